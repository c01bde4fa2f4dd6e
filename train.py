"""Train the language model, in one process or under torchrun with DistributedDataParallel.

    python train.py                                   # the shakespeare preset on data/shakespeare -> out/shakespeare
    python train.py --preset tiny --attention mha --max-iters 200 --out-dir out/tiny-mha
    python train.py --out-dir out/shakespeare --resume --max-iters 8000
    python train.py --init-from out/shakespeare/best.pt --out-dir out/yarn-512 --block-size 512 \\
        --rope-scaling yarn --rope-factor 4 --original-seq-len 128    # fine-tune at 4x the context with YaRN
    torchrun --standalone --nproc-per-node 8 train.py --preset gpt2-small --data-dir data/owt --out-dir out/gpt2

Every TrainConfig and ModelConfig field is a flag (--lr, --n-layer, ...). With --resume the checkpoint's configs
are the base and the flags given override them; the model's must still match the checkpoint's.
OUT receives ckpt.pt (latest), best.pt (lowest val loss), metrics.jsonl and, when matplotlib is installed, loss.png.
"""
import argparse
import json
import math
import os
import signal
import sys
import time
import types
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from checkpoint import load_checkpoint, save_checkpoint
from cli import CLIError, run
from data_prepare import PreparedData
from model import Transformer
from model_config import ATTENTION_KINDS, PRESETS, ModelConfig
from runtime import DTYPES, device_peak_flops, keep_freed_memory, pick_device, pick_dtype
from training import lr_at, make_optimizer, train_step



@dataclass(frozen=True)
class TrainConfig:
    data_dir: str = "data/shakespeare"
    out_dir: str = "out/shakespeare"
    max_iters: int = 400  # optimiser steps
    batch_size: int = 16  # sequences per micro-step, per process
    grad_accum: int = 1  # micro-steps per optimiser step
    lr: float = 1e-3  # peak learning rate, reached after warmup_iters
    min_lr: float = 1e-4  # the cosine decays to this at lr_decay_iters and stays there
    warmup_iters: int = 50
    lr_decay_iters: int | None = field(default=None, metadata={"help": "None: max_iters"})
    weight_decay: float = 0.1  # on matrices only
    eval_interval: int = 100  # evaluate, save ckpt.pt (and best.pt when val improves) every this many steps
    eval_iters: int = 10  # batches per split per evaluation
    log_interval: int = 10  # steps between lines in metrics.jsonl
    seed: int = 1337
    device: str = field(default="auto", metadata={"help": "auto: cuda, then mps, then cpu"})
    dtype: str = field(default="auto", metadata={
        "help": "auto: bfloat16 autocast on CUDA that supports it, else float16 with loss scaling; float32 elsewhere"})
    compile: bool | None = field(default=None, metadata={"help": "None: torch.compile on CUDA only"})
    peak_flops: float | None = field(default=None, metadata={
        "help": "peak FLOP/s of one device, for MFU; None: the datasheet table on CUDA, no MFU on CPU and MPS"})
    resume: bool = False
    init_from: str | None = field(default=None, metadata={
        "help": "start a new run from this checkpoint's weights and model config (e.g. one convert_hf.py imported), "
                "with a fresh optimiser at step 0"})

    def __post_init__(self):
        for name in ("max_iters", "batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need 0 <= min_lr <= lr, got min_lr {self.min_lr} and lr {self.lr}")
        if self.warmup_iters < 0 or self.weight_decay < 0:
            raise ValueError("warmup_iters and weight_decay must be >= 0")
        if self.device not in ("auto", "cpu", "cuda", "mps"):
            raise ValueError(f"device must be auto, cpu, cuda or mps, got {self.device!r}")
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise ValueError(f"peak_flops must be positive, got {self.peak_flops}")

    @property
    def decay_iters(self) -> int:
        return self.max_iters if self.lr_decay_iters is None else self.lr_decay_iters




# ---- devices, seeds, processes -----------------------------------------------------------------

def derive_seed(*keys: int) -> int:
    """A 64-bit seed mixed from keys; callers put a distinct tag second so that the streams never coincide."""
    return int(np.random.SeedSequence(keys).generate_state(1, np.uint64)[0])


