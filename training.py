"""Training: the pieces of one step that train.py and benchmarks/bench_train.py share (the learning-rate
schedule, the optimiser, the step itself), and a whole run as train.py and compare.py start it (TrainConfig,
Trainer: checkpoints, resuming, evaluation during training, metrics.jsonl, loss.png)."""
import json
import math
import os
import signal
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
from cli import CLIError, atomic_write
from dataset import PreparedData
from model import Transformer
from model_config import ModelConfig
from runtime import DTYPES, device_peak_flops, keep_freed_memory, pick_device, pick_dtype

from attention import MultiHeadLatentAttention

GRAD_CLIP = 1.0
ADAM_BETAS = (0.9, 0.95)


def lr_at(step: int, tc) -> float:
    """The learning rate of optimiser step `step` (0-based): linear warmup to tc.lr over warmup_iters steps,
    cosine decay to min_lr at decay_iters, then min_lr."""
    if step < tc.warmup_iters:
        return tc.lr * (step + 1) / tc.warmup_iters
    if step >= tc.decay_iters:
        return tc.min_lr
    progress = (step - tc.warmup_iters) / (tc.decay_iters - tc.warmup_iters)
    return tc.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (tc.lr - tc.min_lr)


OPTIMIZERS = ("adamw", "muon")
TUNED_LR = {"adamw": 1e-3, "muon": 3e-3}  # the peak lr each wants on the shakespeare preset (results/muon.md)


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, fused: bool, kind: str = "adamw"):
    """The optimiser train_step() steps. adamw: AdamW on everything, decaying matrices (embeddings and projections)
    and leaving norm weights and biases alone. muon: MuonWithAdamW, torch's Muon on the 2-D weights inside the
    blocks and AdamW as above on the rest (the tied embedding / LM head, norm weights)."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {kind!r}")
    hidden = [p for p in model.layers.parameters() if p.dim() == 2] if kind == "muon" else []
    rest = [p for p in model.parameters() if p not in set(hidden)]  # a tied weight appears once
    adamw = torch.optim.AdamW([{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
                               {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}],
                              lr=lr, betas=ADAM_BETAS, fused=fused)
    if kind == "adamw":
        return adamw
    return MuonWithAdamW(hidden, stacked_row_blocks(model), adamw, lr, weight_decay)


def stacked_row_blocks(model: torch.nn.Module) -> dict[torch.Tensor, list[int]]:
    """The row counts of the matrices that MLA stacks into one weight, per weight: q_b_proj (q_proj without a
    query LoRA) holds each head's nope then rope queries, kv_a_proj_with_mqa W_DKV then W_KR, kv_b_proj each
    head's W_UK then W_UV."""
    blocks = {}
    for m in model.modules():
        if isinstance(m, MultiHeadLatentAttention):
            q = m.q_b_proj if m.q_lora_rank else m.q_proj
            blocks[q.weight] = [m.dn, m.dr] * m.n_head
            blocks[m.kv_a_proj_with_mqa.weight] = [m.r, m.dr]
            blocks[m.kv_b_proj.weight] = [m.dn, m.dv] * m.n_head
    return blocks


def gradient_rows_to(blocks: tuple[torch.Tensor, ...]):
    """A post-accumulate-grad hook for a stacked weight: each row block's grad becomes the view of its rows."""
    def hook(weight: torch.Tensor) -> None:
        for block, grad in zip(blocks, weight.grad.split([b.size(0) for b in blocks])):
            block.grad = grad
    return hook


