"""latent_conversion.py and convert_mla.py: each exact step exact (float64, tiny models, RoPE in float64 too), the
negative control, an MQA source end to end, the attention classes' per-head weights, the converted model's
decode paths and DeepSeek-V3 export, one-shot loss against rank on a small trained source, and one-line errors."""
import copy
import itertools
import json
import math
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import REPO, shakespeare_bytes, write_byte_data

import attention
import convert_mla
import latent_conversion as lc
from checkpoint import load_checkpoint, save_checkpoint
from cli import CLIError
from dataset import PreparedData
from decode_benchmark import sharpen
from evaluation import evaluate
from model import Transformer
from model_config import ModelConfig
from optim import make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 256  # byte tokens
SOURCES = {"mha": {"attention": "mha"}, "gqa": {"attention": "gqa", "n_kv_head": 2},
           "mqa": {"attention": "gqa", "n_kv_head": 1}}
EXACT = {"atol": 1e-10, "rtol": 1e-10}
F64 = torch.float64


# ---- float64 models and the latent reference forward ---------------------------------------------

@pytest.fixture
def float64_rope(monkeypatch):
    """apply_rope without its float32 round trip, so that a float64 model is float64 throughout."""
    def apply_rope(x, cos, sin):
        x1, x2 = x.chunk(2, dim=-1)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    monkeypatch.setattr(attention, "apply_rope", apply_rope)


def to_float64(model: Transformer) -> Transformer:
    """The model in float64, its RoPE tables too (they stay float32 under .double())."""
    model = model.double()
    c = model.config
    inv_freq = c.rope_theta ** (-torch.arange(0, c.rope_dim, 2, dtype=F64) / c.rope_dim)
    angles = torch.outer(torch.arange(c.block_size, dtype=F64), inv_freq)
    model.rope.tables = {torch.device("cpu"): (angles.cos(), angles.sin())}
    return model


def random_source(kind: str, seed: int = 0) -> Transformer:
    """A tiny source (4 heads of 16, d_model 64, 2 layers) with weights large enough for sharp attention and
    norm gains away from 1, in float64."""
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=VOCAB, **SOURCES[kind])).eval()
    sharpen(model)
    return to_float64(model)


def tokens(batch=2, length=40, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits(model, idx):
    with torch.no_grad():
        return model(idx)[0]


def rotate_pairs(z: torch.Tensor, pairs: torch.Tensor, freq: torch.Tensor) -> torch.Tensor:
    """z (..., T, L) with each pair (a, b) of dims turned by position t * freq, as RoPE turns (i, i + d/2)."""
    angles = torch.arange(z.size(-2), dtype=F64)[:, None] * freq[None, :]  # (T, P)
    cos, sin = angles.cos(), angles.sin()
    a, b = z[..., pairs[:, 0]], z[..., pairs[:, 1]]
    out = z.clone()
    out[..., pairs[:, 0]] = a * cos - b * sin
    out[..., pairs[:, 1]] = b * cos + a * sin
    return out


def latent_forward(layer: lc.LatentLayer, x: torch.Tensor) -> torch.Tensor:
    """What a LatentLayer computes (its docstring), score by score through the latent: causal attention over
    x (B, T, D) float64 -> (B, T, D)."""
    T = x.size(1)
    z = x @ layer.w.T  # (B, T, L)
    if layer.norm is not None:
        c = layer.part("c")
        normed = z[..., c] * torch.rsqrt(z[..., c].pow(2).mean(-1, keepdim=True) + layer.eps) * layer.norm
        z = torch.cat((normed, z[..., c.stop:]), dim=-1)
    q = torch.einsum("bte,hde->bhtd", x, layer.q)
    q_latent = rotate_pairs(torch.einsum("bhtd,hdl->bhtl", q, layer.k_up), layer.pairs, layer.freq)
    scores = torch.einsum("bhtl,bsl->bhts", q_latent, rotate_pairs(z, layer.pairs, layer.freq)) * layer.scale
    probs = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf).softmax(-1)
    heads = torch.einsum("bhts,hdl,bsl->bthd", probs, layer.v_up, z)
    return torch.einsum("bthd,ehd->bte", heads, layer.o)


class LatentModule(torch.nn.Module):
    """A LatentLayer as a drop-in self_attn of a Block (no cache)."""

    def __init__(self, layer: lc.LatentLayer):
        super().__init__()
        self.layer = layer

    def forward(self, x, cos, sin, mask=None, cache=None, input_pos=None, absorb=True):
        assert cache is None
        return latent_forward(self.layer, x)