def start_processes(device_type: str) -> tuple[int, int, int]:
    """(rank, local_rank, world_size) from torchrun's environment, joining the process group when there are
    several processes: NCCL on GPUs, gloo on CPUs."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 0, 1
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device_type == "cuda":
        torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
    return rank, local_rank, world_size


def mean_over_processes(value: torch.Tensor) -> float:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value.item()


class StopSignals:
    """While active, SIGINT and SIGTERM only record themselves; the loop checks after each step, saves and stops.
    A second SIGINT stops at once."""

    def __init__(self):
        self.received = 0

    def __enter__(self):
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def handle(self, signum, frame):
        if self.received and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signum

    def agreed(self, device) -> int:
        """The signal any process received (0: none), the same answer in every process."""
        if not dist.is_initialized():
            return self.received
        flag = torch.tensor(self.received, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())


# ---- checkpoints and logs ----------------------------------------------------------------------

def check_resumable(ckpt: dict, mc: ModelConfig, path: Path) -> None:
    missing = sorted({"optimizer", "scaler", "train_config", "step", "best_val_loss", "tokens_seen", "rng"}
                     - ckpt.keys())
    if missing:
        raise CLIError(f"cannot resume from {path}: it has no {', '.join(missing)} (not written by train.py)")
    saved = {**ModelConfig().to_dict(), **ckpt["model_config"]}  # fields newer than the checkpoint: defaults
    diffs = [f"{name} (checkpoint {saved.get(name)!r}, requested {value!r})"
             for name, value in mc.to_dict().items() if saved.get(name) != value]
    if diffs:
        raise CLIError(f"cannot resume from {path}: the model differs in " + ", ".join(diffs))


def load_initial_weights(model: Transformer, path: str) -> None:
    """Copy a checkpoint's weights into model; a different architecture is one line naming the first mismatch."""
    try:
        model.load_state_dict(load_checkpoint(path)["model"])
    except RuntimeError as err:
        detail = next(line.strip() for line in str(err).splitlines()[1:] if line.strip())
        raise CLIError(f"cannot start from {path}: {detail}") from None


def write_checkpoint(state: dict, path: Path) -> None:
    try:
        save_checkpoint(state, path)
    except OSError as err:
        raise CLIError(f"could not write {path}: {err.strerror or err}") from None


