"""The model core, against slow references written from the paper's equations, in float32 on the CPU."""
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from attention import LayerCache, MultiHeadLatentAttention, apply_rope, rope_tables
from conftest import EVERY_KERNEL, KIND_IDS, KINDS, VOCAB, random_tokens, tiny_model
from model import Transformer
from model_config import PRESETS, VARIANTS, ModelConfig


def rms_norm(x, weight, eps):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


def rotate(x, pos, theta):
    """RoPE on one vector x (d,) at integer position pos, pairs (i, i + d/2), computed from scratch."""
    half = x.numel() // 2
    angles = pos * theta ** (-torch.arange(half, dtype=torch.float64) * 2 / x.numel())
    c, s = angles.cos().float(), angles.sin().float()
    return torch.cat((x[:half] * c - x[half:] * s, x[half:] * c + x[:half] * s))


def reference_mla(attn: MultiHeadLatentAttention, h: torch.Tensor, config: ModelConfig) -> torch.Tensor:
    """DeepSeek-V2 section 2.1, equations (9)-(19), one head and one position at a time. h (T, D) -> (T, D)."""
    T = h.size(0)
    H, dn, dr, dv, r = config.n_head, config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim, config.kv_lora_rank
    if config.q_lora_rank:
        c_q = rms_norm(h @ attn.q_a_proj.weight.T, attn.q_a_layernorm.weight, config.norm_eps)
        q = c_q @ attn.q_b_proj.weight.T
    else:
        q = h @ attn.q_proj.weight.T
    q = q.view(T, H, dn + dr)
    kv_a = h @ attn.kv_a_proj_with_mqa.weight.T
    c_kv = rms_norm(kv_a[:, :r], attn.kv_a_layernorm.weight, config.norm_eps)  # the norm sees c_KV only
    k_rope = torch.stack([rotate(kv_a[t, r:], t, config.rope_theta) for t in range(T)])  # one key for all heads
    kv = (c_kv @ attn.kv_b_proj.weight.T).view(T, H, dn + dv)
    out = torch.zeros(T, H, dv)
    for head in range(H):
        for t in range(T):
            q_t = torch.cat((q[t, head, :dn], rotate(q[t, head, dn:], t, config.rope_theta)))
            keys = torch.cat((kv[: t + 1, head, :dn], k_rope[: t + 1]), dim=-1)
            weights = torch.softmax(keys @ q_t / math.sqrt(dn + dr), dim=0)
            out[t, head] = weights @ kv[: t + 1, head, dn:]
    return out.reshape(T, H * dv) @ attn.o_proj.weight.T


