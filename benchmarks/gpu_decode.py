"""The prepared GPU check of issue 18: one command, at most five minutes on one GPU with its compilation, that says
whether MLA's fused decode attention is right, and how fast the compiled decode steps of MLA, MHA and GQA are.

    python benchmarks/gpu_decode.py --out results/gpu-decode      # one CUDA GPU: writes results.md, results.json
    python benchmarks/gpu_decode.py --smoke --out /tmp/gpu-check   # the same logic on the CPU at tiny sizes (< 1 min)

1. Correctness, first. kernels.flex_latent_attention compiled (the latent attention of a compiled CUDA decode
   step) against a float64 reference, in float32 with TF32 off and in bfloat16, with left padding and several new
   tokens; then on the tiny preset in float32, for MLA, MHA and GQA: a left-padded batch generated greedily
   against each prompt generated alone, and the compiled decode step against the eager one on that batch.
2. The race: one layer's attention in bfloat16, each contender captured as one CUDA graph of 10 calls: flex
   against the two matmuls of the eager CUDA path (kernels.attention_matmul) and MHA's SDPA as the model calls it
   (kernels.grouped_attention), with the GB/s each reads its cache at against the device's copy rate (a copy of
   1 GiB, in the same rounds).
3. The bench: gpt2-small, bfloat16, random weights and caches of random values, the compiled decode steps
   (model.compile_decode_step: inductor, one CUDA graph per shape) of MLA absorbed, MHA and GQA at batch 1, 8, 64
   x context 2K, 8K, 32K; the variants' steps interleaved round by round, each timed by CUDA events (median and
   range of 20), beside the copy rate; a cache that does not fit in memory refused; MLA ÷ MHA decode tok/s.

Compilation is planned to fit: flex is compiled for fixed shapes (2 check cases x 2 dtypes, 4 race shapes). Each
variant has one compiled step, which torch.compile specialises to its first shape and recompiles with dynamic sizes
when the shape changes (batch 1 keeps a graph of its own): 2 or 3 compiles per variant for the 9 shapes (the
smoke run compiles twice), then one CUDA graph recorded per shape; a variant whose step fails is not compiled
again. MQA is left out: 2 or 3 more compiles. Each part starts only if the time left of --budget-s (counted from
the start of main, after torch's import) covers what it needs; a part skipped is recorded with the reason, and one
that has started runs to its end.

Writes results.md (the tables) and results.json (every number) into --out, replacing an earlier run's, prints its
wall time, and exits non-zero if a correctness check failed.
"""
import json
import math
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from functools import partial
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import kernels  # noqa: E402
from cli import ArgumentParser, CLIError, first_line, positive_float, run  # noqa: E402
from decode_benchmark import MEMORY_MARGIN, cache_bytes, random_cache, sharpen, step_bytes  # noqa: E402
from fileio import atomic_write_all, owned_directory  # noqa: E402
from model import Transformer, compile_decode_step, left_pad  # noqa: E402
from model_config import PRESETS, VARIANTS, softmax_scale  # noqa: E402
from report import markdown_table  # noqa: E402
from runtime import available_memory  # noqa: E402


@dataclass(frozen=True)
class Plan:
    """The sizes of a run: the GPU's, or the smoke run's on the CPU."""
    device: str
    preset: str  # the widths of the kernel checks, the race and the bench
    check_cases: tuple  # flex against the reference: (each row's left padding, new tokens, cache slots)
    race_shapes: tuple  # (batch, context)
    batches: tuple
    contexts: tuple
    rounds: int  # timed rounds per race shape and per bench row
    probe_bytes: int  # what the copy-rate probe copies
    backend: str | None  # torch.compile's backend; None: the repo's (inductor, and on CUDA a CUDA graph)


GPU = Plan("cuda", "gpt2-small", (((0, 37, 300), 1, 1000), ((0, 129), 4, 333)),
           ((1, 8192), (1, 32768), (8, 32768), (64, 32768)), (1, 8, 64), (2048, 8192, 32768), 20, 2**30, None)
