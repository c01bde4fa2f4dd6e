"""The decode study: how fast MLA decodes over its latent cache (absorbed), and decompressing that cache every
step, against MHA and GQA at the same depth and width, across contexts and batch sizes; the bytes and FLOPs each
step must move, against this machine's memory bandwidth measured in the same run; and how large a batch each
attention kind fits in a cache budget. Used by test.py --bench and compare.py.

Weights are random, and caches are filled with random values instead of a prefill: a prefill of 32K tokens
would dominate the run, and a decode step reads random latents the same way it reads real ones.
"""
import itertools
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import torch
from tqdm import tqdm

from cli import CLIError
from model import Cache, Transformer, compile_decode_step
from model_config import VARIANTS, ModelConfig
from report import figure, save_figure, table_row
from runtime import available_memory, check_model_fits, release_freed_memory, synchronize

# Each row of the study: name -> (the model variant, whether MLA decodes by weight absorption). Both MLA rows
# share one model and one cache.
CONTENDERS = {"mla absorbed": ("mla", True), "mla decompressed": ("mla", False), "mha": ("mha", True),
              "gqa": ("gqa", True), "mqa": ("mqa", True)}
CAPACITY_CONTENDERS = ("mla absorbed", "mha", "gqa", "mqa")  # one per attention kind: MLA decodes absorbed
# Left free beyond the caches and a step's temporaries, for activations and allocator slack, and on a shared
# machine for other processes' growth: with 1 GiB, a run beside other jobs on a 24 GiB machine was OOM-killed.
MEMORY_MARGIN = 3 * 2**30
RECOMPILE_LIMIT = 64  # graphs of the decode step one process may compile (DecodeBench with compile)
PROBE_BYTES = 2**30  # the bandwidth probe sums this much float32, far more than any CPU cache holds


# ---- what a step must read and compute ----------------------------------------------------------

def cache_bytes(config: ModelConfig, batch: int, context: int, element_size: int) -> int:
    """Bytes of the decode cache of batch sequences of context positions, all layers together."""
    return batch * context * config.n_layer * config.kv_cache_values_per_token_per_layer() * element_size


def step_bytes(config: ModelConfig, batch: int, context: int, element_size: int) -> int:
    """Bytes one decode step of batch tokens must read, each token attending to context positions: every weight
    once (a tied embedding and LM head once) and the cache of those positions."""
    return config.num_params() * element_size + cache_bytes(config, batch, context, element_size)


def step_flops(config: ModelConfig, batch: int, context: int, absorb: bool = True) -> int:
    """FLOPs of one decode step of batch tokens, each attending to context positions: 2 per matmul weight and
    token (the LM head's included, as flops_per_token counts them) plus 2 per multiply-add of attention's scores
    and weighted sum. Per head and position, MHA/GQA multiply keys and values of head_dim; absorbed MLA its
    latent key [c_KV | k_rope] (r + dr) and, as its kernel does, the whole latent as value (r + dr, of which the
    caller keeps c_KV's r); decompressing MLA first runs kv_b_proj over every position, then attends to keys of
    dn + dr and values of dv."""
    c = config
    weights = c.non_embedding_params() + c.vocab_size * c.d_model
    if c.attention != "mla":
        per_head_and_position = 2 * c.head_dim
    elif absorb:
        per_head_and_position = 2 * (c.kv_lora_rank + c.qk_rope_head_dim)
    else:
        kv_b_proj = c.kv_lora_rank * c.n_head * (c.qk_nope_head_dim + c.v_head_dim)
        weights += c.n_layer * kv_b_proj * (context - 1)  # weights already counts it once, for the new token
        per_head_and_position = c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim
    return 2 * batch * (weights + c.n_layer * c.n_head * context * per_head_and_position)


def working_bytes(config: ModelConfig, batch: int, context: int, element_size: int, absorb: bool) -> int:
    """Memory a step holds for a moment beyond the cache. Decompressing MLA makes the per-head keys and values of
    every position, one layer at a time, and a copy of them to attend with; other steps' temporaries are small."""
    if config.attention != "mla" or absorb:
        return 0
    c = config
    return 2 * batch * context * c.n_head * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * element_size


# ---- the machine --------------------------------------------------------------------------------

def memory_bandwidth(probe: torch.Tensor) -> float:
    """Bytes per second of one sum over probe, a tensor far larger than the caches: the rate at which this
    machine streams memory, for the steps timed beside it."""
    synchronize(probe.device)
    begin = time.perf_counter()
    probe.sum()
    synchronize(probe.device)
    return probe.numel() * probe.element_size() / (time.perf_counter() - begin)