class MuonWithAdamW:
    """torch's Muon on the hidden matrices and an AdamW over the other parameters, stepped, zeroed and saved as
    one optimiser. Muon orthogonalises each matrix that MLA stacks (stacked_row_blocks) separately: it steps
    row blocks that share the stacked weight's storage, whose gradients are the matching rows of the weight's
    (results/muon.md measures this against one update per weight). Muon scales its lr as Moonlight does
    (adjust_lr_fn="match_rms_adamw": an update's RMS is 0.2 lr, about AdamW's), so one lr and one weight decay
    serve both optimisers. The blocks' gradients are views of the weight's, set as soon as autograd has written
    it, so that GradScaler.unscale_ unscales (and checks for inf) every row in place."""

    def __init__(self, hidden: list[torch.Tensor], stacked: dict[torch.Tensor, list[int]],
                 adamw: torch.optim.AdamW, lr: float, weight_decay: float):
        self.split = [(w, w.detach().split(stacked[w])) for w in hidden if w in stacked]
        for weight, blocks in self.split:
            weight.register_post_accumulate_grad_hook(gradient_rows_to(blocks))
        matrices = [w for w in hidden if w not in stacked] + [b for _, blocks in self.split for b in blocks]
        self.muon = torch.optim.Muon(matrices, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
        self.adamw = adamw

    @property
    def param_groups(self) -> list[dict]:
        """Both optimisers' groups, so that train_step sets the lr of every one."""
        return self.muon.param_groups + self.adamw.param_groups

    def step(self) -> None:
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)
        for weight, _ in self.split:
            if set_to_none:
                weight.grad = None
            elif weight.grad is not None:
                weight.grad.zero_()

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def train_step(model, optimizer, scaler, next_batch, grad_accum: int, lr: float, autocast) -> torch.Tensor:
    """One optimiser step at learning rate lr over grad_accum micro-batches from next_batch() -> (x, y), each
    (B, T). Under DDP gradients are all-reduced on the last micro-step only. Returns the mean micro-batch loss as
    a 0-dim tensor on the device, so that nothing waits for the device here."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    total = 0.0
    for micro in range(grad_accum):
        x, y = next_batch()
        last = micro == grad_accum - 1
        with nullcontext() if last or not isinstance(model, DistributedDataParallel) else model.no_sync():
            with autocast:
                loss = model(x, y)[1]  # no name for the logits: they are freed before backward
            scaler.scale(loss / grad_accum).backward()
        total = total + loss.detach()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total / grad_accum


# ---- a training run -----------------------------------------------------------------------------

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
    optimizer: str = field(default="muon", metadata={
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
        for name in ("max_iters", "batch_size", "grad_accum", "eval_interval", "eval_iters", "log_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        if self.lr is None:
            object.__setattr__(self, "lr", TUNED_LR[self.optimizer])
        if self.min_lr is None:
            object.__setattr__(self, "min_lr", self.lr / 10)
        if not all(math.isfinite(x) for x in (self.lr, self.min_lr, self.weight_decay, self.peak_flops or 1)):
            raise ValueError("lr, min_lr, weight_decay and peak_flops must be finite numbers")
        if not 0 <= self.min_lr <= self.lr or self.lr == 0:
            raise ValueError(f"need 0 <= min_lr <= lr and lr > 0, got min_lr {self.min_lr} and lr {self.lr}")
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


def train(tc: TrainConfig, mc: ModelConfig, start: dict | None = None) -> int:
    """Train as tc and mc say, from start: the checkpoint tc.resume or tc.init_from names, already loaded (it is
    read here when not given). Returns 0 when max_iters is reached, or the number of the signal that stopped
    the run early after saving."""
    try:
        return Trainer(tc, mc, start).run()
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


def check_start(tc: TrainConfig, mc: ModelConfig, start: dict | None) -> None:
    """Refuse a run that would overwrite another, or resume what it cannot continue."""
    ckpt_path = Path(tc.out_dir) / "ckpt.pt"
    if not tc.resume:
        if ckpt_path.exists():
            raise CLIError(f"{ckpt_path} exists; pass --resume to continue that run, or choose another --out-dir")
        return
    missing = sorted({"optimizer", "scaler", "train_config", "step", "best_val_loss", "tokens_seen", "rng"}
                     - start.keys())
    if missing:
        raise CLIError(f"cannot resume from {ckpt_path}: it has no {', '.join(missing)} (not written by train.py)")
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


@dataclass
class Runtime:
    """Where a run computes: its process among world_size, its device and dtype, and what follows from them."""
    rank: int
    local_rank: int
    world_size: int
    device: str  # "cuda:<local rank>", "mps" or "cpu"
    dtype: torch.dtype
    compile: bool
    peak_flops: float | None

    @classmethod
    def start(cls, tc: TrainConfig) -> "Runtime":
        device = pick_device(tc.device)
        rank, local_rank, world_size = start_processes(device)
        if device == "cuda":
            torch.set_float32_matmul_precision("high")  # TF32 matmuls
            device = f"cuda:{local_rank}"
        else:
            keep_freed_memory()
        return cls(rank, local_rank, world_size, device, pick_dtype(tc.dtype, device.split(":")[0]),
                   device.startswith("cuda") if tc.compile is None else tc.compile,
                   device_peak_flops(device, tc.peak_flops))

    @property
    def device_type(self) -> str:
        return self.device.split(":")[0]

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype, enabled=self.dtype != torch.float32)


class Trainer:
    """Everything one training run changes (model, optimiser, step, RNG streams, best val loss), its checkpoint
    (save and restore), and the loop."""

    def __init__(self, tc: TrainConfig, mc: ModelConfig, start: dict | None = None):
        self.tc, self.mc, self.out = tc, mc, Path(tc.out_dir)
        start = starting_checkpoint(tc) if start is None else start
        check_start(tc, mc, start)
        self.data = load_data(tc, mc)
        self.rt = rt = Runtime.start(tc)
        self.tokens_per_step = tc.batch_size * mc.block_size * tc.grad_accum * rt.world_size
        torch.manual_seed(tc.seed)  # the same initial weights in every process
        self.model = Transformer(mc)  # the plain module: what checkpoints hold, whatever wraps it
        self.data_generator = torch.Generator().manual_seed(derive_seed(tc.seed, 1, rt.rank))
        torch.manual_seed(derive_seed(tc.seed, 2, rt.rank))  # dropout differs per process
        self.step, self.best_val_loss, self.tokens_seen, self.resume_note = 0, math.inf, 0, ""
        if start is not None:
            load_weights(self.model, start["model"], f"cannot {'resume' if tc.resume else 'start'} from "
                                                     f"{self.out / 'ckpt.pt' if tc.resume else tc.init_from}")
        self.model.to(rt.device)
        self.optimizer = make_optimizer(self.model, tc.lr, tc.weight_decay, fused=rt.device_type == "cuda",
                                        kind=tc.optimizer)
        self.scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == torch.float16)
        if tc.resume:
            self.restore(start)
        self.train_model = self.eval_model = torch.compile(self.model) if rt.compile else self.model
        if rt.world_size > 1:
            self.train_model = DistributedDataParallel(
                self.eval_model, device_ids=[rt.local_rank] if rt.device_type == "cuda" else None)
        self.metrics = None
        if rt.rank == 0:
            self.out.mkdir(parents=True, exist_ok=True)
            self.metrics = MetricsLog(self.out / "metrics.jsonl", self.step if tc.resume else None)

    def save(self, best: bool) -> None:
        """Write ckpt.pt, and best.pt too when best. Every process takes part (their RNG states are gathered);
        rank 0 writes."""
        rng = [rng_state(self.data_generator, self.rt.device_type)]
        if self.rt.world_size > 1:
            rng = [None] * self.rt.world_size
            dist.all_gather_object(rng, rng_state(self.data_generator, self.rt.device_type))
        if self.rt.rank != 0:
            return
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                 "scaler": self.scaler.state_dict(), "model_config": self.mc.to_dict(),
                 "train_config": asdict(self.tc), "step": self.step, "best_val_loss": self.best_val_loss,
                 "tokens_seen": self.tokens_seen, "rng": rng}
        for name in ("ckpt.pt", "best.pt") if best else ("ckpt.pt",):
            save_checkpoint(state, self.out / name)

    def restore(self, ckpt: dict) -> None:
        """The other half of save(): the optimiser, loss scaler, counters and RNG streams (weights are loaded
        before the model moves to its device)."""
        self.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt["scaler"]:  # empty when saved without float16 loss scaling
            self.scaler.load_state_dict(ckpt["scaler"])
        self.step, self.best_val_loss, self.tokens_seen = ckpt["step"], ckpt["best_val_loss"], ckpt["tokens_seen"]
        self.resume_note = f"resuming from {self.out / 'ckpt.pt'} at step {self.step}"
        if len(ckpt["rng"]) == self.rt.world_size:
            rng = ckpt["rng"][self.rt.rank]
            self.data_generator.set_state(rng["data"])
            torch.set_rng_state(rng["cpu"])
            if "cuda" in rng and self.rt.device_type == "cuda":
                torch.cuda.set_rng_state(rng["cuda"])
        else:  # another process count: the old streams cannot be split or merged, so start new ones
            self.resume_note += (f"\nwarning: the checkpoint was written by {len(ckpt['rng'])} processes and this "
                                 f"run has {self.rt.world_size}: the data order is reseeded, so it is not an exact "
                                 "continuation")
            self.data_generator.manual_seed(derive_seed(self.tc.seed, 1, self.rt.rank, self.step))
            torch.manual_seed(derive_seed(self.tc.seed, 2, self.rt.rank, self.step))

    def say(self, message: str) -> None:
        if self.rt.rank == 0:
            tqdm.write(message)

    def log(self, **record) -> None:
        if self.metrics is not None:
            self.metrics.write(**record)

    def next_batch(self):
        return self.data.get_batch("train", self.tc.batch_size, self.mc.block_size, self.data_generator,
                                   self.rt.device)

    def run(self) -> int:
        """Train up to max_iters. Returns 0 when done, or the number of the signal that stopped it early
        (after saving ckpt.pt)."""
        tc = self.tc
        self.say(describe(self))
        if self.step == tc.max_iters and tc.resume:
            self.say(f"note: {self.out / 'ckpt.pt'} is at step {self.step} = --max-iters already; nothing to train")
        with StopSignals() as signals, tqdm(total=tc.max_iters, initial=self.step, unit="step", dynamic_ncols=True,
                                            disable=self.rt.rank != 0) as bar:
            window = Window(self)
            if not tc.resume:
                evaluate_and_save(self, window.throughput)
            while self.step < tc.max_iters:
                lr = lr_at(self.step, tc)
                window.add(train_step(self.train_model, self.optimizer, self.scaler, self.next_batch,
                                      tc.grad_accum, lr, self.rt.autocast()))
                self.step += 1
                self.tokens_seen += self.tokens_per_step
                bar.update()
                evaluating = self.step % tc.eval_interval == 0 or self.step == tc.max_iters
                stopping = signals.agreed(self.rt.device)
                if self.step % tc.log_interval == 0 or evaluating or stopping:
                    window.close(lr, bar)
                if evaluating:
                    evaluate_and_save(self, window.throughput)
                elif stopping:
                    self.save(best=False)
                if stopping:
                    self.say(f"stopped by {signal.Signals(stopping).name} after step {self.step}; "
                             f"{self.out / 'ckpt.pt'} saved; continue with --resume")
                    return stopping
                window.restart_clock()  # throughput leaves out logging, evaluation and saving
        if self.rt.rank == 0:
            plot_losses(self.out / "metrics.jsonl", self.out / "loss.png")
        return 0


class Window:
    """The training steps since the last line in metrics.jsonl: their mean loss and throughput."""

    def __init__(self, trainer: Trainer):
        self.trainer = trainer
        self.throughput = {"tokens_per_sec": None, "mfu": None}
        self.loss, self.steps, self.logged, self.start = 0.0, 0, True, time.perf_counter()

    def add(self, loss: torch.Tensor) -> None:
        self.loss, self.steps, self.logged = self.loss + loss, self.steps + 1, False

    def close(self, lr: float, bar) -> None:
        """Log the window's mean loss and throughput (and show them on the bar); refuse a non-finite loss."""
        t = self.trainer
        mean_loss = mean_over_processes(self.loss / self.steps)
        if not math.isfinite(mean_loss):
            raise CLIError(f"the training loss became {mean_loss} between steps {t.step - self.steps + 1} and "
                           f"{t.step}; stopped without saving (ckpt.pt and best.pt hold earlier steps); "
                           "try a lower --lr")
        tokens_per_sec = self.steps * t.tokens_per_step / (time.perf_counter() - self.start)
        mfu = None
        if t.rt.peak_flops is not None:
            mfu = t.mc.flops_per_token(t.mc.block_size) * tokens_per_sec / t.rt.world_size / t.rt.peak_flops
        self.throughput = {"tokens_per_sec": tokens_per_sec, "mfu": mfu}
        t.log(step=t.step, loss=mean_loss, lr=lr, **self.throughput, tokens_seen=t.tokens_seen)
        shown = {"tok/s": f"{tokens_per_sec:,.0f}"} | ({"mfu": f"{100 * mfu:.1f}%"} if mfu is not None else {})
        bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr:.2e}", **shown)
        self.loss, self.steps, self.logged = 0.0, 0, True

    def restart_clock(self) -> None:
        if self.logged:
            self.start = time.perf_counter()