def with_layers(model: Transformer, layers: list[lc.LatentLayer]) -> Transformer:
    """A copy of model whose attention is each latent layer (the reference forward)."""
    model = copy.deepcopy(model)
    for block, layer in zip(model.layers, layers):
        block.self_attn = LatentModule(layer)
    return model


def moments(model, seed=2):
    """E[x x^T] per layer on random tokens (any second moment will do for the exact steps)."""
    return lc.input_moments(model, tokens(4, 64, seed), batch_size=4)


def latent_stage(model, rope_dim=None, alpha=None, full_rank=False, decomposition="pca"):
    """Each layer through steps 1-2 (RoRoPE by PCA), then, with rope_dim, steps 3-4, then 5 (alpha), then 6 at full
    rank."""
    layers = []
    for block, moment in zip(model.layers, moments(model)):
        layer = lc.latent_gqa(block.self_attn, model.config.rope_theta)
        layer = lc.rotate_key_heads(layer, lc.rorope_rotations(layer, moment)[0])
        if rope_dim:
            layer = lc.partial_rope(layer, rope_dim)
            layer = lc.fold_softmax_scale(layer, 1 / math.sqrt(layer.q.size(1) + rope_dim))
        if alpha:
            layer = lc.balance(layer, alpha)
        if full_rank:
            basis = lc.pca_basis(layer, moment)[0] if decomposition == "pca" else lc.svd_basis(layer)[0]
            layer = lc.joint_low_rank(layer, basis)
        layers.append(layer)
    return layers


@pytest.fixture(scope="module")
def random_data(tmp_path_factory) -> PreparedData:
    ids = np.random.default_rng(0).integers(0, VOCAB, 6000)
    return PreparedData(write_byte_data(tmp_path_factory.mktemp("random"), ids, 1000))


# ---- the attention classes' per-head weights -----------------------------------------------------

