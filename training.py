"""A training run as train.py and compare.py start it: TrainConfig, the checks before it starts, and Trainer
(the loop, evaluation during training, checkpoints and exact resuming, DDP processes, stopping on a signal, and
the run's metrics.jsonl and loss.png). One optimisation step is optim.py's."""
import json
import math
import os
import signal
import textwrap
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from checkpoint import load_checkpoint, load_weights, save_checkpoint
from cli import MAX_SEED, CLIError, first_line
from dataset import PreparedData
from fileio import atomic_write, check_field_types, is_of, owned_directory, parse_json, require
from model import Transformer
from model_config import ModelConfig
from optim import DEFAULT_OPTIMIZER, OPTIMIZERS, TUNED_LR, Schedule, make_optimizer, train_step
from report import figure, save_figure
from runtime import DEVICES, DTYPES, Runtime, check_memory, check_model_fits


RUN_FILES = ("ckpt.pt", "best.pt", "metrics.jsonl", "loss.png")  # what a run writes into out_dir


@dataclass(frozen=True)
class TrainConfig:
    data_dir: str = field(default="data/shakespeare", metadata={"help": "prepared data (data_prepare.py's output)"})
    out_dir: str = field(default="out/shakespeare", metadata={
        "help": "where ckpt.pt, best.pt, metrics.jsonl and loss.png go"})
    max_iters: int = field(default=400, metadata={"help": "optimiser steps to train for"})
    batch_size: int = field(default=16, metadata={"help": "sequences per micro-step, per process"})
    grad_accum: int = field(default=1, metadata={"help": "micro-steps per optimiser step"})
    lr: float | None = field(default=None, metadata={
        "help": "peak learning rate, reached after warmup_iters; None: the optimizer's (adamw 1e-3, muon 3e-3)"})
    min_lr: float | None = field(default=None, metadata={
        "help": "the cosine decays to this at lr_decay_iters and stays; None: lr / 10"})
    warmup_iters: int = field(default=50, metadata={"help": "steps of linear warmup"})
    lr_decay_iters: int | None = field(default=None, metadata={"help": "step where the cosine ends; None: max_iters"})
    weight_decay: float = field(default=0.1, metadata={"help": "weight decay, on matrices only"})
    optimizer: str = field(default=DEFAULT_OPTIMIZER, metadata={
        "help": "adamw, or muon: Muon on the 2-D weights inside the blocks and AdamW on the rest, sharing lr and "
                "weight_decay (results/muon.md)"})
    eval_interval: int = field(default=100, metadata={
        "help": "evaluate, save ckpt.pt (and best.pt when val improves) every this many steps"})
    eval_iters: int = field(default=10, metadata={"help": "batches per split per evaluation"})
    log_interval: int = field(default=10, metadata={"help": "steps between lines in metrics.jsonl"})
    seed: int = field(default=1337, metadata={"help": "seed of the initial weights, data order and dropout"})
    device: str = field(default="auto", metadata={"help": "auto: cuda, then mps, then cpu"})
    dtype: str = field(default="auto", metadata={
        "help": "auto: bfloat16 autocast on CUDA that supports it, else float16 with loss scaling; float32 elsewhere"})
    compile: bool | None = field(default=None, metadata={"help": "torch.compile the model; None: on CUDA only"})
    peak_flops: float | None = field(default=None, metadata={
        "help": "peak FLOP/s of one device, for MFU; None: the datasheet table on CUDA, no MFU on CPU and MPS"})
    resume: bool = field(default=False, metadata={"help": "continue the run in out_dir from its ckpt.pt"})
    init_from: str | None = field(default=None, metadata={
        "help": "start a new run from this checkpoint's weights and model config (e.g. one convert_hf.py imported), "
                "with a fresh optimiser at step 0"})

    def __post_init__(self):
        check_field_types(self)
        for name in ("max_iters", "batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lr_decay_iters is not None and self.lr_decay_iters <= 0:
            raise ValueError(f"lr_decay_iters must be positive, got {self.lr_decay_iters}")
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"seed must be in [0, 2^64 - 1], got {self.seed}")
        if self.resume and self.init_from:
            raise ValueError("--resume continues the run in --out-dir, --init-from starts a new one: give only one")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        lr, min_lr = self.schedule.peak, self.schedule.floor
        if not all(math.isfinite(x) for x in (lr, min_lr, self.weight_decay, self.peak_flops or 1)):
            raise ValueError("lr, min_lr, weight_decay and peak_flops must be finite numbers")
        if not 0 <= min_lr <= lr or lr == 0:
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0, got min_lr {min_lr} and lr {lr}")
        if self.warmup_iters < 0 or self.weight_decay < 0:
            raise ValueError("warmup_iters and weight_decay must be >= 0")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"dtype must be auto or one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.peak_flops is not None and self.peak_flops <= 0:
            raise ValueError(f"peak_flops must be positive, got {self.peak_flops}")

    @property
    def schedule(self) -> Schedule:
        """The learning-rate schedule, with lr and min_lr resolved: lr None is the optimizer's tuned peak,
        min_lr None a tenth of lr."""
        lr = TUNED_LR[self.optimizer] if self.lr is None else self.lr
        decay_end = self.max_iters if self.lr_decay_iters is None else self.lr_decay_iters
        return Schedule(lr, lr / 10 if self.min_lr is None else self.min_lr, self.warmup_iters, decay_end)


