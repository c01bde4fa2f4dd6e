"""kernels.py against references, in float32 with tight tolerances on the CPU: the latent attention split over the
context (padding, several new tokens, chunks that see nothing), the chunked weight products, and the rules that
choose them."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.profiler import profile

import kernels
from conftest import random_tokens, tiny_model
from kernels import (chunked_linear, combine_chunks, context_chunks, latent_chunks, linear_chunks, mask_chunks,
                     split_latent_attention)

TIGHT = dict(atol=2e-6, rtol=2e-6)


def reference_latent_attention(q, latent, mask, scale):
    """softmax(q latent^T * scale + mask) latent in float64: q (B, 1, M, E), latent (B, 1, S, E), mask
    (B, 1, M or 1, S) -> (B, 1, M, E); a row that sees no slot gives 0, as SDPA's fused CPU kernel does."""
    scores = (q.double() @ latent.double().transpose(-1, -2)) * scale + mask.double()
    return torch.nan_to_num(scores.softmax(dim=-1), nan=0.0) @ latent.double()


def decode_mask(pad: list[int], first_slot: int, queries: int, slots: int, heads: int) -> torch.Tensor:
    """model.Cache's additive mask for queries at slots first_slot .. first_slot + queries - 1 of rows left-padded
    by pad, folded for heads query heads as attend_absorbed folds it: (B, 1, heads * queries or 1, slots)."""
    mask = torch.full((len(pad), 1, queries, slots), -math.inf)
    for b, p in enumerate(pad):
        for t in range(queries):
            mask[b, 0, t, p:first_slot + t + 1] = 0.0
    return kernels.fold_mask(mask, heads)


# ---- the latent attention split over the context ------------------------------------------------

@pytest.mark.parametrize("rows_per_mask", [1, 12])
def test_the_two_matmuls_equal_the_reference(rows_per_mask):
    torch.manual_seed(0)
    q, latent = torch.randn(2, 1, 12, 40), torch.randn(2, 1, 50, 40)
    mask = torch.zeros(2, 1, rows_per_mask, 50)
    mask[0, ..., 30:] = -math.inf
    mask[1, ..., :7] = -math.inf
    torch.testing.assert_close(kernels.attention_matmul(q, latent, latent, mask, 0.3).double(),
                               reference_latent_attention(q, latent, mask, 0.3), **TIGHT)


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("new_tokens", [1, 4])
@pytest.mark.parametrize("slots", [64, 67, 1000])  # 67 and 1000: not divisible by every chunk count
@pytest.mark.parametrize("chunks", [1, 2, 3, 8])
def test_split_latent_attention_equals_the_reference(batch, new_tokens, slots, chunks):
    torch.manual_seed(slots * 10 + chunks)
    heads, width = 4, 40
    mask = decode_mask([0, 9, 30][:batch], slots - new_tokens - 5, new_tokens, slots, heads)  # 5 unwritten slots
    q, latent = torch.randn(batch, 1, heads * new_tokens, width), torch.randn(batch, 1, slots, width)
    got = split_latent_attention(q, latent, mask, 0.17, chunks)
    assert got.shape == q.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), reference_latent_attention(q, latent, mask, 0.17), **TIGHT)


def test_chunks_are_views_of_the_latent_in_place_even_at_an_offset():
    cache = torch.randn(3, 1, 103, 8)
    latent = cache[1:2]  # a view with a storage offset
    view = context_chunks(latent, 4)
    assert view.data_ptr() == latent.data_ptr() and view.shape == (1, 4, 25 + 3, 8)
    assert torch.equal(view[0, 0, 0], latent[0, 0, 0])  # chunk i starts at slot 25 i ...
    assert torch.equal(view[0, 2, 0], latent[0, 0, 50])
    assert torch.equal(view[0, 3, -1], latent[0, 0, -1])  # ... and the last one ends at the last slot


def test_overlapping_slots_are_counted_once():
    chunked = mask_chunks(torch.zeros(1, 1, 1, 10), 3)  # slots 0-3, 3-6, 6-9
    seen = [3 * c + j for c in range(3) for j in range(4) if chunked[0, c, 0, j] == 0]
    assert sorted(seen) == list(range(10))


def test_chunks_and_rows_that_see_nothing_give_no_nan():
    """Early in a generation most chunks lie past the newest slot; a row may also see nothing at all (not in a
    real cache, where a query sees at least itself, but the merge must not rely on it)."""
    torch.manual_seed(0)
    q, latent = torch.randn(2, 1, 6, 32), torch.randn(2, 1, 4096, 32)
    mask = torch.full((2, 1, 6, 4096), -math.inf)
    mask[0, :, :, :17] = 0.0  # row 0 sees only slots of the first of 8 chunks
    mask[1, :, :3, 2000:2100] = 0.0  # row 1: three rows see one middle chunk, three see nothing
    got = split_latent_attention(q, latent, mask, 0.2, 8)
    assert not got.isnan().any() and (got[1, 0, 3:] == 0).all()
    torch.testing.assert_close(got.double(), reference_latent_attention(q, latent, mask, 0.2), **TIGHT)
    torch.testing.assert_close(got, split_latent_attention(q, latent, mask, 0.2, 1), **TIGHT)