# Inductor takes minutes per compile on a small CPU; aot_eager traces the same graphs and runs them eagerly.
SMOKE = Plan("cpu", "tiny", (((0, 5, 30), 1, 100), ((0, 29), 4, 77)), ((1, 320), (2, 320)), (1, 2), (128, 320),
             3, 2**24, "aot_eager")
DTYPE = torch.bfloat16  # the race's and the bench's
BENCH_VARIANTS = {"mla absorbed": "mla", "mha": "mha", "gqa": "gqa"}
RACE_CALLS = 10  # calls of a contender per timing, one CUDA graph, so that launches do not count
WARMUP = 3  # untimed calls before timing: a reduce-overhead step compiles on the first, records its graph on the next
# Seconds a part needs to start: guesses for one H100/H200, not measurements (no GPU has run this script yet).
NEEDS_S = {"kernel checks": 30, "model checks": 30, "race": 15, "bench": 30}


class Deadline:
    """--budget-s from now, and the parts skipped for it."""

    def __init__(self, seconds: float):
        self.begin, self.seconds = time.monotonic(), seconds
        self.skipped = []

    def elapsed(self) -> float:
        return time.monotonic() - self.begin

    def allows(self, part: str, needs_s: float) -> bool:
        """Whether needs_s seconds are left for part; if not, part is recorded as skipped, saying why."""
        left = self.seconds - self.elapsed()
        if left >= needs_s:
            return True
        why = f"{max(left, 0):.0f} s of --budget-s {self.seconds:g} left, under the {needs_s} s it needs"
        self.skipped.append({"part": part, "why": why})
        print(f"skipped {part}: {why}", flush=True)
        return False


# ---- timing ---------------------------------------------------------------------------------------

def elapsed_ms(fn: Callable, device: torch.device) -> float:
    """Milliseconds fn() takes: between two CUDA events on a GPU, by the clock on the CPU."""
    if device.type != "cuda":
        begin = time.perf_counter()
        fn()
        return 1e3 * (time.perf_counter() - begin)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


class CopyProbe:
    """The device's copy rate: bytes read and written per second by one copy of nbytes, far more than any cache."""

    def __init__(self, nbytes: int, device: torch.device):
        self.device = device
        self.source = torch.ones(nbytes, dtype=torch.uint8, device=device)
        self.target = torch.empty_like(self.source)

    def rate(self) -> float:
        return 2 * self.source.nbytes / (elapsed_ms(lambda: self.target.copy_(self.source), self.device) / 1e3)


def prepare(makers: dict[str, Callable]) -> tuple[dict, dict, dict]:
    """Run each maker (name -> a function that makes the call to time, compiling and warming it up) -> name -> call,
    name -> why it failed (one line), and name -> seconds it took."""
    ready, failed, seconds = {}, {}, {}
    for name, make in makers.items():
        begin = time.monotonic()
        try:
            ready[name] = make()
        except Exception as err:  # a contender that does not compile or run here is a finding, not the end of the run
            failed[name] = f"{type(err).__name__}: {first_line(err, 300)}"
            print(f"{name} failed: {failed[name]}", flush=True)
        seconds[name] = time.monotonic() - begin
    return ready, failed, seconds


def interleaved(calls: dict[str, Callable], rounds: int, probe: CopyProbe) -> tuple[dict, list]:
    """Each call timed once per round, in turn, then the copy probe, so that a change in the machine touches all
    alike -> name -> milliseconds per round, and the probe's bytes/s per round."""
    ms, rates = {name: [] for name in calls}, []
    for _ in range(rounds):
        for name, call in calls.items():
            ms[name].append(elapsed_ms(call, probe.device))
        rates.append(probe.rate())
    return ms, rates


