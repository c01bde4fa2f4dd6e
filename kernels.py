"""The attention cores and the few-row weight products, each chosen per device and dtype by measurement.

attention.py calls them: grouped_attention (MHA/GQA, and MLA when it decompresses its cache) and latent_attention
(MLA's absorbed decode over its latent cache); Linear is every projection of every variant, and the LM head.

Shape letters: B batch, H query heads, G key/value heads, T new tokens, M query rows (heads x new tokens,
folded), S cache slots, E key width, C context chunks.
"""
import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import create_block_mask, flex_attention


@torch._dynamo.assume_constant_result
def threads() -> int:
    """torch.get_num_threads(), read as a constant when torch.compile traces a step (it would break the graph
    otherwise): a compiled step keeps the thread count it was traced with."""
    return torch.get_num_threads()


def visible(slot, query_slot, pad):
    """Whether the query at cache slot query_slot reads slot, in a row of the cache whose first pad slots are
    padding: it reads the slots pad .. query_slot, and a padding slot's query only itself (so that its unused
    output stays finite). Elementwise, broadcasting: model.Cache makes its additive mask from it, and
    flex_latent_attention its block mask."""
    return (slot <= query_slot) & ((slot >= pad) | (slot == query_slot))


# ---- the cores both attention kinds share -------------------------------------------------------

def grouped_attention(q, k, v, scale: float, mask: torch.Tensor | None, dropout_p: float = 0.0) -> torch.Tensor:
    """Softmax attention of q (B, H, T, E) over k (B, G, S, E) and v (B, G, S, Ev), where G key/value heads each
    serve H / G query heads -> (B, H, T, Ev).

    mask None: T == S and attention is causal (training, or a prefill without a cache). Otherwise mask is an
    additive float mask (B, 1, T, S) (0 where a query may look, -inf where not) and the query heads of each
    key/value head are folded into the query axis, so that every key and value is read once per key/value
    head and never copied per query head: SDPA, or for a decode step in bfloat16 on the CPU two matmuls."""
    B, H, T, E = q.shape
    G = k.size(1)
    group = H // G
    if mask is None:
        if group > 1:
            k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale)
    q, mask = q.reshape(B, G, group * T, E), fold_mask(mask, group)
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and T == 1 and not dropout_p:
        # A decode step in bfloat16 on the CPU takes two matmuls. Per layer, 2 threads, OMP_WAIT_POLICY=PASSIVE,
        # 7 rounds, on the shared 2-core AMD EPYC (Zen 5) dev VM under contention (loadavg 6.4-10.5) (issue 18's
        # prototype, sweep_attention.py --kind mha|gqa --dtype bfloat16|float32 --contexts 2048 16384 --batches
        # 1 8 --rounds 7), two matmuls with a float32 softmax against SDPA's bfloat16 CPU path, medians of
        # per-round ratios: MHA 2.97x (batch 1 x 2K), 4.06x (1 x 16K), 4.34x (8 x 2K), 4.33x (8 x 16K); GQA
        # 0.76x at 1 x 2K (1.29x by the 10th percentile of calls), 1.08x at 1 x 16K, 1.70x at 8 x 2K, 1.21x at
        # 8 x 16K. In float32 SDPA stays: MHA 1.06-1.26x and GQA 0.71-1.21x, within the noise. One new token
        # only, as measured (a prefill's T x S scores in float32 can take gigabytes), and without dropout.
        y = attention_matmul(q, k, v, mask, scale)
    else:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p, scale=scale)
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

