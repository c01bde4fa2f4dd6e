"""The decode benchmark: prefill and decode speed and KV-cache size of MLA (absorbed, and decompressing its cache
every step), MHA and GQA at the same depth and width. Used by test.py --bench and compare.py."""
import itertools
import statistics
import time
from dataclasses import replace

import torch
from tqdm import tqdm

from attention import MultiHeadLatentAttention
from model import Transformer
from model_config import ModelConfig
from runtime import synchronize


# name -> (attention kind, MLA's absorb flag). Both MLA rows share one model, prefill and cache.
VARIANTS = {"mla absorbed": ("mla", True), "mla decompressed": ("mla", False), "mha": ("mha", True),
            "gqa": ("gqa", True)}


def benchmark(config: ModelConfig, contexts: list[int], batches: list[int], device, dtype: torch.dtype,
              decode_steps: int = 10, prefill_runs: int = 3) -> list[dict]:
    """Prefill and decode speed and KV-cache size of MLA (absorbed, and decompressing its cache every step),
    MHA and GQA built from config with attention overridden, random weights, at every batch and context.

    Decode at context L: prefill L - 1 tokens into a cache of capacity L, then time decode steps of the L-th
    token (rewinding the cache before each), median of decode_steps after two untimed. The variants take
    their decode steps in turn, so a change in machine load touches all of them alike. Prefill: median of
    prefill_runs. Cache bytes come from the real cache (Cache.nbytes) -> one dict per row."""
    device = torch.device(device)
    kinds = dict.fromkeys(kind for kind, _ in VARIANTS.values())
    models = {kind: bench_model(config, kind, max(contexts), device, dtype) for kind in kinds}
    rows = []
    for batch, context in tqdm(list(itertools.product(batches, contexts)), desc="bench", leave=False):
        caches, prefill_s = {}, {}
        prompt = torch.randint(config.vocab_size, (batch, context - 1), device=device)
        for kind, model in models.items():
            caches[kind] = model.make_cache(batch, context)
            prefill_s[kind] = statistics.median(timed(model, prompt, caches[kind], 0) for _ in range(prefill_runs))
        step_s = {name: [] for name in VARIANTS}
        for _ in range(2 + decode_steps):
            for name, (kind, absorb) in VARIANTS.items():
                set_absorb(models[kind], absorb)
                step_s[name].append(timed(models[kind], prompt[:, -1:], caches[kind], context - 1))
        for name, (kind, _) in VARIANTS.items():
            decode_s, nbytes = statistics.median(step_s[name][2:]), caches[kind].nbytes
            rows.append({"attention": name, "batch": batch, "context": context,
                         "params": sum(p.numel() for p in models[kind].parameters()),
                         "prefill_tokens_per_s": batch * (context - 1) / prefill_s[kind],
                         "decode_tokens_per_s": batch / decode_s, "decode_ms_per_step": 1e3 * decode_s,
                         "cache_bytes": nbytes, "cache_bytes_per_token": nbytes / (batch * context)})
    return rows


def bench_model(config: ModelConfig, kind: str, block_size: int, device: torch.device, dtype) -> Transformer:
    """config's model with attention kind, random weights, warmed up by one untimed prefill and decode step."""
    torch.manual_seed(0)
    model = Transformer(replace(config, attention=kind, block_size=block_size, dropout=0.0))
    model = model.to(device=device, dtype=dtype).eval()
    cache, token = model.make_cache(1, 2), torch.zeros(1, 1, dtype=torch.long, device=device)
    for start in (0, 1):
        timed(model, token, cache, start)
    return model


@torch.no_grad()
def timed(model: Transformer, idx: torch.Tensor, cache, start: int) -> float:
    """Seconds for one cached forward of idx (B, T) at positions start .. start + T - 1 (the cache rewound
    to start first), waiting for the GPU to finish."""
    input_pos = torch.arange(start, start + idx.size(1), device=idx.device)
    synchronize(idx.device)
    begin = time.perf_counter()
    model(idx, cache=cache, input_pos=input_pos)
    synchronize(idx.device)
    return time.perf_counter() - begin


def set_absorb(model: Transformer, absorb: bool):
    """Decode MLA over its latent cache (True) or decompress the cache every step (False); no-op for MHA/GQA."""
    for module in model.modules():
        if isinstance(module, MultiHeadLatentAttention):
            module.absorb = absorb


def markdown_table(rows: list[dict]) -> str:
    """The benchmark rows as a markdown table, with cache size and decode speed relative to MHA's."""
    mha = {(r["batch"], r["context"]): r for r in rows if r["attention"] == "mha"}
    lines = ["| attention | params | batch | context | prefill tok/s | decode tok/s | decode ms/step "
             "| cache B/token | cache MiB | cache ÷ MHA | decode tok/s ÷ MHA |",
             "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
    for r in rows:
        base = mha[r["batch"], r["context"]]
        lines.append(f"| {r['attention']} | {r['params'] / 1e6:.1f}M | {r['batch']} | {r['context']} "
                     f"| {r['prefill_tokens_per_s']:,.0f} | {r['decode_tokens_per_s']:,.1f} "
                     f"| {r['decode_ms_per_step']:.2f} | {r['cache_bytes_per_token']:,.0f} "
                     f"| {r['cache_bytes'] / 2**20:,.1f} | {r['cache_bytes'] / base['cache_bytes']:.4f} "
                     f"| {r['decode_tokens_per_s'] / base['decode_tokens_per_s']:.2f} |")
    return "\n".join(lines)