def timing(ms: list[float], nbytes: int, rates: list[float]) -> dict:
    """A row's timing: the median and range of ms, and nbytes read at the median's rate, beside the copy rate."""
    median = statistics.median(ms)
    return {"ms_median": median, "ms_min": min(ms), "ms_max": max(ms), "bytes": nbytes,
            "bytes_per_s": 1e3 * nbytes / median, "copy_bytes_per_s": statistics.median(rates)}


# ---- models -------------------------------------------------------------------------------------------

def build(config, device: torch.device, dtype: torch.dtype) -> Transformer:
    torch.manual_seed(0)
    return Transformer(config).to(device=device, dtype=dtype).eval()


def compiled_step(model: Transformer, plan: Plan) -> Callable:
    """model's decode step compiled: by the repo's compile_decode_step, or for the smoke run by plan.backend."""
    if plan.backend is None:
        return compile_decode_step(model)
    return torch.compile(model.decode_step, backend=plan.backend, fullgraph=True)


def tiny_model(variant: str, device: torch.device) -> Transformer:
    """The tiny preset as variant, float32, its weights sharpened (decode_benchmark.sharpen)."""
    return sharpen(build(replace(PRESETS["tiny"], **VARIANTS[variant]), device, torch.float32))


# ---- 1. correctness -------------------------------------------------------------------------------

def checked(what: str, fn: Callable) -> dict:
    """The check fn() -> (passed, what was measured), recorded; one that raises fails, saying what it raised."""
    try:
        passed, measured = fn()
    except Exception as err:  # a kernel that does not compile or run here is a finding, not the end of the run
        passed, measured = False, f"raised {type(err).__name__}: {first_line(err, 300)}"
    print(f"{'ok' if passed else 'FAILED'}: {what}: {measured}", flush=True)
    return {"check": what, "passed": passed, "measured": measured}


