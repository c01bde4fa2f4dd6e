"""test.py: whole-split evaluation against a one-forward reference, sampling through the latent cache against
a cache-free argmax loop, top-p filtering, streamed UTF-8, and bad inputs."""
import json
import math
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import test as script  # the repo's test.py (pytest.ini puts the repo first on sys.path)
from checkpoint import save_checkpoint
from conftest import REPO, require_gpt2_ranks, shakespeare_bytes
from cli import CLIError
from dataset import PreparedData
from model import Transformer, sample_next
from model_config import ModelConfig
from tokenizer import VOCAB_SIZE, Tokenizer

CORPUS_CHARS = 24_000  # the first lines of Tiny Shakespeare: a val split of a few hundred tokens


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A prepared dir made by data_prepare.py from the start of Tiny Shakespeare."""
    require_gpt2_ranks()
    root = tmp_path_factory.mktemp("data")
    corpus = root / "input.txt"
    corpus.write_bytes(shakespeare_bytes(CORPUS_CHARS))  # the first lines are ASCII: bytes = characters
    out = root / "prepared"
    subprocess.run([sys.executable, "data_prepare.py", "--input", str(corpus), "--out-dir", str(out)],
                   cwd=REPO, check=True, capture_output=True)
    return out


@pytest.fixture(scope="module")
def data(data_dir):
    return PreparedData(data_dir)


def tiny_model(seed=0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("tiny", **overrides)).eval()


@pytest.fixture(scope="module")
def ckpt_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    model = tiny_model()
    save_checkpoint({"model": model.state_dict(), "model_config": model.config.to_dict()}, path)
    return path


# ---- evaluation ---------------------------------------------------------------------------------

def test_whole_split_in_one_block_matches_one_full_forward(data):
    """With the whole val split in one window, evaluation must equal one plain forward over it."""
    tokens = torch.from_numpy(data.tokens("val").astype(np.int64))
    model = tiny_model(block_size=len(tokens) - 1)
    result = script.evaluate(model, data, "val", len(tokens) - 1, batch_size=2, device="cpu")

    with torch.no_grad():
        logits, _ = model(tokens[None, :-1])
    per_token = F.cross_entropy(logits[0], tokens[1:], reduction="none").double()
    assert result["tokens"] == len(tokens) - 1
    assert result["loss"] == pytest.approx(per_token.mean().item(), rel=1e-6)


@pytest.mark.parametrize("stride", [None, 16])
def test_windowed_evaluation_counts_every_token_once_and_is_deterministic(data, stride):
    model = tiny_model()
    block = model.config.block_size
    runs = [script.evaluate(model, data, "val", block, batch_size, "cpu", stride) for batch_size in (3, 3, 1)]
    assert runs[0] == runs[1]  # deterministic, bit for bit
    assert runs[0]["tokens"] == len(data.tokens("val")) - 1

    # Reference: each window on its own, per-token losses summed in float64.
    nats, scored = 0.0, 0
    with torch.no_grad():
        for x, y in data.eval_windows("val", block, stride):
            logits, _ = model(x[None])
            losses = F.cross_entropy(logits[0], y, ignore_index=-1, reduction="none").double()
            nats += losses[y != -1].sum().item()
            scored += int((y != -1).sum())
    assert scored == runs[0]["tokens"]
    for run in (runs[0], runs[2]):
        assert run["loss"] == pytest.approx(nats / scored, rel=1e-6)


def test_perplexity_and_bits_per_byte(data, data_dir):
    model = tiny_model()
    result = script.evaluate(model, data, "val", model.config.block_size, 4, "cpu")
    meta = json.loads((data_dir / "meta.json").read_text())
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]), rel=1e-12)
    total_bits = result["loss"] * result["tokens"] / math.log(2)
    assert result["bits_per_byte"] == pytest.approx(total_bits / meta["splits"]["val"]["text_bytes"], rel=1e-12)


def test_json_output_parses_and_matches_evaluate(ckpt_path, data, data_dir):
    proc = subprocess.run([sys.executable, "test.py", "--ckpt", str(ckpt_path), "--data-dir", str(data_dir),
                           "--batch-size", "4", "--json"], cwd=REPO, capture_output=True, text=True, check=True)
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    model = tiny_model()
    expected = script.evaluate(model, data, "val", model.config.block_size, 4, "cpu")
    assert report["val_loss"] == pytest.approx(expected["loss"], rel=1e-6)
    assert report["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-6)
    assert report["bits_per_byte"] == pytest.approx(expected["bits_per_byte"], rel=1e-6)
    assert report["tokens"] == expected["tokens"]
    assert ModelConfig.from_dict(report["model_config"]) == model.config


# ---- sampling -----------------------------------------------------------------------------------

def model_preferring_padding(seed=0) -> Transformer:
    """A tiny model whose padding ids (>= the tokenizer's vocabulary) get the largest logits."""
    model = tiny_model(seed)
    with torch.no_grad():
        model.lm_head.weight[VOCAB_SIZE:] *= 200
    return model


def greedy_without_cache(model: Transformer, prompt: list[int], n: int) -> list[int]:
    """The argmax chain over the tokenizer's ids, recomputing the whole sequence every step."""
    seq = torch.tensor([prompt])
    with torch.no_grad():
        for _ in range(n):
            logits, _ = model(seq)
            seq = torch.cat([seq, logits[:, -1, :VOCAB_SIZE].argmax(-1, keepdim=True)], dim=1)
    return seq[0, len(prompt):].tolist()


PROMPT = [464, 3290, 286, 262]


def test_padding_ids_are_never_sampled():
    model = model_preferring_padding()
    with torch.no_grad():
        logits, _ = model(torch.tensor([PROMPT]))
    assert logits[0, -1].argmax() >= VOCAB_SIZE  # unmasked, the padding would win
    ids = list(script.sample_tokens(model, PROMPT, 40, 1.0, None, None, torch.Generator().manual_seed(0)))
    assert len(ids) == 40 and max(ids) < VOCAB_SIZE


@pytest.mark.parametrize("temperature,top_k", [(0.0, None), (1.0, 1)], ids=["temperature-0", "top-k-1"])
def test_greedy_sampling_is_the_argmax_chain_of_full_forwards(temperature, top_k):
    model = model_preferring_padding()
    n = model.config.block_size - len(PROMPT)
    ids = list(script.sample_tokens(model, PROMPT, n, temperature, top_k, None, torch.Generator().manual_seed(0)))
    assert ids == greedy_without_cache(model, PROMPT, n)


def test_seeded_sampling_is_reproducible():
    model = tiny_model()
    draws = [list(script.sample_tokens(model, PROMPT, 30, 1.0, None, 0.9, torch.Generator().manual_seed(seed)))
             for seed in (7, 7, 8)]
    assert draws[0] == draws[1]
    assert draws[0] != draws[2]


def test_sampling_command_is_reproducible_and_writes_prompt_then_continuation(ckpt_path, capsys):
    require_gpt2_ranks()
    argv = ["--ckpt", str(ckpt_path), "--prompt", "To be", "--max-new-tokens", "12", "--seed", "3",
            "--num-samples", "2"]
    outputs = []
    for _ in range(2):
        script.main(argv)
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    samples = outputs[0].split("\n" + "-" * 40 + "\n")
    assert len(samples) == 2 and all(s.startswith("To be") for s in samples)
    assert samples[0] != samples[1]  # one generator runs on through both samples


def test_prompts_from_a_jsonl_file_sample_as_one_batch_and_greedy_equals_one_at_a_time(ckpt_path, tmp_path, capsys):
    prompts = ["To be", "Now is the winter of", "O"]
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text("".join(json.dumps({"text": p}) + "\n" for p in prompts))
    common = ["--ckpt", str(ckpt_path), "--max-new-tokens", "10", "--temperature", "0"]
    script.main(common + ["--prompt-file", str(prompt_file), "--num-samples", "2"])
    together = capsys.readouterr().out.split("\n" + "-" * 40 + "\n")
    alone = []
    for prompt in prompts:
        script.main(common + ["--prompt", prompt])
        alone.append(capsys.readouterr().out)
    assert [s.rstrip("\n") for s in together] == [a.rstrip("\n") for a in alone for _ in range(2)]


def test_a_bad_prompt_file_line_is_one_error(ckpt_path, tmp_path):
    prompt_file = tmp_path / "prompts.jsonl"
    prompt_file.write_text('{"text": "fine"}\n{"txt": "no text field"}\n')
    with pytest.raises(CLIError, match="line 2"):
        script.main(["--ckpt", str(ckpt_path), "--prompt-file", str(prompt_file)])


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.1, 0.5, 0.15, 0.25])  # by rank: token 1, 3, 2, 0; running totals .5, .75, .9, 1
    logits = probs.log().expand(20_000, 4)
    for top_p, kept in [(0.45, {1}), (0.5, {1}), (0.74, {1, 3}), (0.76, {1, 3, 2}), (0.91, {0, 1, 2, 3}),
                        (1.0, {0, 1, 2, 3})]:
        draws = sample_next(logits, 1.0, None, top_p, torch.Generator().manual_seed(0))[:, 0].tolist()
        counts = Counter(draws)
        assert set(counts) == kept, top_p
        mass = sum(probs[t].item() for t in kept)
        for token in kept:  # the kept tokens keep their relative probabilities
            assert counts[token] / len(draws) == pytest.approx(probs[token].item() / mass, abs=0.015)