@pytest.mark.usefixtures("kernel_choice")
@pytest.mark.parametrize("q_lora_rank", [32, 0])
def test_mla_matches_the_paper_equations(q_lora_rank):
    config = ModelConfig.from_preset("tiny", vocab_size=VOCAB, q_lora_rank=q_lora_rank)
    torch.manual_seed(0)
    attn = MultiHeadLatentAttention(config)
    for p in attn.parameters():  # norms away from 1, so a norm on the wrong tensor shows
        torch.nn.init.normal_(p, std=0.3)
    h = torch.randn(1, 12, config.d_model)
    cos, sin = rope_tables(config.qk_rope_head_dim, 12, config.rope_theta)
    torch.testing.assert_close(attn(h, cos[None], sin[None])[0], reference_mla(attn, h[0], config), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_causality(kind):
    model = tiny_model(**kind)
    idx = random_tokens(2, 24)
    t, k = 9, 5
    changed = idx.clone()
    changed[:, t + k] = (changed[:, t + k] + 1) % VOCAB
    before, after = model(idx)[0], model(changed)[0]
    torch.testing.assert_close(before[:, : t + k], after[:, : t + k], atol=0, rtol=0)
    assert not torch.allclose(before[:, t + k:], after[:, t + k:])


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@pytest.mark.parametrize("chunk", [1, 3])
@EVERY_KERNEL
@pytest.mark.usefixtures("kernel_choice")
def test_cached_decode_equals_full_forward(kind, chunk):
    """A prefill of 10 tokens, then chunks of new tokens through the cache: every position's logits equal the
    full forward's; with last_only, each call's last position's."""
    model = tiny_model(**kind)
    idx = random_tokens(3, 40)
    full = model(idx)[0]
    cache, last_cache = model.make_cache(3, 40), model.make_cache(3, 40)
    starts = [0, *range(10, 40, chunk)]
    logits, last = [], []
    for start, end in zip(starts, starts[1:] + [40]):
        positions = torch.arange(start, end)
        logits.append(model(idx[:, start:end], cache=cache, input_pos=positions)[0])
        last.append(model(idx[:, start:end], cache=last_cache, input_pos=positions, last_only=True)[0])
    torch.testing.assert_close(torch.cat(logits, dim=1), full, atol=1e-5, rtol=1e-5)
    ends = [end - 1 for end in starts[1:] + [40]]
    torch.testing.assert_close(torch.cat(last, dim=1), full[:, ends], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
@pytest.mark.usefixtures("kernel_choice")
def test_greedy_generate_equals_full_recompute(kind):
    model = tiny_model(**kind)
    prompt = random_tokens(2, 7)
    generated = model.generate(prompt, max_new_tokens=20, temperature=0)
    seq = prompt
    for _ in range(20):
        seq = torch.cat((seq, model(seq)[0][:, -1].argmax(-1, keepdim=True)), dim=1)
    assert torch.equal(generated, seq)


@pytest.mark.usefixtures("kernel_choice")
def test_absorbed_decode_equals_decompressed_decode_through_the_model(monkeypatch):
    """30 greedy tokens decoded by weight absorption, and with absorb=False (decompressing the cache at every
    step, which never calls attend_absorbed), are the same tokens."""
    model = tiny_model()
    prompt = random_tokens(2, 5)
    calls = []
    attend_absorbed = MultiHeadLatentAttention.attend_absorbed
    monkeypatch.setattr(MultiHeadLatentAttention, "attend_absorbed",
                        lambda *args: calls.append(1) or attend_absorbed(*args))
    absorbed = model.generate(prompt, max_new_tokens=30, temperature=0)
    assert len(calls) == 30 * model.config.n_layer  # the prefill of 5 tokens absorbs too
    decompressed = model.generate(prompt, 30, temperature=0, decode_step=partial(model.decode_step, absorb=False))
    assert len(calls) == 31 * model.config.n_layer  # the prefill's only
    assert torch.equal(decompressed, absorbed)


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_cache_holds_exactly_the_configured_values_per_token(kind):
    model = tiny_model(**kind)
    cache = model.make_cache(batch_size=3, capacity=20)
    model(random_tokens(3, 20), cache=cache, input_pos=torch.arange(20))
    values_per_token = sum(t.numel() for layer in cache.layers for t in layer.tensors) / (3 * 20)
    config = model.config
    assert values_per_token == config.kv_cache_values_per_token_per_layer() * config.n_layer
    assert cache.nbytes == values_per_token * 3 * 20 * 4
    if config.attention == "mla":
        assert values_per_token == (config.kv_lora_rank + config.qk_rope_head_dim) * config.n_layer


def test_gpt2_small_cache_is_288_against_mha_1536_per_layer():
    measured = {}
    for kind in ("mla", "mha"):
        config = ModelConfig.from_preset("gpt2-small", attention=kind)
        block = Transformer(config.__class__.from_dict({**config.to_dict(), "n_layer": 1, "vocab_size": 64}))
        cache = LayerCache(block.layers[0].self_attn.cache_shapes(1, 8), torch.float32, "cpu", torch.zeros(1))
        measured[kind] = sum(t.numel() for t in cache.tensors) // 8
        assert measured[kind] == config.kv_cache_values_per_token_per_layer()
    assert measured == {"mla": 288, "mha": 1536}


def test_rope_score_depends_only_on_relative_position():
    dim, theta = 16, 10000.0
    cos, sin = rope_tables(dim, 64, theta)
    q, k = torch.randn(dim), torch.randn(dim)

    def score(m, n):
        return apply_rope(q.view(1, dim), cos[m:m + 1], sin[m:m + 1]) @ apply_rope(k.view(1, dim), cos[n:n + 1], sin[n:n + 1]).T

    torch.testing.assert_close(score(3, 1), score(40, 38), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(score(10, 17), score(30, 37), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score(3, 1), score(3, 2), atol=1e-3)
    torch.testing.assert_close(apply_rope(q.view(1, dim), cos[5:6], sin[5:6])[0], rotate(q, 5, theta))


@pytest.mark.parametrize("kind", KINDS + [dict(attention="mla", tie_embeddings=False)], ids=KIND_IDS + ["untied"])
def test_shapes_and_parameter_counts(kind):
    model = tiny_model(**kind)
    config = model.config
    logits, loss = model(random_tokens(2, 13))
    assert logits.shape == (2, 13, VOCAB) and loss is None
    assert sum(p.numel() for p in model.parameters()) == config.num_params()
    embeddings = model.embed_tokens.weight.numel() + (0 if config.tie_embeddings else model.lm_head.weight.numel())
    assert config.num_params() - config.non_embedding_params() == embeddings


@pytest.mark.parametrize("kind", [dict(attention="mla", v_head_dim=24), dict(attention="mha"), dict(attention="gqa")],
                         ids=["mla", "mha", "gqa"])
def test_flops_per_token_matches_torch_flop_counter(kind):
    """The formula against counted matmuls. MLA gets v_head_dim = qk_head_dim here, since the training path pads
    narrower values with zeros for SDPA's fused kernel, which adds work the formula rightly leaves out."""
    model = tiny_model(**kind).train()
    T = model.config.block_size
    idx = random_tokens(2, T)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:  # math: countable matmuls
        model(idx, targets=idx)[1].backward()
    counted = counter.get_total_flops() / (2 * T)
    assert counted == pytest.approx(model.config.flops_per_token(T), rel=0.02)


@pytest.mark.parametrize("kind", KINDS, ids=KIND_IDS)
def test_gradients_reach_every_parameter(kind):
    model = tiny_model(**kind).train()
    idx = random_tokens(2, 16)
    model(idx, targets=idx)[1].backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize("field, value", [
    ("qk_rope_head_dim", 7), ("d_model", 0), ("n_layer", -1), ("kv_lora_rank", 0), ("q_lora_rank", -1),
    ("n_kv_head", 3), ("attention", "linear"), ("dropout", 1.5), ("vocab_size", 0),
])
def test_bad_config_names_the_field(field, value):
    overrides = {field: value, "attention": "gqa"} if field == "n_kv_head" else {field: value}
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_preset("tiny", **overrides)


def test_config_dict_round_trip_and_unknown_fields():
    config = ModelConfig.from_preset("gpt2-small", attention="gqa")
    assert ModelConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ValueError, match="bogus"):
        ModelConfig.from_dict({**config.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="preset"):
        ModelConfig.from_preset("huge")


ATTENTION_FIELDS = {"attention", "n_kv_head", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                    "v_head_dim"}


@pytest.mark.parametrize("preset", sorted(PRESETS))
@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_of_every_preset_differs_from_it_in_attention_only(preset, variant):
    """The like-for-like baselines: the same depth, width, heads, FFN, vocabulary, context, RoPE and dropout;
    MHA and GQA cache more per token than MLA (MQA, one key/value head, can cache less: 128 values against 288
    at gpt2-small)."""
    mla = ModelConfig.from_preset(preset)
    other = ModelConfig.from_preset(preset, **VARIANTS[variant])
    differing = {name for name, value in other.to_dict().items() if mla.to_dict()[name] != value}
    assert differing <= ATTENTION_FIELDS
    if variant in ("mha", "gqa"):
        assert other.kv_cache_values_per_token_per_layer() > mla.kv_cache_values_per_token_per_layer()


def test_generate_past_block_size_is_a_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="block_size"):
        model.generate(random_tokens(1, 60), max_new_tokens=10)


def test_a_few_steps_overfit_one_batch():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny")).train()
    idx = torch.randint(0, 50257, (4, 33), generator=torch.Generator().manual_seed(0))
    x, y = idx[:, :-1], idx[:, 1:]
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = model(x, targets=y)[1].item()
    for _ in range(30):
        loss = model(x, targets=y)[1]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert first > 10.0  # about ln(50304) at init
    assert loss.item() < 0.3 * first


def test_loss_skips_targets_marked_minus_one():
    model = tiny_model()
    idx = random_tokens(2, 12)
    targets = idx.clone()
    targets[:, :5] = -1
    logits, loss = model(idx, targets=targets)
    expected = F.cross_entropy(logits[:, 5:].reshape(-1, VOCAB), idx[:, 5:].reshape(-1))
    torch.testing.assert_close(loss, expected)


def test_casting_the_model_keeps_rope_tables_in_float32():
    model = tiny_model().to(torch.bfloat16)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    positions = torch.arange(model.config.block_size)[None]
    cos, sin = model.rope.at(positions)
    assert cos.dtype == sin.dtype == torch.float32
    expected, _ = rope_tables(model.config.rope_dim, model.config.block_size, model.config.rope_theta)
    assert torch.equal(cos[0], expected)
    assert "rope" not in "".join(name for name, _ in model.named_buffers())  # nothing a cast could reach


def test_dropout_acts_in_training_only():
    model = tiny_model(dropout=0.5)
    idx = random_tokens(1, 16)
    assert torch.equal(model(idx)[0], model(idx)[0])  # eval: no dropout anywhere
    model.train()
    assert not torch.equal(model(idx)[0], model(idx)[0])


@pytest.mark.parametrize("q_lora_rank", [32, 0], ids=["q-lora", "no-q-lora"])
def test_stacked_rows_say_which_rows_make_which_part(q_lora_rank):
    """Zeroing the rows of one block of a stacked weight (MultiHeadLatentAttention.stacked_rows) zeroes exactly
    that part: one head's q_nope or q_rope; c_KV or k_rope; one head's value (its output), while one head's
    k_nope changes that head's output only."""
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", q_lora_rank=q_lora_rank)
    attn = MultiHeadLatentAttention(config).eval()
    x = torch.randn(2, 6, config.d_model)
    cos, sin = rope_tables(config.qk_rope_head_dim, 6, config.rope_theta)
    cos, sin = cos[None], sin[None]
    head_outputs = {}
    attn.o_proj.register_forward_pre_hook(lambda module, args: head_outputs.update(y=args[0]))

    def parts_after_zeroing(name, start, rows):
        weight = attn.get_parameter(name)
        saved = weight.detach().clone()
        with torch.no_grad():
            weight[start:start + rows] = 0
            q_nope, q_rope = attn.queries(x, cos, sin)
            c_kv, k_rope = attn.latent_kv(x, cos, sin)
            attn(x, cos, sin)
            weight.copy_(saved)
        y = head_outputs["y"].view(2, 6, config.n_head, config.v_head_dim)
        return {"q_nope": q_nope, "q_rope": q_rope, "c_kv": c_kv, "k_rope": k_rope, "v": y, "k_nope": y}

    reference = parts_after_zeroing("o_proj.weight", 0, 0)  # nothing zeroed
    stacked = attn.stacked_rows()
    assert set(stacked) == {"q_b_proj.weight" if q_lora_rank else "q_proj.weight", "kv_a_proj_with_mqa.weight",
                            "kv_b_proj.weight"}
    for name, blocks in stacked.items():
        assert sum(block.rows for block in blocks) == attn.get_parameter(name).size(0)
        per_head = len(blocks) > 2
        for index, block in enumerate(blocks):
            parts = parts_after_zeroing(name, sum(b.rows for b in blocks[:index]), block.rows)
            changed = parts[block.part]
            if not per_head:
                assert not changed.any() and not torch.equal(reference[block.part], changed), (name, block)
                continue
            head = index // 2
            axis = 1 if block.part.startswith("q_") else 2  # (B, H, T, d) queries; (B, T, H, dv) outputs
            others = [h for h in range(config.n_head) if h != head]
            mine, theirs = changed.select(axis, head), changed.index_select(axis, torch.tensor(others))
            assert torch.equal(theirs, reference[block.part].index_select(axis, torch.tensor(others))), (name, block)
            if block.part == "k_nope":
                assert not torch.equal(mine, reference[block.part].select(axis, head)), (name, block)
            else:
                assert not mine.any(), (name, block)
    assert [block.rotary for block in stacked["kv_a_proj_with_mqa.weight"]] == [False, True]