def reference_latent_attention(q, latent, pad, input_pos, scale: float, r: int) -> torch.Tensor:
    """flex_latent_attention's definition in float64: softmax(q latent^T * scale + mask) c_KV, where q (B, 1, M, E)
    has its rows folded head-major (row h * T + t is new token t at slot input_pos[t]), latent (B, 1, S, E) is
    [c_KV | k_rope] with c_KV its first r columns, and the mask is kernels.visible's for rows left-padded by
    pad (B,) -> (B, 1, M, r)."""
    query_slot = input_pos.repeat(q.size(2) // input_pos.size(0))[:, None]  # (M, 1)
    seen = kernels.visible(torch.arange(latent.size(2), device=q.device), query_slot, pad[:, None, None])
    scores = (q.double() @ latent.double().transpose(-1, -2)) * scale  # (B, 1, M, S)
    return scores.masked_fill(~seen[:, None], -math.inf).softmax(dim=-1) @ latent.double()[..., :r]


def flex_against_reference(flex: Callable, config, dtype: torch.dtype, tolerance: float, pad: tuple,
                           new_tokens: int, slots: int, device: torch.device) -> tuple[bool, str]:
    """flex's largest absolute difference from the reference, for random q (B, 1, H * new_tokens, r + dr) and latent
    (B, 1, slots, r + dr) at config's widths, the new tokens at the last slots but 7, which no query may read."""
    E, r = config.kv_lora_rank + config.qk_rope_head_dim, config.kv_lora_rank
    torch.manual_seed(slots)
    q = torch.randn(len(pad), 1, config.n_head * new_tokens, E, device=device).to(dtype)
    latent = torch.randn(len(pad), 1, slots, E, device=device).to(dtype)
    pad, input_pos = torch.tensor(pad, device=device), torch.arange(slots - 7 - new_tokens, slots - 7, device=device)
    scale = softmax_scale(config, config.qk_nope_head_dim + config.qk_rope_head_dim)
    got = flex(q, latent, pad, input_pos, scale, r)
    error = (got.double() - reference_latent_attention(q, latent, pad, input_pos, scale, r)).abs().max().item()
    return error <= tolerance, f"largest difference {error:.1e} (at most {tolerance:g})"


@torch.no_grad()
def kernel_checks(plan: Plan, flex: Callable, deadline: Deadline) -> list[dict]:
    """flex (flex_latent_attention compiled) against the reference, in float32 (TF32 is off) and bfloat16."""
    if not deadline.allows("the kernel checks", NEEDS_S["kernel checks"]):
        return []
    config, checks = PRESETS[plan.preset], []
    for dtype, tolerance in ((torch.float32, 1e-4), (torch.bfloat16, 2e-2)):
        for pad, new_tokens, slots in plan.check_cases:
            what = (f"flex_latent_attention compiled, {str(dtype).removeprefix('torch.')}, {plan.preset} widths: "
                    f"left padding {list(pad)}, {new_tokens} new token(s), {slots} slots, against float64")
            checks.append(checked(what, partial(flex_against_reference, flex, config, dtype, tolerance, pad,
                                                new_tokens, slots, torch.device(plan.device))))
    return checks


def batched_vs_alone(model: Transformer, prompts: list[list[int]], new_tokens: int) -> tuple[bool, str]:
    """Greedy tokens of the prompts left-padded into one batch against each prompt generated alone."""
    device = model.lm_head.weight.device
    idx, pad = left_pad(prompts)
    batched = model.generate(idx.to(device), new_tokens, temperature=0, pad=pad)[:, idx.size(1):]
    alone = [model.generate(torch.tensor([p], device=device), new_tokens, temperature=0)[0, len(p):] for p in prompts]
    same = [torch.equal(b, a) for b, a in zip(batched, alone)]
    return all(same), f"{sum(same)} of {len(same)} rows generate the same {new_tokens} tokens"


@torch.no_grad()
def forced_logits(model: Transformer, step: Callable, tokens: torch.Tensor, prompt_length: int,
                  pad: torch.Tensor) -> torch.Tensor:
    """The logits (steps, B, vocab) of step (a decode step) fed tokens (B, T) one at a time, after a prefill of
    their first prompt_length, in rows left-padded by pad (B,)."""
    B, T = tokens.shape
    cache = model.make_cache(B, T, pad=pad)
    model(tokens[:, :prompt_length], cache=cache, input_pos=torch.arange(prompt_length, device=tokens.device))
    logits = []
    for slot in range(prompt_length, T):
        torch.compiler.cudagraph_mark_step_begin()  # a new step: the graph may overwrite the last step's logits
        logits.append(step(tokens[:, slot:slot + 1], cache, torch.tensor([slot], device=tokens.device)).clone())
    return torch.stack(logits)


def compiled_vs_eager(model: Transformer, step: Callable, prompts: list[list[int]], new_tokens: int,
                      tolerance: float = 1e-4) -> tuple[bool, str]:
    """The logits of the compiled step against the eager one's, fed the batch's greedy tokens."""
    idx, pad = left_pad(prompts)
    tokens = model.generate(idx.to(model.lm_head.weight.device), new_tokens, temperature=0, pad=pad)
    eager = forced_logits(model, model.decode_step, tokens, idx.size(1), pad)
    error = (forced_logits(model, step, tokens, idx.size(1), pad) - eager).abs().max().item()
    return error <= tolerance, f"largest logit difference {error:.1e} (at most {tolerance:g})"


def model_checks(plan: Plan, deadline: Deadline, new_tokens: int = 12) -> list[dict]:
    """For MLA, MHA and GQA on the tiny preset, in float32: batched_vs_alone and compiled_vs_eager."""
    generator = torch.Generator().manual_seed(1)
    prompts = [torch.randint(PRESETS["tiny"].vocab_size, (n,), generator=generator).tolist() for n in (5, 9, 13)]
    checks = []
    for variant in ("mla", "mha", "gqa"):
        if not deadline.allows(f"the {variant} model checks", NEEDS_S["model checks"]):
            continue
        model = tiny_model(variant, torch.device(plan.device))
        batch = f"{variant}, tiny, float32: 3 prompts of {', '.join(str(len(p)) for p in prompts)} tokens left-padded"
        checks.append(checked(f"{batch}, {new_tokens} greedy tokens, against each prompt alone",
                              partial(batched_vs_alone, model, prompts, new_tokens)))
        checks.append(checked(f"{batch}, {new_tokens} steps, the compiled decode step against the eager one",
                              lambda: compiled_vs_eager(model, compiled_step(model, plan), prompts, new_tokens)))
    return checks


# ---- 2. the race: one layer's attention -------------------------------------------------------------

def graphed(fn: Callable, device: torch.device) -> Callable:
    """RACE_CALLS calls of fn, after WARMUP calls (compiling it), captured as one CUDA graph on a GPU so that its
    kernels are timed and not their launches -> the graph's replay; on the CPU the calls themselves."""
    if device.type != "cuda":
        for _ in range(WARMUP):
            fn()
        return lambda: [fn() for _ in range(RACE_CALLS)]
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):  # as torch.cuda.graph's documentation warms up: cuBLAS sets up outside the capture
        for _ in range(WARMUP):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(RACE_CALLS):
            fn()
    return graph.replay


