"""Evaluate a checkpoint on a whole split, sample from it through the latent cache, or benchmark MLA's decode
cache and speed against MHA and GQA.

    python test.py --ckpt out/shakespeare/best.pt                          # loss, perplexity, bits per byte
    python test.py --ckpt out/shakespeare/best.pt --prompt "ROMEO:"        # stream a sample
    python test.py --bench --preset gpt2-small --contexts 256 1024 4096    # cache bytes and decode speed
"""
import argparse
import codecs
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import torch

from checkpoint import load_checkpoint, model_from_checkpoint
from cli import CLIError, run
from data_prepare import PreparedData
from decode_benchmark import benchmark, markdown_table
from evaluation import evaluate
from model import Transformer
from model_config import PRESETS, ModelConfig
from runtime import DTYPES, keep_freed_memory
from tokenizer import EOT_ID, VOCAB_SIZE, Tokenizer, add_argument as add_tokenizer_argument


# ---- sampling -----------------------------------------------------------------------------------

def sample_tokens(model: Transformer, prompt_ids: list[int], max_new_tokens: int, temperature: float,
                  top_k: int | None, top_p: float | None, generator: torch.Generator) -> Iterator[int]:
    """Yield the ids continuing prompt_ids as they are generated: one prefill, then one cached decode step per
    token. Only the tokenizer's ids are sampled, never the padding ids past its vocabulary."""
    idx = torch.tensor([prompt_ids], device=model.lm_head.weight.device)  # (1, T)
    handle = model.lm_head.register_forward_hook(lambda module, inputs, logits: logits[..., :VOCAB_SIZE])
    try:
        for token in model.stream(idx, max_new_tokens, temperature, top_k, top_p, generator):
            yield token.item()
    finally:
        handle.remove()


