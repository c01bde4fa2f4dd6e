"""The attention cores and the few-row weight products, each chosen per device and dtype by measurement.

attention.py calls them: grouped_attention (MHA/GQA, and MLA when it decompresses its cache) and latent_attention
(MLA's absorbed decode over its latent cache).

Shape letters: B batch, H query heads, G key/value heads, T new tokens, M query rows (heads x new tokens,
folded), S cache slots, E key width.
"""
import torch
import torch.nn.functional as F


# ---- the cores both attention kinds share -------------------------------------------------------

def grouped_attention(q, k, v, scale: float, mask: torch.Tensor | None, dropout_p: float = 0.0) -> torch.Tensor:
    """Softmax attention of q (B, H, T, E) over k (B, G, S, E) and v (B, G, S, Ev), where G key/value heads each
    serve H / G query heads -> (B, H, T, Ev).

    mask None: T == S and attention is causal (training, or a prefill without a cache). Otherwise mask is an
    additive float mask (B, 1, T, S) (0 where a query may look, -inf where not) and the query heads of each
    key/value head are folded into the query axis, so that every key and value is read once per key/value
    head and never copied per query head."""
    B, H, T, E = q.shape
    G = k.size(1)
    group = H // G
    if mask is None:
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
    q = q.reshape(B, G, group * T, E)
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=fold_mask(mask, group), dropout_p=dropout_p, scale=scale)
    return y.reshape(B, H, T, -1)  # SDPA on CUDA may return the folded rows non-contiguous


def fold_mask(mask: torch.Tensor, heads: int) -> torch.Tensor:
    """The mask (B, 1, T, S) of T queries, for heads * T queries folded head-major (row h * T + t takes query t's
    mask); with T == 1 the mask broadcasts as it is."""
    return mask if mask.size(2) == 1 else mask.repeat(1, 1, heads, 1)


def attention_matmul(q, k, v, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q k^T * scale + mask) v as two matmuls in the inputs' dtype, the softmax between them in float32:
    q (B, G, M, E), k (B, G, S, E), v (B, G, S, Ev), mask (B, 1, M or 1, S) additive -> (B, G, M, Ev)."""
    scores = torch.matmul(q * scale, k.transpose(-1, -2)).float() + mask
    return torch.matmul(scores.softmax(dim=-1).to(v.dtype), v)


# ---- MLA's absorbed decode attention ------------------------------------------------------------

def latent_attention(q: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(q latent^T * scale + mask) latent for one key/value head shared by every query row:
    q (B, 1, M, E), latent (B, 1, S, E), mask (B, 1, M or 1, S) -> (B, 1, M, E). The caller keeps the first r
    columns (c_KV's part). Both formulations read the cache in place and put the scale on the query.

    On the CPU, SDPA's fused kernel: it takes key and value of one width only, so the whole latent goes in as
    the value (with a narrower value slice SDPA falls back to its math path, which rescales the whole cache at
    every step: 3-7x slower at batch 8 and 4,096 positions on the 2-core dev CPU). On CUDA that kernel does not
    exist for widths over 256 and the one that does runs one thread block per batch row, so two matmuls,
    spread over every SM by cuBLAS, with the softmax between them in float32."""
    if latent.device.type == "cuda":
        return attention_matmul(q, latent, latent, mask, scale)
    return F.scaled_dot_product_attention(q, latent, latent, attn_mask=mask.to(q.dtype), scale=scale)
