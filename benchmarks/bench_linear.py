"""The few-row weight products behind kernels.linear_chunks: F.linear against kernels.chunked_linear in 2, 4 and 8
blocks, for every weight shape of gpt2-small (MLA's and MHA's projections, the FFN, the LM head), each call after
streaming 64 MiB so that its weight comes from memory as in a decode step; rounds interleaved, medians.

    python benchmarks/bench_linear.py                                  # one row, float32, ~1 min on 2 cores
    python benchmarks/bench_linear.py --rows 8 --dtype bfloat16
"""
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cli import ArgumentParser, positive_int, run  # noqa: E402
from kernels import chunked_linear  # noqa: E402
from report import table_header, table_row  # noqa: E402
from runtime import DTYPES  # noqa: E402

SHAPES = {"LM head": (50304, 768), "FFN gate/up": (2048, 768), "FFN down": (768, 2048), "o_proj": (768, 768),
          "MLA kv_b_proj": (3072, 256), "MLA q_b_proj": (1152, 768), "MLA kv_a_proj": (288, 768),
          "MHA q/k/v": (768, 768)}
BLOCKS = (1, 2, 4, 8)  # 1: F.linear


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=positive_int, default=1, help="input rows (a decode step's batch)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--rounds", type=positive_int, default=30, help="interleaved rounds (median over them)")
    return p.parse_args(argv)


def product(x: torch.Tensor, weight: torch.Tensor, blocks: int):
    """x (rows, 1, K) by weight (O, K): F.linear for 1 block, else chunked_linear."""
    return (lambda: F.linear(x, weight)) if blocks == 1 else (lambda: chunked_linear(x, weight, blocks))


def main(argv=None):
    args = parse_args(argv)
    dtype = DTYPES[args.dtype]
    flush = torch.ones(16 * 2**20)  # 64 MiB, more than this CPU's caches
    print(f"CPU, {torch.get_num_threads()} thread(s), torch {torch.__version__}, {args.dtype}, {args.rows} row(s); "
          f"ms per call (GB/s of weight read), median of {args.rounds} rounds")
    print(table_header(["weight", "shape", *(f"{b} block{'s' * (b > 1)}" for b in BLOCKS)]))
    torch.manual_seed(0)
    for name, (out_features, in_features) in SHAPES.items():
        weight = torch.randn(out_features, in_features, dtype=dtype)
        x = torch.randn(args.rows, 1, in_features, dtype=dtype)
        calls = {b: product(x, weight, b) for b in BLOCKS if out_features % b == 0}
        seconds = {b: [] for b in calls}
        for _ in range(args.rounds):
            for b, call in calls.items():
                flush.sum()
                begin = time.perf_counter()
                call()
                seconds[b].append(time.perf_counter() - begin)
        cells = []
        for b in BLOCKS:
            median = statistics.median(seconds[b]) if b in seconds else None
            cells.append("–" if median is None else
                         f"{1e3 * median:.3f} ({weight.numel() * weight.element_size() / median / 1e9:.1f})")
        print(table_row([name, f"{out_features} x {in_features}", *cells]), flush=True)


if __name__ == "__main__":
    run(main)
