"""Evaluate a checkpoint on a whole split, sample from it through the latent cache, or benchmark MLA's decode
cache and speed against MHA and GQA.

    python test.py --ckpt out/shakespeare/best.pt                          # loss, perplexity, bits per byte
    python test.py --ckpt out/shakespeare/best.pt --prompt "ROMEO:"        # stream a sample
    python test.py --bench                                                 # MLA's decode against MHA and GQA
"""
import codecs
import json
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch

from checkpoint import load_checkpoint, model_from_checkpoint
from cli import ArgumentParser, CLIError, non_negative_float, number, positive_float, positive_int, run
from dataset import PreparedData
from decode_benchmark import CAPACITY_COLUMNS, PROBE_BYTES, SWEEP_COLUMNS, DecodeBench, plot, table_header, table_line
from evaluation import evaluate
from model import Transformer, compile_decode_step, left_pad
from model_config import PRESETS, ModelConfig
from runtime import DTYPES, keep_freed_memory, pick_device
from tokenizer import EOT_ID, VOCAB_SIZE, Tokenizer, add_argument as add_tokenizer_argument


# ---- sampling -----------------------------------------------------------------------------------

def sample_batch(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                 top_k: int | None, top_p: float | None, generator: torch.Generator,
                 cache_dtype: torch.dtype | None = None) -> Iterator[torch.Tensor]:
    """Yield the next ids (B, 1) of every prompt at each step, all decoded as one batch (left-padded to the
    longest): one prefill, then one cached decode step per token. Only the tokenizer's ids are sampled, never
    the padding ids past its vocabulary; a row that produces <|endoftext|> stops there (its later ids are
    <|endoftext|> too), and the stream ends when every row has."""
    idx, pad = left_pad(prompts)
    device = model.lm_head.weight.device
    yield from model.stream(idx.to(device), max_new_tokens, temperature, top_k, top_p, generator, pad=pad,
                            vocab_limit=VOCAB_SIZE, stop_id=EOT_ID, cache_dtype=cache_dtype)


def sample_tokens(model: Transformer, prompt_ids: list[int], max_new_tokens: int, temperature: float,
                  top_k: int | None, top_p: float | None, generator: torch.Generator,
                  cache_dtype: torch.dtype | None = None) -> Iterator[int]:
    """Yield the ids continuing one prompt as they are generated, up to (not including) <|endoftext|>."""
    for token in sample_batch(model, [prompt_ids], max_new_tokens, temperature, top_k, top_p, generator, cache_dtype):
        if token.item() == EOT_ID:
            return
        yield token.item()