class MetricsLog:
    """OUT/metrics.jsonl: one JSON object per line. A fresh run starts it empty; a resumed one keeps the lines up
    to the step it resumes from and appends after them."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        kept = []
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if logged_step(line) <= resume_step]
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, path)

    def write(self, **record) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for a line cut short by a crash, so that it is dropped."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """Train and val loss against step, when matplotlib is installed; nothing otherwise."""
    try:
        from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone
    except ImportError:
        return
    records = [json.loads(line) for line in metrics_path.read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for points, label, style in ((train, "train (mean since the previous line)", "-"), (val, "val", "o-")):
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=png_path.parent.name)
    ax.legend()
    tmp = png_path.with_name(f".{png_path.name}.tmp")
    fig.savefig(tmp, format="png", dpi=120)
    os.replace(tmp, png_path)


# ---- the run -----------------------------------------------------------------------------------

def load_data(tc: TrainConfig, mc: ModelConfig) -> PreparedData:
    """The prepared data dir, checked up front against the model."""
    data = PreparedData(tc.data_dir)
    if data.vocab_size > mc.vocab_size:
        raise CLIError(f"{tc.data_dir} has token ids up to {data.vocab_size - 1} but the model's vocab_size is "
                       f"{mc.vocab_size}; pass --vocab-size {data.vocab_size} or more")
    for split in ("train", "val"):
        n = len(data.tokens(split))
        if n < mc.block_size + 1:
            raise CLIError(f"{tc.data_dir}: the {split} split has {n} tokens, fewer than block_size + 1 = "
                           f"{mc.block_size + 1}; use a smaller --block-size or more text")
    return data


class Trainer:
    """Holds everything one training run changes: model, optimiser, step, RNG streams, best val loss."""

    def __init__(self, tc: TrainConfig, mc: ModelConfig):
        self.tc, self.mc = tc, mc
        self.out = Path(tc.out_dir)
        ckpt_path = self.out / "ckpt.pt"
        if not tc.resume and ckpt_path.exists():
            raise CLIError(f"{ckpt_path} exists; pass --resume to continue that run, or choose another --out-dir")
        ckpt = load_checkpoint(ckpt_path) if tc.resume else None
        if ckpt is not None:
            check_resumable(ckpt, mc, ckpt_path)
        self.data = load_data(tc, mc)

        device = pick_device(tc.device)
        self.rank, local_rank, self.world_size = start_processes(device)
        self.device = f"cuda:{local_rank}" if device == "cuda" else device
        self.dtype = pick_dtype(tc.dtype, device)
        self.compile = device == "cuda" if tc.compile is None else tc.compile
        self.autocast = torch.autocast(device, dtype=self.dtype, enabled=self.dtype != torch.float32)
        self.scaler = torch.amp.GradScaler(device, enabled=self.dtype == torch.float16)
        self.peak_flops = device_peak_flops(self.device, tc.peak_flops)
        self.tokens_per_step = tc.batch_size * mc.block_size * tc.grad_accum * self.world_size
        if device == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 matmuls
        else:
            keep_freed_memory()

        torch.manual_seed(tc.seed)  # the same initial weights in every process
        self.model = Transformer(mc)  # the plain module: what checkpoints hold, whatever wraps it
        self.data_generator = torch.Generator().manual_seed(derive_seed(tc.seed, 1, self.rank))
        torch.manual_seed(derive_seed(tc.seed, 2, self.rank))  # dropout differs per process
        self.step, self.best_val_loss, self.tokens_seen = 0, math.inf, 0
        if ckpt is not None:
            self.model.load_state_dict(ckpt["model"])
        elif tc.init_from:
            load_initial_weights(self.model, tc.init_from)
        self.model.to(self.device)
        self.optimizer = make_optimizer(self.model, tc.lr, tc.weight_decay, fused=device == "cuda")
        if ckpt is not None:
            self.restore(ckpt)
        self.train_model = self.eval_model = torch.compile(self.model) if self.compile else self.model
        if self.world_size > 1:
            self.train_model = DistributedDataParallel(self.eval_model, device_ids=[local_rank] if device == "cuda" else None)
        self.metrics = None
        if self.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            self.metrics = MetricsLog(self.out / "metrics.jsonl", self.step if ckpt else None)

    def restore(self, ckpt: dict) -> None:
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"]:  # empty when saved without float16 loss scaling
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.best_val_loss, self.tokens_seen = ckpt["step"], ckpt["best_val_loss"], ckpt["tokens_seen"]
        self.resume_note = f"resuming from {self.out / 'ckpt.pt'} at step {self.step}"
        if len(ckpt["rng"]) == self.world_size:
            rng = ckpt["rng"][self.rank]
            self.data_generator.set_state(rng["data"])
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and self.device.startswith("cuda"):
                torch.cuda.set_rng_state(rng["cuda"])
        else:  # another process count: the old streams cannot be split or merged, so start new ones
            self.resume_note += (f"\nwarning: the checkpoint was written by {len(ckpt['rng'])} processes and this run "
                                 f"has {self.world_size}: the data order is reseeded, so it is not an exact continuation")
            self.data_generator.manual_seed(derive_seed(self.tc.seed, 1, self.rank, self.step))
            torch.manual_seed(derive_seed(self.tc.seed, 2, self.rank, self.step))

    def rng_state(self) -> dict:
        state = {"data": self.data_generator.get_state(), "cpu": torch.get_rng_state()}
        if self.device.startswith("cuda"):
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def save(self, best: bool) -> None:
        """Write ckpt.pt, and best.pt too when best. Every process takes part (their RNG states are gathered);
        rank 0 writes."""
        rng = [self.rng_state()]
        if self.world_size > 1:
            rng = [None] * self.world_size
            dist.all_gather_object(rng, self.rng_state())
        if self.rank != 0:
            return
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict(), "model_config": self.mc.to_dict(),
                 "train_config": asdict(self.tc), "step": self.step, "best_val_loss": self.best_val_loss,
                 "tokens_seen": self.tokens_seen, "rng": rng}
        write_checkpoint(state, self.out / "ckpt.pt")
        if best:
            write_checkpoint(state, self.out / "best.pt")

    def say(self, message: str) -> None:
        if self.rank == 0:
            tqdm.write(message)

    def next_batch(self):
        return self.data.get_batch("train", self.tc.batch_size, self.mc.block_size, self.data_generator, self.device)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Mean loss over eval_iters batches of each split, averaged over processes. The batches come from a
        generator seeded by (seed, rank, step), so evaluation leaves the training stream untouched."""
        self.eval_model.eval()
        generator = torch.Generator().manual_seed(derive_seed(self.tc.seed, 3, self.rank, self.step))
        losses = {}
        for split in ("train", "val"):
            total = torch.zeros((), device=self.device)
            for _ in range(self.tc.eval_iters):
                x, y = self.data.get_batch(split, self.tc.batch_size, self.mc.block_size, generator, self.device)
                with self.autocast:
                    total += self.eval_model(x, y)[1].float()
            losses[split] = mean_over_processes(total / self.tc.eval_iters)
        self.eval_model.train()
        return losses

    def describe(self) -> str:
        mc, tc = self.mc, self.tc
        lines = [f"model: {json.dumps(mc.to_dict())}",
                 f"       {mc.num_params() / 1e6:.2f}M parameters, {mc.non_embedding_params() / 1e6:.2f}M "
                 f"without embeddings, {mc.flops_per_token(mc.block_size) / 1e6:.1f} MFLOP per token trained",
                 f"train: {json.dumps(asdict(tc))}",
                 f"run:   device {self.device}, dtype {str(self.dtype).removeprefix('torch.')}, compile "
                 f"{self.compile}, {self.world_size} process(es), {self.tokens_per_step:,} tokens per step, "
                 f"lr decays until step {tc.decay_iters}, peak FLOP/s for MFU "
                 f"{'unknown (pass --peak-flops)' if self.peak_flops is None else f'{self.peak_flops:.3g}'}"]
        if tc.resume:
            lines.append(self.resume_note)
        return "\n".join(lines)

    def run(self) -> int:
        """Train up to max_iters. Returns 0 when done, or the number of the signal that stopped it early
        (after saving ckpt.pt)."""
        tc = self.tc
        self.say(self.describe())
        throughput = {"tokens_per_sec": None, "mfu": None}
        with StopSignals() as signals, tqdm(total=tc.max_iters, initial=self.step, unit="step", dynamic_ncols=True,
                                            disable=self.rank != 0) as bar:
            if not tc.resume:
                self.evaluate_and_save(throughput)
            window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
            while self.step < tc.max_iters:
                lr = lr_at(self.step, tc)
                loss = train_step(self.train_model, self.optimizer, self.scaler, self.next_batch, tc.grad_accum,
                                  lr, self.autocast)
                self.step += 1
                self.tokens_seen += self.tokens_per_step
                window_loss, window_steps = window_loss + loss, window_steps + 1
                bar.update()
                evaluating = self.step % tc.eval_interval == 0 or self.step == tc.max_iters
                stopping = signals.agreed(self.device)
                logging = self.step % tc.log_interval == 0 or evaluating or stopping
                if logging:
                    mean_loss = mean_over_processes(window_loss / window_steps)
                    if not math.isfinite(mean_loss):
                        raise CLIError(f"the training loss became {mean_loss} between steps "
                                       f"{self.step - window_steps + 1} and {self.step}; stopped without saving "
                                       f"(ckpt.pt and best.pt hold earlier steps); try a lower --lr")
                    throughput = self.throughput(window_steps, time.perf_counter() - window_start)
                    self.log(step=self.step, loss=mean_loss, lr=lr, **throughput, tokens_seen=self.tokens_seen)
                    bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", **self.readable(throughput))
                    window_loss, window_steps = 0.0, 0
                if evaluating:
                    self.evaluate_and_save(throughput)
                elif stopping:
                    self.save(best=False)
                if stopping:
                    self.say(f"stopped by {signal.Signals(stopping).name} after step {self.step}; "
                             f"{self.out / 'ckpt.pt'} saved; continue with --resume")
                    return stopping
                if logging:
                    window_start = time.perf_counter()  # throughput leaves out logging, evaluation and saving
        if self.rank == 0:
            plot_losses(self.out / "metrics.jsonl", self.out / "loss.png")
        return 0

    def evaluate_and_save(self, throughput: dict) -> None:
        """Evaluate at the current step, log it, and save ckpt.pt (and best.pt when val loss improved)."""
        losses = self.evaluate()
        if not math.isfinite(losses["val"]):
            raise CLIError(f"the val loss is {losses['val']} at step {self.step}; stopped without saving")
        best = losses["val"] < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, losses["val"])
        self.log(step=self.step, train_loss=losses["train"], val_loss=losses["val"],
                 best_val_loss=self.best_val_loss, lr=lr_at(max(self.step - 1, 0), self.tc), **throughput)
        self.say(f"step {self.step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                 f"{' (best)' if best else f', best {self.best_val_loss:.4f}'}")
        self.save(best)

    def throughput(self, steps: int, seconds: float) -> dict:
        tokens_per_sec = steps * self.tokens_per_step / seconds
        mfu = None
        if self.peak_flops is not None:
            flops = self.mc.flops_per_token(self.mc.block_size) * tokens_per_sec / self.world_size
            mfu = flops / self.peak_flops
        return {"tokens_per_sec": tokens_per_sec, "mfu": mfu}

    @staticmethod
    def readable(throughput: dict) -> dict:
        shown = {"tok/s": f"{throughput['tokens_per_sec']:,.0f}"}
        if throughput["mfu"] is not None:
            shown["mfu"] = f"{100 * throughput['mfu']:.1f}%"
        return shown

    def log(self, **record) -> None:
        if self.metrics is not None:
            self.metrics.write(**record)


def train(tc: TrainConfig, mc: ModelConfig) -> int:
    """Train as tc and mc say (resuming from tc.out_dir/ckpt.pt when tc.resume). Returns 0 when max_iters is
    reached, or the number of the signal that stopped the run early after saving."""
    try:
        return Trainer(tc, mc).run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


# ---- command line ------------------------------------------------------------------------------

CHOICES = {"attention": ATTENTION_KINDS, "device": ("auto", "cpu", "cuda", "mps"), "dtype": ("auto", *DTYPES)}


def add_flags(parser: argparse.ArgumentParser, config_class, title: str, default_note) -> None:
    """One --flag per dataclass field; the parsed namespace holds only the flags given."""
    group = parser.add_argument_group(title)
    for f in fields(config_class):
        kind = f.type
        if isinstance(kind, types.UnionType):  # X | None
            kind = next(t for t in kind.__args__ if t is not type(None))
        flag = "--" + f.name.replace("_", "-")
        common = dict(dest=f.name, default=argparse.SUPPRESS, help=default_note(f))
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        else:
            group.add_argument(flag, type=kind, choices=CHOICES.get(f.name), **common)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=argparse.SUPPRESS,
                        help="model preset (default: shakespeare, or the checkpoint's model with --resume)")
    add_flags(parser, TrainConfig, "training", lambda f: "; ".join([f"default: {f.default}", *f.metadata.values()]))
    add_flags(parser, ModelConfig, "model (override the preset)",
              lambda f: "; ".join(["default: from the preset", *f.metadata.values()]))
    return parser.parse_args(argv)