def evaluate_and_save(t: Trainer, throughput: dict) -> None:
    """Evaluate at the current step, log it, and save ckpt.pt (and best.pt when val loss improved)."""
    losses = estimate_losses(t)
    if not math.isfinite(losses["val"]):
        raise CLIError(f"the val loss is {losses['val']} at step {t.step}; stopped without saving")
    best = losses["val"] < t.best_val_loss
    t.best_val_loss = min(t.best_val_loss, losses["val"])
    t.log(step=t.step, train_loss=losses["train"], val_loss=losses["val"], best_val_loss=t.best_val_loss,
          lr=lr_at(max(t.step - 1, 0), t.tc), **throughput)
    t.say(f"step {t.step}: train loss {losses['train']:.4f}, val loss {losses['val']:.4f}"
          f"{' (best)' if best else f', best {t.best_val_loss:.4f}'}")
    t.save(best)


@torch.no_grad()
def estimate_losses(t: Trainer) -> dict[str, float]:
    """Mean loss over eval_iters batches of each split, averaged over processes. The batches come from a
    generator seeded by (seed, rank, step), so evaluation leaves the training stream untouched."""
    tc, mc = t.tc, t.mc
    t.eval_model.eval()
    generator = torch.Generator().manual_seed(derive_seed(tc.seed, 3, t.rt.rank, t.step))
    losses = {}
    for split in ("train", "val"):
        total = torch.zeros((), device=t.rt.device)
        for _ in range(tc.eval_iters):
            x, y = t.data.get_batch(split, tc.batch_size, mc.block_size, generator, t.rt.device)
            with t.rt.autocast():
                total += t.eval_model(x, y)[1].float()
        losses[split] = mean_over_processes(total / tc.eval_iters)
    t.eval_model.train()
    return losses