def test_the_merge_ignores_the_kernels_log_sum_exp_of_zero_for_a_chunk_that_sees_nothing():
    out = torch.stack([torch.full((1, 2), 5.0), torch.zeros(1, 2)]).unsqueeze(0)  # (B 1, C 2, M 1, E 2)
    lse = torch.tensor([[[-3.0], [0.0]]])  # the fused kernel's 0 for chunk 1, which saw nothing
    visible = torch.tensor([[[True], [False]]])
    torch.testing.assert_close(combine_chunks(out, lse, visible), torch.full((1, 1, 1, 2), 5.0))


@pytest.mark.parametrize("batch, slots, threads, chunks", [
    (1, 2048, 2, 2), (1, 32768, 2, 2), (1, 1500, 2, 1), (1, 512, 2, 1),  # never chunks under 1,024 slots
    (2, 32768, 2, 1), (8, 32768, 2, 1), (1, 32768, 1, 1),  # the batch already fills the threads
    (3, 32768, 8, 3), (1, 3000, 8, 2),
])
def test_latent_chunks_splits_only_when_the_batch_leaves_threads_idle(batch, slots, threads, chunks):
    assert latent_chunks(batch, slots, threads) == chunks


@pytest.mark.parametrize("slots, chunks", [(2048, 1), (8191, 1), (16384, 2), (32768, 2)])
def test_bfloat16_latent_chunks_are_8192_slots_or_more(slots, chunks):
    assert latent_chunks(1, slots, 2, torch.bfloat16) == chunks


def test_latent_attention_takes_the_split_kernel_where_latent_chunks_says(monkeypatch):
    """The rule wired in: a tiny MLA decode step runs the chunked kernel when latent_chunks asks for chunks."""
    calls = []
    fused = kernels._flash_attention_cpu
    monkeypatch.setattr(kernels, "_flash_attention_cpu", lambda *a, **k: calls.append(a[1].size(1)) or fused(*a, **k))
    monkeypatch.setattr(kernels, "latent_chunks", lambda batch, slots, threads, dtype: 3)
    model = tiny_model()
    model.generate(random_tokens(2, 5), max_new_tokens=2, temperature=0)
    assert calls == [3] * 2 * model.config.n_layer  # the prefill of 5 and one decode step, every layer


# ---- weight products of few rows ----------------------------------------------------------------

@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("out_features, chunks", [(64, 2), (96, 3), (1152, 8), (50304, 2)])
def test_chunked_linear_equals_f_linear(rows, out_features, chunks):
    torch.manual_seed(rows)
    x, weight = torch.randn(rows, 1, 48), torch.randn(out_features, 48)
    got = chunked_linear(x, weight, chunks)
    assert got.shape == (rows, 1, out_features)
    torch.testing.assert_close(got, F.linear(x, weight), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got.double(), x.double() @ weight.double().t(), atol=1e-5, rtol=1e-5)


def test_chunked_linear_really_runs_one_bmm_of_blocks():
    """torch.matmul of the blocks by the rows would fold them into one mm, the product it replaces."""
    with profile() as prof:
        chunked_linear(torch.randn(1, 64), torch.randn(256, 64), 4)
    ops = {event.key for event in prof.key_averages()}
    assert "aten::bmm" in ops and not ops & {"aten::mm", "aten::addmm", "aten::matmul"}


