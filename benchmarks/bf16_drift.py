"""How far a bfloat16 decode's logits drift from float32's: each attention variant of a preset (random weights)
decodes --steps greedy tokens in float32 after a random prompt; a bfloat16 copy of the same weights, with a
bfloat16 cache, is fed the same tokens (teacher-forced, so both see identical inputs), and every step's logits
are compared. Each model decodes on its own kernels (kernels.py picks the bfloat16 ones on the CPU).

    python benchmarks/bf16_drift.py                       # gpt2-small, 32-token prompt, 64 steps, ~1 min on 2 cores
"""
import statistics
import sys
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from cli import ArgumentParser, positive_int, run  # noqa: E402
from model import Transformer  # noqa: E402
from model_config import PRESETS, VARIANTS  # noqa: E402
from report import table_header, table_row  # noqa: E402

KINDS = ("mla", "mha", "gqa", "mqa")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--preset", choices=sorted(PRESETS), default="gpt2-small", help="the architecture (default: %(default)s)")
    p.add_argument("--prompt", type=positive_int, default=32, help="random prompt tokens before the greedy steps")
    p.add_argument("--steps", type=positive_int, default=64, help="greedy decode steps compared")
    return p.parse_args(argv)


@torch.no_grad()
def drift(model: Transformer, prompt: torch.Tensor, steps: int) -> dict:
    """Decode steps greedy tokens with model (float32) after prompt (1, T) and teach the same tokens to its
    bfloat16 copy; -> the largest and median step's largest |bf16 - fp32| logit, the largest |fp32| logit, and at
    how many steps the two argmaxes agree."""
    half = Transformer(model.config).to(torch.bfloat16).eval()
    half.load_state_dict({name: value.bfloat16() for name, value in model.state_dict().items()})
    capacity, T = prompt.size(1) + steps, prompt.size(1)
    caches = model.make_cache(1, capacity), half.make_cache(1, capacity, dtype=torch.bfloat16)
    full, low = (m(prompt, cache=c, input_pos=torch.arange(T))[0][:, -1] for m, c in zip((model, half), caches))
    differences, largest, agree = [], 0.0, 0
    for step in range(steps):
        low = low.float()
        differences.append((low - full).abs().max().item())
        largest = max(largest, full.abs().max().item())
        token = full.argmax(-1, keepdim=True)  # (1, 1)
        agree += int(low.argmax(-1).item() == token.item())
        slot = torch.tensor([T + step])
        full, low = model.decode_step(token, caches[0], slot), half.decode_step(token, caches[1], slot)
    return {"largest": max(differences), "median": statistics.median(differences), "logit": largest, "agree": agree}


def main(argv=None):
    args = parse_args(argv)
    base = PRESETS[args.preset]
    print(f"CPU, {torch.get_num_threads()} thread(s), torch {torch.__version__}; {args.preset}, random weights, "
          f"a {args.prompt}-token random prompt, {args.steps} greedy steps teacher-forced into the bfloat16 copy")
    print(table_header(["attention", "largest logit gap, bf16 to fp32", "median step's gap",
                        "largest fp32 logit (abs)", "same argmax"]))
    prompt = torch.randint(base.vocab_size, (1, args.prompt), generator=torch.Generator().manual_seed(1))
    for kind in KINDS:
        torch.manual_seed(0)
        config = replace(base, **VARIANTS[kind], block_size=max(base.block_size, args.prompt + args.steps),
                         dropout=0.0)
        r = drift(Transformer(config).eval(), prompt, args.steps)
        print(table_row([kind, f"{r['largest']:.4f}", f"{r['median']:.4f}", f"{r['logit']:.2f}",
                         f"{r['agree']}/{args.steps}"]), flush=True)


if __name__ == "__main__":
    run(main)
