"""train.py on the CPU: the loss falls, resuming is bitwise exact, two DDP processes equal one with twice the batch,
a crash while saving or a NaN loss leaves the checkpoints alone, and bad input is one line.

Most runs use a prepared data dir in data_prepare.py's format whose tokens are the UTF-8 bytes of Tiny Shakespeare
(vocab 256), so that the tiny model's LM head is small and a training step takes milliseconds."""
import io
import itertools
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import urllib.error
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, SequentialLR

import corpus
import data_prepare
import train as train_script
import training
from checkpoint import load_checkpoint
from cli import CLIError
from conftest import REPO, require_gpt2_ranks, shakespeare_bytes
from dataset import PreparedData
from model import Transformer
from model_config import ModelConfig
from optim import make_optimizer, train_step
from runs import (TINY, assert_same_run, assert_same_state, ddp_worker, metrics, run_cli, run_config,
                  train_on_one_and_two_processes)
from training import MetricsLog, TrainConfig, train



pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory, byte_data) -> Path:
    """20 steps in one go: evaluations (and saves) at steps 0, 5, 10, 15, 20."""
    out = tmp_path_factory.mktemp("straight")
    assert train(run_config(out, byte_data), TINY) == 0
    return out


# ---- schedule and optimiser --------------------------------------------------------------------

HEAP_OF_A_FREED_BLOCK = """
import ctypes, torch
from runtime import keep_freed_memory

class Mallinfo2(ctypes.Structure):  # glibc's struct mallinfo2 (malloc.h), every field a size_t
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                      "fsmblks", "uordblks", "fordblks", "keepcost")]

mallinfo2 = ctypes.CDLL(None).mallinfo2
mallinfo2.restype = Mallinfo2

def mapped_then_kept():
    block = torch.empty(100 << 20, dtype=torch.uint8)
    mapped = mallinfo2().hblkhd  # bytes in blocks mmapped on their own, which free() unmaps
    del block
    return mapped, mallinfo2().fordblks  # bytes freed but kept in malloc's heap for the next allocation

print(*mapped_then_kept())
keep_freed_memory()
print(*mapped_then_kept())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc" or platform.libc_ver()[1] < "2.33",
                    reason="keep_freed_memory tunes glibc's malloc; mallinfo2 needs glibc 2.33")
def test_keep_freed_memory_keeps_a_freed_100_mb_block_in_the_heap():
    """By default glibc maps a 100 MB block on its own and unmaps it when freed, so the next one is page-faulted
    in afresh; after keep_freed_memory() the block comes from the heap and stays there, free, once freed.
    Read from malloc's own counters (mallinfo2), in a fresh process, as the setting lasts for the process."""
    out = subprocess.run([sys.executable, "-c", HEAP_OF_A_FREED_BLOCK], capture_output=True, text=True,
                         check=True, cwd=REPO).stdout.split()
    default_mapped, default_kept, mapped, kept = map(int, out)
    block = 100 << 20
    assert default_mapped >= block and default_kept < block
    assert mapped < block and kept >= block


def test_lr_schedule_matches_torch_schedulers():
    """Linear warmup then cosine decay, against torch's LinearLR + CosineAnnealingLR; min_lr after the horizon."""
    schedule = TrainConfig(lr=1e-3, min_lr=1e-4, warmup_iters=10, lr_decay_iters=80, max_iters=100).schedule
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    reference = SequentialLR(optimizer, [LinearLR(optimizer, 1 / 10, 1.0, total_iters=9),
                                         CosineAnnealingLR(optimizer, T_max=70, eta_min=1e-4)], milestones=[10])
    for step in range(81):
        assert schedule.lr_at(step) == pytest.approx(optimizer.param_groups[0]["lr"], rel=1e-12, abs=0)
        optimizer.step()
        reference.step()
    assert [schedule.lr_at(step) for step in range(80, 100)] == [1e-4] * 20