def test_linear_has_nn_linears_state_dict_and_picks_its_product_by_linear_chunks(monkeypatch):
    torch.manual_seed(0)
    plain, linear = nn.Linear(32, 64, bias=False), kernels.Linear(32, 64)
    linear.load_state_dict(plain.state_dict())
    plain.load_state_dict(linear.state_dict())
    assert list(linear.state_dict()) == ["weight"] and isinstance(linear, nn.Linear)
    asked = []
    monkeypatch.setattr(kernels, "linear_chunks", lambda *shape: asked.append(shape[:4]) or 4)
    x = torch.randn(2, 1, 32)
    with profile() as prof:
        y = linear(x)
    assert asked == [(2, 64, 32, torch.float32)] and "aten::bmm" in {e.key for e in prof.key_averages()}
    torch.testing.assert_close(y, plain(x), atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("rows, shape, dtype, threads, chunks", [
    (1, (50304, 768), torch.float32, 2, 4), (1, (2048, 768), torch.float32, 2, 4),  # one row: 2 blocks a thread
    (1, (288, 768), torch.float32, 2, 4), (1, (64, 768), torch.float32, 2, 1),  # under 2^17 values
    (8, (50304, 768), torch.float32, 2, 8), (8, (2048, 768), torch.float32, 2, 8), (4, (1152, 512), torch.float32, 2, 8),
    (8, (768, 2048), torch.float32, 2, 1), (8, (1536, 256), torch.float32, 2, 1),  # FFN down; under 2^19 values
    (9, (50304, 768), torch.float32, 2, 1), (1, (50304, 768), torch.float32, 1, 1),
    (1, (50304, 768), torch.bfloat16, 2, 1), (8, (2048, 768), torch.bfloat16, 2, 1),  # never in bfloat16
    (1, (50257, 768), torch.float32, 2, 1), (1, (50306, 768), torch.float32, 2, 2), (8, (1100, 768), torch.float32, 2, 4),  # a count that divides
])
def test_linear_chunks_follows_the_measurements(rows, shape, dtype, threads, chunks):
    assert linear_chunks(rows, *shape, dtype, threads) == chunks


# ---- the bfloat16 choices -----------------------------------------------------------------------

def taken(monkeypatch, name: str) -> list:
    """Record each call of kernels' function name (still calling it)."""
    calls, original = [], getattr(kernels, name)
    monkeypatch.setattr(kernels, name, lambda *a, **k: calls.append(name) or original(*a, **k))
    return calls


@pytest.mark.parametrize("kv_heads, new_tokens, matmuls", [(4, 1, True), (2, 1, True), (4, 3, False)])
def test_bfloat16_grouped_attention_takes_two_matmuls_at_a_decode_step_and_agrees_with_float32(
        monkeypatch, kv_heads, new_tokens, matmuls):
    torch.manual_seed(0)
    B, H, S, E = 3, 4, 300, 16
    q, k, v = torch.randn(B, H, new_tokens, E), torch.randn(B, kv_heads, S, E), torch.randn(B, kv_heads, S, E)
    mask = torch.full((B, 1, new_tokens, S), -math.inf)
    for b, p in enumerate([0, 40, 7]):
        for t in range(new_tokens):
            mask[b, 0, t, p:S - new_tokens - 2 + t] = 0.0
    calls = taken(monkeypatch, "attention_matmul")
    got = kernels.grouped_attention(*(x.bfloat16() for x in (q, k, v)), 0.25, mask.bfloat16())
    assert got.dtype == torch.bfloat16 and calls == ["attention_matmul"] * matmuls
    expected = kernels.grouped_attention(q, k, v, 0.25, mask)  # float32: SDPA
    torch.testing.assert_close(got.float(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("batch, kernel", [(8, "attention_matmul"), (1, "split_latent_attention")])
def test_bfloat16_latent_attention_takes_two_matmuls_from_batch_8_and_agrees_with_float32(monkeypatch, batch, kernel):
    torch.manual_seed(0)
    q, latent = torch.randn(batch, 1, 12, 288), torch.randn(batch, 1, 2048, 288)
    mask = decode_mask(list(range(0, 80 * batch, 80)), 2040, 1, 2048, 12)
    pad, input_pos = torch.arange(0, 80 * batch, 80), torch.tensor([2040])
    calls = taken(monkeypatch, kernel)
    got = kernels.latent_attention(q.bfloat16(), latent.bfloat16(), mask.bfloat16(), pad, input_pos, 96 ** -0.5, 256)
    assert got.dtype == torch.bfloat16 and calls == [kernel]
    torch.testing.assert_close(got.double(), reference_latent_attention(q, latent, mask, 96 ** -0.5)[..., :256],
                               atol=3e-2, rtol=3e-2)


# ---- the GPU's fused kernel, on the CPU ---------------------------------------------------------

@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("batch, new_tokens, slots, pad", [
    (1, 1, 700, [0]), (3, 1, 1000, [0, 37, 300]),
    (2, 4, 333, [0, 129]),  # several new tokens, and no slot count a multiple of a block
    (2, 1, 2050, [0, 2000]),  # row 1 sees its last 43 slots only: most blocks of the block mask are empty
])
def test_flex_latent_attention_equals_the_reference(batch, new_tokens, slots, pad, compiled):
    """flex_attention eagerly (its unfused path) and compiled by inductor (its fused CPU template), the block
    mask made from pad and input_pos, with 7 unwritten slots at the end of the cache. Inductor's CPU template
    (torch 2.13) fails to build this mask when the slots are a multiple of its 128-slot blocks, or when it
    recompiles with dynamic shapes: hence these slot counts and fixed shapes (the CPU never takes flex)."""
    torch.manual_seed(slots)
    heads, r, width = 4, 32, 40
    first_slot = slots - new_tokens - 7
    q, latent = torch.randn(batch, 1, heads * new_tokens, width), torch.randn(batch, 1, slots, width)
    flex = kernels.flex_latent_attention
    if compiled:
        flex = torch.compile(flex, fullgraph=True, dynamic=False)
    got = flex(q, latent, torch.tensor(pad), torch.arange(first_slot, first_slot + new_tokens), 0.17, r)
    assert got.shape == (batch, 1, heads * new_tokens, r)
    mask = decode_mask(pad, first_slot, new_tokens, slots, heads)
    torch.testing.assert_close(got.double(), reference_latent_attention(q, latent, mask, 0.17)[..., :r], **TIGHT)