@torch.no_grad()
def race_shape(plan: Plan, flex: Callable, probe: CopyProbe, batch: int, context: int) -> list[dict]:
    """One layer's attention at batch x context over a full cache, bfloat16, one row per contender: MLA's absorbed
    queries q (B, 1, H, r + dr) over the latent (B, 1, S, r + dr), by flex and by the two matmuls; MHA's q
    (B, H, 1, hd) over k, v (B, H, S, hd) by SDPA. GB/s: the cache read once (the latent; MHA's k and v)."""
    config, device = PRESETS[plan.preset], torch.device(plan.device)
    H, r, dr, hd = config.n_head, config.kv_lora_rank, config.qk_rope_head_dim, config.d_model // config.n_head
    q, latent = (torch.randn(batch, 1, rows, r + dr, device=device, dtype=DTYPE) for rows in (H, context))
    q_mha, k, v = (torch.randn(batch, H, rows, hd, device=device, dtype=DTYPE) for rows in (1, context, context))
    pad, input_pos = torch.zeros(batch, dtype=torch.long, device=device), torch.tensor([context - 1], device=device)
    mask = torch.zeros(batch, 1, 1, context, device=device, dtype=DTYPE)
    scale = softmax_scale(config, config.qk_nope_head_dim + dr)
    contenders = {
        "mla, flex compiled": (lambda: flex(q, latent, pad, input_pos, scale, r), latent.nbytes),
        "mla, two matmuls": (lambda: kernels.attention_matmul(q, latent, latent, mask, scale)[..., :r], latent.nbytes),
        "mha, sdpa": (lambda: kernels.grouped_attention(q_mha, k, v, softmax_scale(config, hd), mask),
                      k.nbytes + v.nbytes),
    }
    ready, failed, _ = prepare({name: partial(graphed, fn, device) for name, (fn, _) in contenders.items()})
    ms, rates = interleaved(ready, plan.rounds, probe)
    rows = []
    for name, (_, nbytes) in contenders.items():
        row = {"attention": name, "batch": batch, "context": context}
        row |= {"error": failed[name]} if name in failed else timing([t / RACE_CALLS for t in ms[name]], nbytes, rates)
        rows.append(row)
        print(f"race: {json.dumps(row)}", flush=True)
    return rows


def race(plan: Plan, flex: Callable, probe: CopyProbe, deadline: Deadline) -> list[dict]:
    return [row for batch, context in plan.race_shapes
            if deadline.allows(f"the race at batch {batch}, context {context}", NEEDS_S["race"])
            for row in race_shape(plan, flex, probe, batch, context)]


# ---- 3. the bench: whole compiled decode steps -------------------------------------------------------