# ---- the benchmark ------------------------------------------------------------------------------

class DecodeBench:
    """One model per attention kind built from config (random weights, block_size raised to max_context), ready
    to time decode steps at any batch and context up to max_context."""

    def __init__(self, config: ModelConfig, max_context: int, device, dtype: torch.dtype, steps: int,
                 compile: bool = False):
        self.device, self.dtype, self.steps = torch.device(device), dtype, steps
        self.element_size = torch.empty(0, dtype=dtype).element_size()
        self.configs = {variant: replace(config, **VARIANTS[variant], block_size=max_context, dropout=0.0)
                        for variant, _ in CONTENDERS.values()}
        check_model_fits(self.configs.values(), self.device, dtype)
        if compile:
            # Every model's decode_step is one function to torch.compile (Transformer.decode_step's code), each
            # model and shape a graph of it: 4 models at 2 batches already pass dynamo's default limit of 8,
            # after which a fullgraph compile fails (FailOnRecompileLimitHit).
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        self.models = {variant: self.build(c) for variant, c in self.configs.items()}
        self.step_functions = {variant: self.step_function(model, compile) for variant, model in self.models.items()}
        # Untimed rounds before each row's timed ones; CUDA graphs (reduce-overhead) are recorded on the third call.
        self.warmup = 3 if compile else 1
        self.probe = torch.ones(PROBE_BYTES // 4, device=self.device)

    def build(self, config: ModelConfig) -> Transformer:
        torch.manual_seed(0)
        return Transformer(config).to(device=self.device, dtype=self.dtype).eval()

    def step_function(self, model: Transformer, compile: bool) -> Callable:
        """model.decode_step, or with compile its compiled form, run once (untimed) so that it is captured."""
        if not compile:
            return model.decode_step
        try:
            step = compile_decode_step(model)
            with torch.no_grad():
                step(torch.zeros(1, 1, dtype=torch.long, device=self.device), model.make_cache(1, 2),
                     torch.tensor([1], device=self.device))
        except Exception as err:  # any compiler failure: say what it was, in one line
            raise CLIError(f"--compile failed: {type(err).__name__}: {str(err).strip().splitlines()[0]}") from None
        return step

    def sweep(self, contexts: list[int], batches: list[int]) -> Iterator[list[dict]]:
        """The rows of every variant at each batch and context, one list per (batch, context) as it is measured."""
        for batch in batches:
            for context in contexts:
                yield with_ratio_to_mha(self.measure([(name, batch) for name in CONTENDERS], context))

    def capacity(self, context: int, budget_bytes: int) -> list[dict]:
        """Per attention kind, the largest batch whose cache of context positions fits in budget_bytes, and its
        aggregate decode speed at that batch (rows in CAPACITY_CONTENDERS' order; batch 0 if one sequence is
        over). The kinds are timed one after another, so that memory holds one budget's cache at a time."""
        rows = []
        for name in CAPACITY_CONTENDERS:
            batch = budget_bytes // self.cache_bytes(name, 1, context)
            rows += self.measure([(name, batch)], context) if batch else [
                self.refused(name, 0, context, self.cache_bytes(name, 1, context))]
        return [{**row, "budget_bytes": budget_bytes} for row in with_ratio_to_mha(rows)]

    def cache_bytes(self, name: str, batch: int, context: int) -> int:
        return cache_bytes(self.configs[CONTENDERS[name][0]], batch, context, self.element_size)

    def working_bytes(self, name: str, batch: int, context: int) -> int:
        variant, absorb = CONTENDERS[name]
        return working_bytes(self.configs[variant], batch, context, self.element_size, absorb)

    def measure(self, plan: list[tuple[str, int]], context: int) -> list[dict]:
        """Time decode steps of plan's (contender, batch) pairs at context, interleaved: every round takes one step
        of each pair in turn, then one bandwidth probe, so that a change in machine load touches all alike. A
        pair whose cache does not fit in memory is not run. -> one row per pair, in plan's order."""
        caches, needs = self.allocate(plan, context)
        admitted = [pair for pair in plan if pair not in needs]
        tokens = {batch: torch.randint(self.configs["mla"].vocab_size, (batch, 1), device=self.device)
                  for _, batch in admitted}
        seconds, bandwidths = {pair: [] for pair in admitted}, []
        rounds = range(self.warmup + self.steps) if admitted else range(0)
        for i in tqdm(rounds, desc=f"context {context}", leave=False, delay=2):
            for name, batch in admitted:
                variant, absorb = CONTENDERS[name]
                elapsed = timed(self.step_functions[variant], tokens[batch], caches[variant, batch], context - 1,
                                absorb)
                if i >= self.warmup:
                    seconds[name, batch].append(elapsed)
            if i >= self.warmup:
                bandwidths.append(memory_bandwidth(self.probe))
        del caches
        release_freed_memory(self.device)
        return [self.row(name, batch, context, seconds[name, batch], bandwidths) if (name, batch) in seconds
                else self.refused(name, batch, context, needs[name, batch]) for name, batch in plan]

    def allocate(self, plan: list[tuple[str, int]], context: int) -> tuple[dict, dict]:
        """Caches filled with random values for the pairs of plan that fit in memory, smallest first: each
        must fit with the largest temporaries of any step run beside it, and a margin.
        -> (variant, batch) -> cache, and (contender, batch) -> bytes needed for each pair that does not fit."""
        caches, needs, temporaries = {}, {}, 0
        for name, batch in sorted(plan, key=lambda p: self.cache_bytes(*p, context) + self.working_bytes(*p, context)):
            variant = CONTENDERS[name][0]
            new = 0 if (variant, batch) in caches else self.cache_bytes(name, batch, context)
            work = self.working_bytes(name, batch, context)
            available = available_memory(self.device)
            if available is not None and new + max(temporaries, work) + MEMORY_MARGIN > available:
                needs[name, batch] = self.cache_bytes(name, batch, context) + work
                continue
            temporaries = max(temporaries, work)
            if (variant, batch) not in caches:
                caches[variant, batch] = random_cache(self.models[variant], batch, context)
        return caches, needs

    def row(self, name: str, batch: int, context: int, seconds: list[float], bandwidths: list[float]) -> dict:
        variant, absorb = CONTENDERS[name]
        config, median = self.configs[variant], statistics.median(seconds)
        nbytes = step_bytes(config, batch, context, self.element_size)
        flops = step_flops(config, batch, context, absorb)
        machine = statistics.median(bandwidths)
        return {"attention": name, "batch": batch, "context": context, "fits": True,
                "decode_tokens_per_s": batch / median, "ms_per_step": 1e3 * median,
                "ms_per_step_min": 1e3 * min(seconds), "ms_per_step_max": 1e3 * max(seconds),
                "cache_bytes": self.cache_bytes(name, batch, context), "bytes_per_step": nbytes,
                "flops_per_step": flops, "bytes_per_s": nbytes / median, "machine_bytes_per_s": machine,
                "bandwidth_fraction": nbytes / median / machine, "flops_per_s": flops / median}

    @staticmethod
    def refused(name: str, batch: int, context: int, needs_bytes: int) -> dict:
        return {"attention": name, "batch": batch, "context": context, "fits": False, "needs_bytes": needs_bytes}


def random_cache(model: Transformer, batch: int, context: int) -> Cache:
    """model's decode cache for batch sequences of context positions, filled with random values instead of a
    prefill (a step reads random latents as it reads real ones)."""
    cache = model.make_cache(batch, context)
    for layer in cache.layers:
        for tensor in layer.tensors:
            tensor.normal_()
    return cache


def sharpen(model: torch.nn.Module) -> torch.nn.Module:
    """model with weights large enough for sharp attention and logits (std 0.1, where a RoPE mix-up moves the
    logits by ~2, and no rounding difference flips a greedy token), and RMSNorm gains away from their initial 1
    (1 +- 0.2), so that every weight's mapping shows in the logits. For checks that compare two paths."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.copy_(1 + 0.2 * torch.randn_like(param))
            else:
                param.normal_(0, 0.1)
    return model


def with_ratio_to_mha(rows: list[dict]) -> list[dict]:
    """rows, each measured one with its decode tok/s divided by MHA's among them, where MHA was measured."""
    mha = next((r for r in rows if r["attention"] == "mha" and r["fits"]), None)
    return [{**r, "tokens_per_s_vs_mha": r["decode_tokens_per_s"] / mha["decode_tokens_per_s"]} if r["fits"] and mha
            else r for r in rows]


@torch.no_grad()
def timed(step: Callable, token: torch.Tensor, cache, position: int, absorb: bool) -> float:
    """Seconds for one decode step (a decode_step) of token (B, 1) at slot position, waiting for the GPU."""
    synchronize(token.device)
    begin = time.perf_counter()
    step(token, cache, torch.tensor([position], device=token.device), absorb=absorb)
    synchronize(token.device)
    return time.perf_counter() - begin


def benchmark(config: ModelConfig, contexts: list[int], batches: list[int], device, dtype: torch.dtype,
              steps: int = 5) -> list[dict]:
    """The decode sweep's rows: every variant at every batch and context (see DecodeBench)."""
    bench = DecodeBench(config, max(contexts), device, dtype, steps)
    return [row for rows in bench.sweep(contexts, batches) for row in rows]


# ---- reporting ----------------------------------------------------------------------------------

def ratio(row: dict) -> str:
    return f"{row['tokens_per_s_vs_mha']:.2f}" if "tokens_per_s_vs_mha" in row else "–"


# How each column shows a row, by the column's heading.
CELLS = {
    "attention": lambda r: r["attention"], "batch": lambda r: f"{r['batch']}", "context": lambda r: f"{r['context']}",
    "decode tok/s": lambda r: f"{r['decode_tokens_per_s']:,.1f}", "ms/step": lambda r: f"{r['ms_per_step']:,.1f}",
    "ms/step min–max": lambda r: f"{r['ms_per_step_min']:,.1f}–{r['ms_per_step_max']:,.1f}",
    "cache MiB": lambda r: f"{r['cache_bytes'] / 2**20:,.1f}",
    "cache GiB": lambda r: f"{r['cache_bytes'] / 2**30:,.2f}",
    "MiB read/step": lambda r: f"{r['bytes_per_step'] / 2**20:,.1f}",
    "GFLOP/step": lambda r: f"{r['flops_per_step'] / 1e9:,.2f}", "GB/s": lambda r: f"{r['bytes_per_s'] / 1e9:,.1f}",
    "machine GB/s": lambda r: f"{r['machine_bytes_per_s'] / 1e9:,.1f}",
    "% of machine GB/s": lambda r: f"{100 * r['bandwidth_fraction']:.0f}%",
    "GFLOP/s": lambda r: f"{r['flops_per_s'] / 1e9:,.1f}", "tok/s ÷ MHA": ratio,
}
CELLS |= {"largest batch": CELLS["batch"], "decode tok/s (all sequences)": CELLS["decode tok/s"]}


def columns(*headings: str) -> tuple:
    """(heading, cell) for each column; a row that did not fit shows its first three cells, then what it needs."""
    return tuple((heading, CELLS[heading]) for heading in headings)


SWEEP_COLUMNS = columns("attention", "batch", "context", "decode tok/s", "ms/step", "ms/step min–max", "cache MiB",
                        "MiB read/step", "GFLOP/step", "GB/s", "machine GB/s", "% of machine GB/s", "GFLOP/s",
                        "tok/s ÷ MHA")
CAPACITY_COLUMNS = columns("attention", "context", "largest batch", "cache GiB", "decode tok/s (all sequences)",
                           "ms/step", "ms/step min–max", "% of machine GB/s", "tok/s ÷ MHA")


def table_line(row: dict, columns) -> str:
    """A row of the table: its cells, or for a row that did not fit its first three cells and what it needs."""
    if row["fits"]:
        cells = [cell(row) for _, cell in columns]
    else:
        cells = [cell(row) for _, cell in columns[:3]] + [f"does not fit (needs {row['needs_bytes'] / 2**30:,.1f} GiB)"]
        cells += [""] * (len(columns) - len(cells))
    return table_row(cells)


def plot(rows: list[dict], path: Path, then: str) -> None:
    """Draw decode tok/s against context (log2 axis), one line per contender and batch, into the PNG at path
    (then: how to draw it later, for the note shown when matplotlib is missing)."""
    fig = figure(path, "decode tok/s against context for each contender and batch", then, figsize=(8, 5),
                 layout="constrained")
    if fig is None:
        return
    ax = fig.subplots()
    batches = sorted({r["batch"] for r in rows})
    for color, name in zip(("C0", "C1", "C2", "C3", "C4"), CONTENDERS):
        for style, batch in zip(itertools.cycle(("-", "--", ":", "-.")), batches):
            points = [(r["context"], r["decode_tokens_per_s"]) for r in rows
                      if r["attention"] == name and r["batch"] == batch and r["fits"]]
            if points:
                ax.plot(*zip(*points), color=color, linestyle=style, marker="o", label=f"{name}, batch {batch}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set(xlabel="context (tokens)", ylabel="decode tokens/s (all sequences of the batch)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize="small")
    save_figure(fig, path)
