"""convert_hf.py against transformers' own DeepseekV3ForCausalLM: same logits, same greedy tokens, exact round
trips, and one-line errors for what cannot convert."""
import json
import subprocess
import sys

import pytest
import torch
from conftest import REPO, require_gpt2_ranks

import convert_hf
from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from cli import CLIError
from decode_benchmark import sharpen
from model import Transformer
from model_config import ModelConfig

INSTALL = "pip install -r requirements-dev.txt"
pytest.importorskip("safetensors", reason=f"convert_hf.py needs safetensors: {INSTALL}")
transformers = pytest.importorskip("transformers", reason=f"these tests compare against transformers: {INSTALL}")

VOCAB = 320  # 256 token ids used + padding, like GPT-2's 50257 padded to 50304
# (q_lora_rank, tie_embeddings, qk_rope_head_dim): with and without query compression, tied and untied, two rope dims
CONFIGS = [(32, True, 8), (0, False, 16), (0, True, 8), (32, False, 16)]
CONFIG_IDS = ["q32-tied-dr8", "q0-untied-dr16", "q0-tied-dr8", "q32-untied-dr16"]


def project_model(q_lora_rank=32, tie_embeddings=True, qk_rope_head_dim=8, seed=0, **overrides) -> Transformer:
    """A tiny MLA model (vocab_size VOCAB unless overridden) with random weights."""
    torch.manual_seed(seed)
    config = ModelConfig.from_preset("tiny", **{"vocab_size": VOCAB, **overrides}, q_lora_rank=q_lora_rank,
                                     tie_embeddings=tie_embeddings, qk_rope_head_dim=qk_rope_head_dim)
    model = Transformer(config).eval()
    sharpen(model)
    return model


def save_project(model: Transformer, path):
    save_checkpoint({"model": model.state_dict(), "model_config": model.config.to_dict()}, path)
    return path


def exported(model: Transformer, tmp_path):
    """Export the model through a checkpoint file; return the Hugging Face directory."""
    out_dir = tmp_path / "hf"
    convert_hf.export_checkpoint(save_project(model, tmp_path / "ckpt.pt"), out_dir)
    return out_dir


def load_hf(hf_dir):
    """DeepseekV3ForCausalLM from hf_dir, asserting that every weight was used and none was missing."""
    model, info = transformers.DeepseekV3ForCausalLM.from_pretrained(hf_dir, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and info["mismatched_keys"] == set()
    assert model.dtype == torch.float32
    return model.eval()


def random_tokens(batch, length, seed=1):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def edit_config(hf_dir, **changes):
    path = hf_dir / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


# ---- export -------------------------------------------------------------------------------------

@pytest.mark.parametrize("q_lora_rank,tie,dr", CONFIGS, ids=CONFIG_IDS)
def test_exported_model_gives_the_same_logits_in_transformers(q_lora_rank, tie, dr, tmp_path):
    ours = project_model(q_lora_rank, tie, dr)
    theirs = load_hf(exported(ours, tmp_path))
    assert all(type(layer.mlp).__name__ == "DeepseekV3MLP" for layer in theirs.model.layers)  # dense, no MoE
    assert theirs.config.tie_word_embeddings == tie and (theirs.config.q_lora_rank or 0) == q_lora_rank
    idx = random_tokens(2, ours.config.block_size)  # every RoPE position
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx)[0], atol=1e-4, rtol=0)


def test_rope_layout_is_what_makes_the_logits_agree(tmp_path):
    """Reading the exported RoPE rows as half-split pairs (rope_interleave false) breaks the match."""
    ours = project_model()
    hf_dir = exported(ours, tmp_path)
    edit_config(hf_dir, rope_interleave=False)
    idx = random_tokens(1, 32)
    with torch.no_grad():
        assert (load_hf(hf_dir)(idx).logits - ours(idx)[0]).abs().max() > 0.1


