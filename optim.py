"""One optimisation step and what it needs: the learning-rate schedule, the optimiser (AdamW, or Muon on the
blocks' matrices beside AdamW on the rest, stepped and saved as one object) and the step itself. A training run
(training.py) and benchmarks/bench_train.py take their steps from here."""
import math
from contextlib import nullcontext
from typing import NamedTuple

import torch
from torch.nn.parallel import DistributedDataParallel

from model import Transformer

GRAD_CLIP = 1.0
ADAM_BETAS = (0.9, 0.95)
OPTIMIZERS = ("adamw", "muon")
DEFAULT_OPTIMIZER = "muon"
TUNED_LR = {"adamw": 1e-3, "muon": 3e-3}  # the peak lr each wants on the shakespeare preset (results/muon.md)


class Schedule(NamedTuple):
    """Linear warmup to peak over warmup steps, cosine decay to floor at decay_end, then floor."""
    peak: float
    floor: float
    warmup: int
    decay_end: int

    def lr_at(self, step: int) -> float:
        """The learning rate of optimiser step `step` (0-based)."""
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        if step >= self.decay_end:
            return self.floor
        progress = (step - self.warmup) / (self.decay_end - self.warmup)
        return self.floor + 0.5 * (1.0 + math.cos(math.pi * progress)) * (self.peak - self.floor)


def make_optimizer(model: Transformer, lr: float, weight_decay: float, fused: bool = False,
                   kind: str = DEFAULT_OPTIMIZER):
    """The optimiser train_step() steps. adamw: AdamW on everything, decaying matrices (embeddings and projections)
    and leaving norm weights alone. muon: MuonWithAdamW, torch's Muon on the 2-D weights inside the blocks and
    AdamW as above on the rest (the tied embedding / LM head, norm weights)."""
    if kind not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {kind!r}")
    hidden = [p for p in model.layers.parameters() if p.dim() == 2] if kind == "muon" else []
    rest = [p for p in model.parameters() if p not in set(hidden)]  # a tied weight appears once
    adamw = torch.optim.AdamW([{"params": [p for p in rest if p.dim() >= 2], "weight_decay": weight_decay},
                               {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0}],
                              lr=lr, betas=ADAM_BETAS, fused=fused)
    if kind == "adamw":
        return adamw
    parameters = dict(model.named_parameters())
    stacked = {parameters[name]: [block.rows for block in blocks] for name, blocks in model.stacked_rows().items()}
    return MuonWithAdamW(hidden, stacked, adamw, lr, weight_decay)


def gradient_rows_to(blocks: tuple[torch.Tensor, ...]):
    """A post-accumulate-grad hook for a stacked weight: each row block's grad becomes the view of its rows."""
    def hook(weight: torch.Tensor) -> None:
        for block, grad in zip(blocks, weight.grad.split([b.size(0) for b in blocks])):
            block.grad = grad
    return hook


class MuonWithAdamW:
    """torch's Muon on the hidden matrices and an AdamW over the other parameters, stepped, zeroed and saved as
    one optimiser. Muon orthogonalises each matrix that MLA stacks into one weight (the model's stacked_rows)
    separately: it steps row blocks that share the stacked weight's storage, whose gradients are the matching
    rows of the weight's (results/muon.md measures this against one update per weight). Muon scales its lr as
    Moonlight does (adjust_lr_fn="match_rms_adamw": an update's RMS is 0.2 lr, about AdamW's), so one lr and one
    weight decay serve both optimisers. The blocks' gradients are views of the weight's, set as soon as autograd
    has written it, so that GradScaler.unscale_ unscales (and checks for inf) every row in place."""

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