def configs_from_args(argv=None) -> tuple[TrainConfig, ModelConfig]:
    """TrainConfig and ModelConfig from the command line; with --resume (or --init-from), the model config comes
    from that checkpoint, and the flags given override it."""
    args = vars(parse_args(argv))
    train_names = {f.name for f in fields(TrainConfig)}
    train_flags = {k: v for k, v in args.items() if k in train_names}
    model_flags = {k: v for k, v in args.items() if k not in train_names and k != "preset"}
    preset = args.get("preset")
    try:
        if train_flags.get("resume"):
            out_dir = train_flags.setdefault("out_dir", TrainConfig.out_dir)
            ckpt = load_checkpoint(Path(out_dir) / "ckpt.pt")
            saved = ckpt.get("train_config", {})
            tc = TrainConfig(**{k: v for k, v in saved.items() if k in train_names} | train_flags)
            base = ModelConfig.from_preset(preset) if preset else ModelConfig.from_dict(ckpt["model_config"])
        elif train_flags.get("init_from") and not preset:
            tc = TrainConfig(**train_flags)
            base = ModelConfig.from_dict(load_checkpoint(tc.init_from)["model_config"])
        else:
            tc = TrainConfig(**train_flags)
            base = ModelConfig.from_preset(preset or "shakespeare")
        return tc, replace(base, **model_flags)
    except ValueError as err:
        raise CLIError(str(err)) from None


def main(argv=None):
    stopped_by = train(*configs_from_args(argv))
    if stopped_by:
        sys.exit(128 + stopped_by)


if __name__ == "__main__":
    run(main)