def latent_attention(q: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor, pad: torch.Tensor,
                     input_pos: torch.Tensor, scale: float, r: int) -> torch.Tensor:
    """softmax(q latent^T * scale + mask) c_KV for one key/value head [c_KV | k_rope] shared by every query row:
    q (B, 1, M, E) with its rows folded head-major (row h * T + t: head h, new token t), latent (B, 1, S, E)
    read in place, mask (B, 1, M or 1, S) additive, and the same visibility as the cache's left padding pad (B,)
    and the new tokens' slots input_pos (T,) -> (B, 1, M, r), c_KV's r columns. Every formulation puts the
    scale on the query.

    On CUDA, in a compiled step flex_latent_attention: one fused pass over the latent, split over the context
    (chosen by design, not measured: no GPU was lent to issue 18, and benchmarks/gpu_decode.py races it against
    the two matmuls). In an eager step, where flex_attention is not fused, two matmuls spread over every SM by
    cuBLAS with the softmax between them in float32: SDPA's fused CUDA kernels take no width over 256, and the
    one that does runs one thread block per batch row.

    On the CPU, SDPA's fused kernel, split over the context when the batch leaves threads idle (latent_chunks),
    or in bfloat16 at batch 8 and more two matmuls. The fused kernel takes key and value of one width only, so
    the whole latent goes in as the value (with a narrower value slice SDPA falls back to its math path, which
    rescales the whole cache at every step: 3-7x slower at batch 8 and 4,096 positions on the 2-core dev CPU)."""
    if latent.device.type == "cuda":
        if torch.compiler.is_compiling():
            return flex_latent_attention(q, latent, pad, input_pos, scale, r)
        return attention_matmul(q, latent, latent, mask, scale)[..., :r]
    cpu = latent.device.type == "cpu"
    if cpu and q.dtype == torch.bfloat16 and q.size(0) >= 8:
        # Per layer, q 12 x 288, bfloat16, 2 threads, OMP_WAIT_POLICY=PASSIVE, 7 rounds, on the shared 2-core AMD
        # EPYC (Zen 5) dev VM under contention (loadavg 6.4-10.5) (issue 18's prototype, sweep_attention.py
        # --kind mla --dtype bfloat16 --contexts 2048 16384 --batches 1 8 --matmul --rounds 7), two matmuls with
        # a float32 softmax against the fused kernel, medians of per-round ratios: 1.81x at batch 8 x 2K, 1.63x
        # at 8 x 16K, but 0.74x at batch 1 x 2K and 0.67x at 1 x 16K, where the fused kernel split in 2 chunks
        # tied the unsplit one (1.00x at 16K). Batches between 1 and 8 were not measured.
        return attention_matmul(q, latent, latent, mask, scale)[..., :r]
    chunks = latent_chunks(q.size(0), latent.size(2), threads(), q.dtype) if cpu else 1
    return split_latent_attention(q, latent, mask, scale, chunks)[..., :r]


def flex_latent_attention(q: torch.Tensor, latent: torch.Tensor, pad: torch.Tensor, input_pos: torch.Tensor,
                          scale: float, r: int) -> torch.Tensor:
    """latent_attention as one flex_attention pass: q (B, 1, M, E) with its rows folded head-major, latent
    (B, 1, S, E), pad (B,), input_pos (T,) -> (B, 1, M, r). Fused only when compiled.

    A batch row's M query rows are one query head against the one key head, so that every tile of the latent is
    read once for all heads (CUDA's flex-decoding template, which splits the context over thread blocks, wants
    query heads / key heads a power of two: 12 / 1 is not, 1 / 1 is); the value is the latent's first r
    columns, a view. The block mask is computed from pad and input_pos, the step's inputs (inductor's CPU
    template refuses a mask that reads a tensor computed inside the graph, as the additive mask is), and it
    skips the blocks of slots no query reads."""
    B, _, M, _ = q.shape
    T = input_pos.size(0)

    def mask_mod(b, h, row, slot):  # row h * T + t is new token t
        return visible(slot, input_pos[row % T], pad[b])

    block_mask = create_block_mask(mask_mod, B, 1, M, latent.size(2), device=latent.device)
    return flex_attention(q, latent, latent[..., :r], block_mask=block_mask, scale=scale)


