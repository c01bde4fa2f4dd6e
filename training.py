"""The pieces of one training step that train.py and benchmarks/bench_train.py share: the learning-rate
schedule, the optimiser and the step itself."""
import math
from contextlib import nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel

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
            q = m.q_b_proj if hasattr(m, "q_b_proj") else m.q_proj
            blocks[q.weight] = [m.dn, m.dr] * m.n_head
            blocks[m.kv_a_proj_with_mqa.weight] = [m.r, m.dr]
            blocks[m.kv_b_proj.weight] = [m.dn, m.dv] * m.n_head
    return blocks


class MuonWithAdamW:
    """torch's Muon on the hidden matrices and an AdamW over the other parameters, stepped, zeroed and saved as
    one optimiser. Muon orthogonalises each matrix that MLA stacks (stacked_row_blocks) separately: it steps
    row blocks that share the stacked weight's storage, whose gradients are the matching rows of the weight's
    (results/muon.md measures this against one update per weight). Muon scales its lr as Moonlight does
    (adjust_lr_fn="match_rms_adamw": an update's RMS is 0.2 lr, about AdamW's), so one lr and one weight decay
    serve both optimisers. No float16 loss scaling (train.py refuses it): GradScaler.unscale_ would miss the
    blocks' gradients, which step() sets."""

    def __init__(self, hidden: list[torch.Tensor], stacked: dict[torch.Tensor, list[int]],
                 adamw: torch.optim.AdamW, lr: float, weight_decay: float):
        self.split = [(w, w.detach().split(stacked[w])) for w in hidden if w in stacked]
        matrices = [w for w in hidden if w not in stacked] + [b for _, blocks in self.split for b in blocks]
        self.muon = torch.optim.Muon(matrices, lr=lr, weight_decay=weight_decay, adjust_lr_fn="match_rms_adamw")
        self.adamw = adamw

    @property
    def param_groups(self) -> list[dict]:
        """Both optimisers' groups, so that train_step sets the lr of every one."""
        return self.muon.param_groups + self.adamw.param_groups

    def step(self) -> None:
        for weight, blocks in self.split:
            for block, grad in zip(blocks, weight.grad.split([b.size(0) for b in blocks])):
                block.grad = grad
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
                _, loss = model(x, y)
            scaler.scale(loss / grad_accum).backward()
        total = total + loss.detach()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return total / grad_accum