def test_gqa_head_weights_are_the_heads_the_forward_uses(float64_rope):
    """head_weights' docstring, written out head by head: query head h with key/value head h // (H / G), RoPE on
    pairs (i, i + hd/2) at theta^(-2i / hd)."""
    model = random_source("gqa")
    attn, T = model.layers[0].self_attn, 12
    q, k, v, o = attn.head_weights()
    H, d, D = q.shape
    G = k.size(0)
    x = torch.randn(1, T, D, dtype=F64, generator=torch.Generator().manual_seed(0))
    pairs = torch.stack((torch.arange(d // 2), torch.arange(d // 2) + d // 2), dim=1)
    freq = model.config.rope_theta ** (-2 * torch.arange(d // 2, dtype=F64) / d)
    heads = []
    for h in range(H):
        g = h // (H // G)
        scores = rotate_pairs(x @ q[h].T, pairs, freq) @ rotate_pairs(x @ k[g].T, pairs, freq).transpose(1, 2)
        probs = (scores / math.sqrt(d)).masked_fill(~torch.ones(T, T, dtype=torch.bool).tril(), -math.inf).softmax(-1)
        heads.append(probs @ (x @ v[g].T) @ o[:, h].T)
    cos, sin = model.rope.at(torch.arange(T)[None])
    with torch.no_grad():
        torch.testing.assert_close(attn(x, cos, sin), sum(heads), **EXACT)


@pytest.mark.parametrize("q_lora_rank", [0, 32])
def test_mla_head_weights_round_trip(q_lora_rank):
    """load_head_weights(head_weights()) of one model into another gives it the first one's stacked weights and
    W_O, and the parts are where the forward reads them (head 1's q_nope and q_rope, c_kv and k_rope)."""
    torch.manual_seed(0)
    config = ModelConfig.from_preset("tiny", vocab_size=VOCAB, q_lora_rank=q_lora_rank)
    a, b = Transformer(config).layers[0].self_attn, Transformer(config).layers[0].self_attn
    heads = a.head_weights()
    b.load_head_weights(heads)
    for name in [*a.stacked_rows(), "o_proj.weight"]:
        assert torch.equal(b.get_parameter(name), a.get_parameter(name)), name
    x = torch.randn(3, config.d_model)
    q_in = a.q_a_layernorm(a.q_a_proj(x)) if q_lora_rank else x
    q = (a.q_b_proj if q_lora_rank else a.q_proj)(q_in).view(3, config.n_head, -1)
    torch.testing.assert_close(q[:, 1], torch.cat((q_in @ heads["q_nope"][1].T, q_in @ heads["q_rope"][1].T), -1))
    torch.testing.assert_close(a.kv_a_proj_with_mqa(x), x @ torch.cat((heads["c_kv"][0], heads["k_rope"][0])).T)
    assert heads["o"].shape == (config.d_model, config.n_head, config.v_head_dim)


# ---- the exact steps ----------------------------------------------------------------------------

@pytest.mark.parametrize("kind", SOURCES)
def test_latent_gqa_with_every_rope_component_equals_the_source(kind, float64_rope):
    model = random_source(kind)
    layers = [lc.latent_gqa(b.self_attn, model.config.rope_theta) for b in model.layers]
    idx = tokens()
    torch.testing.assert_close(logits(with_layers(model, layers), idx), logits(model, idx), **EXACT)


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_rorope_with_any_per_frequency_rotation_leaves_logits_unchanged(kind, float64_rope):
    model = random_source(kind)
    idx = tokens()
    expected = logits(model, idx)
    generator = torch.Generator().manual_seed(3)
    layers = []
    for block in model.layers:
        layer = lc.latent_gqa(block.self_attn, model.config.rope_theta)
        G, d = lc.heads_and_dim(layer)
        rotations = torch.linalg.qr(torch.randn(d // 2, G, G, generator=generator, dtype=F64))[0]  # one per frequency
        layers.append(lc.rotate_key_heads(layer, rotations))
    torch.testing.assert_close(logits(with_layers(model, layers), idx), expected, **EXACT)
    torch.testing.assert_close(logits(with_layers(model, latent_stage(model)), idx), expected, **EXACT)  # by PCA


def test_a_rotation_mixing_two_frequencies_changes_the_logits(float64_rope):
    """The negative control: an orthogonal change of basis that mixes frequencies 0 and 1 of key head 0 (both
    halves alike) does not commute with RoPE."""
    model = random_source("gqa")
    idx = tokens()
    layers = []
    for block in model.layers:
        layer = lc.latent_gqa(block.self_attn, model.config.rope_theta)
        d = layer.q.size(1)
        m = torch.eye(layer.width, dtype=F64)
        c, s = math.cos(0.7), math.sin(0.7)
        for a, b in ((0, 1), (d // 2, d // 2 + 1)):
            m[a, a], m[a, b], m[b, a], m[b, b] = c, -s, s, c
        layers.append(lc.change_basis(layer, m, m.T))
    assert (logits(with_layers(model, layers), idx) - logits(model, idx)).abs().max() > 1e-2


def test_partial_rope_keeping_every_frequency_of_an_mqa_source_is_exact(float64_rope):
    model = random_source("mqa")
    idx = tokens()
    d = model.config.head_dim
    torch.testing.assert_close(logits(with_layers(model, latent_stage(model, rope_dim=d)), idx), logits(model, idx),
                               **EXACT)


@pytest.mark.parametrize("kind", ["mha", "gqa"])
def test_partial_rope_is_lossy_for_several_key_heads(kind, float64_rope):
    model = random_source(kind)
    idx = tokens()
    d = model.config.head_dim
    assert (logits(with_layers(model, latent_stage(model, rope_dim=d)), idx) - logits(model, idx)).abs().max() > 1e-3


def test_folding_the_softmax_scale_is_exact(float64_rope):
    model = random_source("gqa")
    idx = tokens()
    layers = [lc.fold_softmax_scale(lc.latent_gqa(b.self_attn, model.config.rope_theta), 0.123) for b in model.layers]
    torch.testing.assert_close(logits(with_layers(model, layers), idx), logits(model, idx), **EXACT)


@pytest.mark.parametrize("alpha", [0.1, 7.3])
def test_balancing_leaves_logits_unchanged_for_any_alpha(alpha, float64_rope):
    model = random_source("gqa")
    idx = tokens()
    before = logits(with_layers(model, latent_stage(model, rope_dim=4)), idx)
    after = logits(with_layers(model, latent_stage(model, rope_dim=4, alpha=alpha)), idx)
    torch.testing.assert_close(after, before, **EXACT)


@pytest.mark.parametrize("kind,decomposition", [("mha", "pca"), ("gqa", "pca"), ("gqa", "svd"), ("mqa", "svd")])
def test_full_rank_joint_decomposition_equals_the_step_before(kind, decomposition, float64_rope):
    model = random_source(kind)
    idx = tokens()
    before = logits(with_layers(model, latent_stage(model, rope_dim=8, alpha=2.5)), idx)
    after = logits(with_layers(model, latent_stage(model, rope_dim=8, alpha=2.5, full_rank=True,
                                                   decomposition=decomposition)), idx)
    torch.testing.assert_close(after, before, **EXACT)


def test_unit_latent_scaling_is_exact(float64_rope):
    model = random_source("gqa")
    idx = tokens()
    layers = latent_stage(model, rope_dim=8, alpha=2.0, full_rank=True)
    scaled = [lc.unit_latent(layer, m) for layer, m in zip(layers, moments(model))]
    torch.testing.assert_close(logits(with_layers(model, scaled), idx), logits(with_layers(model, layers), idx),
                               **EXACT)


@pytest.mark.parametrize("kind,rope_dim,rank", [("gqa", 4, 20), ("mha", 8, 40), ("mqa", 16, 16)])
def test_the_mla_model_computes_exactly_what_the_latent_layers_do(kind, rope_dim, rank, float64_rope):
    """mla_model (through MultiHeadLatentAttention.load_head_weights) equals the latent reference forward, with
    a latent norm (a random one, so that it shows)."""
    model = random_source(kind)
    idx = tokens()
    layers, _ = lc.convert_layers(model, moments(model), lc.ConvertOptions(rank, rope_dim))
    layers = [replace(layer, norm=1 + 0.3 * torch.randn(rank, dtype=F64)) for layer in layers]
    mla = to_float64(lc.mla_model(model, layers, F64))
    torch.testing.assert_close(logits(mla, idx), logits(with_layers(model, layers), idx), **EXACT)


def test_an_mqa_source_converts_exactly_end_to_end(random_data, float64_rope):
    """MQA, the whole head as k_rope, full rank: the MLA model equals the source, up to the latent norm (step 7,
    the lossy one, which is the identity here); convert() reports all of the keys' energy kept."""
    model = random_source("mqa")
    d = model.config.head_dim
    opts = lc.ConvertOptions(kv_lora_rank=d, rope_dim=d, calib_tokens=2048)
    windows = lc.calibration_windows(random_data, model.config.block_size, opts.calib_tokens)
    layers, _ = lc.convert_layers(model, lc.input_moments(model, windows), opts)
    mla = to_float64(lc.mla_model(model, layers, F64))
    assert mla.config.kv_cache_values_per_token_per_layer() == model.config.kv_cache_values_per_token_per_layer()
    for block in mla.layers:
        block.self_attn.kv_a_layernorm = torch.nn.Identity()
    idx = tokens()
    torch.testing.assert_close(logits(mla, idx), logits(model, idx), **EXACT)
    _, report = lc.convert(model, random_data, opts)
    assert all(abs(layer["rope_energy_kept"] - 1) < 1e-12 for layer in report["layers"])


def test_the_latent_norm_fits(random_data):
    """fit-full's residual is at most fit's (it optimises over a superset), and both are small for a latent
    whose RMS varies little."""
    model = random_source("gqa")
    residuals = {}
    for mode in lc.LATENT_NORMS:
        opts = lc.ConvertOptions(kv_lora_rank=24, rope_dim=4, latent_norm=mode, calib_tokens=2048)
        residuals[mode] = [layer["norm_fit_residual"] for layer in lc.convert(model, random_data, opts)[1]["layers"]]
    assert all(0 <= full <= diag + 1e-12 for full, diag in zip(residuals["fit-full"], residuals["fit"]))
    assert max(residuals["fit"]) < 0.5


# ---- the converted checkpoint: decode, export ----------------------------------------------------

def converted(data, kind="gqa", rank=24, rope_dim=4) -> Transformer:
    return lc.convert(random_source(kind).float(), data, lc.ConvertOptions(rank, rope_dim, calib_tokens=2048))[0]


def test_absorbed_decode_equals_decompressed_decode_on_a_converted_model(random_data, float64_rope):
    """In float64: cached decode by absorption, cached decode decompressing the cache, and the whole sequence in
    one forward give the same logits."""
    model = to_float64(converted(random_data))
    idx = tokens(2, 16, seed=4)
    expected = logits(model, idx)
    for absorb in (True, False):
        cache = model.make_cache(2, 16)
        with torch.no_grad():
            steps = [model(idx[:, :5], cache=cache, input_pos=torch.arange(5), absorb=absorb)[0]]
            steps += [model(idx[:, t:t + 1], cache=cache, input_pos=torch.tensor([t]), absorb=absorb)[0]
                      for t in range(5, 16)]
        torch.testing.assert_close(torch.cat(steps, dim=1), expected, **EXACT)


def test_a_converted_model_exports_to_deepseek_v3_with_the_same_logits(random_data, tmp_path):
    pytest.importorskip("safetensors")
    transformers = pytest.importorskip("transformers")
    import convert_hf
    model = converted(random_data)
    save_checkpoint({"model": model.state_dict(), "model_config": model.config.to_dict()}, tmp_path / "c.pt")
    convert_hf.export_checkpoint(tmp_path / "c.pt", tmp_path / "hf")
    theirs, info = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not (info["missing_keys"] or info["unexpected_keys"] or info["mismatched_keys"])
    idx = tokens(2, model.config.block_size)
    with torch.no_grad():
        torch.testing.assert_close(theirs.eval()(idx).logits, model(idx)[0], atol=1e-4, rtol=0)


# ---- one-shot loss against rank on a trained source ----------------------------------------------

@pytest.fixture(scope="module")
def byte_shakespeare(tmp_path_factory) -> PreparedData:
    """The first 120 kB of Tiny Shakespeare as byte tokens, 12,000 of them for val."""
    ids = np.frombuffer(shakespeare_bytes(120_000), dtype=np.uint8)
    return PreparedData(write_byte_data(tmp_path_factory.mktemp("bytes"), ids, 12_000))


def train_tiny(data: PreparedData, kind: str, steps=200) -> Transformer:
    """A tiny source (2 layers, 4 heads of 16) trained on byte Shakespeare with AdamW: about 3 s on one quiet core."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=VOCAB, **SOURCES[kind]))
    optimizer = make_optimizer(model, 3e-3, 0.0, kind="adamw")
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, y = data.get_batch("train", 16, model.config.block_size, generator)
        model(x, y)[1].backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval()


@pytest.fixture(scope="module")
def trained(byte_shakespeare):
    """kind -> a tiny source trained once per module."""
    models = {}

    def get(kind):
        if kind not in models:
            models[kind] = train_tiny(byte_shakespeare, kind)
        return models[kind]
    return get


def val_loss(model, data) -> float:
    return evaluate(model, data, "val", 64, 32, "cpu")["loss"]


def one_shot_losses(model, data, rope_dim, ranks) -> list[float]:
    return [val_loss(lc.convert(model, data, lc.ConvertOptions(rank, rope_dim, calib_tokens=8192))[0], data)
            for rank in ranks]


def test_one_shot_loss_never_rises_when_the_rank_grows(byte_shakespeare, trained):
    """Where the low rank is the only loss before the latent norm (an MQA source, its whole head as k_rope), more
    rank never costs loss."""
    model = trained("mqa")
    assert val_loss(model, byte_shakespeare) < 2.5  # it learned something (uniform over bytes: 5.55)
    losses = one_shot_losses(model, byte_shakespeare, 16, (1, 2, 4, 8, 16))
    assert all(later <= earlier for earlier, later in itertools.pairwise(losses)), losses
    assert losses[0] > losses[-1] + 0.1, losses


def test_with_partial_rope_one_shot_loss_falls_with_rank_up_to_noise(byte_shakespeare, trained):
    """A GQA source, rope_dim 8 of 16: the unrotated key components are already wrong (they lost their
    rotation), so reconstructing them more faithfully is not guaranteed to lower the loss, and it does not
    strictly (measured on a 300-step source: 2.8544 at rank 16, 2.8630 at 32, 2.8632 at full rank 56). The loss
    still falls by far more than it ever rises."""
    losses = one_shot_losses(trained("gqa"), byte_shakespeare, 8, (2, 4, 8, 16, 32, 56))
    assert all(later <= earlier + 0.02 for earlier, later in itertools.pairwise(losses)), losses
    assert losses[0] > min(losses) + 0.1, losses


# ---- the command line ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = tmp_path_factory.mktemp("ckpts")
    for kind, overrides in {"gqa": SOURCES["gqa"], "mla": {"attention": "mla"}}.items():
        torch.manual_seed(0)
        model = Transformer(ModelConfig.from_preset("tiny", vocab_size=VOCAB, **overrides))
        save_checkpoint({"model": model.state_dict(), "model_config": model.config.to_dict()}, out / f"{kind}.pt")
    return {kind: out / f"{kind}.pt" for kind in ("gqa", "mla")}


@pytest.mark.parametrize("source,flags,message", [
    ("mla", ["--kv-lora-rank", "8"], "MLA checkpoint already"),
    ("gqa", ["--kv-lora-rank", "61", "--rope-dim", "4"], "gives 1 to 60 latent dims"),
    ("gqa", ["--kv-lora-rank", "8", "--rope-dim", "6"], r"--rope-dim 6: the source's head_dim 16 gives only \[2, 4, 8, 16\]"),
    ("gqa", ["--kv-lora-rank", "8", "--rope-dim", "32"], "--rope-dim 32"),
    ("gqa", ["--kv-lora-rank", "8", "--latent-norm", "off"], "invalid choice: 'off'"),
    ("gqa", ["--kv-lora-rank", "8", "--alpha", "-1"], "--alpha"),
])
def test_what_cannot_convert_is_refused_and_nothing_is_written(checkpoints, random_data, tmp_path, source, flags,
                                                               message):
    with pytest.raises(CLIError, match=message):
        convert_mla.main(["--ckpt", str(checkpoints[source]), "--out", str(tmp_path / "o.pt"),
                          "--data-dir", str(random_data.data_dir), *flags])
    assert not any(tmp_path.iterdir())


def test_missing_calibration_data_is_refused(checkpoints, tmp_path):
    with pytest.raises(CLIError, match="no such data directory"):
        convert_mla.main(["--ckpt", str(checkpoints["gqa"]), "--out", str(tmp_path / "o.pt"), "--data-dir",
                          str(tmp_path / "nothing"), "--kv-lora-rank", "8"])
    assert not any(tmp_path.iterdir())


def test_the_cli_writes_a_checkpoint_that_loads_and_replaces_it_only_with_force(checkpoints, random_data, tmp_path):
    out = tmp_path / "o.pt"
    argv = ["--ckpt", str(checkpoints["gqa"]), "--out", str(out), "--data-dir", str(random_data.data_dir),
            "--kv-lora-rank", "12", "--rope-dim", "4", "--calib-tokens", "1024"]
    good = subprocess.run([sys.executable, str(REPO / "convert_mla.py"), *argv], capture_output=True, text=True,
                          check=False)
    assert good.returncode == 0, good.stderr
    ckpt = load_checkpoint(out)
    assert ckpt["model_config"]["kv_lora_rank"] == 12 and len(ckpt["conversion"]["layers"]) == 2
    with pytest.raises(CLIError, match="pass --force"):
        convert_mla.main([*argv[:-6], "--kv-lora-rank", "8", "--rope-dim", "4"])
    assert load_checkpoint(out)["model_config"]["kv_lora_rank"] == 12
    convert_mla.main([*argv[:-6], "--kv-lora-rank", "8", "--rope-dim", "4", "--force"])
    assert load_checkpoint(out)["model_config"]["kv_lora_rank"] == 8


def test_the_sweep_writes_every_variant_and_the_exact_one_is_exact(random_data, tmp_path):
    """benchmarks/conversion_sweep.py on an MQA source: a header and a line a variant; the whole head as k_rope
    at full rank without the latent norm is the source (float32)."""
    from benchmarks import conversion_sweep
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=VOCAB, **SOURCES["mqa"]))
    sharpen(model)
    save_checkpoint({"model": model.state_dict(), "model_config": model.config.to_dict()}, tmp_path / "mqa.pt")
    conversion_sweep.main(["--ckpt", str(tmp_path / "mqa.pt"), "--data-dir", str(random_data.data_dir),
                           "--out", str(tmp_path / "sweep.jsonl"), "--calib-tokens", "1024"])
    header, *rows = [json.loads(line) for line in (tmp_path / "sweep.jsonl").read_text().splitlines()]
    assert header["n_variants"] == len(rows) == len(conversion_sweep.variants(model.config))
    exact = [row for row in rows if row["variant"] == {"kv_lora_rank": 16, "rope_dim": 16, "latent_norm": "none"}]
    assert exact and all(abs(row["gap"]) < 1e-4 for row in exact), exact  # twice: full rank is the whole head


def test_calibration_windows_are_deterministic_and_spread(random_data):
    a = lc.calibration_windows(random_data, 64, 64 * 10)
    assert torch.equal(a, lc.calibration_windows(random_data, 64, 64 * 10)) and a.shape == (10, 64)
    train = torch.from_numpy(random_data.tokens("train").astype(np.int64))
    assert torch.equal(a[0], train[:64]) and torch.equal(a[-1], train[-64:])
