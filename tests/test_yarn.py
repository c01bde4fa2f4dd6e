"""YaRN on the RoPE dims (rope_scaling "yarn"): plain RoPE untouched, DeepSeek's softmax correction, YaRN's
frequencies and attention factor against transformers' own, the MHA/GQA baselines, and the flags that switch it
on. Exports compare with transformers' DeepseekV3ForCausalLM in tests/test_convert_hf.py."""
import math
import re
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import REPO

import test as script  # the repo's test.py (pytest.ini puts the repo first on sys.path)
import train
from attention import GroupedQueryAttention, MultiHeadLatentAttention, rope_tables
from checkpoint import (
    load_checkpoint,
    load_weights,
    model_from_checkpoint,
    save_checkpoint,
)
from cli import CLIError
from model import Transformer
from model_config import ModelConfig, softmax_scale
from training import TrainConfig, check_start

TINY = ModelConfig.from_preset("tiny", vocab_size=128)


def yarn(config: ModelConfig = TINY, **fields) -> ModelConfig:
    return replace(config, **{"rope_scaling": "yarn", "rope_factor": 4.0, "original_seq_len": 16, **fields})


def saved_tiny(path, config: ModelConfig = TINY) -> Path:
    torch.manual_seed(0)
    save_checkpoint({"model": Transformer(config).state_dict(), "model_config": config.to_dict()}, path)
    return path


# ---- plain RoPE stays what it was ---------------------------------------------------------------

@pytest.mark.parametrize("rope_dim,theta", [(8, 10000.0), (64, 500.0)])
def test_unscaled_and_factor_1_tables_are_plain_rope_bit_for_bit(rope_dim, theta):
    inv_freq = theta ** (-torch.arange(0, rope_dim, 2, dtype=torch.float64) / rope_dim)  # the code before YaRN
    angles = torch.outer(torch.arange(300, dtype=torch.float64), inv_freq)
    plain = angles.cos().float(), angles.sin().float()
    for config in (None, TINY, yarn(rope_factor=1.0)):
        cos, sin = rope_tables(rope_dim, 300, theta, config)
        assert torch.equal(cos, plain[0]) and torch.equal(sin, plain[1])


@pytest.mark.parametrize("attention", ["mla", "mha"])
def test_yarn_factor_1_model_is_the_plain_model_bit_for_bit(attention):
    plain = replace(TINY, attention=attention)
    torch.manual_seed(0)
    ours = Transformer(plain).eval()
    scaled = Transformer(yarn(plain, rope_factor=1.0, mscale=0.7, mscale_all_dim=0.7)).eval()
    scaled.load_state_dict(ours.state_dict())
    idx = torch.randint(0, 128, (2, 64))
    with torch.no_grad():
        assert torch.equal(ours(idx)[0], scaled(idx)[0])


# ---- DeepSeek's softmax correction and YaRN's tables --------------------------------------------

@pytest.mark.parametrize("mscale,expected", [(1.0, 1.874), (0.707, 1.590)], ids=["v3", "v2-lite"])
def test_softmax_multiplier_is_deepseeks_for_the_released_configs(mscale, expected):
    """DeepSeek-V3: factor 40 over 4096, mscale = mscale_all_dim = 1.0; V2-Lite: 0.707. MLA's softmax scale is
    (dn + dr)^-0.5 times (0.1 mscale_all_dim ln(40) + 1)^2, the same in the baselines."""
    config = yarn(ModelConfig.from_preset("gpt2-small"), rope_factor=40.0, original_seq_len=4096, mscale=mscale,
                  mscale_all_dim=mscale)
    multiplier = (0.1 * mscale * math.log(40) + 1) ** 2
    assert round(multiplier, 3) == expected
    dn_dr = config.qk_nope_head_dim + config.qk_rope_head_dim
    assert MultiHeadLatentAttention(config).scale == pytest.approx(multiplier / math.sqrt(dn_dr), rel=1e-12)
    assert softmax_scale(replace(config, attention="mha"), 64) == pytest.approx(multiplier / 8, rel=1e-12)
    plain = replace(config, rope_scaling="none", rope_factor=1.0)
    assert MultiHeadLatentAttention(plain).scale == 1.0 / math.sqrt(dn_dr)  # as before YaRN, bit for bit