def test_weight_decay_applies_to_matrices_only():
    model = Transformer(TINY)
    decay, no_decay = make_optimizer(model, 1e-3, 0.1, kind="adamw").param_groups
    names = {p: name for name, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[p] for p in no_decay["params"]} == {n for n, p in model.named_parameters() if "norm" in n}
    assert "embed_tokens.weight" in {names[p] for p in decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)  # the tied LM head counted once


# ---- training runs -----------------------------------------------------------------------------

def test_loss_goes_down(tmp_path):
    """End to end on GPT-2 tokens: data_prepare.py on 100 kB of Tiny Shakespeare, then 20 steps of 512 tokens
    with the tiny preset's vocab of 50304 take the val loss from about ln 50304 = 10.8 nats to 2 nats lower."""
    require_gpt2_ranks()
    text = tmp_path / "shakespeare.txt"
    text.write_bytes(shakespeare_bytes(100_000))
    data_prepare.main(["--input", str(text), "--out-dir", str(tmp_path / "data"), "--workers", "1"])
    tc = run_config(tmp_path / "out", tmp_path / "data", eval_interval=20)
    assert train(tc, ModelConfig.from_preset("tiny")) == 0
    evals = [line for line in metrics(tmp_path / "out") if "val_loss" in line]
    assert [line["step"] for line in evals] == [0, 20]
    assert evals[0]["val_loss"] == pytest.approx(np.log(50304), abs=0.1)
    assert evals[1]["val_loss"] < evals[0]["val_loss"] - 2.0


def test_best_checkpoint_holds_the_lowest_val_loss(straight_run):
    evals = [line for line in metrics(straight_run) if "val_loss" in line]
    assert [line["step"] for line in evals] == [0, 5, 10, 15, 20]
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 1.5  # byte tokens: from ln 256 = 5.55 nats
    lowest = min(evals, key=lambda line: line["val_loss"])
    best = load_checkpoint(straight_run / "best.pt")
    assert best["best_val_loss"] == lowest["val_loss"] == evals[-1]["best_val_loss"] and best["step"] == lowest["step"]


def test_loss_curve_is_drawn(straight_run):
    """loss.png is a PNG (matplotlib is in requirements-dev.txt)."""
    pytest.importorskip("matplotlib", reason="pip install -r requirements-dev.txt")
    assert (straight_run / "loss.png").read_bytes().startswith(b"\x89PNG\r\n\x1a\n")


