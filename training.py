"""The pieces of one training step that train.py and benchmarks/bench_train.py share: the learning-rate
schedule, the optimiser and the step itself."""
import math
from contextlib import nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel

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


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, fused: bool) -> torch.optim.AdamW:
    """AdamW that decays matrices (embeddings and projections) and leaves norm weights and biases alone."""
    params = list(model.parameters())  # a tied embedding and LM head appear once
    groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=ADAM_BETAS, fused=fused)


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