def train(tc: TrainConfig, mc: ModelConfig, start: dict | None = None, force: bool = False) -> int:
    """Train as tc and mc say, from start: the checkpoint tc.resume or tc.init_from names, already loaded (it is
    read here when not given). A fresh run over another run's outputs in out_dir is refused unless force, which
    removes them first. The writing process owns out_dir while it runs. Returns 0 when max_iters is reached, or
    the number of the signal that stopped the run early after saving ckpt.pt."""
    writes = int(os.environ.get("RANK", "0")) == 0  # rank 0 writes; the other processes need no directory
    try:
        with owned_directory(tc.out_dir, "a training run") if writes else nullcontext():
            return Trainer(tc, mc, start, force).run()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def starting_checkpoint(tc: TrainConfig) -> dict | None:
    """The checkpoint a run starts from: OUT/ckpt.pt with resume, the init_from file, or None."""
    if tc.resume:
        return load_checkpoint(Path(tc.out_dir) / "ckpt.pt")
    return load_checkpoint(tc.init_from) if tc.init_from else None


def saved_train_config(ckpt: dict) -> dict:
    """The TrainConfig fields a checkpoint was trained with; one saved before --optimizer existed was AdamW's."""
    return {"optimizer": "adamw"} | ckpt.get("train_config", {})


def check_start(tc: TrainConfig, mc: ModelConfig, start: dict | None, force: bool = False) -> None:
    """Refuse a run that would start afresh over another's outputs (unless force), or resume what it cannot
    continue."""
    out, ckpt_path = Path(tc.out_dir), Path(tc.out_dir) / "ckpt.pt"
    if tc.init_from and any(Path(tc.init_from).resolve() == (out / name).resolve() for name in RUN_FILES):
        raise CLIError(f"--init-from {tc.init_from} is one of the files this run writes into --out-dir {out}; copy "
                       "it elsewhere first, or choose another --out-dir")
    if not tc.resume:
        existing = [name for name in RUN_FILES if (out / name).exists()]
        if existing and not force:
            raise CLIError(f"{out} holds a run ({', '.join(existing)}); pass --resume to continue it, --force to "
                           "start afresh over it, or choose another --out-dir")
        return
    missing = sorted(set(Trainer.STATE) - start.keys())
    if missing:
        raise CLIError(f"cannot resume from {ckpt_path}: it has no {', '.join(missing)} (not written by train.py)")
    check_state_types(start, ckpt_path)
    saved_optimizer = saved_train_config(start)["optimizer"]
    if saved_optimizer != tc.optimizer:
        raise CLIError(f"cannot resume from {ckpt_path}: it was trained with --optimizer {saved_optimizer}, "
                       f"not {tc.optimizer}")
    saved = {**ModelConfig().to_dict(), **start["model_config"]}  # fields newer than the checkpoint: defaults
    diffs = [f"{name} (checkpoint {saved.get(name)!r}, requested {value!r})"
             for name, value in mc.to_dict().items() if saved.get(name) != value]
    if diffs:
        raise CLIError(f"cannot resume from {ckpt_path}: the model differs in " + ", ".join(diffs))
    if start["step"] > tc.max_iters:
        raise CLIError(f"{ckpt_path} is at step {start['step']}, past --max-iters {tc.max_iters}: nothing to "
                       f"train; pass a larger --max-iters")


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