@pytest.mark.parametrize("q_lora_rank", [32, 0])
def test_greedy_generation_is_identical(q_lora_rank, tmp_path):
    ours = project_model(q_lora_rank, seed=2)
    theirs = load_hf(exported(ours, tmp_path))
    prompt = random_tokens(1, 8, seed=3)
    expected = ours.generate(prompt, 20, temperature=0)
    got = theirs.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=20, do_sample=False,
                          use_cache=True, pad_token_id=0)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("q_lora_rank,tie,dr", CONFIGS, ids=CONFIG_IDS)
def test_import_of_export_reproduces_the_checkpoint_exactly(q_lora_rank, tie, dr, tmp_path):
    original = project_model(q_lora_rank, tie, dr, dropout=0.1)
    convert_hf.import_checkpoint(exported(original, tmp_path), tmp_path / "back.pt")
    ckpt = load_checkpoint(tmp_path / "back.pt")
    expected = original.state_dict()
    assert ckpt["model"].keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(ckpt["model"][name], tensor), name
    assert ckpt["model_config"] == {**original.config.to_dict(), "dropout": 0.0}  # transformers has no dropout to keep


def test_gpt2_vocabulary_exports_padded_with_the_endoftext_id(tmp_path):
    """The default vocab_size (GPT-2's 50257 padded to 50304) goes out whole, with bos/eos = <|endoftext|>."""
    require_gpt2_ranks()  # the export then carries GPT-2's tokenizer files
    ours = project_model(vocab_size=50304)
    theirs = load_hf(exported(ours, tmp_path))
    assert theirs.config.vocab_size == 50304
    assert theirs.config.eos_token_id == theirs.config.bos_token_id == 50256 == theirs.generation_config.eos_token_id
    idx = torch.randint(0, 50257, (1, 16), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx)[0], atol=1e-4, rtol=0)


# ---- import of what transformers wrote ----------------------------------------------------------

@pytest.mark.parametrize("rope_interleave,q_lora_rank,tie",
                         [(True, 32, False), (False, None, True), (True, None, True)])
def test_model_saved_by_transformers_imports_with_the_same_logits(rope_interleave, q_lora_rank, tie, tmp_path):
    torch.manual_seed(4)
    config = transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=q_lora_rank, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8,
        v_head_dim=12, first_k_dense_replace=2, max_position_embeddings=48, rope_interleave=rope_interleave,
        rope_parameters={"rope_type": "default", "rope_theta": 5000.0}, tie_word_embeddings=tie,
        bos_token_id=None, eos_token_id=None)
    theirs = transformers.DeepseekV3ForCausalLM(config).eval()
    sharpen(theirs)
    theirs.save_pretrained(tmp_path / "hf")

    convert_hf.import_checkpoint(tmp_path / "hf", tmp_path / "imported.pt")
    ours = model_from_checkpoint(load_checkpoint(tmp_path / "imported.pt")).eval()
    assert ours.config.rope_theta == 5000.0 and ours.config.block_size == 48 and ours.config.tie_embeddings == tie
    idx = random_tokens(2, 48)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], theirs(idx).logits, atol=1e-4, rtol=0)


def test_older_rope_keys_read_as_transformers_reads_them(tmp_path):
    """Config files from before transformers 5 (and DeepSeek's own) give rope_theta and rope_scaling at top level."""
    hf_dir = exported(project_model(), tmp_path)
    config = json.loads((hf_dir / "config.json").read_text())
    del config["rope_parameters"]
    (hf_dir / "config.json").write_text(json.dumps({**config, "rope_theta": 2000.0, "rope_scaling": None}))
    convert_hf.import_checkpoint(hf_dir, tmp_path / "imported.pt")
    ours = model_from_checkpoint(load_checkpoint(tmp_path / "imported.pt")).eval()
    assert ours.config.rope_theta == 2000.0
    idx = random_tokens(1, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], load_hf(hf_dir)(idx).logits, atol=1e-4, rtol=0)


