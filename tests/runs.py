"""Training runs that test_train.py and test_optimizer.py share: the tiny model on byte tokens, a short run's
configuration, comparing two runs bit for bit, one process against two (DDP), and train.py as a user runs it."""
import itertools
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from checkpoint import load_checkpoint
from conftest import REPO
from dataset import PreparedData
from model_config import ModelConfig
from training import TrainConfig, train

TINY = ModelConfig.from_preset("tiny", vocab_size=256, dropout=0.1)  # dropout: resuming must restore its RNG too
TIMING_FIELDS = ("tokens_per_sec", "mfu")


def run_config(out_dir, data_dir, **overrides) -> TrainConfig:
    settings = dict(data_dir=str(data_dir), out_dir=str(out_dir), max_iters=20, lr_decay_iters=20, batch_size=8,
                    lr=3e-3, min_lr=3e-4, warmup_iters=5, eval_interval=5, eval_iters=2, log_interval=5,
                    device="cpu", optimizer="adamw")  # test_optimizer.py runs these with muon
    return TrainConfig(**settings | overrides)


def metrics(out_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def without_timing(record: dict) -> dict:
    return {k: v for k, v in record.items() if k not in TIMING_FIELDS}


def assert_same_state(a, b, where=""):
    """Equal nested checkpoint contents, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}/{i}")
    else:
        assert a == b, where


def assert_same_run(resumed: Path, straight: Path, every_line: bool):
    """Same ckpt.pt and best.pt (weights, optimiser, RNG and data-stream states, step, best val loss), and the
    same evaluations in metrics.jsonl; every_line: the same training lines too."""
    for name in ("ckpt.pt", "best.pt"):
        a, b = load_checkpoint(resumed / name), load_checkpoint(straight / name)
        assert a["train_config"].pop("resume") and not b["train_config"].pop("resume")
        for ckpt in (a, b):
            ckpt["train_config"].pop("out_dir")
        assert_same_state(a, b, name)
    lines = [list(map(without_timing, metrics(out))) for out in (resumed, straight)]
    if not every_line:
        lines = [[line for line in run if "val_loss" in line] for run in lines]
    assert lines[0] == lines[1]


def feed_fixed_batches(rank: int, world_size: int, seeds_file: Path | None = None):
    """Replace PreparedData.get_batch: call k returns rows [rank * b, (rank + 1) * b) of the k-th fixed
    (world_size * b)-row batch, so the ranks' batches together are exactly one process's batch with
    world_size * b rows. Appends the seed of the generator of each train-split batch to seeds_file."""
    calls = itertools.count()

    def get_batch(self, split, batch_size, block_size, generator, device="cpu"):
        rows = torch.randint(0, 256, (world_size * batch_size, block_size + 1),
                             generator=torch.Generator().manual_seed(next(calls)))
        rows = rows[rank * batch_size:(rank + 1) * batch_size]
        if seeds_file is not None and split == "train":
            with open(seeds_file, "a") as f:
                f.write(f"{generator.initial_seed()}\n")
        return rows[:, :-1].to(device), rows[:, 1:].to(device)

    PreparedData.get_batch = get_batch


def ddp_worker(rank, world_size, port, tc, mc, seeds_dir):
    """One torchrun-like process: its environment, fixed batches, and train()."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    feed_fixed_batches(rank, world_size, Path(seeds_dir) / f"rank{rank}.txt")
    train(tc, mc)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train_on_one_and_two_processes(worker, tmp_path: Path, data_dir: Path, mc: ModelConfig, monkeypatch,
                                   **overrides) -> tuple[Path, Path]:
    """3 steps of 2 accumulation micro-steps on feed_fixed_batches' batches: in this process at batch 8, then in
    two spawned processes running worker (ddp_worker, or a function that calls it) at batch 4, which fail the test
    if they have not finished after 180 s. Returns the two out dirs; the ranks' seeds are under tmp_path."""
    settings = dict(max_iters=3, grad_accum=2, eval_interval=3, eval_iters=1, log_interval=1, **overrides)
    single, double = tmp_path / "one", tmp_path / "two"
    monkeypatch.setattr(PreparedData, "get_batch", PreparedData.get_batch)  # undone after the test
    feed_fixed_batches(0, 1)
    assert train(run_config(single, data_dir, batch_size=8, **settings), mc) == 0

    args = (2, free_port(), run_config(double, data_dir, batch_size=4, **settings), mc, str(tmp_path))
    processes = mp.start_processes(worker, args=args, nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 180
    while not processes.join(timeout=1):
        if time.monotonic() > deadline:
            for process in processes.processes:
                process.kill()
            pytest.fail("the DDP processes did not finish in 180 s")
    return single, double


def run_cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "train.py"), "--device", "cpu", *map(str, args)],
                          capture_output=True, text=True, timeout=120, env=os.environ | {"OMP_NUM_THREADS": "1"})