def latent_chunks(batch: int, slots: int, threads: int, dtype: torch.dtype = torch.float32) -> int:
    """How many context chunks split_latent_attention takes for batch rows over slots cache slots on threads
    threads: 1 (no split) when the batch gives every thread a row, else enough that every thread has a chunk,
    never chunks of fewer than 1,024 slots in float32, 8,192 in bfloat16."""
    # The whole gpt2-small decode step, batch 1, 2 threads, default OpenMP policy, on the 2-core AMD EPYC (Zen 5)
    # dev VM with nothing else running (load average 1.5-2.3), 3 rounds interleaved with the unsplit kernel's
    # commit (benchmarks/bench_decode.py, results/decode-cpu-2026-12-01.md): MLA with the split (and the chunked
    # LM head) against the unsplit kernel, float32: 1.14x at 2K, 1.23x at 16K, 1.35x at 32K; bfloat16 with the
    # split from 1,024 slots: 0.88x at 2K [0.87-0.93], 1.24x at 16K, 1.20x at 32K. Earlier, per layer under
    # contention (the prototype's sweep_attention.py): 2 chunks 0.72x at 512 slots, 1.20-1.43x from 2K to 32K;
    # 4 and 8 chunks no better than 2; at batch 8, 0.82-0.98x for every chunk count.
    if batch >= threads:
        return 1
    shortest = 1024 if dtype == torch.float32 else 8192
    return max(1, min(math.ceil(threads / batch), slots // shortest))


_flash_attention_cpu = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu  # SDPA's fused CPU kernel, + LSE


def split_latent_attention(q: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor, scale: float,
                           chunks: int) -> torch.Tensor:
    """latent_attention on SDPA's fused kernel with the S slots cut into chunks pieces laid out as its heads, so
    that the kernel, which shares its work out by batch x heads x query blocks, has B x chunks pieces instead of
    B: q (B, 1, M, E), latent (B, 1, S, E) read in place, mask (B, 1, M or 1, S) additive, 1 <= chunks <= S
    -> (B, 1, M, E). chunks 1 is the unsplit kernel (on any device).

    Every chunk is attended by all M rows (q is broadcast over the chunks, not copied), and the kernel's per-row
    log-sum-exps merge the chunks exactly (combine_chunks)."""
    if chunks == 1:
        return F.scaled_dot_product_attention(q, latent, latent, attn_mask=mask.to(q.dtype), scale=scale)
    B, _, M, E = q.shape
    keys = context_chunks(latent, chunks)  # (B, C, L, E)
    chunk_mask = mask_chunks(mask.to(q.dtype), chunks)  # (B, C, M or 1, L)
    out, lse = _flash_attention_cpu(q.expand(B, chunks, M, E), keys, keys, attn_mask=chunk_mask, scale=scale)
    return combine_chunks(out, lse, (chunk_mask > -math.inf).any(dim=-1))


def context_chunks(latent: torch.Tensor, chunks: int) -> torch.Tensor:
    """The latent (B, 1, S, E) as chunks pieces along its slots, a view (no copy) -> (B, C, S // C + S % C, E).

    Chunk i starts at slot i * (S // C) and all are S // C + S % C long, so that the last one ends at slot S - 1
    and none reads past the cache: neighbours overlap by S % C slots, which mask_chunks hides in the later one."""
    B, _, S, E = latent.shape
    step = S // chunks
    return latent.as_strided((B, chunks, step + S % chunks, E),  # keeps latent's storage offset
                             (latent.stride(0), step * latent.stride(2), latent.stride(2), latent.stride(3)))


def mask_chunks(mask: torch.Tensor, chunks: int) -> torch.Tensor:
    """The additive mask (B, 1, M or 1, S) cut as context_chunks cuts the latent -> (B, C, M or 1, L), with the
    slots that a chunk shares with the one before it hidden, so that every slot counts once. A copy only when
    chunks overlap."""
    B, _, rows, S = mask.shape
    step, overlap = S // chunks, S % chunks
    view = mask.as_strided((B, chunks, rows, step + overlap),
                           (mask.stride(0), step * mask.stride(3), mask.stride(2), mask.stride(3)))
    if overlap:
        view = view.clone()
        view[:, 1:, :, :overlap] = -math.inf
    return view


def combine_chunks(out: torch.Tensor, lse: torch.Tensor, visible: torch.Tensor) -> torch.Tensor:
    """Merge C softmax attentions of the same rows over different slots by their log-sum-exps: out (B, C, M, E),
    lse (B, C, M) float32, visible (B, C, M or 1) whether the row saw any slot of the chunk -> (B, 1, M, E) in
    out's dtype.

    The fused CPU kernel returns output 0 and log-sum-exp 0 (not -inf) for a row that sees no slot of its chunk,
    so visible, from the mask, decides which chunks count. A row that sees no slot at all comes out 0, as the
    unsplit kernel gives it, never NaN."""
    lse = lse.masked_fill(~visible, -math.inf)
    top = lse.amax(dim=1, keepdim=True)
    top = top.masked_fill(top == -math.inf, 0.0)  # every chunk hidden: every weight is exp(-inf) = 0
    weight = torch.exp(lse - top)  # (B, C, M)
    total = weight.sum(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.einsum("bcm,bcme->bme", weight / total, out.float()).unsqueeze(1).to(out.dtype)


# ---- weight products of few rows ----------------------------------------------------------------

class Linear(nn.Linear):
    """nn.Linear without bias (the same parameter, so the same state dict) whose product on the CPU is
    chunked_linear where linear_chunks measured that faster: a decode step's few rows against a large weight."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., in_features) -> (..., out_features)."""
        rows = x.numel() // x.size(-1)
        chunks = linear_chunks(rows, *self.weight.shape, x.dtype, threads()) if x.device.type == "cpu" else 1
        return chunked_linear(x, self.weight, chunks) if chunks > 1 else F.linear(x, self.weight)


def linear_chunks(rows: int, out_features: int, in_features: int, dtype: torch.dtype, threads: int) -> int:
    """How many blocks of output rows chunked_linear cuts an (out_features, in_features) weight into, for rows
    input rows on threads threads; 1 is plain F.linear. Float32 only; at one row, two blocks per thread for every
    weight of 2^17 values or more; at 2-8 rows, 8 blocks for weights of 2^19 values or more with 1,024 output
    rows or more (LM head, q_b_proj, kv_b_proj, FFN gate and up); always a count that divides out_features."""
    # Per weight of gpt2-small, 2 threads, each call after streaming 64 MiB (so that the weight comes from DRAM,
    # as in a step), median of 30 interleaved rounds, on the 2-core AMD EPYC (Zen 5) dev VM with nothing else
    # running (results/decode-cpu-2026-12-01.md). Float32, one row, F.linear (MKL's SGEMV) against 4 blocks: LM
    # head (50304 x 768) 9.07 -> 3.42 ms (17 -> 45 GB/s), FFN gate/up 0.360 -> 0.143 ms, FFN down 0.281 -> 0.149,
    # o_proj 0.148 -> 0.075, kv_b_proj 0.221 -> 0.093, q_b_proj 0.209 -> 0.095, kv_a_proj (288 x 768) 0.070 ->
    # 0.060; 2 blocks gained less (LM head 3.59 ms). Float32, 8 rows, 8 blocks: LM head 2.3x, kv_b_proj 1.8x,
    # FFN gate/up 1.25x, q_b_proj 1.2x, o_proj and MHA's projections 1.1-1.2x, FFN down 0.88x. Bfloat16 (oneDNN),
    # one row: F.linear already reads the LM head at 60 GB/s, and every chunked form loses (0.5-0.7x).
    if threads == 1 or dtype != torch.float32 or rows > 8:
        return 1
    weights = out_features * in_features
    if rows == 1:
        chunks = 2 * threads if weights >= 2**17 else 1
    else:
        chunks = 8 if weights >= 2**19 and out_features >= 1024 else 1
    while out_features % chunks:
        chunks //= 2
    return chunks


def chunked_linear(x: torch.Tensor, weight: torch.Tensor, chunks: int) -> torch.Tensor:
    """F.linear(x, weight) with weight's O output rows cut into chunks equal blocks multiplied as one bmm, which
    hands the blocks to the threads: x (..., K), weight (O, K) with O divisible by chunks -> (..., O). Each
    output is F.linear's dot product, up to the order of the float sums. (torch.matmul of the 3-D blocks by a
    2-D matrix folds them back into one mm; bmm with the rows expanded over the blocks keeps them apart.)"""
    *lead, K = x.shape
    O = weight.size(0)
    rows = x.reshape(-1, K)  # (N, K)
    y = torch.bmm(weight.view(chunks, O // chunks, K), rows.t().expand(chunks, K, rows.size(0)))  # (C, O / C, N)
    return y.permute(2, 0, 1).reshape(*lead, O)