# ---- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("attention", ["mha", "gqa"])
def test_export_refuses_a_non_mla_checkpoint(attention, tmp_path):
    model = Transformer(ModelConfig.from_preset("tiny", vocab_size=VOCAB, attention=attention))
    with pytest.raises(CLIError, match=f"has {attention} attention; only MLA"):
        convert_hf.export_checkpoint(save_project(model, tmp_path / "ckpt.pt"), tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt"]  # nothing written


def test_export_refuses_a_norm_eps_transformers_cannot_reproduce(tmp_path):
    with pytest.raises(CLIError, match="norm_eps is 1e-05"):
        exported(project_model(norm_eps=1e-5), tmp_path)
    assert not (tmp_path / "hf").exists()


def exported_then(tmp_path, **config_changes):
    hf_dir = exported(project_model(), tmp_path)
    edit_config(hf_dir, **config_changes)
    return hf_dir


@pytest.mark.parametrize("changes,message", [
    ({"model_type": "llama"}, "model_type 'llama', not 'deepseek_v3'"),
    ({"first_k_dense_replace": 1}, "mixture-of-experts layers"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}}, "RoPE scaling 'yarn'"),
    ({"rms_norm_eps": 1e-5}, "rms_norm_eps is 1e-05"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"kv_lora_rank": 16}, r"kv_a_proj_with_mqa.weight has shape \(40, 64\); config.json implies \(24, 64\)"),
    ({"num_hidden_layers": 3, "first_k_dense_replace": 3}, "the weights lack model.layers.2"),
    ({"num_hidden_layers": 1, "first_k_dense_replace": 1}, "unexpected weights for a dense DeepSeek-V3 model: model.l"),
    ({"qk_rope_head_dim": 7}, "qk_rope_head_dim must be even"),
])
def test_import_refuses_what_does_not_convert(changes, message, tmp_path):
    hf_dir = exported_then(tmp_path, **changes)
    with pytest.raises(CLIError, match=message):
        convert_hf.import_checkpoint(hf_dir, tmp_path / "imported.pt")
    assert not (tmp_path / "imported.pt").exists()


def test_import_refuses_missing_and_broken_files(tmp_path):
    with pytest.raises(CLIError, match="is not a directory"):
        convert_hf.import_checkpoint(tmp_path / "nowhere", tmp_path / "imported.pt")
    hf_dir = exported(project_model(), tmp_path)
    weights = hf_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CLIError, match="is not a readable safetensors file"):
        convert_hf.import_checkpoint(hf_dir, tmp_path / "imported.pt")
    (hf_dir / "config.json").write_text("{not json")
    with pytest.raises(CLIError, match="not valid JSON"):
        convert_hf.import_checkpoint(hf_dir, tmp_path / "imported.pt")
    (hf_dir / "config.json").unlink()
    with pytest.raises(CLIError, match="config.json does not exist"):
        convert_hf.import_checkpoint(hf_dir, tmp_path / "imported.pt")