def allocate(models: dict[str, Transformer], batch: int, context: int, device: torch.device) -> tuple[dict, dict]:
    """Caches of random values, smallest first, for the variants whose cache fits in the memory left beside a
    margin -> name -> Cache, and name -> (the bytes its cache needs, the bytes free) for each that does not fit."""
    caches, needs = {}, {}
    for name, model in sorted(models.items(), key=lambda item: cache_bytes(item[1].config, batch, context, 1)):
        nbytes = cache_bytes(model.config, batch, context, DTYPE.itemsize)
        free = available_memory(device)
        if free is not None and nbytes + MEMORY_MARGIN > free:
            needs[name] = nbytes, free
        else:
            caches[name] = random_cache(model, batch, context)
    return caches, needs


def warmed_step(step: Callable, token: torch.Tensor, cache, position: torch.Tensor) -> Callable:
    """One decode step of token (B, 1) at slot position (1,) of cache, after WARMUP untimed steps."""
    def call():
        torch.compiler.cudagraph_mark_step_begin()  # a new step: its graph may overwrite the last step's logits
        step(token, cache, position)
    for _ in range(WARMUP):
        call()
    return call


@torch.no_grad()
def bench_group(plan: Plan, models: dict, steps: dict, probe: CopyProbe, batch: int, context: int) -> list[dict]:
    """Every variant's row at batch x context, the last slot of a cache of context slots: its compiled step warmed
    up (compiled for a new shape, its CUDA graph recorded; the seconds this took are the row's warm_up_s), then the
    steps timed round by round."""
    device = torch.device(plan.device)
    caches, needs = allocate(models, batch, context, device)
    token = torch.randint(PRESETS[plan.preset].vocab_size, (batch, 1), device=device)
    position = torch.tensor([context - 1], device=device)
    ready, failed, seconds = prepare({name: partial(warmed_step, steps[name], token, caches[name], position)
                                      for name in caches})
    ms, rates = interleaved(ready, plan.rounds, probe)
    rows = []
    for name, model in models.items():
        row = {"attention": name, "batch": batch, "context": context, "fits": name not in needs}
        if name in needs:
            row |= dict(zip(("needs_bytes", "free_bytes"), needs[name]))
        elif name in failed:
            row |= {"error": failed[name]}
        else:
            row |= timing(ms[name], step_bytes(model.config, batch, context, DTYPE.itemsize), rates)
            row |= {"decode_tokens_per_s": 1e3 * batch / row["ms_median"], "warm_up_s": seconds[name],
                    "cache_bytes": cache_bytes(model.config, batch, context, DTYPE.itemsize)}
        rows.append(row)
    mha = next((row for row in rows if row["attention"] == "mha" and "ms_median" in row), None)
    for row in rows:
        if "ms_median" in row and mha is not None:
            row["tokens_per_s_vs_mha"] = row["decode_tokens_per_s"] / mha["decode_tokens_per_s"]
        print(f"bench: {json.dumps(row)}", flush=True)
    return rows


def bench(plan: Plan, probe: CopyProbe, deadline: Deadline) -> list[dict]:
    """The bench rows, batch by batch and context by context, each model's one compiled step serving them all.
    After a step fails, its variant's later rows say so instead of compiling again."""
    if not deadline.allows("the bench", NEEDS_S["bench"]):
        return []
    device = torch.device(plan.device)
    models = {name: build(replace(PRESETS[plan.preset], **VARIANTS[variant], block_size=max(plan.contexts)), device,
                          DTYPE) for name, variant in BENCH_VARIANTS.items()}
    steps = {name: compiled_step(model, plan) for name, model in models.items()}
    rows, broken = [], {}  # a variant whose step failed is not tried again: each try may cost a compile
    for batch in plan.batches:
        for context in plan.contexts:
            if not deadline.allows(f"the bench rows at batch {batch}, context {context}", NEEDS_S["bench"]):
                continue
            live = {name: model for name, model in models.items() if name not in broken}
            rows += [{"attention": name, "batch": batch, "context": context, "fits": True,
                      "error": f"not tried again after {why}"} for name, why in broken.items()]
            group = bench_group(plan, live, steps, probe, batch, context)
            broken |= {row["attention"]: row["error"] for row in group if "error" in row}
            rows += group
    return rows


