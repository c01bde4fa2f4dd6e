"""The decode study (decode_benchmark.py) from the command line: MLA's decode speed and cache against MHA and GQA,
across contexts and batch sizes, or the largest batch each fits in a cache budget.

    python benchmarks/bench_decode.py                                             # gpt2-small, CPU, ~4 min on 2 cores
    python benchmarks/bench_decode.py --ckpt out/shakespeare/best.pt              # that checkpoint's architecture
    python benchmarks/bench_decode.py --contexts 4096 --cache-budget-gib 4        # largest batch that fits, its speed
    python benchmarks/bench_decode.py --device cuda --dtype bfloat16 --compile --contexts 2048 8192 32768 --batches 1 8 64

Weights are random and caches are filled with random values instead of a prefill; each row is the median of
--steps decode steps, the contenders' steps interleaved round by round, beside the machine's streaming rate
measured in the same rounds. Prints a markdown table (and with --json one JSON line, last).
"""
import json
import os
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoint import read_model_config  # noqa: E402
from cli import ArgumentParser, CLIError, number, positive_float, positive_int, run  # noqa: E402
from decode_benchmark import CAPACITY_COLUMNS, PROBE_BYTES, SWEEP_COLUMNS, DecodeBench, plot, table_line  # noqa: E402
from model_config import PRESETS  # noqa: E402
from report import table_header  # noqa: E402
from runtime import DTYPES, keep_freed_memory, pick_device  # noqa: E402


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    model = p.add_mutually_exclusive_group()
    model.add_argument("--preset", choices=sorted(PRESETS), help="benchmark this preset's config (default: gpt2-small)")
    model.add_argument("--ckpt", help="benchmark this checkpoint's config (its weights are not read)")
    p.add_argument("--layers", type=positive_int, help="override the config's n_layer (fewer make long contexts cheap)")
    p.add_argument("--contexts", type=number(int, minimum=2), nargs="+", default=[512, 2048, 8192],
                   help="positions each step attends to")
    p.add_argument("--batches", type=positive_int, nargs="+", help="sequences decoded per step (default: 1)")
    p.add_argument("--steps", type=positive_int, default=3, help="timed decode steps per row (median and range)")
    p.add_argument("--device", default="auto", help="auto: cuda, then mps, then cpu; or cpu, cuda, cuda:N, mps")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights' and cache's dtype")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step (a CUDA graph on CUDA)")
    p.add_argument("--cache-budget-gib", type=positive_float, help="instead of the sweep: the largest batch whose "
                   "cache fits in this many GiB, and its decode speed, at each context")
    p.add_argument("--plot", help="also draw decode tok/s against context into this PNG")
    p.add_argument("--json", action="store_true", help="also print the rows as one JSON line, last")
    args = p.parse_args(argv)
    if args.cache_budget_gib is not None and (args.batches or args.plot):
        raise CLIError("--cache-budget-gib finds the batch that fits; it takes no --batches and no --plot")
    if args.plot:
        check_plot_path(Path(args.plot), args.ckpt)
    return args


def check_plot_path(plot: Path, ckpt: str | None) -> None:
    """Refuse, before benchmarking, a --plot that cannot be written or that would replace the checkpoint read."""
    if plot.is_dir():
        raise CLIError(f"--plot {plot} is a directory; name the PNG file to write")
    if not plot.resolve().parent.is_dir():
        raise CLIError(f"--plot {plot}: no such directory {plot.resolve().parent}")
    if not os.access(plot.resolve().parent, os.W_OK):
        raise CLIError(f"--plot {plot}: cannot write into {plot.resolve().parent}")
    if ckpt is not None and plot.resolve() == Path(ckpt).resolve():
        raise CLIError(f"--plot {plot} is the checkpoint --ckpt reads; name another file")


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(pick_device(args.device))
    if device.type == "cpu":
        keep_freed_memory()  # as train.py and test.py do
    name = args.ckpt or args.preset or "gpt2-small"
    config = read_model_config(args.ckpt) if args.ckpt else PRESETS[name]
    config = replace(config, n_layer=args.layers or config.n_layer)
    threads = f"CPU, {torch.get_num_threads()} thread(s)"
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else threads
    order = "the contenders' steps interleaved" if args.cache_budget_gib is None else "one kind after another"
    print(f"{hardware}, torch {torch.__version__}, {args.dtype}{', compiled' if args.compile else ''}; "
          f"{name}'s config with {config.n_layer} layers, random weights, caches filled with random values "
          f"instead of a prefill; median of {args.steps} steps per row, {order}; bytes and FLOPs per step "
          f"counted from the config; machine GB/s: a sum over {PROBE_BYTES / 2**30:g} GiB of float32 after every "
          f"round of steps", flush=True)
    bench = DecodeBench(config, max(args.contexts), device, DTYPES[args.dtype], args.steps, args.compile)
    if args.cache_budget_gib is None:
        columns, groups = SWEEP_COLUMNS, bench.sweep(args.contexts, args.batches or [1])
    else:
        print(f"largest batch whose cache fits in {args.cache_budget_gib:g} GiB, and its decode speed", flush=True)
        budget = int(args.cache_budget_gib * 2**30)
        columns, groups = CAPACITY_COLUMNS, (bench.capacity(context, budget) for context in args.contexts)
    print(table_header([heading for heading, _ in columns]), flush=True)
    rows = []
    for group in groups:
        for row in group:
            print(table_line(row, columns), flush=True)
        rows += group
    if args.plot:
        plot(rows, Path(args.plot), "run the same command again")
    if args.json:
        print(json.dumps({"device": hardware, "torch": torch.__version__, "dtype": args.dtype,
                          "compile": args.compile, "model_config": config.to_dict(), "rows": rows}))


if __name__ == "__main__":
    run(main, memory_hint="lower --contexts or --batches")