def test_outputs_are_not_overwritten_without_force(tmp_path):
    first, second = project_model(seed=5), project_model(seed=6)
    hf_dir = exported(first, tmp_path)
    ckpt = save_project(second, tmp_path / "second.pt")
    with pytest.raises(CLIError, match="already holds .*; pass --force to replace"):
        convert_hf.export_checkpoint(ckpt, hf_dir)
    convert_hf.export_checkpoint(ckpt, hf_dir, force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.pt", "hf", "second.pt"]  # no temp dirs left
    convert_hf.import_checkpoint(hf_dir, tmp_path / "imported.pt")
    with pytest.raises(CLIError, match="already holds .*; pass --force to replace"):
        convert_hf.import_checkpoint(hf_dir, tmp_path / "imported.pt")
    convert_hf.import_checkpoint(hf_dir, tmp_path / "imported.pt", force=True)
    assert torch.equal(load_checkpoint(tmp_path / "imported.pt")["model"]["embed_tokens.weight"],
                       second.embed_tokens.weight)


def test_missing_safetensors_is_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # makes the import fail
    with pytest.raises(CLIError, match="needs safetensors: pip install -r requirements-dev.txt"):
        exported(project_model(), tmp_path)


def test_command_line_error_is_one_line_and_exit_2(tmp_path):
    ckpt = save_project(Transformer(ModelConfig.from_preset("tiny", vocab_size=VOCAB, attention="gqa")),
                        tmp_path / "gqa.pt")
    result = subprocess.run([sys.executable, str(REPO / "convert_hf.py"), "export", "--ckpt", str(ckpt),
                             "--out-dir", str(tmp_path / "hf")], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {ckpt} has gqa attention; only MLA checkpoints export "
                                                  "as DeepSeek-V3"]
    assert not (tmp_path / "hf").exists()


def test_export_with_force_into_a_run_dir_replaces_only_its_own_files(tmp_path):
    """Exporting RUN/best.pt into RUN itself, then again with --force: the checkpoint and every other file stay."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ckpt = save_project(project_model(seed=5), run_dir / "best.pt")
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    convert_hf.export_checkpoint(ckpt, run_dir)
    first = (run_dir / "model.safetensors").read_bytes()
    save_project(project_model(seed=6), tmp_path / "other.pt")
    written = convert_hf.export_checkpoint(tmp_path / "other.pt", run_dir, force=True)
    assert (run_dir / "model.safetensors").read_bytes() != first
    assert sorted(p.name for p in run_dir.iterdir()) == sorted([*before, *written])
    assert {name: (run_dir / name).read_bytes() for name in before} == before


@pytest.mark.parametrize("key,value", [("vocab_size", "320"), ("hidden_size", 64.0), ("num_hidden_layers", True)])
def test_import_refuses_a_config_field_of_the_wrong_type(key, value, tmp_path):
    hf_dir = exported_then(tmp_path, **{key: value})
    with pytest.raises(CLIError, match=f"config.json: {key} must be an integer, got {value!r}"):
        convert_hf.import_checkpoint(hf_dir, tmp_path / "imported.pt")
    assert not (tmp_path / "imported.pt").exists()


# ---- YaRN ---------------------------------------------------------------------------------------

YARN = {"rope_scaling": "yarn", "original_seq_len": 16, "block_size": 96}  # positions up to 6x the original


@pytest.mark.parametrize("factor", [4.0, 40.0])
@pytest.mark.parametrize("mscale", [1.0, 0.707], ids=["v3-mscale", "v2-lite-mscale"])
@pytest.mark.parametrize("q_lora_rank", [32, 0])
def test_exported_yarn_model_gives_the_same_logits_in_transformers(factor, mscale, q_lora_rank, tmp_path):
    ours = project_model(q_lora_rank, qk_rope_head_dim=16, **YARN, rope_factor=factor, mscale=mscale,
                         mscale_all_dim=mscale)
    theirs = load_hf(exported(ours, tmp_path))
    assert theirs.config.rope_parameters["rope_type"] == "yarn"
    idx = random_tokens(2, 96)
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx)[0], atol=1e-4, rtol=0)


def test_yarn_round_trips_and_is_what_makes_the_logits_agree(tmp_path):
    """Unequal mscale and mscale_all_dim put a factor on cos/sin as well as on the softmax; reading the same
    weights with plain RoPE breaks the match."""
    ours = project_model(**YARN, rope_factor=8.0, mscale=0.8, mscale_all_dim=0.5, beta_fast=16.0, beta_slow=2.0)
    hf_dir = exported(ours, tmp_path)
    convert_hf.import_checkpoint(hf_dir, tmp_path / "back.pt")
    assert load_checkpoint(tmp_path / "back.pt")["model_config"] == {**ours.config.to_dict(), "dropout": 0.0}
    idx = random_tokens(1, 96)
    with torch.no_grad():
        torch.testing.assert_close(load_hf(hf_dir)(idx).logits, ours(idx)[0], atol=1e-4, rtol=0)
        edit_config(hf_dir, rope_parameters={"rope_type": "default", "rope_theta": 10000.0})
        assert (load_hf(hf_dir)(idx).logits - ours(idx)[0]).abs().max() > 0.1


@pytest.mark.parametrize("rope_scaling", [
    {"factor": 4.0, "original_max_position_embeddings": 16, "mscale": 0.707, "mscale_all_dim": 0.707},
    {"factor": 40.0, "original_max_position_embeddings": 8, "beta_fast": 16, "beta_slow": 2},  # no mscale: as 1
    {"factor": 4.0, "original_max_position_embeddings": 16, "mscale": 0.707},  # transformers ignores this mscale
])
@pytest.mark.parametrize("layout", ["rope_parameters", "rope_scaling"])
def test_yarn_model_saved_by_transformers_imports_with_the_same_logits(rope_scaling, layout, tmp_path):
    """transformers 5 writes rope_parameters; DeepSeek's own config files have rope_scaling {"type": "yarn"}."""
    torch.manual_seed(5)
    config = transformers.DeepseekV3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=16,
        v_head_dim=12, first_k_dense_replace=2, max_position_embeddings=80,
        rope_parameters={"rope_type": "yarn", "rope_theta": 5000.0, **rope_scaling}, bos_token_id=None,
        eos_token_id=None)
    theirs = transformers.DeepseekV3ForCausalLM(config).eval()
    sharpen(theirs)
    theirs.save_pretrained(tmp_path / "hf")
    if layout == "rope_scaling":
        saved = json.loads((tmp_path / "hf" / "config.json").read_text())
        del saved["rope_parameters"]
        (tmp_path / "hf" / "config.json").write_text(json.dumps(
            {**saved, "rope_theta": 5000.0, "rope_scaling": {"type": "yarn", **rope_scaling}}))
    convert_hf.import_checkpoint(tmp_path / "hf", tmp_path / "imported.pt")
    ours = model_from_checkpoint(load_checkpoint(tmp_path / "imported.pt")).eval()
    assert ours.config.rope_scaling == "yarn" and ours.config.rope_factor == rope_scaling["factor"]
    idx = random_tokens(2, 80)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx)[0], theirs(idx).logits, atol=1e-4, rtol=0)