def stream_text(tok: Tokenizer, ids: Iterator[int]) -> Iterator[str]:
    """Text of ids as they arrive; a character whose UTF-8 bytes span several tokens comes out once whole."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    for token in ids:
        if text := decoder.decode(tok.decode_bytes([token])):
            yield text
    if text := decoder.decode(b"", final=True):
        yield text


def read_prompts(args) -> list[str]:
    """--prompt; or --prompt-file: the whole file as one prompt, or one prompt per line of a .jsonl file (its
    "text" field)."""
    if args.prompt_file is None:
        return [args.prompt]
    path = Path(args.prompt_file)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise CLIError(f"prompt file {path}: {err.strerror}") from None
    except UnicodeDecodeError:
        raise CLIError(f"prompt file {path} is not UTF-8 text") from None
    if path.suffix != ".jsonl":
        return [text]
    prompts = []
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            prompts.append(json.loads(line)["text"])
        except (json.JSONDecodeError, KeyError, TypeError):
            raise CLIError(f"{path} line {line_number}: not a JSON object with a \"text\" string") from None
        if not isinstance(prompts[-1], str):
            raise CLIError(f"{path} line {line_number}: \"text\" is not a string")
    if not prompts:
        raise CLIError(f"{path} holds no prompts")
    return prompts


def sample_command(model: Transformer, args, device):
    """Continue every prompt --num-samples times, all as one batch. One sample streams as it is generated;
    several are printed whole, each after its prompt, between lines of dashes."""
    tok = Tokenizer(args.tokenizer_file)
    prompts = [prompt for prompt in read_prompts(args) for _ in range(args.num_samples)]
    prompt_ids = [tok.encode(prompt) or [EOT_ID] for prompt in prompts]  # an empty prompt starts a new document
    longest = max(len(ids) for ids in prompt_ids)
    room = model.config.block_size - longest
    if room <= 0:
        raise CLIError(f"the longest prompt is {longest} tokens; the model's block_size of "
                       f"{model.config.block_size} leaves no room to generate")
    if args.max_new_tokens > room:
        print(f"note: generating {room} tokens, all that fit in block_size {model.config.block_size}",
              file=sys.stderr)
    if args.compile:
        compile_decode_step(model)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    cache_dtype = DTYPES[args.cache_dtype] if args.cache_dtype else None
    n = min(args.max_new_tokens, room)
    if len(prompts) == 1:
        sys.stdout.write(prompts[0])
        ids = sample_tokens(model, prompt_ids[0], n, args.temperature, args.top_k, args.top_p, generator, cache_dtype)
        for text in stream_text(tok, ids):
            sys.stdout.write(text)
            sys.stdout.flush()
        print()
        return
    steps = list(sample_batch(model, prompt_ids, n, args.temperature, args.top_k, args.top_p, generator, cache_dtype))
    rows = torch.cat(steps, dim=1).tolist()
    for i, (prompt, row) in enumerate(zip(prompts, rows)):
        if i:
            print("\n" + "-" * 40)
        ids = row[:row.index(EOT_ID)] if EOT_ID in row else row
        print(prompt + tok.decode(ids))


def bench_command(args, device):
    if args.ckpt is not None and args.preset is not None:
        raise CLIError("--bench takes --ckpt (its model config) or --preset NAME, not both")
    check_bench_args(args)
    name = args.ckpt or args.preset or "gpt2-small"
    config = model_from_checkpoint(load_checkpoint(args.ckpt)).config if args.ckpt else PRESETS[name]
    config = replace(config, n_layer=args.layers or config.n_layer)
    threads = f"CPU, {torch.get_num_threads()} thread(s)"
    hardware = torch.cuda.get_device_name(device) if device.type == "cuda" else threads
    order = "the variants' steps interleaved" if args.cache_budget_gib is None else "one kind after another"
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
    print(table_header(columns), flush=True)
    rows = []
    for group in groups:
        for row in group:
            print(table_line(row, columns), flush=True)
        rows += group
    if args.plot and (note := plot(rows, args.plot)):
        print(note, file=sys.stderr)
    if args.json:
        print(json.dumps({"device": hardware, "torch": torch.__version__, "dtype": args.dtype,
                          "compile": args.compile, "model_config": config.to_dict(), "rows": rows}))


def check_bench_args(args):
    """What the flags' types cannot check alone: --bench's flags that exclude each other."""
    if args.cache_budget_gib is not None and (args.batches or args.plot):
        raise CLIError("--cache-budget-gib finds the batch that fits; it takes no --batches and no --plot")
    if args.plot and not Path(args.plot).resolve().parent.is_dir():
        raise CLIError(f"--plot {args.plot}: no such directory {Path(args.plot).resolve().parent}")


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
    p = ArgumentParser(description=__doc__)
    p.add_argument("--ckpt", help="checkpoint to evaluate, sample from, or take the --bench config of")
    p.add_argument("--device", default="auto", help="auto: cuda, then mps, then cpu; or cpu, cuda, cuda:N, mps")
    p.add_argument("--json", action="store_true", help="also print the results as one JSON line, last")
    p.add_argument("--compile", action="store_true", help="sampling and --bench: torch.compile the decode step "
                                                          "(as a CUDA graph on CUDA)")
    e = p.add_argument_group("evaluation (the default)")
    e.add_argument("--data-dir", help="prepared data (default: the checkpoint's train_config data_dir)")
    e.add_argument("--split", choices=["val", "train"], default="val", help="split to evaluate")
    e.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward")
    e.add_argument("--stride", type=positive_int, help="slide windows by this many tokens, scoring only their last "
                                              "stride targets (default: block_size, disjoint windows)")
    e.add_argument("--block-size", type=positive_int, help="window length, also the model's context (default: the "
                                                  "checkpoint's block_size); longer runs RoPE past its trained length")
    e.add_argument("--yarn", type=number(float, minimum=1), metavar="FACTOR", help="switch YaRN on with this rope_factor (default: the "
                   "checkpoint's RoPE), over original_seq_len = the checkpoint's block_size unless it has YaRN already")
    s = p.add_argument_group("sampling (with --prompt or --prompt-file)")
    s.add_argument("--prompt", help="text to continue (\"\" starts a new document)")
    s.add_argument("--prompt-file", help="UTF-8 file holding the prompt, or a .jsonl file of prompts, one "
                                         "{\"text\": ...} per line, sampled together")
    s.add_argument("--max-new-tokens", type=positive_int, default=256, help="at most block_size - prompt tokens")
    s.add_argument("--temperature", type=non_negative_float, default=0.8, help="0: greedy")
    s.add_argument("--top-k", type=positive_int, default=200, help="sample among the k likeliest tokens")
    s.add_argument("--top-p", type=positive_float, help="sample among the likeliest tokens holding this much "
                                                       "probability, in (0, 1] (default: off)")
    s.add_argument("--num-samples", type=positive_int, default=1, help="samples per prompt, all decoded as one batch")
    s.add_argument("--cache-dtype", choices=sorted(DTYPES), help="the KV cache's dtype (default: the model's)")
    s.add_argument("--seed", type=int, default=1337, help="seed of the sampling")
    add_tokenizer_argument(s)
    b = p.add_argument_group("benchmark (--bench): decode speed of MLA, MHA and GQA across contexts")
    b.add_argument("--bench", action="store_true", help="benchmark decode speed and cache size, random weights")
    b.add_argument("--preset", choices=sorted(PRESETS), help="benchmark this preset's config (default: gpt2-small, "
                                                             "or --ckpt's config)")
    b.add_argument("--layers", type=positive_int, help="override the config's n_layer (fewer make long contexts cheap)")
    b.add_argument("--contexts", type=number(int, minimum=2), nargs="+", default=[512, 2048, 8192], help="positions each step attends to")
    b.add_argument("--batches", type=positive_int, nargs="+", help="sequences decoded per step (default: 1)")
    b.add_argument("--steps", type=positive_int, default=3, help="timed decode steps per row (median and range)")
    b.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="weights' and cache's dtype")
    b.add_argument("--cache-budget-gib", type=positive_float, help="instead of the sweep: the largest batch whose cache "
                                                          "fits in this many GiB, and its decode speed, at each context")
    b.add_argument("--plot", help="also draw decode tok/s against context into this PNG")
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


def main(argv=None):
    args = parse_args(argv)
    device = torch.device(pick_device(args.device))
    if device.type == "cpu":
        keep_freed_memory()
    if args.bench:
        return bench_command(args, device)
    if args.ckpt is None:
        raise CLIError("--ckpt is required (or --bench --preset NAME)")
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
    run(main, memory_hint="lower --batch-size, or --contexts and --batches with --bench")
