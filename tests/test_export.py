"""The self-contained export (convert_hf.py export): GPT-2's tokenizer files against tiktoken on real text; the
directory as transformers reads it offline: tokenizer, pipeline, a config without experts, the tied lm_head, file
modes; and, where llama.cpp's converter is found ($LLAMA_CPP_CONVERTER), the GGUF it makes of an export against
what llama.cpp's loader checks (gguf_convert.py)."""
import json
import logging
import math
import os
import shutil
import socket
import stat
from dataclasses import asdict

import pytest
import torch
from conftest import require_gpt2_ranks, shakespeare_bytes

import cli
import convert_hf
import gguf_convert
import hf_tokenizer
from attention import rope_tables
from benchmarks import llama_cpp as llama_cpp_check
from checkpoint import save_checkpoint
from decode_benchmark import sharpen
from model import Transformer
from model_config import ModelConfig, softmax_scale
from tokenizer import EOT_ID, VOCAB_SIZE, Tokenizer
from training import TrainConfig

INSTALL = "pip install -r requirements-dev.txt"
safetensors_torch = pytest.importorskip("safetensors.torch", reason=f"convert_hf.py needs safetensors: {INSTALL}")
transformers = pytest.importorskip("transformers", reason=f"these tests read the export with transformers: {INSTALL}")
EOT = "<|endoftext|>"
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    require_gpt2_ranks()
    directory = tmp_path_factory.mktemp("tokenizer")
    for name, text in hf_tokenizer.tokenizer_files(model_max_length=1024).items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def theirs(tokenizer_dir):
    """transformers' tokenizer, read from the files alone."""
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def ours():
    return Tokenizer()


def test_tokenizer_files_encode_tiny_shakespeare_as_tiktoken(theirs, ours):
    text = shakespeare_bytes(2_000_000).decode("utf-8")  # all of it: 1,115,394 characters
    ids = theirs(text, add_special_tokens=False)["input_ids"]
    assert ids == ours.encode(text)
    assert theirs.decode(ids) == text


@pytest.mark.parametrize("text", [
    f"First.{EOT}Second.", EOT, f" {EOT}\n{EOT}x", "Ünïcödé 日本語 😀👍🏽 \u00a0\u3000 tabs\t\r\n  trailing  ",
    "numbers 1234567 3.14 -42", "it's we've I'M", ""])