def test_streamed_text_prints_multibyte_characters_whole():
    require_gpt2_ranks()
    tok = Tokenizer()
    text = "Naïve café — 日本語 🙂!"
    ids = tok.encode(text)
    assert len(ids) > len(text.split())  # several characters span more than one token
    pieces = list(script.stream_text(tok, iter(ids)))
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    # A character cut off by the end of generation is flushed as U+FFFD rather than lost.
    assert "".join(script.stream_text(tok, iter(ids[:-2]))) == tok.decode(ids[:-2])


def test_too_long_prompt_is_refused_and_max_new_tokens_clamped(ckpt_path, capsys):
    require_gpt2_ranks()
    with pytest.raises(CLIError, match="leaves no room"):
        script.main(["--ckpt", str(ckpt_path), "--prompt", "word " * 64])
    prompt = "word " * 60
    room = 64 - len(Tokenizer().encode(prompt))
    script.main(["--ckpt", str(ckpt_path), "--prompt", prompt, "--max-new-tokens", "50"])
    assert f"generating {room} tokens" in capsys.readouterr().err


# ---- bad input ----------------------------------------------------------------------------------

def bad_checkpoints(tmp_path, ckpt_path):
    good = ckpt_path.read_bytes()
    (tmp_path / "truncated.pt").write_bytes(good[: len(good) // 2])
    (tmp_path / "corrupt.pt").write_bytes(bytes(range(256)) * 64)
    torch.save({"format_version": 99, "model": {}, "model_config": {}}, tmp_path / "future.pt")
    return {"missing.pt": "does not exist", "truncated.pt": "truncated or corrupt",
            "corrupt.pt": "truncated or corrupt", "future.pt": "format version 99"}


def test_bad_checkpoints_give_one_line_errors(tmp_path, ckpt_path, data_dir):
    for name, message in bad_checkpoints(tmp_path, ckpt_path).items():
        with pytest.raises(CLIError, match=message):
            script.main(["--ckpt", str(tmp_path / name), "--data-dir", str(data_dir)])
    proc = subprocess.run([sys.executable, "test.py", "--ckpt", str(tmp_path / "truncated.pt")],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: checkpoint") and len(proc.stderr.splitlines()) == 1


def test_data_with_a_larger_vocabulary_than_the_model_is_refused(tmp_path, data_dir):
    model = tiny_model(vocab_size=1024)
    path = tmp_path / "small_vocab.pt"
    save_checkpoint({"model": model.state_dict(), "model_config": model.config.to_dict()}, path)
    with pytest.raises(CLIError, match="vocabulary of 50257"):
        script.main(["--ckpt", str(path), "--data-dir", str(data_dir)])


def test_missing_data_dir_is_asked_for(ckpt_path):
    with pytest.raises(CLIError, match="--data-dir is needed"):
        script.main(["--ckpt", str(ckpt_path)])
