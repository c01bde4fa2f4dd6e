"""Whole-split evaluation of a model: loss, perplexity and bits per byte, every token scored once. Used by test.py
and compare.py."""
import itertools
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from tqdm import tqdm

from dataset import PreparedData
from model import Transformer


@torch.no_grad()
def evaluate(model: Transformer, data: PreparedData, split: str, block_size: int, batch_size: int, device,
             stride: int | None = None) -> dict:
    """Mean loss over every token of the split after the first, each predicted exactly once, in windows of
    block_size tokens (sliding by stride when given), batch_size windows per forward.

    -> {"loss", "perplexity", "bits_per_byte", "tokens"}; bits per byte divide the total nats by the UTF-8
    bytes of the split's text, so tokenizers of different granularity compare."""
    was_training = model.training
    model.eval()
    total_nats, tokens = 0.0, 0  # Python floats: float64 accumulation
    windows = data.eval_windows(split, block_size, stride)
    with tqdm(total=len(data.tokens(split)) - 1, desc=f"eval {split}", unit="tok", delay=2, leave=False) as bar:
        for batch in batched(windows, batch_size):
            x = torch.stack([x for x, _ in batch]).to(device)  # (B, T)
            y = torch.stack([y for _, y in batch]).to(device)  # (B, T), -1 where not scored
            logits, _ = model(x)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=-1, reduction="sum")
            scored = int((y != -1).sum())
            total_nats += loss.item()
            tokens += scored
            bar.update(scored)
    model.train(was_training)
    loss = total_nats / tokens
    return {"loss": loss, "perplexity": math.exp(loss),
            "bits_per_byte": total_nats / math.log(2) / data.text_bytes(split), "tokens": tokens}


def batched(items, n: int) -> Iterator[list]:
    """Lists of n consecutive items (the last one possibly shorter)."""
    items = iter(items)
    while batch := list(itertools.islice(items, n)):
        yield batch