@pytest.mark.parametrize("factor,beta_fast,beta_slow,mscale,mscale_all_dim", [
    (4.0, 32.0, 1.0, 1.0, 1.0), (40.0, 32.0, 1.0, 0.707, 0.707), (8.0, 16.0, 2.0, 0.8, 0.5), (2.0, 32.0, 1.0, 1.0, 0.0),
])
def test_tables_are_transformers_yarn(factor, beta_fast, beta_slow, mscale, mscale_all_dim):
    """transformers' own YaRN (modeling_rope_utils) gives the frequencies and the cos/sin attention factor."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": factor, "original_max_position_embeddings": 64,
            "beta_fast": beta_fast, "beta_slow": beta_slow, "mscale": mscale, "mscale_all_dim": mscale_all_dim}
    hf = transformers.DeepseekV3Config(hidden_size=64, num_attention_heads=4, qk_rope_head_dim=32,
                                       max_position_embeddings=int(64 * factor), rope_parameters=rope)
    inv_freq, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](hf)
    if not mscale_all_dim:  # transformers then ignores mscale (see convert_hf.py's notes)
        mscale = 1.0
    config = yarn(rope_factor=factor, original_seq_len=64, beta_fast=beta_fast, beta_slow=beta_slow, mscale=mscale,
                  mscale_all_dim=mscale_all_dim)
    positions = torch.arange(int(64 * factor), dtype=torch.float64)
    angles = torch.outer(positions, inv_freq.double())
    cos, sin = rope_tables(32, len(positions), 10000.0, config)
    torch.testing.assert_close(cos, (angles.cos() * attention_factor).float(), atol=2e-5, rtol=0)
    torch.testing.assert_close(sin, (angles.sin() * attention_factor).float(), atol=2e-5, rtol=0)
    assert not torch.allclose(cos, rope_tables(32, len(positions), 10000.0)[0], atol=1e-2)  # YaRN did change them


def test_baseline_attention_under_yarn_is_rope_attention_with_yarns_tables_and_scale():
    """GroupedQueryAttention against softmax attention written out, with mscale != mscale_all_dim: the cos/sin
    factor reaches every logit squared, the softmax factor once."""
    config = yarn(TINY, attention="gqa", mscale=0.8, mscale_all_dim=0.5)
    torch.manual_seed(1)
    layer = GroupedQueryAttention(config)
    x = torch.randn(2, 40, config.d_model)
    cos, sin = rope_tables(config.head_dim, 40, config.rope_theta, config)
    with torch.no_grad():
        got = layer(x, cos[None], sin[None])
        q = layer.q_proj(x).view(2, 40, 4, 16).transpose(1, 2)
        k = layer.k_proj(x).view(2, 40, 2, 16).transpose(1, 2).repeat_interleave(2, dim=1)
        v = layer.v_proj(x).view(2, 40, 2, 16).transpose(1, 2).repeat_interleave(2, dim=1)
        rotate = lambda t: torch.cat((t[..., :8] * cos - t[..., 8:] * sin, t[..., 8:] * cos + t[..., :8] * sin), -1)
        mscale = lambda m: 0.1 * m * math.log(4.0) + 1
        logits = rotate(q) @ rotate(k).transpose(-1, -2) * mscale(0.5) ** 2 / math.sqrt(16)
        logits = logits.masked_fill(torch.ones(40, 40, dtype=torch.bool).triu(1), float("-inf"))
        expected = layer.o_proj((logits.softmax(-1) @ v).transpose(1, 2).reshape(2, 40, -1))
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert cos[0, 0].item() == pytest.approx(mscale(0.8) / mscale(0.5), rel=1e-6)  # position 0: the factor alone


# ---- config, checkpoints and flags --------------------------------------------------------------

def test_old_checkpoint_configs_load_with_plain_rope_and_yarn_round_trips():
    old = {k: v for k, v in TINY.to_dict().items()
           if k not in ("rope_scaling", "rope_factor", "original_seq_len", "beta_fast", "beta_slow", "mscale",
                        "mscale_all_dim")}
    assert ModelConfig.from_dict(old) == TINY and TINY.rope_scaling == "none"
    scaled = yarn(mscale=0.707, mscale_all_dim=0.707)
    assert ModelConfig.from_dict(scaled.to_dict()) == scaled


@pytest.mark.parametrize("fields,message", [
    ({"rope_scaling": "ntk"}, "rope_scaling must be one of ('none', 'yarn'), got 'ntk'"),
    ({"rope_scaling": "none", "rope_factor": 4.0}, "rope_factor 4.0 needs rope_scaling 'yarn'"),
    ({"rope_factor": 0.5}, "rope_factor must be >= 1"),
    ({"original_seq_len": 0}, "original_seq_len (the context length trained at) must be positive for yarn"),
    ({"beta_fast": 1.0, "beta_slow": 2.0}, "need 0 < beta_slow < beta_fast"),
    ({"mscale": 0.0}, "mscale must be positive"),
    ({"mscale_all_dim": -1.0}, "mscale_all_dim must be >= 0"),
])
def test_bad_rope_scaling_field_is_one_clear_error(fields, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
        yarn(**fields)


def test_init_from_at_a_longer_context_with_yarn_loads_the_weights(tmp_path, capsys):
    """Fine-tuning at 4x the context: the RoPE tables are not in the state dict, so the weights load as they are."""
    ckpt = saved_tiny(tmp_path / "short.pt")
    tc, mc, start, _ = train.configs_from_args(["--init-from", str(ckpt), "--block-size", "256", "--rope-scaling",
                                             "yarn", "--rope-factor", "4", "--original-seq-len", "64"])
    assert mc == yarn(TINY, block_size=256, original_seq_len=64)
    model = Transformer(mc)
    load_weights(model, start["model"], "cannot start")
    assert torch.equal(model.embed_tokens.weight, load_checkpoint(ckpt)["model"]["embed_tokens.weight"])
    cos, _ = model.rope.at(torch.arange(256)[None])
    assert cos.shape == (1, 256, TINY.qk_rope_head_dim // 2)
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--rope-scaling ROPE_SCALING none | yarn" in help_text


def test_checkpoints_from_before_yarn_resume_with_plain_rope(tmp_path):
    old_config = {k: v for k, v in TINY.to_dict().items() if k not in ("rope_scaling", "rope_factor")}
    ckpt = {"model": {}, "optimizer": {}, "scaler": {}, "train_config": {}, "step": 0, "best_val_loss": 5.0,
            "tokens_seen": 0, "rng": [], "model_config": old_config}
    tc = TrainConfig(out_dir=str(tmp_path), resume=True, optimizer="adamw")
    check_start(tc, TINY, ckpt)
    with pytest.raises(CLIError, match=r"differs in rope_scaling \(checkpoint 'none', requested 'yarn'\)"):
        check_start(tc, yarn(), ckpt)


def test_eval_context_and_yarn_override_the_checkpoint(tmp_path):
    ckpt = load_checkpoint(saved_tiny(tmp_path / "short.pt"))
    longer = script.with_eval_context(ckpt, 256, 4.0)
    assert ModelConfig.from_dict(longer["model_config"]) == yarn(TINY, block_size=256, original_seq_len=64)
    model = model_from_checkpoint(longer).eval()
    with torch.no_grad():
        assert model(torch.randint(0, 128, (1, 256)))[0].isfinite().all()
    again = script.with_eval_context(longer, None, 8.0)  # already YaRN: original_seq_len stays 64
    assert ModelConfig.from_dict(again["model_config"]) == yarn(TINY, block_size=256, original_seq_len=64,
                                                                 rope_factor=8.0)


@pytest.mark.parametrize("command,message", [
    (["train.py", "--out-dir", "OUT", "--rope-scaling", "yarn", "--rope-factor", "4"],
     "error: original_seq_len (the context length trained at) must be positive for yarn, got 0"),
    (["train.py", "--out-dir", "OUT", "--rope-factor", "4"],
     "error: rope_factor 4.0 needs rope_scaling 'yarn' (it is 'none')"),
    (["test.py", "--ckpt", "CKPT", "--yarn", "0.5"],
     "error: argument --yarn: must be at least 1, got '0.5' (see --help)"),
    (["train.py", "--out-dir", "OUT", "--rope-scaling", "yarn", "--rope-factor", "0.5", "--original-seq-len", "64"],
     "error: rope_factor must be >= 1 (1: no extension), got 0.5"),
], ids=["yarn-without-original-length", "factor-without-yarn", "test-yarn-below-1", "train-factor-below-1"])
def test_bad_rope_flag_is_refused_in_one_line(command, message, tmp_path):
    paths = {"OUT": str(tmp_path / "out"), "CKPT": str(saved_tiny(tmp_path / "tiny.pt"))}
    result = subprocess.run([sys.executable, *[paths.get(part, part) for part in command]], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [message]
    assert not (tmp_path / "out").exists()