@pytest.mark.parametrize("rope,message", [
    ({"rope_type": "linear", "factor": 2.0}, "RoPE scaling 'linear' is not supported: only yarn converts"),
    ({"rope_type": "yarn", "factor": 4.0}, "RoPE scaling 'yarn' needs original_max_position_embeddings"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "attention_factor": 1.2},
     "explicit attention_factor or truncate false does not convert"),
    ({"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "mscale_all_dim": 1.0},
     "mscale_all_dim but no mscale does not convert"),
    ({"rope_type": "yarn", "factor": 0.5, "original_max_position_embeddings": 16},
     r"config.json: rope_factor must be >= 1"),
])
def test_import_refuses_yarn_it_cannot_reproduce(rope, message, tmp_path):
    hf_dir = exported_then(tmp_path, rope_parameters={"rope_theta": 1e4, **rope})
    with pytest.raises(CLIError, match=message):
        convert_hf.import_checkpoint(hf_dir, tmp_path / "imported.pt")
    assert not (tmp_path / "imported.pt").exists()


def test_export_refuses_an_mscale_transformers_would_ignore(tmp_path):
    model = project_model(**YARN, rope_factor=4.0, mscale=0.7, mscale_all_dim=0.0)
    with pytest.raises(CLIError, match="mscale 0.7 with mscale_all_dim 0 does not export"):
        exported(model, tmp_path)
    assert not (tmp_path / "hf").exists()