# ---- the report ---------------------------------------------------------------------------------------

def environment(device: torch.device) -> dict:
    env = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "torch": torch.__version__}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return env | {"device": props.name, "sms": props.multi_processor_count, "cuda": torch.version.cuda,
                      "memory_gib": round(props.total_memory / 2**30, 1)}
    return env | {"device": f"CPU, {torch.get_num_threads()} thread(s)"}


def timing_cells(row: dict, columns: int) -> list[str]:
    """A row's timing cells (ms, range, GB/s, share of the copy rate), or why it has none; columns wide."""
    if "error" in row:
        cells = [f"failed: {row['error']}"]
    elif "needs_bytes" in row:
        cells = [f"does not fit: its cache needs {row['needs_bytes'] / 2**30:,.1f} GiB + a margin of "
                 f"{MEMORY_MARGIN / 2**30:g}, {row['free_bytes'] / 2**30:,.1f} GiB free"]
    else:
        cells = [f"{row['ms_median']:,.3f}", f"{row['ms_min']:,.3f}–{row['ms_max']:,.3f}",
                 f"{row['bytes_per_s'] / 1e9:,.1f}", f"{100 * row['bytes_per_s'] / row['copy_bytes_per_s']:.0f}%"]
    return cells + [""] * (columns - len(cells))


def ratio_cell(rows: list[dict], batch: int, context: int) -> str:
    """MLA absorbed ÷ MHA decode tok/s at batch x context, or why there is none."""
    group = {r["attention"]: r for r in rows if (r["batch"], r["context"]) == (batch, context)}
    if not group:
        return "not run"
    if "tokens_per_s_vs_mha" in group["mla absorbed"]:
        return f"{group['mla absorbed']['tokens_per_s_vs_mha']:.2f}"
    for name, row in (("MHA", group["mha"]), ("MLA", group["mla absorbed"])):
        if "needs_bytes" in row:
            return f"{name} does not fit"
    return "failed"


def markdown(record: dict) -> str:
    env, checks, race_rows, bench_rows = (record[k] for k in ("environment", "checks", "race", "bench"))
    passed = sum(c["passed"] for c in checks)
    lines = ["# MLA decode on one GPU: the prepared check (issue 18)", "",
             f"`{record['command']}`: {env['device']}, torch {env['torch']}, {env['date']}; wall time "
             f"{record['wall_s']:.0f} s of a {record['budget_s']:g} s budget.", ""]
    if record["smoke"]:
        lines += ["**Smoke run**: the CPU at tiny sizes, compiled by aot_eager. It checks this script; its numbers "
                  "say nothing about a GPU.", ""]
    lines += [f"## Correctness: {passed} of {len(checks)} checks passed", "",
              markdown_table(["check", "passed", "measured"],
                             [[c["check"], "yes" if c["passed"] else "**no**", c["measured"]] for c in checks]),
              "## One layer's attention, bfloat16, each contender a CUDA graph of its calls", "",
              "GB/s: the cache (the latent; MHA's keys and values) read once, per median call. Copy rate: bytes read "
              f"and written by one copy of {record['probe_bytes'] / 2**20:,.0f} MiB, in the same rounds.", "",
              markdown_table(["attention", "batch", "context", "ms per call", "min–max", "GB/s", "% of copy rate"],
                             [[r["attention"], str(r["batch"]), str(r["context"]), *timing_cells(r, 4)]
                              for r in race_rows]),
              "## Decode steps, compiled, bfloat16", "",
              "GB/s: every weight and the cache read once per median step. Warm-up: compiling for the shape if it "
              "is new, and recording its CUDA graph.", "",
              markdown_table(["attention", "batch", "context", "ms/step", "min–max", "GB/s", "% of copy rate",
                              "decode tok/s", "cache GiB", "tok/s ÷ MHA", "warm-up s"],
                             [[r["attention"], str(r["batch"]), str(r["context"]), *timing_cells(r, 4),
                               *([f"{r['decode_tokens_per_s']:,.0f}", f"{r['cache_bytes'] / 2**30:,.2f}",
                                  f"{r['tokens_per_s_vs_mha']:.2f}" if "tokens_per_s_vs_mha" in r else "–",
                                  f"{r['warm_up_s']:.1f}"]
                                 if "ms_median" in r else [""] * 4)] for r in bench_rows]),
              "## MLA absorbed ÷ MHA, decode tok/s", "",
              markdown_table(["batch", *(f"context {c}" for c in record["contexts"])],
                             [[str(b), *(ratio_cell(bench_rows, b, c) for c in record["contexts"])]
                              for b in record["batches"]]),
              "## Skipped for the budget", ""]
    lines += [f"- {s['part']}: {s['why']}" for s in record["skipped"]] or ["Nothing."]
    return "\n".join(lines) + "\n"