def test_special_tokens_are_tiktokens_and_split_they_are_plain_text(theirs, ours, text):
    """transformers reads <|endoftext|> in text as the special token 50256, and with split_special_tokens as
    plain text, as this project's Tokenizer.encode does."""
    pieces = [ours.encode(piece) for piece in text.split(EOT)]
    ids = theirs(text, add_special_tokens=False)["input_ids"]
    assert ids == [*pieces[0], *(id for piece in pieces[1:] for id in (EOT_ID, *piece))]
    assert theirs(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == ours.encode(text)
    assert theirs.decode(ids) == text


def test_special_tokens_and_defaults_are_gpt2s(theirs):
    assert theirs.is_fast and len(theirs) == 50257
    assert theirs.eos_token == theirs.bos_token == theirs.unk_token == EOT and theirs.eos_token_id == 50256
    assert theirs.pad_token is None  # GPT-2 has none; generation_config.json names one for generate()
    assert theirs("Hello")["input_ids"] == [15496]  # no BOS added
    assert theirs.decode(theirs("a .  b 's")["input_ids"]) == "a .  b 's"  # spaces are not cleaned up


def test_the_two_file_layout_holds_the_same_vocabulary_and_merges(tokenizer_dir):
    fast = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    assert json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8")) == fast["vocab"]
    lines = (tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[:5] == ["#version: 0.2", "Ġ t", "Ġ a", "h e", "i n"]  # as GPT-2's own merges.txt begins
    assert [line.split(" ") for line in lines[1:]] == fast["merges"] and len(fast["merges"]) == 50000


# ---- the export directory -----------------------------------------------------------------------

def export_random_model(directory, seed=0, **overrides) -> tuple[Transformer, object]:
    """A tiny MLA model with GPT-2's padded vocabulary and random weights, saved as if train.py had trained it
    for 7 steps and exported under umask 022 -> (the model, the export directory)."""
    require_gpt2_ranks()
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.from_preset("tiny", **overrides)).eval()
    sharpen(model)
    ckpt = directory / "best.pt"
    save_checkpoint({"model": model.state_dict(), "model_config": model.config.to_dict(), "step": 7,
                     "tokens_seen": 7168, "best_val_loss": 4.25, "train_config": asdict(TrainConfig(seed=5))}, ckpt)
    umask = os.umask(0o022)
    try:
        convert_hf.export_checkpoint(ckpt, directory / "hf")
    finally:
        os.umask(umask)
    return model, directory / "hf"


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return export_random_model(tmp_path_factory.mktemp("export"), seed=4)  # a seed whose greedy text varies


@pytest.fixture(scope="module")
def export_without_query_compression(tmp_path_factory):
    return export_random_model(tmp_path_factory.mktemp("export-q0"), q_lora_rank=0)


@pytest.fixture
def no_network(monkeypatch):
    """Record every attempt to open a connection, and make it fail; the test asserts there were none."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("no network in this test")
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    return attempts


def test_export_is_complete_and_every_file_is_mode_0644(export):
    _, hf_dir = export
    assert sorted(path.name for path in hf_dir.iterdir()) == sorted(convert_hf.EXPORT_FILES)
    for path in hf_dir.iterdir():  # under umask 022; safetensors alone writes model.safetensors 0600
        assert stat.S_IMODE(path.stat().st_mode) == 0o644, path.name


def test_model_card_says_how_the_checkpoint_was_trained(export):
    card = " ".join((export[1] / "README.md").read_text(encoding="utf-8").split())
    assert "for 7 steps (7,168 tokens) on `data/shakespeare`: muon at peak lr 0.003" in card
    assert "seed 5. Best validation loss 4.2500 nats/token" in card


@pytest.mark.parametrize("fixture", ["export", "export_without_query_compression"])
def test_config_read_through_autoconfig_has_no_experts_in_any_field(fixture, request, caplog):
    """Every field a reader (llama.cpp's converter goes through AutoConfig) would otherwise default to DeepSeek-V3's
    experts says there are none."""
    model, hf_dir = request.getfixturevalue(fixture)
    with caplog.at_level(logging.WARNING):
        config = transformers.AutoConfig.from_pretrained(hf_dir)
    assert not caplog.records
    read = config.to_dict()
    for key, value in convert_hf.DENSE_FIELDS.items():
        assert read[key] == value and type(read[key]) is type(value), key
    assert config.num_mtp_layers == 0  # transformers' name for num_nextn_predict_layers
    assert read["first_k_dense_replace"] == read["num_hidden_layers"] == model.config.n_layer
    assert read["q_lora_rank"] == (model.config.q_lora_rank or None)


def test_lm_head_is_written_and_tied_again_on_load(export, caplog):
    model, hf_dir = export
    with safetensors_torch.safe_open(hf_dir / "model.safetensors", framework="pt") as f:
        assert torch.equal(f.get_tensor("lm_head.weight"), model.embed_tokens.weight)  # for readers that do not tie
    with caplog.at_level(logging.WARNING):
        theirs, info = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, output_loading_info=True)
    assert not any(info.values()) and not caplog.records
    assert theirs.lm_head.weight.data_ptr() == theirs.model.embed_tokens.weight.data_ptr()


def test_import_refuses_a_tied_lm_head_that_is_not_the_embedding(export, tmp_path):
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    shutil.copy(export[1] / "config.json", hf_dir)
    weights = safetensors_torch.load_file(export[1] / "model.safetensors")
    weights["lm_head.weight"][0, 0] += 1
    safetensors_torch.save_file(weights, hf_dir / "model.safetensors")
    with pytest.raises(cli.CLIError, match="ties the embeddings .* lm_head.weight is not model.embed_tokens.weight"):
        convert_hf.import_checkpoint(hf_dir, tmp_path / "imported.pt")
    assert not (tmp_path / "imported.pt").exists()


def test_generation_config_stops_pads_and_never_samples_padding(export):
    generation = json.loads((export[1] / "generation_config.json").read_text())
    assert generation["eos_token_id"] == generation["pad_token_id"] == EOT_ID
    assert generation["suppress_tokens"] == list(range(VOCAB_SIZE, 50304))
    assert "max_length" not in generation  # one would make every call that passes max_new_tokens warn


def test_tokenizer_and_pipeline_offline_generate_what_our_greedy_decode_generates(export, no_network):
    model, hf_dir = export
    prompt, n = "ROMEO:", 24
    ids = Tokenizer().encode(prompt)
    with torch.no_grad():
        ours = model.generate(torch.tensor([ids]), n, temperature=0, vocab_limit=VOCAB_SIZE, stop_id=EOT_ID)
    ours = ours[0, len(ids):].tolist()
    assert len(set(ours)) > 10 and EOT_ID not in ours  # varied text, all n tokens

    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(hf_dir)
    prompt_ids = tokenizer(prompt, return_tensors="pt")
    assert prompt_ids["input_ids"].tolist() == [ids]
    got = theirs.generate(**prompt_ids, max_new_tokens=n, do_sample=False)[0, len(ids):].tolist()
    assert got == ours
    pipe = transformers.pipeline("text-generation", model=str(hf_dir), device="cpu")
    assert pipe(prompt, max_new_tokens=n, do_sample=False)[0]["generated_text"] == prompt + Tokenizer().decode(ours)
    assert no_network == []


def test_force_replaces_an_earlier_exports_files_and_nothing_else(export, tmp_path):
    """A smaller vocabulary (not GPT-2's tokens) exports without a tokenizer; with --force over a GPT-2 export, the
    old tokenizer files go too, and the user's files stay."""
    hf_dir = tmp_path / "hf"
    shutil.copytree(export[1], hf_dir)
    (hf_dir / "notes.txt").write_text("mine")
    small = Transformer(ModelConfig.from_preset("tiny", vocab_size=320))
    save_checkpoint({"model": small.state_dict(), "model_config": small.config.to_dict()}, tmp_path / "small.pt")
    written = convert_hf.export_checkpoint(tmp_path / "small.pt", hf_dir, force=True)
    assert written == ["model.safetensors", "generation_config.json", "README.md", "config.json"]
    assert sorted(path.name for path in hf_dir.iterdir()) == sorted([*written, "notes.txt"])
    assert "There is no tokenizer" in (hf_dir / "README.md").read_text(encoding="utf-8")


# ---- llama.cpp's GGUF (gguf_convert.py) ---------------------------------------------------------

@pytest.mark.parametrize("mscale,mscale_all_dim", [(1.0, 1.0), (0.707, 0.707), (1.0, 0.5), (0.5, 1.0), (1.0, 0.0)])
def test_yarn_fix_gives_llama_cpp_our_cos_sin_and_softmax_scales(mscale, mscale_all_dim):
    """With the fix's keys, llama.cpp's YaRN scales (src/models/deepseek2.cpp: cos/sin times attn_factor, the
    softmax times (attn_factor (1 + 0.1 L ln s))^2, L = yarn_log_multiplier / 0.1) are our model's; where mscale
    equals mscale_all_dim they already are, with attn_factor 1 and the converter's 0.1 mscale_all_dim."""
    config = ModelConfig.from_preset("tiny", rope_scaling="yarn", rope_factor=4.0, original_seq_len=16,
                                     mscale=mscale, mscale_all_dim=mscale_all_dim)
    metadata = {"deepseek2.attention.q_lora_rank": 32}
    fixes = gguf_convert.needed_fixes(config, metadata)
    assert bool(fixes) == (mscale != mscale_all_dim)
    attn_factor = fixes.get("deepseek2.rope.scaling.attn_factor", ("FLOAT32", 1.0))[1]
    log_multiplier = fixes.get("deepseek2.rope.scaling.yarn_log_multiplier", ("FLOAT32", 0.1 * mscale_all_dim))[1]
    llama_cpp_softmax = (attn_factor * (1 + log_multiplier * math.log(4.0))) ** 2
    cos, _ = rope_tables(config.qk_rope_head_dim, 1, config.rope_theta, config)
    assert attn_factor == pytest.approx(cos[0, 0].item(), rel=1e-6)  # cos(0) times our factor
    qk_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
    assert llama_cpp_softmax == pytest.approx(softmax_scale(config, qk_dim) * math.sqrt(qk_dim), rel=1e-6)


def test_the_llama_cpp_check_without_llama_cpps_converter_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(gguf_convert.CONVERTER_ENV, raising=False)
    with pytest.raises(SystemExit) as stop:
        cli.run(lambda: llama_cpp_check.main(["--preset", "tiny", "--out-dir", str(tmp_path / "out")]))
    assert stop.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: llama.cpp's convert_hf_to_gguf.py not found: pass --converter PATH or set "
                             "LLAMA_CPP_CONVERTER") and stderr.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def converter():
    path = gguf_convert.find_converter()
    if path is None:
        pytest.skip(f"llama.cpp's convert_hf_to_gguf.py not found (set {gguf_convert.CONVERTER_ENV} to it; it ships "
                    "with llama.cpp and in the llama-cpp-python sdist under vendor/llama.cpp); CI does not fetch it")
    return path


def loader_violations(metadata: dict, n_layer: int) -> list[str]:
    """What llama.cpp's deepseek2 loader (src/models/deepseek2.cpp, and llama_model's hyperparameter checks in
    src/llama-model.cpp) would refuse in this metadata."""
    def get(key):
        return metadata.get(f"deepseek2.{key}", 0)
    refused = []
    if get("expert_used_count") > get("expert_count"):
        refused.append("more experts used than there are")
    if get("expert_count") == 0 and get("expert_group_count") != 0:
        refused.append("expert groups without experts")
    if get("expert_count") == 0 and get("leading_dense_block_count") < n_layer:
        refused.append("mixture-of-experts layers without experts")
    if n_layer not in (26, 27) and "deepseek2.attention.q_lora_rank" not in metadata:
        refused.append("no attention.q_lora_rank")
    return refused


@pytest.mark.parametrize("fixture", ["export", "export_without_query_compression"])
def test_llama_cpp_converter_makes_a_consistent_gguf_once_fixed(fixture, request, converter, tmp_path):
    model, hf_dir = request.getfixturevalue(fixture)
    gguf = gguf_convert.gguf_package(converter)
    converted = tmp_path / "converted.gguf"
    gguf_convert.convert(converter, hf_dir, converted)
    metadata, tensors = gguf_convert.read_metadata(gguf, converted)
    c = model.config
    expected = {"block_count": c.n_layer, "leading_dense_block_count": c.n_layer, "expert_count": 0,
                "expert_used_count": 0, "expert_group_count": 0, "expert_group_used_count": 0,
                "expert_shared_count": 0, "expert_feed_forward_length": 0, "expert_weights_scale": 1.0,
                "attention.kv_lora_rank": c.kv_lora_rank, "attention.head_count": c.n_head,
                "attention.head_count_kv": 1, "attention.key_length": c.kv_lora_rank + c.qk_rope_head_dim,
                "attention.value_length": c.kv_lora_rank,
                "attention.key_length_mla": c.qk_nope_head_dim + c.qk_rope_head_dim,
                "attention.value_length_mla": c.v_head_dim, "rope.dimension_count": c.qk_rope_head_dim,
                "vocab_size": c.vocab_size, "embedding_length": c.d_model, "feed_forward_length": c.ffn_hidden}
    for key, value in expected.items():
        assert metadata[f"deepseek2.{key}"] == value, key
    assert metadata["tokenizer.ggml.model"] == "gpt2" and metadata["tokenizer.ggml.pre"] == "gpt-2"  # GPT-2's BPE
    assert metadata["tokenizer.ggml.eos_token_id"] == EOT_ID
    assert {"blk.0.attn_k_b.weight", "blk.0.attn_v_b.weight"} <= set(tensors)  # kv_b_proj split for MLA decode
    assert "output.weight" not in tensors  # tied: llama.cpp reads token_embd, lm_head.weight is skipped
    assert ("blk.0.attn_q.weight" in tensors) == (c.q_lora_rank == 0)

    fixes = gguf_convert.needed_fixes(c, metadata)
    if c.q_lora_rank:
        assert loader_violations(metadata, c.n_layer) == [] and fixes == {}
        return
    assert loader_violations(metadata, c.n_layer) == ["no attention.q_lora_rank"]
    assert fixes == {"deepseek2.attention.q_lora_rank": ("UINT32", 0)}
    gguf_convert.rewrite(gguf, converted, tmp_path / "fixed.gguf", fixes)
    fixed, fixed_tensors = gguf_convert.read_metadata(gguf, tmp_path / "fixed.gguf")
    assert fixed == {**metadata, "deepseek2.attention.q_lora_rank": 0} and fixed_tensors == tensors
    assert loader_violations(fixed, c.n_layer) == []
