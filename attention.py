"""RoPE, the per-layer KV cache, Multi-Head Latent Attention, and the MHA/GQA baselines.

Shape letters: B batch, T new tokens, S cached + new tokens (keys), H query heads, G key/value heads,
r kv_lora_rank, dn qk_nope_head_dim, dr qk_rope_head_dim, dv v_head_dim, D model width.
"""
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from kernels import Linear, fold_mask, grouped_attention, latent_attention
from model_config import ModelConfig, softmax_scale, yarn_mscale


# ---- rotary position embedding ------------------------------------------------------------------

def rope_tables(rope_dim: int, max_len: int, theta: float,
                scaling: ModelConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's rotation angles, each (max_len, rope_dim / 2), in float32.

    With scaling's rope_scaling "yarn", the angles are YaRN's and both tables carry its attention factor
    mscale(factor, mscale) / mscale(factor, mscale_all_dim), as in DeepSeek-V2's and transformers' code."""
    inv_freq = theta ** (-torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim)
    attention_factor = 1.0
    if scaling is not None and scaling.rope_scaling == "yarn":
        inv_freq = yarn_inv_freq(inv_freq, theta, scaling)
        factor = scaling.rope_factor
        attention_factor = yarn_mscale(factor, scaling.mscale) / yarn_mscale(factor, scaling.mscale_all_dim)
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)
    return (angles.cos() * attention_factor).float(), (angles.sin() * attention_factor).float()


def yarn_inv_freq(inv_freq: torch.Tensor, theta: float, c: ModelConfig) -> torch.Tensor:
    """YaRN's "NTK-by-parts" frequencies (arXiv 2309.00071, section 3.2) for inv_freq (rope_dim / 2,).

    Over the original_seq_len positions trained at, pair i turns L / (2 pi / inv_freq[i]) times. Pairs that turn
    more than beta_fast times keep their frequency (extrapolation), those that turn fewer than beta_slow times are
    divided by rope_factor (interpolation), and a linear ramp over the pair index blends the two in between. The
    ramp's ends are rounded outwards to whole pairs, as DeepSeek's and transformers' code do."""
    rope_dim = 2 * inv_freq.numel()

    def pair_turning(turns: float) -> float:  # the (fractional) pair index that turns this often over L
        return rope_dim * math.log(c.original_seq_len / (2 * math.pi * turns)) / (2 * math.log(theta))

    low = max(math.floor(pair_turning(c.beta_fast)), 0)
    high = min(math.ceil(pair_turning(c.beta_slow)), rope_dim - 1)
    if low == high:
        high += 0.001  # as the reference code: avoids dividing by zero
    ramp = ((torch.arange(inv_freq.numel(), dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    return torch.lerp(inv_freq, inv_freq / c.rope_factor, ramp)  # exactly inv_freq when rope_factor is 1


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (..., T, dr) by the angles of its T positions, cos/sin (..., T, dr/2) broadcasting against x.

    Pairs are (i, i + dr/2): the "half-split" layout of GPT-NeoX and Llama, not interleaved pairs."""
    x1, x2 = x.float().chunk(2, dim=-1)
    rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return rotated.type_as(x)


# ---- cache --------------------------------------------------------------------------------------

class LayerCache:
    """One layer's preallocated decode cache: its tensors have a fixed capacity of positions along dim -2.

    MLA keeps a single (B, capacity, r + dr) tensor: [c_KV | k_rope] per token.
    MHA/GQA keep K and V, each (B, G, capacity, head_dim).
    The cache holds no length: the caller says which slots each call writes (input_pos), and the attention
    mask says which slots each query reads. It keeps each row's left padding pad (B,), the same tensor in every
    layer of a model.Cache, for the kernels that make the mask themselves (flex_attention on CUDA)."""

    def __init__(self, shapes: list[tuple[int, ...]], dtype: torch.dtype, device, pad: torch.Tensor):
        self.tensors = [torch.zeros(shape, dtype=dtype, device=device) for shape in shapes]
        for tensor in self.tensors:  # a fixed address, so a compiled decode step can be captured as a CUDA graph
            torch._dynamo.mark_static_address(tensor)
        self.pad = pad

    @property
    def capacity(self) -> int:
        return self.tensors[0].size(-2)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def write(self, input_pos: torch.Tensor, *new: torch.Tensor) -> list[torch.Tensor]:
        """Store T new positions (..., T, :) of each tensor at slots input_pos (T,); return the whole tensors."""
        for buffer, values in zip(self.tensors, new):
            buffer.index_copy_(buffer.dim() - 2, input_pos, values.to(buffer.dtype))
        return self.tensors


# ---- Multi-Head Latent Attention ----------------------------------------------------------------

class RowBlock(NamedTuple):
    """One matrix inside a stacked weight: its part's name, its number of rows, and whether RoPE rotates the
    vector it makes (its rows are then RoPE's half-split pairs (i, i + rows / 2))."""
    part: str
    rows: int
    rotary: bool = False


class MultiHeadLatentAttention(nn.Module):
    """DeepSeek-V2's MLA (arXiv 2405.04434, section 2.1), with DeepSeek's projection names.

    Training and prefill decompress c_KV into per-head keys and values. Decoding caches only the normalised
    c_KV and the rotated, head-shared k_rope, and attends over them by weight absorption."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.n_head, self.r, self.dr = c.n_head, c.kv_lora_rank, c.qk_rope_head_dim
        self.dn, self.dv = c.qk_nope_head_dim, c.v_head_dim
        self.q_lora_rank = c.q_lora_rank
        self.scale = softmax_scale(c, self.dn + self.dr)
        self.dropout = c.dropout
        # Decoding with a cache takes the absorbed path when it costs fewer FLOPs than decompressing the cache:
        # per cached position and head, absorbed costs T * 2(r + dr) multiply-adds for T new queries, and
        # decompressing costs r * (dn + dv) + T * (dn + dr + dv). So prefill decompresses, decoding absorbs.
        self.max_absorbed_queries = self.r * (self.dn + self.dv) // max(2 * self.r + self.dr - self.dn - self.dv, 1)
        q_out = c.n_head * (self.dn + self.dr)
        if c.q_lora_rank:
            self.q_a_proj = Linear(c.d_model, c.q_lora_rank)  # W_DQ
            self.q_a_layernorm = nn.RMSNorm(c.q_lora_rank, eps=c.norm_eps)
            self.q_b_proj = Linear(c.q_lora_rank, q_out)  # W_UQ (and W_QR)
        else:
            self.q_proj = Linear(c.d_model, q_out)
        self.kv_a_proj_with_mqa = Linear(c.d_model, self.r + self.dr)  # W_DKV and W_KR
        self.kv_a_layernorm = nn.RMSNorm(self.r, eps=c.norm_eps)
        self.kv_b_proj = Linear(self.r, c.n_head * (self.dn + self.dv))  # W_UK and W_UV
        self.o_proj = Linear(c.n_head * self.dv, c.d_model)  # W_O

    def cache_shapes(self, batch_size: int, capacity: int) -> list[tuple[int, ...]]:
        return [(batch_size, capacity, self.r + self.dr)]

    def stacked_rows(self) -> dict[str, list[RowBlock]]:
        """The matrices stacked into one weight, by weight name within this module, each weight's row blocks in
        order: q_b_proj (q_proj without query compression) holds every head's W_UQ then W_QR rows,
        kv_a_proj_with_mqa W_DKV then the shared W_KR, kv_b_proj every head's W_UK then W_UV."""
        query = "q_b_proj" if self.q_lora_rank else "q_proj"
        per_head_query = [RowBlock("q_nope", self.dn), RowBlock("q_rope", self.dr, rotary=True)]
        return {f"{query}.weight": per_head_query * self.n_head,
                "kv_a_proj_with_mqa.weight": [RowBlock("c_kv", self.r), RowBlock("k_rope", self.dr, rotary=True)],
                "kv_b_proj.weight": [RowBlock("k_nope", self.dn), RowBlock("v", self.dv)] * self.n_head}

    def head_weights(self) -> dict[str, torch.Tensor]:
        """Every row block of stacked_rows, by part, one per head, and W_O by head: q_nope (H, dn, Dq) and q_rope
        (H, dr, Dq) (Dq is q_lora_rank, or D without query compression), c_kv (1, r, D) and k_rope (1, dr, D)
        (shared by all heads), k_nope (H, dn, r), v (H, dv, r), o (D, H, dv). RoPE turns pairs (i, i + dr/2) of
        q_rope and k_rope. Detached views of the weights."""
        parts = {}
        for name, blocks in self.stacked_rows().items():
            rows = self.get_parameter(name).detach().split([block.rows for block in blocks])
            for block, weight in zip(blocks, rows):
                parts.setdefault(block.part, []).append(weight)
        heads = {part: torch.stack(weights) for part, weights in parts.items()}
        return heads | {"o": self.o_proj.weight.detach().view(-1, self.n_head, self.dv)}

    @torch.no_grad()
    def load_head_weights(self, heads: dict[str, torch.Tensor]) -> None:
        """Set the projections from weights by part and head, as head_weights returns them."""
        for name, blocks in self.stacked_rows().items():
            parts = {part: iter(weights) for part, weights in heads.items()}  # each part's next head
            self.get_parameter(name).copy_(torch.cat([next(parts[block.part]) for block in blocks]))
        self.o_proj.weight.copy_(heads["o"].reshape_as(self.o_proj.weight))

    def forward(self, x, cos, sin, mask=None, cache: LayerCache | None = None, input_pos=None,
                absorb: bool = True) -> torch.Tensor:
        """x (B, T, D), cos/sin (B or 1, T, dr/2) for the T new positions -> (B, T, D).

        Without a cache: causal attention over x's own T positions, on decompressed keys and values. With one:
        [c_KV | k_rope] of the new positions is written at slots input_pos (T,), and the queries attend over the
        whole cache under mask (B, 1, T, capacity): absorbed where that costs fewer FLOPs, unless absorb is
        False (always decompress: the decode benchmark's reference row)."""
        B, T, _ = x.shape
        q_nope, q_rope = self.queries(x, cos, sin)
        c_kv, k_rope = self.latent_kv(x, cos, sin)
        if cache is None:
            y = self.attend_decompressed(q_nope, q_rope, c_kv, k_rope, None)
        else:
            (latent,) = cache.write(input_pos, torch.cat((c_kv, k_rope), dim=-1))  # (B, capacity, r + dr)
            if absorb and T <= self.max_absorbed_queries:
                y = self.attend_absorbed(q_nope, q_rope, latent, mask, cache.pad, input_pos)
            else:
                y = self.attend_decompressed(q_nope, q_rope, *latent.split([self.r, self.dr], dim=-1), mask)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))

    def queries(self, x, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> q_nope (B, H, T, dn) and rotated q_rope (B, H, T, dr)."""
        B, T, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora_rank else self.q_proj(x)
        q_nope, q_rope = q.view(B, T, self.n_head, self.dn + self.dr).transpose(1, 2).split([self.dn, self.dr], -1)
        return q_nope, apply_rope(q_rope, cos.unsqueeze(1), sin.unsqueeze(1))

    def latent_kv(self, x, cos, sin) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D) -> normalised c_KV (B, T, r) and rotated k_rope (B, T, dr), one key for all heads.

        RMSNorm applies to c_KV only, never to k_rope."""
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.r, self.dr], dim=-1)
        return self.kv_a_layernorm(c_kv), apply_rope(k_rope, cos, sin)

    def attend_decompressed(self, q_nope, q_rope, c_kv, k_rope, mask) -> torch.Tensor:
        """Decompress c_KV into per-head keys and values, then attend.

        q_nope (B, H, T, dn), q_rope (B, H, T, dr), c_kv (B, S, r), k_rope (B, S, dr), mask None (causal, S == T)
        or (B, 1, T, S) -> (B, H, T, dv)."""
        B, S, _ = c_kv.shape
        kv = self.kv_b_proj(c_kv.to(q_nope.dtype)).view(B, S, self.n_head, self.dn + self.dv).transpose(1, 2)
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)  # (B, H, S, dn), (B, H, S, dv)
        k_rope = k_rope.to(q_rope.dtype).unsqueeze(1).expand(B, self.n_head, S, self.dr)
        k = torch.cat((k_nope, k_rope), dim=-1)
        q = torch.cat((q_nope, q_rope), dim=-1)
        dropout_p = self.dropout if self.training else 0.0
        # SDPA's fused (flash) kernels want values as wide as keys: pad v with zeros and drop them after.
        y = grouped_attention(q, k, F.pad(v, (0, self.dn + self.dr - self.dv)), self.scale, mask, dropout_p)
        return y[..., :self.dv]

    def attend_absorbed(self, q_nope, q_rope, latent, mask, pad, input_pos) -> torch.Tensor:
        """Attend over the latent cache without decompressing it: W_UK is absorbed into the query, and W_UV is
        applied after the probabilities are reduced against c_KV. This is multi-query attention with one key
        [c_KV | k_rope] of width r + dr per position, read in place from the cache.

        q_nope (B, H, T, dn), q_rope (B, H, T, dr), latent = [c_KV | k_rope] (B, S, r + dr), mask (B, 1, T, S),
        and the same visibility as the cache's left padding pad (B,) and the new tokens' slots input_pos (T,)
        -> (B, H, T, dv)."""
        B, H, T, _ = q_nope.shape
        w_uk, w_uv = self.kv_b_proj.weight.view(H, self.dn + self.dv, self.r).split([self.dn, self.dv], 1)
        q_latent = torch.einsum("bhtn,hnr->bhtr", q_nope, w_uk)  # (B, H, T, r)
        q = torch.cat((q_latent, q_rope), dim=-1).to(latent.dtype)  # (B, H, T, r + dr)
        o_latent = latent_attention(q.reshape(B, 1, H * T, self.r + self.dr), latent.unsqueeze(1), fold_mask(mask, H),
                                    pad, input_pos, self.scale, self.r)  # (B, 1, H * T, r)
        return torch.einsum("bhtr,hvr->bhtv", o_latent.reshape(B, H, T, self.r).to(w_uv.dtype), w_uv)


# ---- baselines ----------------------------------------------------------------------------------

class GroupedQueryAttention(nn.Module):
    """Multi-head attention with G key/value heads shared by groups of query heads: G = H is standard MHA,
    G < H is GQA. RoPE rotates the whole head; decoding caches K and V for every key/value head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv, self.hd = config.n_head, config.kv_heads, config.head_dim
        # Under YaRN the baselines take MLA's two factors too. RoPE turns their whole head, so the cos/sin factor
        # reaches every logit squared, and with the softmax's both give mscale(factor, mscale)^2: the YaRN paper's
        # temperature on every logit, as MLA gets when mscale = mscale_all_dim (DeepSeek's released configs).
        self.scale = softmax_scale(config, self.hd)
        self.dropout = config.dropout
        self.q_proj = Linear(config.d_model, self.n_head * self.hd)
        self.k_proj = Linear(config.d_model, self.n_kv * self.hd)
        self.v_proj = Linear(config.d_model, self.n_kv * self.hd)
        self.o_proj = Linear(self.n_head * self.hd, config.d_model)

    def cache_shapes(self, batch_size: int, capacity: int) -> list[tuple[int, ...]]:
        return [(batch_size, self.n_kv, capacity, self.hd)] * 2

    def stacked_rows(self) -> dict[str, list[RowBlock]]:
        """No weight here stacks matrices that are stepped apart: each projection is one matrix to the optimiser."""
        return {}

    def head_weights(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The projections by head: q (H, hd, D), k and v (G, hd, D), o (D, H, hd). Query head h attends with
        key/value head h // (H / G); RoPE turns pairs (i, i + hd/2) of q and k, pair i at theta^(-2i / hd).
        Detached views of the weights."""
        D = self.q_proj.in_features
        return (self.q_proj.weight.detach().view(self.n_head, self.hd, D),
                self.k_proj.weight.detach().view(self.n_kv, self.hd, D),
                self.v_proj.weight.detach().view(self.n_kv, self.hd, D),
                self.o_proj.weight.detach().view(D, self.n_head, self.hd))

    def forward(self, x, cos, sin, mask=None, cache: LayerCache | None = None, input_pos=None,
                absorb: bool = True) -> torch.Tensor:
        """x (B, T, D), cos/sin (B or 1, T, hd/2) -> (B, T, D); q (B, H, T, hd) attends over k, v (B, G, S, hd):
        x's own T positions, causally, without a cache; with one, the whole cache (S = capacity) under mask
        (B, 1, T, S), after the new positions are written at slots input_pos (T,). absorb is MLA's; it changes
        nothing here."""
        B, T, _ = x.shape
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
        q = apply_rope(self.q_proj(x).view(B, T, self.n_head, self.hd).transpose(1, 2), cos, sin)
        k = apply_rope(self.k_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2), cos, sin)
        v = self.v_proj(x).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        if cache is not None:
            k, v = (t.to(q.dtype) for t in cache.write(input_pos, k, v))
        dropout_p = self.dropout if self.training else 0.0
        y = grouped_attention(q, k, v, self.scale, mask, dropout_p)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


def build_attention(config: ModelConfig) -> nn.Module:
    return MultiHeadLatentAttention(config) if config.attention == "mla" else GroupedQueryAttention(config)