def test_without_matplotlib_a_note_says_how_to_get_the_loss_curve(straight_run, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # makes the import fail
    training.plot_losses(straight_run / "metrics.jsonl", tmp_path / "loss.png")
    note = capsys.readouterr().err
    assert note.startswith("note: matplotlib is not installed, so there is no") and "pip install matplotlib" in note
    assert f"python train.py --resume --out-dir {tmp_path}" in note and not (tmp_path / "loss.png").exists()


def test_default_data_dir_is_prepared_on_first_use(tmp_path, monkeypatch):
    """python train.py with no --data-dir, where data/shakespeare is missing: it is downloaded and prepared
    (here from a stand-in for the download), then trained on."""
    require_gpt2_ranks()
    text = shakespeare_bytes(60_000)
    monkeypatch.setattr(corpus.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(text))
    monkeypatch.chdir(tmp_path)
    train_script.main(["--preset", "tiny", "--device", "cpu", "--max-iters", "1", "--eval-iters", "1",
                       "--batch-size", "2", "--out-dir", "out"])
    assert PreparedData("data/shakespeare").meta["sources"][0]["bytes"] == len(text)
    assert load_checkpoint(tmp_path / "out" / "ckpt.pt")["train_config"]["data_dir"] == "data/shakespeare"


def test_default_data_dir_offline_is_one_line_naming_the_way_out(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(corpus.urllib.request, "urlopen", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CLIError, match=r"cannot download Tiny Shakespeare .* data_prepare.py --input PATH --out-dir "):
        train_script.main(["--preset", "tiny", "--device", "cpu", "--max-iters", "1"])
    assert not any(tmp_path.iterdir())


def test_resume_is_bitwise_exact(tmp_path, byte_data, straight_run):
    """10 steps, then resumed to 20: the same weights, optimiser, RNG states, best.pt and log as 20 straight."""
    assert train(run_config(tmp_path, byte_data, max_iters=10), TINY) == 0
    saved = load_checkpoint(tmp_path / "ckpt.pt")
    assert saved["step"] == 10 and saved.keys() - {"format_version"} == set(training.Trainer.STATE)
    assert train(run_config(tmp_path, byte_data, resume=True), TINY) == 0
    assert_same_run(tmp_path, straight_run, every_line=True)


def test_evaluating_leaves_training_untouched(tmp_path, byte_data, straight_run):
    """Evaluating at steps 0 and 20 only, instead of every 5 steps, changes nothing in the weights at step 20."""
    assert train(run_config(tmp_path, byte_data, eval_interval=20), TINY) == 0
    ours, straight = load_checkpoint(tmp_path / "ckpt.pt"), load_checkpoint(straight_run / "ckpt.pt")
    for key in ("model", "optimizer", "rng"):
        assert_same_state(ours[key], straight[key], key)


def test_sigterm_saves_and_resume_is_bitwise_exact(tmp_path, byte_data, straight_run, monkeypatch):
    """SIGTERM during step 7 finishes that step, saves ckpt.pt and returns; resuming then ends where 20 straight
    steps do. (The first training line after the resume averages fewer steps, so only evaluations are compared.)"""
    steps = itertools.count(1)

    def signal_during_step_7(*args):
        if next(steps) == 7:
            os.kill(os.getpid(), signal.SIGTERM)
        return train_step(*args)

    monkeypatch.setattr(training, "train_step", signal_during_step_7)
    assert train(run_config(tmp_path, byte_data), TINY) == signal.SIGTERM
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 7
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # handlers restored
    monkeypatch.undo()
    assert train(run_config(tmp_path, byte_data, resume=True), TINY) == 0
    assert_same_run(tmp_path, straight_run, every_line=False)


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, byte_data, straight_run, monkeypatch):
    shutil.copytree(straight_run, tmp_path, dirs_exist_ok=True)
    before = (tmp_path / "ckpt.pt").read_bytes()
    files = sorted(p.name for p in tmp_path.iterdir())

    def save_part_then_fail(obj, path, *args, **kwargs):
        Path(path).write_bytes(before[: len(before) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", save_part_then_fail)
    with pytest.raises(CLIError, match=r"could not write .*ckpt\.pt: No space left on device"):
        train(run_config(tmp_path, byte_data, max_iters=30, resume=True), TINY)
    monkeypatch.undo()
    assert (tmp_path / "ckpt.pt").read_bytes() == before
    assert load_checkpoint(tmp_path / "ckpt.pt")["step"] == 20
    assert sorted(p.name for p in tmp_path.iterdir()) == files  # no temp file left


def test_nan_loss_stops_without_touching_checkpoints(tmp_path, byte_data, straight_run, monkeypatch):
    shutil.copytree(straight_run, tmp_path, dirs_exist_ok=True)
    before = {name: (tmp_path / name).read_bytes() for name in ("ckpt.pt", "best.pt")}
    forward = Transformer.forward

    def forward_with_nan_loss(self, idx, targets=None, cache=None):
        logits, loss = forward(self, idx, targets, cache)
        return logits, loss * float("nan")

    monkeypatch.setattr(Transformer, "forward", forward_with_nan_loss)
    with pytest.raises(CLIError, match="training loss became nan between steps 21 and 25"):
        train(run_config(tmp_path, byte_data, max_iters=30, resume=True), TINY)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before


def test_metrics_log_keeps_the_lines_up_to_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 5, "loss": 3.0}\n{"step": 10, "loss": 2.0}\n{"step": 15, "loss": 1.0}\n{"step": 20, "lo')
    MetricsLog(path, resume_step=10).write(step=11, loss=1.5)  # the last line was cut short by a crash
    assert [json.loads(line) for line in path.read_text().splitlines()] == [
        {"step": 5, "loss": 3.0}, {"step": 10, "loss": 2.0}, {"step": 11, "loss": 1.5}]
    MetricsLog(path, resume_step=None)  # a fresh run starts it anew, at its first line
    assert len(path.read_text().splitlines()) == 3
    MetricsLog(path, resume_step=None).write(step=0, loss=9.0)
    assert path.read_text() == '{"step": 0, "loss": 9.0}\n'


def test_resuming_another_model_names_the_fields(tmp_path, byte_data, straight_run):
    shutil.copytree(straight_run, tmp_path, dirs_exist_ok=True)
    with pytest.raises(CLIError) as error:
        train(run_config(tmp_path, byte_data, resume=True), replace(TINY, n_layer=3, vocab_size=512))
    assert "vocab_size (checkpoint 256, requested 512), n_layer (checkpoint 2, requested 3)" in str(error.value)


# ---- two processes -----------------------------------------------------------------------------

def test_ddp_two_processes_equal_one_with_twice_the_batch(tmp_path, byte_data, monkeypatch):
    """gloo, 2 processes x batch 4 against 1 process x batch 8, with 2 accumulation micro-steps per step (so the
    no_sync path runs) and no dropout. Rank 0 alone writes; each process seeds its streams differently."""
    mc = replace(TINY, dropout=0.0)
    single, double = train_on_one_and_two_processes(ddp_worker, tmp_path, byte_data, mc, monkeypatch)
    one, two = load_checkpoint(single / "ckpt.pt"), load_checkpoint(double / "ckpt.pt")
    assert one["model"].keys() == two["model"].keys() == Transformer(mc).state_dict().keys()  # no module. prefix
    for name, weight in one["model"].items():
        torch.testing.assert_close(two["model"][name], weight, rtol=1e-5, atol=1e-6, msg=name)
    assert two["tokens_seen"] == one["tokens_seen"] == 3 * 8 * mc.block_size * 2
    assert len(two["rng"]) == 2
    lines = [metrics(single), metrics(double)]
    assert len(lines[0]) == len(lines[1])  # one writer: no line written twice
    for a, b in zip(*lines):
        assert a.keys() == b.keys() and a["step"] == b["step"]
        for key in ("loss", "train_loss", "val_loss"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-5)
    seeds = [set((tmp_path / f"rank{rank}.txt").read_text().split()) for rank in (0, 1)]
    assert len(seeds[0]) == len(seeds[1]) == 3 and seeds[0].isdisjoint(seeds[1])  # training + 2 evaluations


# ---- the command line --------------------------------------------------------------------------

def test_cli_resume_takes_the_configs_from_the_checkpoint(tmp_path, straight_run):
    """--resume with only --out-dir and --max-iters: data dir, model and schedule come from ckpt.pt."""
    shutil.copytree(straight_run, tmp_path, dirs_exist_ok=True)
    result = run_cli("--out-dir", tmp_path, "--resume", "--max-iters", 23, "--eval-interval", 3)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("model: ") == 1 and "vocab_size=256," in result.stdout
    ckpt = load_checkpoint(tmp_path / "ckpt.pt")
    assert ckpt["step"] == 23 and ckpt["model_config"] == TINY.to_dict()
    assert ckpt["train_config"]["lr_decay_iters"] == 20 and ckpt["train_config"]["eval_interval"] == 3
    before, after = metrics(straight_run), metrics(tmp_path)
    assert after[:len(before)] == before and [line["step"] for line in after[len(before):]] == [21, 21, 23, 23]


def test_lr_defaults_follow_the_optimizer(tmp_path, straight_run):
    """lr: each optimizer's tuned peak (results/muon.md), min_lr a tenth of lr; a checkpoint saved before
    --optimizer existed resumes as the AdamW run it was."""
    assert (TrainConfig().optimizer, TrainConfig().schedule.peak) == ("muon", 3e-3)
    assert TrainConfig().schedule.floor == pytest.approx(3e-4, rel=1e-15)
    assert TrainConfig(optimizer="adamw").schedule[:2] == (1e-3, 1e-4)
    assert (TrainConfig(lr=5e-3, min_lr=1e-3).schedule.floor, TrainConfig(lr=2e-3).schedule.floor) == (1e-3, 2e-3 / 10)
    ckpt = load_checkpoint(straight_run / "ckpt.pt")
    del ckpt["train_config"]["optimizer"]
    torch.save(ckpt, tmp_path / "ckpt.pt")
    tc, _, _, _ = train_script.configs_from_args(["--resume", "--out-dir", str(tmp_path)])
    assert (tc.optimizer, tc.lr, tc.min_lr) == ("adamw", 3e-3, 3e-4)  # the run's own, not the defaults


@pytest.mark.parametrize("case", ["vocab", "short split", "no data", "bad value", "ckpt exists", "other model"])
def test_bad_input_is_one_line(case, tmp_path, byte_data, straight_run):
    out = tmp_path / "out"
    args, expected = {
        "vocab": (["--data-dir", byte_data, "--preset", "tiny", "--vocab-size", 200],
                  "has token ids up to 255 but the model's vocab_size is 200; pass --vocab-size 256 or more"),
        "short split": (["--data-dir", byte_data, "--preset", "tiny", "--vocab-size", 256, "--block-size", 20_000],
                        "the val split has 20000 tokens, fewer than block_size + 1 = 20001"),
        "no data": (["--data-dir", tmp_path / "missing"], "missing: no such data directory"),
        "bad value": (["--data-dir", byte_data, "--lr", 1e-5, "--min-lr", 1e-4], "need 0 <= min_lr <= lr"),
        "ckpt exists": (["--data-dir", byte_data, "--preset", "tiny", "--vocab-size", 256, "--out-dir", straight_run],
                        "holds a run (ckpt.pt, best.pt, metrics.jsonl, loss.png); pass --resume to continue it, --force to start afresh"),
        "other model": (["--resume", "--out-dir", straight_run, "--n-layer", 3],
                        "the model differs in n_layer (checkpoint 2, requested 3)"),
    }[case]
    result = run_cli("--out-dir", out, *args)
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert expected in result.stderr and "Traceback" not in result.stderr
    assert not out.exists()


def test_init_from_starts_a_fresh_run_from_the_checkpoint_weights(tmp_path, byte_data, straight_run):
    """--init-from (fine-tuning, e.g. from a convert_hf.py import): model config and weights from the checkpoint,
    model flags on top, step 0 and a fresh optimiser; another architecture is one line."""
    source = straight_run / "best.pt"
    tc, mc, start, _ = train_script.configs_from_args(["--data-dir", str(byte_data), "--out-dir", str(tmp_path / "a"),
                                             "--init-from", str(source), "--dropout", "0.2"])
    assert mc == replace(TINY, dropout=0.2)
    trainer = training.Trainer(tc, mc, start)
    weights = load_checkpoint(source)["model"]
    assert trainer.step == 0 and tc.optimizer == "muon"  # the default, whatever the checkpoint was trained with
    assert not trainer.optimizer.muon.state and not trainer.optimizer.adamw.state
    for name, tensor in trainer.model.state_dict().items():
        assert torch.equal(tensor, weights[name]), name
    with pytest.raises(CLIError, match="cannot start from .*size mismatch"):
        training.Trainer(replace(tc, out_dir=str(tmp_path / "b")), replace(mc, ffn_hidden=2 * mc.ffn_hidden))
