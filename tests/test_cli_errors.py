"""Bad input to every script is one line on stderr starting with 'error:', exit code 2, no traceback, and leaves
the user's files as they were. Each script is run once as a real process (a bad flag); the other cases call its
main() through cli.run in this process, which is the same path without the interpreter start."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import cli
import compare
import convert_hf
import data_prepare
import test as test_script  # the repo's test.py
import train
from checkpoint import load_checkpoint
from conftest import REPO, write_byte_data

SCRIPTS = ["train.py", "test.py --ckpt a.pt", "data_prepare.py", "compare.py", "convert_hf.py export --ckpt a.pt --out-dir b",
           "benchmarks/bench_decode.py", "benchmarks/bench_train.py", "benchmarks/bench_linear.py", "benchmarks/bf16_drift.py",
           "benchmarks/llama_cpp.py --preset tiny --out-dir b", "convert_mla.py --ckpt a.pt --out b.pt --kv-lora-rank 8",
           "benchmarks/conversion_sweep.py --ckpt a.pt --data-dir d --out o.jsonl"]


def assert_one_error_line(stderr: str, expected: str):
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr and expected in stderr, stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_bad_flag_is_one_line_in_a_real_process(script):
    result = subprocess.run([sys.executable, *script.split(), "--no-such-flag"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2
    assert_one_error_line(result.stderr, "unrecognized arguments: --no-such-flag (see --help)")
    assert "usage:" not in result.stderr


def refused(capsys, main, *argv) -> str:
    """Run main(argv) as the script would (through cli.run); return its one stderr line."""
    with pytest.raises(SystemExit) as stop:
        cli.run(lambda: main([str(arg) for arg in argv]))
    assert stop.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: ") and stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    return stderr


@pytest.fixture(scope="module")
def byte_data(tmp_path_factory) -> Path:
    """6,000 random byte tokens (vocab 256): 5,000 for train, 1,000 for val. Overrides conftest's Tiny Shakespeare
    bytes, so that these tests run without the corpus."""
    tokens = np.random.default_rng(0).integers(0, 256, 6000, dtype=np.uint16)
    return write_byte_data(tmp_path_factory.mktemp("bytes"), tokens, val_tokens=1000)


def tiny_run(data_dir, out_dir, *more):
    return ["--data-dir", data_dir, "--out-dir", out_dir, "--preset", "tiny", "--vocab-size", 256, "--device", "cpu",
            "--max-iters", 2, "--eval-interval", 2, "--eval-iters", 1, "--batch-size", 2, *more]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, byte_data) -> Path:
    out = tmp_path_factory.mktemp("run")
    torch.set_num_threads(1)
    train.main([str(arg) for arg in tiny_run(byte_data, out)])
    return out


def snapshot(directory: Path) -> dict:
    return {p: p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


# ---- flag domains, checked where parsed ----------------------------------------------------------

@pytest.mark.parametrize("main,argv,expected", [
    (train.main, ["--lr", "nan"], "argument --lr: must be finite, got 'nan'"),
    (train.main, ["--batch-size", "0"], "batch_size must be positive, got 0"),
    (train.main, ["--max-iters", "x"], "argument --max-iters: expected an integer, got 'x'"),
    (train.main, ["--batch-size", str(2**63)], "argument --batch-size: must be at most 2^63 - 1"),
    (train.main, ["--seed", "-1"], "argument --seed: must be at least 0, got '-1'"),
    (test_script.main, ["--ckpt", "x.pt", "--stride", "0"], "argument --stride: must be at least 1, got '0'"),
    (test_script.main, ["--ckpt", "x.pt", "--stride", "-4"], "argument --stride: must be at least 1, got '-4'"),
    (test_script.main, ["--ckpt", "x.pt", "--temperature", "inf"], "argument --temperature: must be finite"),
    (test_script.main, ["--ckpt", "x.pt", "--device", "tpu"], "--device tpu: not a device"),
    (test_script.main, ["--ckpt", "x.pt", "--top-p", "1.5"], "argument --top-p: must be at most 1, got '1.5'"),
    (test_script.main, ["--ckpt", "x.pt", "--prompt", "a", "--prompt-file", "p.txt"],
     "argument --prompt-file: not allowed with argument --prompt"),
    (data_prepare.main, ["--workers", "0"], "argument --workers: must be at least 1, got '0'"),
    (data_prepare.main, ["--val-fraction", "nan"], "argument --val-fraction: must be finite"),
    (compare.main, ["--bench-context", "1"], "argument --bench-context: must be at least 2, got '1'"),
    (compare.main, ["--max-iters", "-3"], "argument --max-iters: must be at least 1, got '-3'"),
    (convert_hf.main, ["export", "--ckpt", "x.pt"], "the following arguments are required: --out-dir"),
])
def test_a_value_outside_its_domain_is_refused(capsys, main, argv, expected):
    assert expected in refused(capsys, main, *argv)


# ---- output paths that cannot be written ---------------------------------------------------------

def test_an_out_dir_that_is_a_file_is_one_line(capsys, tmp_path, byte_data):
    (tmp_path / "taken").write_text("the user's file")
    assert "taken: File exists (a file is where a directory should be)" in refused(
        capsys, train.main, *tiny_run(byte_data, tmp_path / "taken"))
    assert "taken/sub: Not a directory" in refused(capsys, train.main, *tiny_run(byte_data, tmp_path / "taken/sub"))
    assert (tmp_path / "taken").read_text() == "the user's file"


def test_a_convert_out_dir_under_a_file_is_one_line(capsys, tmp_path, finished_run):
    (tmp_path / "taken").write_text("the user's file")
    message = refused(capsys, convert_hf.main, "export", "--ckpt", finished_run / "best.pt", "--out-dir",
                      tmp_path / "taken" / "hf")
    assert "Not a directory" in message or "is not a directory" in message
    assert (tmp_path / "taken").read_text() == "the user's file"


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a read-only directory anyway; run as a user")
def test_an_out_dir_without_write_permission_is_one_line(capsys, tmp_path, byte_data):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    try:
        assert "Permission denied" in refused(capsys, train.main, *tiny_run(byte_data, locked / "out"))
    finally:
        locked.chmod(0o700)


# ---- running out of memory -------------------------------------------------------------------------

def out_of_memory_line(capsys, allocate) -> str:
    with pytest.raises(SystemExit) as stop:
        cli.run(allocate, memory_hint="lower --batch-size")
    assert stop.value.code == 2
    stderr = capsys.readouterr().err
    assert stderr.count("\n") == 1 and "Traceback" not in stderr, stderr
    return stderr


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB"), MemoryError("numpy array")])
def test_running_out_of_memory_says_what_to_lower(capsys, error):
    def allocate():
        raise error

    assert out_of_memory_line(capsys, allocate) == f"error: out of memory ({error}); lower --batch-size\n"


def test_an_allocation_this_machine_cannot_make_says_what_to_lower(capsys):
    """torch's CPU allocator raises a RuntimeError ("DefaultCPUAllocator: can't allocate memory ...")."""
    line = out_of_memory_line(capsys, lambda: torch.empty(1 << 60, dtype=torch.uint8))
    assert line.startswith("error: out of memory (") and "can't allocate memory" in line
    assert line.endswith("; lower --batch-size\n")


# ---- silent no-ops and mixed results -----------------------------------------------------------------

def test_resuming_to_a_step_already_passed_is_refused(capsys, finished_run):
    before = snapshot(finished_run)
    message = refused(capsys, train.main, "--resume", "--out-dir", finished_run, "--max-iters", 1)
    assert "is at step 2, past --max-iters 1: nothing to train; pass a larger --max-iters" in message
    assert snapshot(finished_run) == before


def test_resuming_a_finished_run_trains_nothing_and_says_so(capsys, tmp_path, finished_run):
    """The same step as --max-iters: a note, exit 0, the checkpoint unchanged (and loss.png drawn again)."""
    ckpt = (finished_run / "ckpt.pt").read_bytes()
    train.main(["--resume", "--out-dir", str(finished_run)])
    assert "is at step 2 = --max-iters already; nothing to train" in capsys.readouterr().out
    assert (finished_run / "ckpt.pt").read_bytes() == ckpt and load_checkpoint(finished_run / "ckpt.pt")["step"] == 2