def rng_state(data_generator: torch.Generator, device_type: str) -> dict:
    """The RNG states one process saves: its data stream's, torch's CPU one (dropout) and its GPU's."""
    state = {"data": data_generator.get_state(), "cpu": torch.get_rng_state()}
    if device_type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def describe(t: Trainer) -> str:
    mc, tc, rt = t.mc, t.tc, t.rt
    lines = [f"model: {json.dumps(mc.to_dict())}",
             f"       {mc.num_params() / 1e6:.2f}M parameters, {mc.non_embedding_params() / 1e6:.2f}M "
             f"without embeddings, {mc.flops_per_token(mc.block_size) / 1e6:.1f} MFLOP per token trained",
             f"train: {json.dumps(asdict(tc))}",
             f"run:   device {rt.device}, dtype {str(rt.dtype).removeprefix('torch.')}, compile "
             f"{rt.compile}, {rt.world_size} process(es), {t.tokens_per_step:,} tokens per step, "
             f"lr decays until step {tc.decay_iters}, peak FLOP/s for MFU "
             f"{'unknown (pass --peak-flops)' if rt.peak_flops is None else f'{rt.peak_flops:.3g}'}"]
    if t.resume_note:
        lines.append(t.resume_note)
    return "\n".join(lines)


# ---- processes, seeds, signals ------------------------------------------------------------------

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