def check_state_types(state: dict, path: Path) -> None:
    """The resumable state's values, checked by type before use (the weights and configs are checked where they
    are loaded)."""
    for key, kind in (("step", int), ("tokens_seen", int), ("best_val_loss", float)):
        require(state[key], kind, f"{path}: {key}", minimum=0)
    for key, kind in (("optimizer", dict), ("scaler", dict), ("train_config", dict), ("rng", list)):
        require(state[key], kind, f"{path}: {key}")
    if not all(isinstance(rng, dict) and {"data", "cpu"} <= rng.keys() for rng in state["rng"]):
        raise CLIError(f"{path}: rng must hold each process's RNG states")


class Trainer:
    """Everything one training run changes (model, optimiser, step, RNG streams, best val loss), its checkpoint
    (state_dict and load_state_dict), and the loop."""

    # What a checkpoint must hold to resume: state_dict()'s keys.
    STATE = ("model", "optimizer", "scaler", "model_config", "train_config", "step", "best_val_loss", "tokens_seen",
             "rng")

    def __init__(self, tc: TrainConfig, mc: ModelConfig, start: dict | None = None, force: bool = False):
        self.tc, self.mc, self.out = tc, mc, Path(tc.out_dir)
        start = starting_checkpoint(tc) if start is None else start
        check_start(tc, mc, start, force)
        self.data = load_data(tc, mc)
        self.rt = rt = Runtime.start(tc.device, tc.dtype, tc.compile, tc.peak_flops)
        self.tokens_per_step = tc.batch_size * mc.block_size * tc.grad_accum * rt.world_size
        check_model_fits([mc], rt.device)
        logits = tc.batch_size * mc.block_size * mc.vocab_size * 4  # one micro-batch's float32 logits, at least
        check_memory(logits, rt.device, f"the logits of a micro-batch of {tc.batch_size} x {mc.block_size} tokens")
        torch.manual_seed(tc.seed)  # the same initial weights in every process
        self.model = Transformer(mc)  # the plain module: what checkpoints hold, whatever wraps it
        self.data_generator = torch.Generator().manual_seed(derive_seed(tc.seed, 1, rt.rank))
        torch.manual_seed(derive_seed(tc.seed, 2, rt.rank))  # dropout differs per process
        self.step, self.best_val_loss, self.tokens_seen, self.resume_note = 0, math.inf, 0, ""
        if start is not None:
            load_weights(self.model, start["model"], f"cannot {'resume' if tc.resume else 'start'} from "
                                                     f"{self.out / 'ckpt.pt' if tc.resume else tc.init_from}")
        self.model.to(rt.device)
        self.optimizer = make_optimizer(self.model, tc.schedule.peak, tc.weight_decay, fused=rt.device_type == "cuda",
                                        kind=tc.optimizer)
        self.scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == torch.float16)
        if tc.resume:
            self.load_state_dict(start)
        self.train_model = self.eval_model = torch.compile(self.model) if rt.compile else self.model
        if rt.world_size > 1:
            self.train_model = DistributedDataParallel(
                self.eval_model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)
        self.metrics = None
        if rt.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            if not tc.resume:  # a fresh run (--force): nothing of the run it replaces stays beside it
                for name in RUN_FILES:
                    (self.out / name).unlink(missing_ok=True)
            self.metrics = MetricsLog(self.out / "metrics.jsonl", self.step if tc.resume else None)

    # ---- the resumable state --------------------------------------------------------------------

    def state_dict(self) -> dict:
        """What ckpt.pt holds (STATE). Every process takes part, as their RNG states are gathered."""
        rng = [self.rng_state()]
        if self.rt.world_size > 1:
            rng = [None] * self.rt.world_size
            dist.all_gather_object(rng, self.rng_state())
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scaler": self.scaler.state_dict(), "model_config": self.mc.to_dict(),
                "train_config": asdict(self.tc), "step": self.step, "best_val_loss": self.best_val_loss,
                "tokens_seen": self.tokens_seen, "rng": rng}

    def load_state_dict(self, state: dict) -> None:
        """The other half of state_dict(): the optimiser, loss scaler, counters and RNG streams (the weights are
        loaded before the model moves to its device)."""
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            if state["scaler"]:  # empty when saved without float16 loss scaling
                self.scaler.load_state_dict(state["scaler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:  # how torch reports a state that does not fit
            raise CLIError(f"cannot resume from {self.out / 'ckpt.pt'}: its optimizer state does not fit this model "
                           f"and --optimizer {self.tc.optimizer} ({type(err).__name__}: {first_line(err, 80)})") from None
        self.step, self.best_val_loss, self.tokens_seen = state["step"], state["best_val_loss"], state["tokens_seen"]
        self.resume_note = f"resuming from {self.out / 'ckpt.pt'} at step {self.step}"
        if len(state["rng"]) == self.rt.world_size:
            rng = state["rng"][self.rt.rank]
            self.data_generator.set_state(rng["data"])
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and self.rt.device_type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"])
        else:  # another process count: the old streams cannot be split or merged, so start new ones
            self.resume_note += (f"\nwarning: the checkpoint was written by {len(state['rng'])} processes and this "
                                 f"run has {self.rt.world_size}: the data order is reseeded, so it is not an exact "
                                 "continuation")
            self.data_generator.manual_seed(derive_seed(self.tc.seed, 1, self.rt.rank, self.step))
            torch.manual_seed(derive_seed(self.tc.seed, 2, self.rt.rank, self.step))

    def rng_state(self) -> dict:
        """The RNG states this process saves: its data stream's, torch's CPU one (dropout) and its GPU's."""
        state = {"data": self.data_generator.get_state(), "cpu": torch.get_rng_state()}
        if self.rt.device_type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def save(self, best: bool) -> None:
        """Write ckpt.pt, and best.pt too when best (rank 0 writes; every process takes part)."""
        state = self.state_dict()
        if self.rt.rank == 0:
            for name in ("ckpt.pt", "best.pt") if best else ("ckpt.pt",):
                save_checkpoint(state, self.out / name)

    # ---- the loop -------------------------------------------------------------------------------

    def run(self) -> int:
        """Train up to max_iters. Returns 0 when done, or the number of the signal that stopped it early
        (after saving ckpt.pt). A fresh run that fails before its first checkpoint leaves no metrics.jsonl."""
        try:
            return self.loop()
        except BaseException:
            if not self.tc.resume and self.rt.rank == 0 and not (self.out / "ckpt.pt").exists():
                (self.out / "metrics.jsonl").unlink(missing_ok=True)
            raise

    def loop(self) -> int:
        tc = self.tc
        self.say(self.describe())
        if self.step == tc.max_iters and tc.resume:
            self.say(f"note: {self.out / 'ckpt.pt'} is at step {self.step} = --max-iters already; nothing to train")
        with StopSignals() as signals, tqdm(total=tc.max_iters, initial=self.step, unit="step", dynamic_ncols=True,
                                            disable=self.rt.rank != 0) as bar:
            window = Window()
            if not tc.resume:
                self.evaluate_and_save(window.throughput)
            while self.step < tc.max_iters:
                lr = tc.schedule.lr_at(self.step)
                window.add(train_step(self.train_model, self.optimizer, self.scaler, self.next_batch,
                                      tc.grad_accum, lr, self.rt.autocast()))
                self.step += 1
                self.tokens_seen += self.tokens_per_step
                bar.update()
                evaluating = self.step % tc.eval_interval == 0 or self.step == tc.max_iters
                stopping = signals.agreed(self.rt.device)
                if self.step % tc.log_interval == 0 or evaluating or stopping:
                    self.log_window(window, lr, bar)
                if evaluating:
                    self.evaluate_and_save(window.throughput)
                elif stopping:
                    self.save(best=False)
                if stopping:
                    self.say(f"stopped by {signal.Signals(stopping).name} after step {self.step}; "
                             f"{self.out / 'ckpt.pt'} saved")
                    return stopping
                window.restart_clock()  # throughput leaves out logging, evaluation and saving
        if self.rt.rank == 0:
            plot_losses(self.out / "metrics.jsonl", self.out / "loss.png")
        return 0

    def next_batch(self):
        return self.data.get_batch("train", self.tc.batch_size, self.mc.block_size, self.data_generator,
                                   self.rt.device)

    def log_window(self, window: "Window", lr: float, bar) -> None:
        """Log the mean loss and throughput of the steps since the last line (and show them on the bar); refuse a
        non-finite loss."""
        steps = window.steps
        mean_loss = mean_over_processes(window.loss / steps)
        if not math.isfinite(mean_loss):
            raise CLIError(f"the training loss became {mean_loss} between steps {self.step - steps + 1} and "
                           f"{self.step}; stopped without saving (ckpt.pt and best.pt hold earlier steps); "
                           "try a lower --lr")
        throughput = window.close(self.tokens_per_step, self.mfu)
        self.log(step=self.step, loss=mean_loss, lr=lr, **throughput, tokens_seen=self.tokens_seen)
        mfu = throughput["mfu"]
        shown = {"tok/s": f"{throughput['tokens_per_sec']:,.0f}"} | ({"mfu": f"{100 * mfu:.1f}%"} if mfu else {})
        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", **shown)

    def mfu(self, tokens_per_sec: float) -> float | None:
        """Model FLOPs utilisation of one device at this throughput; None when the device's peak is unknown."""
        if self.rt.peak_flops is None:
            return None
        flops = self.mc.flops_per_token(self.mc.block_size) * tokens_per_sec
        return flops / self.rt.world_size / self.rt.peak_flops

    def evaluate_and_save(self, throughput: dict) -> None:
        """Evaluate at the current step, log it, and save ckpt.pt (and best.pt when val loss improved)."""
        losses = self.estimate_losses()
        if not math.isfinite(losses["val"]):
            raise CLIError(f"the val loss is {losses['val']} at step {self.step}; stopped without saving")
        best = losses["val"] < self.best_val_loss
        self.best_val_loss = min(self.best_val_loss, losses["val"])
        self.log(step=self.step, train_loss=losses["train"], val_loss=losses["val"], best_val_loss=self.best_val_loss,
                 lr=self.tc.schedule.lr_at(max(self.step - 1, 0)), **throughput)
        self.say(f"step {self.step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
                 f"{' (best)' if best else f', best {self.best_val_loss:.4f}'}")
        self.save(best)

    @torch.no_grad()
    def estimate_losses(self) -> dict[str, float]:
        """Mean loss over eval_iters batches of each split, averaged over processes. The batches come from a
        generator seeded by (seed, rank, step), so evaluation leaves the training stream untouched."""
        tc, mc = self.tc, self.mc
        self.eval_model.eval()
        generator = torch.Generator().manual_seed(derive_seed(tc.seed, 3, self.rt.rank, self.step))
        losses = {}
        for split in ("train", "val"):
            total = torch.zeros((), device=self.rt.device)
            for _ in range(tc.eval_iters):
                x, y = self.data.get_batch(split, tc.batch_size, mc.block_size, generator, self.rt.device)
                with self.rt.autocast():
                    total += self.eval_model(x, y)[1].float()
            losses[split] = mean_over_processes(total / tc.eval_iters)
        self.eval_model.train()
        return losses

    # ---- what the run says ----------------------------------------------------------------------

    def describe(self) -> str:
        """The run's opening lines: the model, the training settings and where it runs."""
        mc, tc, rt, schedule = self.mc, self.tc, self.rt, self.tc.schedule
        size = (f"{mc.num_params() / 1e6:.2f}M parameters ({mc.non_embedding_params() / 1e6:.2f}M without "
                f"embeddings), {mc.flops_per_token(mc.block_size) / 1e6:.1f} MFLOP per token trained")
        settings = {k: v for k, v in asdict(tc).items() if k not in ("lr", "min_lr", "lr_decay_iters")}
        lr = (f"lr {schedule.peak:g} -> {schedule.floor:g} (warmup {schedule.warmup} steps, cosine until step "
              f"{schedule.decay_end})")
        where = (f"{rt.device}, {str(rt.dtype).removeprefix('torch.')}, {'compiled' if rt.compile else 'eager'}, "
                 f"{rt.world_size} process{'es' if rt.world_size > 1 else ''}, {self.tokens_per_step:,} tokens "
                 "per step" + (f", peak {rt.peak_flops:.3g} FLOP/s for MFU" if rt.peak_flops else ""))
        lines = [labelled("model", [size, fields_text(mc.active_fields())]), labelled("train", [lr, fields_text(settings)]),
                 labelled("run", [where])]
        return "\n".join(lines + ([self.resume_note] if self.resume_note else []))

    def say(self, message: str) -> None:
        if self.rt.rank == 0:
            tqdm.write(message)

    def log(self, **record) -> None:
        if self.metrics is not None:
            self.metrics.write(**record)


class Window:
    """The training steps since the last line in metrics.jsonl: their summed loss (a tensor on the device, so
    nothing waits for it), their count, and the time they took; and the throughput of the last closed window."""

    def __init__(self):
        self.throughput = {"tokens_per_sec": None, "mfu": None}
        self.loss, self.steps, self.logged, self.start = 0.0, 0, True, time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.loss, self.steps, self.logged = self.loss + loss, self.steps + 1, False

    def close(self, tokens_per_step: int, mfu) -> dict:
        """End the window -> its throughput {"tokens_per_sec", "mfu"}, mfu(tokens_per_sec) giving the latter."""
        tokens_per_sec = self.steps * tokens_per_step / (time.perf_counter() - self.start)
        self.throughput = {"tokens_per_sec": tokens_per_sec, "mfu": mfu(tokens_per_sec)}
        self.loss, self.steps, self.logged = 0.0, 0, True
        return self.throughput

    def restart_clock(self) -> None:
        if self.logged:
            self.start = time.perf_counter()


def fields_text(fields: dict) -> str:
    """name=value pairs, floats as %g: "n_layer=6, dropout=0.1, ..."."""
    return ", ".join(f"{name}={value:g}" if isinstance(value, float) else f"{name}={value}"
                     for name, value in fields.items())


def labelled(label: str, paragraphs: list[str], width: int = 110) -> str:
    """paragraphs wrapped to width, the first line starting with label, the rest indented under it."""
    indent = " " * 7
    lines = [line for text in paragraphs for line in textwrap.wrap(text, width - len(indent))]
    return "\n".join(f"{label + ':':<7}{line}" if i == 0 else indent + line for i, line in enumerate(lines))


# ---- processes, seeds, signals ------------------------------------------------------------------

def derive_seed(*keys: int) -> int:
    """A 64-bit seed mixed from keys; callers put a distinct tag second so that the streams never coincide."""
    return int(np.random.SeedSequence(keys).generate_state(1, np.uint64)[0])


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


# ---- the run's logs -----------------------------------------------------------------------------

class MetricsLog:
    """OUT/metrics.jsonl: one JSON object per line. A fresh run starts it anew at its first line; a resumed one
    keeps the lines up to the step it resumes from (a last line cut short by a crash is dropped) and appends."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path, self.started = path, resume_step is not None
        if resume_step is not None and path.exists():
            kept = [line for line in read_lines(path) if logged_step(line) <= resume_step]
            with atomic_write(path) as tmp:
                tmp.write_text("".join(line + "\n" for line in kept))

    def write(self, **record) -> None:
        with open(self.path, "a" if self.started else "w") as f:
            f.write(json.dumps(record) + "\n")
        self.started = True


def read_lines(path: Path) -> list[str]:
    """The records of a metrics.jsonl, a line each; a last line without its newline, cut short by a crash while
    it was written, is dropped. Anything else that is not a record is refused."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CLIError(f"{path} is not UTF-8 text, so not a metrics log; move it away to resume") from None
    lines = text.splitlines()
    if text and not text.endswith("\n"):
        lines = lines[:-1]
    for number, line in enumerate(lines, start=1):
        if logged_step(line) == math.inf:
            raise CLIError(f"{path} line {number} is not a metrics record (a JSON object with an integer step); "
                           "move the file away to resume")
    return lines


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, in order."""
    return [parse_json(line, str(path)) for line in read_lines(path)]


def logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for a line that is not a record."""
    try:
        record = parse_json(line, "metrics.jsonl")
    except CLIError:
        return math.inf
    step = record.get("step") if isinstance(record, dict) else None
    return step if is_of(step, int) else math.inf


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """Train and val loss against step. The y axis spans the losses from a tenth of the run on, so that the
    train/val gap, not the first drop from ln(vocab), fills the picture; the first val loss is named in the
    title."""
    fig = figure(png_path, "train and val loss against step",
                 f"`python train.py --resume --out-dir {png_path.parent}` draws it without training further",
                 figsize=(7, 4), layout="constrained")
    if fig is None:
        return
    records = read_metrics(metrics_path)
    train_points = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val_points = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    ax = fig.subplots()
    for points, label, style in ((train_points, "train (mean since the previous line)", "-"),
                                 (val_points, "val (estimate)", "o-")):
        if points:
            ax.plot(*zip(*points), style, label=label)
    last_step = max(step for step, _ in train_points + val_points)
    later = [loss for step, loss in train_points + val_points if step >= last_step / 10]
    if later and last_step > 0:
        low, high = min(later), max(later)
        margin = 0.05 * (high - low or 1.0)
        ax.set_ylim(low - margin, high + margin)
    start = f"; step 0: val {val_points[0][1]:.2f}" if val_points and val_points[0][0] == 0 else ""
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=f"{png_path.parent.name}{start}")
    ax.grid(True, alpha=0.3)
    ax.legend()
    save_figure(fig, png_path)
