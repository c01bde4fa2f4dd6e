"""Decoding through the cache: each attention formulation against a reference written out head by head,
explicit positions (rewinding, padding), batched prompts of different lengths against one-by-one generation,
the compiled decode step against eager, and the cache's contents and dtype. Float32 on the CPU."""
import copy
import math

import pytest
import torch
from torch._dynamo.testing import CompileCounter

from attention import MultiHeadLatentAttention
from conftest import EVERY_KERNEL, KIND_IDS, KINDS, VOCAB, random_tokens, tiny_model
from model import left_pad
from model_config import ModelConfig


def padded_causal_mask(pad: list[int], first_slot: int, queries: int, slots: int) -> torch.Tensor:
    """(B, 1, T, S) additive mask: query t at slot first_slot + t of row b reads slots pad[b] .. first_slot + t."""
    mask = torch.full((len(pad), 1, queries, slots), -math.inf)
    for b, p in enumerate(pad):
        for t in range(queries):
            mask[b, 0, t, p:first_slot + t + 1] = 0.0
    return mask


def reference_latent_decode(attn: MultiHeadLatentAttention, q_nope, q_rope, c_kv, k_rope, mask):
    """Attention over decompressed keys and values, one row, head and query at a time, from the paper's
    equations: k = [W_UK c_KV | k_rope], v = W_UV c_KV, softmax(q k / sqrt(dn + dr)) v."""
    B, H, T, _ = q_nope.shape
    w = attn.kv_b_proj.weight.view(H, attn.dn + attn.dv, attn.r)
    out = torch.zeros(B, H, T, attn.dv)
    for b in range(B):
        for h in range(H):
            keys = torch.cat((c_kv[b] @ w[h, :attn.dn].T, k_rope[b]), dim=-1)  # (S, dn + dr)
            values = c_kv[b] @ w[h, attn.dn:].T  # (S, dv)
            for t in range(T):
                q = torch.cat((q_nope[b, h, t], q_rope[b, h, t]))
                weights = torch.softmax(keys @ q / math.sqrt(attn.dn + attn.dr) + mask[b, 0, t], dim=0)
                out[b, h, t] = weights @ values
    return out


@pytest.mark.parametrize("batch, queries", [(1, 1), (3, 1), (1, 4), (3, 4)])
@pytest.mark.usefixtures("kernel_choice")
def test_every_decode_formulation_equals_the_reference(batch, queries):
    config = ModelConfig.from_preset("tiny", vocab_size=VOCAB)
    torch.manual_seed(0)
    attn = MultiHeadLatentAttention(config)
    H, S = config.n_head, 23
    q_nope = torch.randn(batch, H, queries, config.qk_nope_head_dim)
    q_rope = torch.randn(batch, H, queries, config.qk_rope_head_dim)
    c_kv, k_rope = torch.randn(batch, S, config.kv_lora_rank), torch.randn(batch, S, config.qk_rope_head_dim)
    pad = [0, 5, 2][:batch]
    mask = padded_causal_mask(pad, first_slot=S - queries - 3, queries=queries, slots=S)  # 3 unused slots at the end
    expected = reference_latent_decode(attn, q_nope, q_rope, c_kv, k_rope, mask)
    latent = torch.cat((c_kv, k_rope), dim=-1)
    input_pos = torch.arange(S - queries - 3, S - 3)
    torch.testing.assert_close(attn.attend_absorbed(q_nope, q_rope, latent, mask, torch.tensor(pad), input_pos),
                               expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(attn.attend_decompressed(q_nope, q_rope, c_kv, k_rope, mask), expected,
                               atol=1e-5, rtol=1e-5)


def test_prefill_decompresses_and_decoding_absorbs(monkeypatch):
    model = tiny_model()
    calls = []
    for name in ("attend_absorbed", "attend_decompressed"):
        original = getattr(MultiHeadLatentAttention, name)
        monkeypatch.setattr(MultiHeadLatentAttention, name,
                            lambda self, *a, _name=name, _f=original: calls.append(_name) or _f(self, *a))
    prompt = model.layers[0].self_attn.max_absorbed_queries + 1  # where decompressing costs fewer FLOPs
    model.generate(random_tokens(1, prompt), max_new_tokens=3, temperature=0)
    n = model.config.n_layer
    assert calls == ["attend_decompressed"] * n + ["attend_absorbed"] * 2 * n


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@pytest.mark.usefixtures("kernel_choice")
def test_rewinding_is_writing_earlier_slots_again(kind):
    model = tiny_model(**kind)
    first, second = random_tokens(2, 30, seed=1), random_tokens(2, 30, seed=2)
    cache = model.make_cache(2, 30)
    model(first, cache=cache, input_pos=torch.arange(30))  # fill every slot
    model(second[:, 10:20], cache=cache, input_pos=torch.arange(10, 20))  # rewind to slot 10, write other tokens
    logits = model(second[:, 20:21], cache=cache, input_pos=torch.tensor([20]))[0]
    expected = model(torch.cat((first[:, :10], second[:, 10:21]), dim=1))[0][:, -1:]
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@EVERY_KERNEL
@pytest.mark.usefixtures("kernel_choice")
def test_batched_prompts_of_different_lengths_generate_what_each_generates_alone(kind):
    model = tiny_model(**kind)
    prompts = [[5, 6, 7], random_tokens(1, 17)[0].tolist(), [9], random_tokens(1, 8, seed=3)[0].tolist()]
    idx, pad = left_pad(prompts)
    batched = model.generate(idx, 25, temperature=0, pad=pad)[:, idx.size(1):]
    for row, prompt in zip(batched, prompts):
        alone = model.generate(torch.tensor([prompt]), 25, temperature=0)[0, len(prompt):]
        assert torch.equal(row, alone)


def test_rows_stop_at_the_stop_id_and_the_stream_ends_when_all_have():
    model = tiny_model()
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8], [9]]
    idx, pad = left_pad(prompts)
    free = model.generate(idx, 20, temperature=0, pad=pad)[:, idx.size(1):]
    stop_id = int(free[1, 4])  # row 1's fifth token
    stopped = model.generate(idx, 20, temperature=0, pad=pad, stop_id=stop_id)[:, idx.size(1):]
    for row_free, row_stopped in zip(free, stopped):
        hits = (row_free == stop_id).nonzero()
        end = int(hits[0]) + 1 if len(hits) else len(row_free)
        assert torch.equal(row_stopped[:end], row_free[:end])  # the same tokens up to the row's stop
        assert (row_stopped[end:] == stop_id).all()  # then only the stop id
    if all((row == stop_id).any() for row in free):
        assert stopped.size(1) == max(int((row == stop_id).nonzero()[0]) + 1 for row in free)