# ---- logs ---------------------------------------------------------------------------------------

class MetricsLog:
    """OUT/metrics.jsonl: one JSON object per line. A fresh run starts it empty; a resumed one keeps the lines up
    to the step it resumes from and appends after them."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        kept = []
        if resume_step is not None and path.exists():
            kept = [line for line in path.read_text().splitlines() if logged_step(line) <= resume_step]
        with atomic_write(path) as tmp:
            tmp.write_text("".join(line + "\n" for line in kept))

    def write(self, **record) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl, in order."""
    return [json.loads(line) for line in path.read_text().splitlines()]


def logged_step(line: str) -> float:
    """The step of a metrics.jsonl line; infinity for a line cut short by a crash, so that it is dropped."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """Train and val loss against step, when matplotlib is installed; a note saying how to get it otherwise."""
    try:
        from matplotlib.figure import Figure  # no pyplot: leaves the caller's backend alone
    except ImportError:
        tqdm.write(f"note: matplotlib is not installed, so there is no {png_path} (train and val loss against "
                   f"step); pip install matplotlib, then `python train.py --resume --out-dir {png_path.parent}` "
                   "draws it without training further")
        return
    records = read_metrics(metrics_path)
    train_points = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val_points = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for points, label, style in ((train_points, "train (mean since the previous line)", "-"),
                                 (val_points, "val", "o-")):
        if points:
            ax.plot(*zip(*points), style, label=label)
    ax.set(xlabel="step", ylabel="loss (nats/token)", title=png_path.parent.name)
    ax.legend()
    with atomic_write(png_path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
