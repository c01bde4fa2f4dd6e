"""Training throughput (tokens/s) and MFU of MLA against MHA and GQA at the same depth and width, in one run.

    python benchmarks/bench_train.py                                          # shakespeare preset on the CPU
    python benchmarks/bench_train.py --device cuda --preset gpt2-small --batch-size 16

Each step is train.py's own: optim.train_step() with the optimiser a run makes (--optimizer, default train.py's:
Muon on the blocks' matrices, AdamW on the rest), gradient clipping and, on CUDA, bf16 autocast and torch.compile
(as a run picks them: runtime.Runtime). Batches are random tokens, generated up front, so the data
reader is left out. The attention kinds take turns, --rounds times, and the median round is reported, so that a
noisy machine slows them alike.

MFU = flops_per_token(block_size) x tokens/s / peak FLOP/s. The peak is, on the CPU, measured here in every round
beside the models (a 4096 x 4096 float32 matmul, the median round's rate); on CUDA, train.py's datasheet table
(dense bf16), or --peak-flops.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cli import ArgumentParser, number, positive_int, run  # noqa: E402
from model import Transformer  # noqa: E402
from model_config import ATTENTION_KINDS, PRESETS, ModelConfig  # noqa: E402
from optim import DEFAULT_OPTIMIZER, OPTIMIZERS, make_optimizer, train_step  # noqa: E402
from report import markdown_table  # noqa: E402
from runtime import DEVICES, Runtime, keep_freed_memory, synchronize  # noqa: E402


def matmul_flops(a: torch.Tensor, b: torch.Tensor) -> float:
    """FLOP/s of one (n, n) @ (n, n) matmul."""
    synchronize(str(a.device))
    start = time.perf_counter()
    a @ b
    synchronize(str(a.device))
    return 2 * a.size(0) ** 3 / (time.perf_counter() - start)


class Contender:
    """One attention kind: its model, optimiser and fixed batches, ready to time training steps."""

    def __init__(self, config: ModelConfig, args, rt: Runtime):
        torch.manual_seed(0)
        self.config, self.device = config, rt.device
        self.model = Transformer(config).to(rt.device)
        self.optimizer = make_optimizer(self.model, 1e-4, 0.1, fused=rt.device_type == "cuda", kind=args.optimizer)
        self.step_model = torch.compile(self.model) if rt.compile else self.model
        self.scaler = torch.amp.GradScaler(rt.device_type, enabled=rt.dtype == torch.float16)
        self.autocast = rt.autocast()
        tokens = torch.randint(0, config.vocab_size, (4, args.batch_size, config.block_size + 1), device=rt.device)
        self.batches = [(t[:, :-1], t[:, 1:]) for t in tokens]
        self.tokens_per_step = args.batch_size * config.block_size
        self.calls = 0
        self.tokens_per_sec = []

    def next_batch(self):
        self.calls += 1
        return self.batches[self.calls % len(self.batches)]

    def steps(self, n: int) -> float:
        """Seconds for n training steps."""
        synchronize(self.device)
        start = time.perf_counter()
        for _ in range(n):
            train_step(self.step_model, self.optimizer, self.scaler, self.next_batch, 1, 1e-4, self.autocast)
        synchronize(self.device)
        return time.perf_counter() - start

    def time_round(self, n: int) -> None:
        self.tokens_per_sec.append(n * self.tokens_per_step / self.steps(n))


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="shakespeare")
    parser.add_argument("--device", choices=DEVICES, default="cpu")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default=DEFAULT_OPTIMIZER)
    parser.add_argument("--batch-size", type=positive_int, default=16)
    parser.add_argument("--steps", type=positive_int, default=3, help="timed steps per round")
    parser.add_argument("--rounds", type=positive_int, default=5, help="turns each attention kind takes")
    parser.add_argument("--warmup", type=number(int, minimum=0), default=2, help="untimed steps first (compilation)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile (default: on CUDA only, as train.py)")
    parser.add_argument("--peak-flops", type=number(float, above=0), help="peak FLOP/s of one device for MFU")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    rt = Runtime.start(args.device, "auto", args.compile, args.peak_flops)
    if rt.device_type == "cpu":
        keep_freed_memory()  # as train.py does
    device, dtype = rt.device, rt.dtype
    contenders = {kind: Contender(ModelConfig.from_preset(args.preset, attention=kind), args, rt)
                  for kind in ATTENTION_KINDS}
    for contender in contenders.values():
        contender.steps(args.warmup)
    square = torch.randn(4096, 4096, device=device)
    matmul = []
    for _ in range(args.rounds):
        matmul.append(matmul_flops(square, square))
        for contender in contenders.values():
            contender.time_round(args.steps)

    matmul = statistics.median(matmul)
    peak = rt.peak_flops if rt.device_type == "cuda" or args.peak_flops else matmul
    cuda = rt.device_type == "cuda"
    name = torch.cuda.get_device_name(device) if cuda else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"device: {name}; torch {torch.__version__}; dtype {str(dtype).removeprefix('torch.')}; "
          f"compile {rt.compile}")
    print(f"float32 4096^3 matmul: {matmul / 1e9:,.1f} GFLOP/s measured; peak used for MFU: "
          + (f"{peak / 1e12:,.3f} TFLOP/s" if peak else "unknown (pass --peak-flops)"))

    block = contenders["mla"].config.block_size
    print(f"\npreset {args.preset}, batch {args.batch_size} x {block} tokens, median of {args.rounds} rounds of "
          f"{args.steps} steps\n")
    mha = statistics.median(contenders["mha"].tokens_per_sec)
    rows = []
    for kind, contender in contenders.items():
        tokens_per_sec = statistics.median(contender.tokens_per_sec)
        flops = contender.config.flops_per_token(block)
        mfu = f"{100 * flops * tokens_per_sec / peak:.1f}%" if peak else "n/a"
        spread = f"{min(contender.tokens_per_sec):,.0f}-{max(contender.tokens_per_sec):,.0f}"
        rows.append([kind, f"{contender.config.num_params() / 1e6:.1f}M", f"{flops / 1e9:.3f}", f"{tokens_per_sec:,.0f}",
                     spread, f"{tokens_per_sec / mha:.2f}x", mfu])
    print(markdown_table(["attention", "params", "GFLOP/token", "tokens/s (median)", "tokens/s (min-max)", "vs MHA",
                          "MFU"], rows))


if __name__ == "__main__":
    run(main)