def test_sampling_never_draws_ids_past_the_vocab_limit():
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight[90:] = 5 * model.lm_head.weight[:11].abs().sum()  # ids >= 90 would win every draw
    ids = model.generate(random_tokens(2, 4), 30, temperature=1.0, vocab_limit=90,
                         generator=torch.Generator().manual_seed(0))
    assert ids[:, 4:].max() < 90


@pytest.mark.parametrize("kind", [dict(attention="mla"), dict(attention="mha")], ids=["mla", "mha"])
@EVERY_KERNEL
@pytest.mark.usefixtures("kernel_choice", "fresh_compiler")
def test_compiled_decode_step_equals_eager_and_compiles_once(kind):
    model = tiny_model(**kind)
    prompt = random_tokens(2, 6)
    eager = model.generate(prompt, 24, temperature=0)
    counter = CompileCounter()
    step = torch.compile(model.decode_step, backend=counter, fullgraph=True)
    compiled = model.generate(prompt, 24, temperature=0, decode_step=step)
    assert torch.equal(compiled, eager)
    assert counter.frame_count == 1  # 23 decode steps, one graph: no recompiles


@EVERY_KERNEL
@pytest.mark.usefixtures("kernel_choice", "fresh_compiler")
def test_decode_step_through_aot_autograd_equals_eager():
    """The compiled graph with its cache writes functionalised (aot_eager: the tracing and functionalisation
    half of inductor, without its C++ code generation, which takes minutes on a 2-core CPU; the benchmark runs
    the full inductor build), over a left-padded batch."""
    model = tiny_model()
    pad = torch.tensor([0, 3])
    cache_eager, cache_compiled = model.make_cache(2, 16, pad=pad), model.make_cache(2, 16, pad=pad)
    prompt = random_tokens(2, 12)
    for cache in (cache_eager, cache_compiled):
        model(prompt[:, :8], cache=cache, input_pos=torch.arange(8))
    step = torch.compile(model.decode_step, backend="aot_eager", fullgraph=True)
    for pos in range(8, 12):
        token, input_pos = prompt[:, pos:pos + 1], torch.tensor([pos])
        torch.testing.assert_close(step(token, cache_compiled, input_pos),
                                   model.decode_step(token, cache_eager, input_pos), atol=1e-5, rtol=1e-5)


def test_the_mla_cache_holds_the_normalised_c_kv_and_rotated_k_rope_and_nothing_else():
    model = tiny_model()
    idx = random_tokens(2, 9)
    cache = model.make_cache(2, 12)
    model(idx, cache=cache, input_pos=torch.arange(9))
    attn = model.layers[0].self_attn
    x = model.layers[0].input_layernorm(model.embed_tokens(idx))
    cos, sin = model.rope.at(torch.arange(9)[None])
    c_kv, k_rope = attn.latent_kv(x, cos, sin)
    (latent,) = cache.layers[0].tensors
    assert latent.shape == (2, 12, model.config.kv_lora_rank + model.config.qk_rope_head_dim)
    torch.testing.assert_close(latent[:, :9], torch.cat((c_kv, k_rope), dim=-1), atol=0, rtol=0)
    assert latent[:, 9:].eq(0).all()


def test_a_bfloat16_cache_holds_bfloat16_and_decodes_close_to_float32():
    model = tiny_model()
    prompt = random_tokens(2, 10)
    cache = model.make_cache(2, 12, dtype=torch.bfloat16)
    model(prompt[:, :9], cache=cache, input_pos=torch.arange(9))
    assert cache.layers[0].tensors[0].dtype == torch.bfloat16
    logits = model(prompt[:, 9:10], cache=cache, input_pos=torch.tensor([9]))[0]
    torch.testing.assert_close(logits, model(prompt)[0][:, -1:], atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("batch", [1, 8])
def test_a_bfloat16_model_decodes_close_to_its_float32_weights(kind, batch):
    """Each variant in bfloat16 on the CPU's bfloat16 kernels (MHA/GQA: two matmuls; MLA: the fused kernel at
    batch 1, two matmuls at batch 8), against the same weights in float32."""
    model = tiny_model(**kind)
    with torch.no_grad():  # attention far from uniform, so that a wrong score shows
        for name, weight in model.named_parameters():
            if "self_attn" in name and weight.dim() == 2:
                weight.mul_(8)
    half = copy.deepcopy(model).to(torch.bfloat16)
    prompt = random_tokens(batch, 12)
    logits = []
    for m in (model, half):
        cache = m.make_cache(batch, 12)
        m(prompt[:, :11], cache=cache, input_pos=torch.arange(11))
        logits.append(m.decode_step(prompt[:, 11:], cache, torch.tensor([11])).float())
    torch.testing.assert_close(logits[1], logits[0], atol=2e-2, rtol=2e-2)