def write_results(out: Path, record: dict) -> None:
    with atomic_write_all([out / "results.json", out / "results.md"]) as (json_path, md_path):
        json_path.write_text(json.dumps(record, indent=1) + "\n")
        md_path.write_text(markdown(record))


# ---- the command --------------------------------------------------------------------------------------

def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--out", required=True, help="directory to write results.md and results.json into")
    p.add_argument("--budget-s", type=positive_float, default=270.0,
                   help="seconds the run may take after torch's import; a part that would not fit is skipped")
    p.add_argument("--smoke", action="store_true", help="the same logic on the CPU at tiny sizes: checks the script")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    plan = SMOKE if args.smoke else GPU
    if not args.smoke and not torch.cuda.is_available():
        raise CLIError("no CUDA GPU here; --smoke runs the same logic on the CPU at tiny sizes")
    deadline, device = Deadline(args.budget_s), torch.device(plan.device)
    env = environment(device)
    if args.smoke:
        torch.set_num_threads(1)  # tiny sizes: a second thread only waits (tests/conftest.py's one_thread)
    torch.set_float32_matmul_precision("highest")  # TF32 off: the float32 checks hold float32 to its precision
    # Over dynamo's 8 graphs per function: flex takes 8 shapes, and every model's decode_step is one function to
    # dynamo (Transformer.decode_step), about 12 graphs here.
    with owned_directory(args.out, "the GPU decode check's results") as out, \
            torch._dynamo.config.patch(recompile_limit=64):
        flex = torch.compile(kernels.flex_latent_attention, fullgraph=True, dynamic=False,
                             backend=plan.backend or "inductor")
        checks = kernel_checks(plan, flex, deadline) + model_checks(plan, deadline)
        probe = CopyProbe(plan.probe_bytes, device)
        race_rows = race(plan, flex, probe, deadline)
        bench_rows = bench(plan, probe, deadline)
        record = {"command": shlex.join(["python", "benchmarks/gpu_decode.py", *(argv or sys.argv[1:])]),
                  "environment": env, "smoke": args.smoke, "budget_s": args.budget_s, "preset": plan.preset,
                  "probe_bytes": plan.probe_bytes, "batches": plan.batches, "contexts": plan.contexts,
                  "checks": checks, "race": race_rows, "bench": bench_rows, "skipped": deadline.skipped,
                  "wall_s": deadline.elapsed()}
        write_results(out, record)
    print(f"wrote {out / 'results.md'} and {out / 'results.json'}; wall time {record['wall_s']:.1f} s", flush=True)
    failed = len(checks) - sum(c["passed"] for c in checks)
    if failed:
        raise CLIError(f"{failed} of {len(checks)} correctness checks failed; see {out / 'results.md'}")


if __name__ == "__main__":
    run(main, memory_hint="the bench refuses caches that do not fit, so something else did not; run it alone")