def stream_text(tok: Tokenizer, ids: Iterator[int]) -> Iterator[str]:
    """Text of ids as they arrive; a character whose UTF-8 bytes span several tokens comes out once whole."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in ids:
        if text := decoder.decode(tok.decode_bytes([token])):
            yield text
    if text := decoder.decode(b"", final=True):
        yield text


def read_prompt(args) -> str:
    if args.prompt_file is None:
        return args.prompt
    try:
        return Path(args.prompt_file).read_text(encoding="utf-8")
    except OSError as err:
        raise CLIError(f"prompt file {args.prompt_file}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise CLIError(f"prompt file {args.prompt_file} is not UTF-8 text") from None


def sample_command(model: Transformer, args, device):
    tok = Tokenizer(args.tokenizer_file)
    prompt = read_prompt(args)
    prompt_ids = tok.encode(prompt) or [EOT_ID]  # an empty prompt starts a new document
    room = model.config.block_size - len(prompt_ids)
    if room <= 0:
        raise CLIError(f"the prompt is {len(prompt_ids)} tokens; the model's block_size of "
                       f"{model.config.block_size} leaves no room to generate")
    if args.max_new_tokens > room:
        print(f"note: generating {room} tokens, all that fit in block_size {model.config.block_size}",
              file=sys.stderr)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    for i in range(args.num_samples):
        if i:
            print("\n" + "-" * 40)
        sys.stdout.write(prompt)
        ids = sample_tokens(model, prompt_ids, min(args.max_new_tokens, room), args.temperature, args.top_k,
                            args.top_p, generator)
        for text in stream_text(tok, ids):
            sys.stdout.write(text)
            sys.stdout.flush()
        print()


def bench_command(args, device):
    if (args.ckpt is None) == (args.preset is None):
        raise CLIError("--bench needs exactly one of --ckpt (its model config) or --preset NAME")
    config = model_from_checkpoint(load_checkpoint(args.ckpt)).config if args.ckpt else PRESETS[args.preset]
    if min(args.contexts) < 2 or min(args.batches) < 1 or args.steps < 1 or args.prefill_runs < 1:
        raise CLIError("--contexts must be >= 2, --batches, --steps and --prefill-runs >= 1")
    rows = benchmark(config, args.contexts, args.batches, device, DTYPES[args.dtype], args.steps, args.prefill_runs)
    threads = f"CPU, {torch.get_num_threads()} thread(s)"
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else threads
    print(f"{hardware}, torch {torch.__version__}, {args.dtype}, random weights")
    print(markdown_table(rows))
    if args.json:
        print(json.dumps({"device": hardware, "torch": torch.__version__, "dtype": args.dtype,
                          "model_config": config.to_dict(), "rows": rows}))


# ---- evaluation command -------------------------------------------------------------------------

def eval_command(model: Transformer, ckpt: dict, args, device):
    data_dir = args.data_dir or ckpt.get("train_config", {}).get("data_dir")
    if not data_dir:
        raise CLIError("--data-dir is needed: the checkpoint does not record the data dir it was trained on")
    data = PreparedData(data_dir)
    if data.vocab_size > model.config.vocab_size:
        raise CLIError(f"{data_dir} has a vocabulary of {data.vocab_size} tokens; the model has only "
                       f"{model.config.vocab_size}")
    result = evaluate(model, data, args.split, model.config.block_size, args.batch_size, device, args.stride)
    print(f"{args.split} split of {data_dir}: {result['tokens']:,} tokens evaluated")
    print(f"loss {result['loss']:.4f} | perplexity {result['perplexity']:.2f} | "
          f"bits per byte {result['bits_per_byte']:.4f}")
    if args.json:
        print(json.dumps({"val_loss": result["loss"], "perplexity": result["perplexity"],
                          "bits_per_byte": result["bits_per_byte"], "tokens": result["tokens"],
                          "split": args.split, "model_config": model.config.to_dict()}))


def with_eval_context(ckpt: dict, block_size: int | None, yarn_factor: float | None) -> dict:
    """ckpt with its model config given another context length and/or YaRN factor. The RoPE tables are not
    in the state dict, so the same weights load."""
    saved = ckpt["model_config"]
    overrides = {}
    if block_size is not None:
        overrides["block_size"] = block_size
    if yarn_factor is not None:
        has_yarn = saved.get("rope_scaling") == "yarn"
        overrides |= {"rope_scaling": "yarn", "rope_factor": yarn_factor,
                      "original_seq_len": saved["original_seq_len"] if has_yarn else saved["block_size"]}
    if not overrides:
        return ckpt
    try:
        ModelConfig.from_dict({**saved, **overrides})
    except (TypeError, ValueError) as err:
        raise CLIError(str(err)) from None
    return {**ckpt, "model_config": {**saved, **overrides}}


# ---- command line -------------------------------------------------------------------------------

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", help="checkpoint to evaluate, sample from, or take the --bench config of")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", action="store_true", help="also print the results as one JSON line, last")
    e = p.add_argument_group("evaluation (the default)")
    e.add_argument("--data-dir", help="prepared data (default: the checkpoint's train_config data_dir)")
    e.add_argument("--split", choices=["val", "train"], default="val")
    e.add_argument("--batch-size", type=int, default=8, help="windows per forward")
    e.add_argument("--stride", type=int, help="slide windows by this many tokens, scoring only their last "
                                              "stride targets (default: block_size, disjoint windows)")
    e.add_argument("--block-size", type=int, help="window length, also the model's context (default: the "
                                                  "checkpoint's block_size); longer runs RoPE past its trained length")
    e.add_argument("--yarn", type=float, metavar="FACTOR", help="switch YaRN on with this rope_factor (default: the "
                   "checkpoint's RoPE), over original_seq_len = the checkpoint's block_size unless it has YaRN already")
    s = p.add_argument_group("sampling (with --prompt or --prompt-file)")
    s.add_argument("--prompt")
    s.add_argument("--prompt-file")
    s.add_argument("--max-new-tokens", type=int, default=256, help="at most block_size - prompt tokens")
    s.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    s.add_argument("--top-k", type=int, default=200)
    s.add_argument("--top-p", type=float)
    s.add_argument("--num-samples", type=int, default=1)
    s.add_argument("--seed", type=int, default=1337)
    add_tokenizer_argument(s)
    b = p.add_argument_group("benchmark (--bench)")
    b.add_argument("--bench", action="store_true")
    b.add_argument("--preset", choices=sorted(PRESETS), help="benchmark this preset instead of --ckpt's config")
    b.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096])
    b.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    b.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    b.add_argument("--steps", type=int, default=10, help="timed decode steps per row")
    b.add_argument("--prefill-runs", type=int, default=3, help="timed prefills per row")
    return p.parse_args(argv)


def check_sampling_args(args):
    if args.prompt is not None and args.prompt_file is not None:
        raise CLIError("give --prompt or --prompt-file, not both")
    if args.json:
        raise CLIError("--json applies to evaluation and --bench, not to sampling")
    if args.max_new_tokens < 1 or args.num_samples < 1:
        raise CLIError("--max-new-tokens and --num-samples must be at least 1")
    if args.temperature < 0:
        raise CLIError("--temperature must be >= 0")
    if args.top_k is not None and args.top_k < 1:
        raise CLIError("--top-k must be at least 1")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise CLIError("--top-p must be in (0, 1]")


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError:
        raise CLIError(f"unknown device {name!r}") from None
    available = {"cuda": torch.cuda.is_available, "mps": torch.backends.mps.is_available}
    if not available.get(device.type, lambda: True)():
        raise CLIError(f"--device {name}: no {device.type} device is available")
    return device


def main(argv=None):
    args = parse_args(argv)
    device = resolve_device(args.device)
    if device.type == "cpu":
        keep_freed_memory()
    if args.bench:
        return bench_command(args, device)
    if args.ckpt is None:
        raise CLIError("--ckpt is required (or --bench --preset NAME)")
    if args.batch_size < 1:
        raise CLIError("--batch-size must be at least 1")
    sampling = args.prompt is not None or args.prompt_file is not None
    if sampling:
        check_sampling_args(args)
    ckpt = with_eval_context(load_checkpoint(args.ckpt), args.block_size, args.yarn)
    model = model_from_checkpoint(ckpt).to(device).eval()
    if sampling:
        sample_command(model, args, device)
    else:
        eval_command(model, ckpt, args, device)


if __name__ == "__main__":
    run(main)
