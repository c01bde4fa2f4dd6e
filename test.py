"""Evaluate a checkpoint on a whole split, or sample from it through its cache (MLA's latent cache).

    python test.py --ckpt out/shakespeare/best.pt                          # loss, perplexity, bits per byte
    python test.py --ckpt out/shakespeare/best.pt --prompt "ROMEO:"        # stream a sample

The decode benchmark (MLA's decode speed and cache against MHA and GQA) is benchmarks/bench_decode.py.
"""
import codecs
import json
import sys
from collections.abc import Iterator

import torch

from checkpoint import load_checkpoint, model_from_checkpoint
from cli import ArgumentParser, CLIError, non_negative_float, number, positive_int, run, seed_int
from dataset import PreparedData
from evaluation import evaluate
from fileio import parse_json, regular_file
from model import DEFAULT_TEMPERATURE, DEFAULT_TOP_K, Transformer, compile_decode_step, left_pad
from model_config import ModelConfig
from runtime import DTYPES, check_memory, keep_freed_memory, pick_device
from tokenizer import EOT_ID, VOCAB_SIZE, Tokenizer, holds_gpt2_ids
from tokenizer import add_argument as add_tokenizer_argument

# ---- sampling -----------------------------------------------------------------------------------

def sample_batch(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                 top_k: int | None, top_p: float | None, generator: torch.Generator,
                 cache_dtype: torch.dtype | None = None, decode_step=None) -> Iterator[torch.Tensor]:
    """Yield the next ids (B, 1) of every prompt at each step, all decoded as one batch (left-padded to the
    longest): one prefill, then one cached decode step per token. Only the tokenizer's ids are sampled, never
    the padding ids past its vocabulary; a row that produces <|endoftext|> stops there (its later ids are
    <|endoftext|> too), and the stream ends when every row has. decode_step: as Transformer.stream takes it."""
    idx, pad = left_pad(prompts)
    device = model.lm_head.weight.device
    yield from model.stream(idx.to(device), max_new_tokens, temperature, top_k, top_p, generator, pad=pad,
                            vocab_limit=VOCAB_SIZE, stop_id=EOT_ID, cache_dtype=cache_dtype, decode_step=decode_step)


def sample_tokens(model: Transformer, prompt_ids: list[int], max_new_tokens: int, temperature: float,
                  top_k: int | None, top_p: float | None, generator: torch.Generator,
                  cache_dtype: torch.dtype | None = None, decode_step=None) -> Iterator[int]:
    """Yield the ids continuing one prompt as they are generated, up to (not including) <|endoftext|>."""
    for token in sample_batch(model, [prompt_ids], max_new_tokens, temperature, top_k, top_p, generator, cache_dtype,
                              decode_step):
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
    "text" field). A prompt that is not Unicode text (bytes that are not UTF-8 arrive as lone surrogates) is
    refused."""
    if args.prompt_file is None:
        return [unicode_text(args.prompt, "--prompt")]
    path = regular_file(args.prompt_file, "prompt file")
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
        where = f"{path} line {line_number}"
        record = parse_json(line, where)
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise CLIError(f"{where}: not a JSON object with a \"text\" string")
        prompts.append(unicode_text(record["text"], where))
    if not prompts:
        raise CLIError(f"{path} holds no prompts")
    return prompts


def unicode_text(text: str, where: str) -> str:
    if any("\ud800" <= char <= "\udfff" for char in text):
        raise CLIError(f"{where}: holds a lone surrogate (bytes that are not UTF-8, or an unpaired \\ud800-\\udfff "
                       "escape): not Unicode text")
    return text


def sample_command(model: Transformer, args, device):
    """Continue every prompt --num-samples times, all as one batch. One sample streams as it is generated;
    several are printed whole, each after its prompt, between lines of dashes."""
    texts = read_prompts(args)
    if not holds_gpt2_ids(model.config.vocab_size):
        raise CLIError(f"the model knows {model.config.vocab_size} token ids, fewer than GPT-2's tokenizer's "
                       f"{VOCAB_SIZE}: it was not trained on GPT-2 tokens, so there is nothing to sample with")
    tok = Tokenizer(args.tokenizer_file)
    unique_ids = [tok.encode(text) or [EOT_ID] for text in texts]  # an empty prompt starts a new document
    longest = max(len(ids) for ids in unique_ids)
    room = model.config.block_size - longest
    if room <= 0:
        raise CLIError(f"the longest prompt is {longest} tokens; the model's block_size of "
                       f"{model.config.block_size} leaves no room to generate")
    batch, config = len(texts) * args.num_samples, model.config
    cache = batch * config.block_size * config.n_layer * config.kv_cache_values_per_token_per_layer() * 4
    check_memory(cache + batch * config.vocab_size * 4, device, f"the cache and logits of {batch:,} sequences")
    prompts = [text for text in texts for _ in range(args.num_samples)]
    prompt_ids = [ids for ids in unique_ids for _ in range(args.num_samples)]
    if args.max_new_tokens > room:
        print(f"note: generating {room} tokens, all that fit in block_size {model.config.block_size}",
              file=sys.stderr)
    decode_step = compile_decode_step(model) if args.compile else None
    generator = torch.Generator(device=device).manual_seed(args.seed)
    cache_dtype = DTYPES[args.cache_dtype] if args.cache_dtype else None
    n = min(args.max_new_tokens, room)
    if len(prompts) == 1:
        sys.stdout.write(prompts[0])
        ids = sample_tokens(model, prompt_ids[0], n, args.temperature, args.top_k, args.top_p, generator, cache_dtype,
                            decode_step)
        for text in stream_text(tok, ids):
            sys.stdout.write(text)
            sys.stdout.flush()
        print()
        return
    steps = list(sample_batch(model, prompt_ids, n, args.temperature, args.top_k, args.top_p, generator, cache_dtype,
                              decode_step))
    rows = torch.cat(steps, dim=1).tolist()
    for i, (prompt, row) in enumerate(zip(prompts, rows)):
        if i:
            print("\n" + "-" * 40)
        ids = row[:row.index(EOT_ID)] if EOT_ID in row else row
        print(prompt + tok.decode(ids))


# ---- evaluation command -------------------------------------------------------------------------

def eval_command(model: Transformer, ckpt: dict, args, device):
    data_dir = args.data_dir or ckpt.get("train_config", {}).get("data_dir")
    if not data_dir:
        raise CLIError("--data-dir is needed: the checkpoint does not record the data dir it was trained on")
    data = PreparedData(data_dir)
    if data.vocab_size > model.config.vocab_size:
        raise CLIError(f"{data_dir} has a vocabulary of {data.vocab_size} tokens; the model has only "
                       f"{model.config.vocab_size}")
    config = model.config
    check_memory(args.batch_size * config.block_size * config.vocab_size * 4, device,
                 f"the logits of {args.batch_size} windows of {config.block_size} tokens")
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
    p.add_argument("--ckpt", required=True, help="checkpoint to evaluate or sample from")
    p.add_argument("--device", default="auto", help="auto: cuda, then mps, then cpu; or cpu, cuda, cuda:N, mps")
    e = p.add_argument_group("evaluation (the default)")
    e.add_argument("--data-dir", help="prepared data (default: the checkpoint's train_config data_dir)")
    e.add_argument("--split", choices=["val", "train"], default="val", help="split to evaluate")
    e.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward")
    e.add_argument("--stride", type=positive_int, help="slide windows by this many tokens, scoring only their last "
                                                       "stride targets (default: block_size, disjoint windows)")
    e.add_argument("--block-size", type=positive_int, help="window length, also the model's context (default: the "
                   "checkpoint's block_size); longer runs RoPE past its trained length")
    e.add_argument("--yarn", type=number(float, minimum=1), metavar="FACTOR", help="switch YaRN on with this "
                   "rope_factor (default: the checkpoint's RoPE), over original_seq_len = the checkpoint's "
                   "block_size unless it has YaRN already")
    e.add_argument("--json", action="store_true", help="also print the results as one JSON line, last")
    s = p.add_argument_group("sampling (with --prompt or --prompt-file)")
    prompt = s.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="text to continue (\"\" starts a new document)")
    prompt.add_argument("--prompt-file", help="UTF-8 file holding the prompt, or a .jsonl file of prompts, one "
                                              "{\"text\": ...} per line, sampled together")
    s.add_argument("--max-new-tokens", type=positive_int, default=256, help="at most block_size - prompt tokens")
    s.add_argument("--temperature", type=non_negative_float, default=DEFAULT_TEMPERATURE, help="0: greedy")
    s.add_argument("--top-k", type=positive_int, default=DEFAULT_TOP_K, help="sample among the k likeliest tokens")
    s.add_argument("--top-p", type=number(float, above=0, maximum=1), help="sample among the likeliest tokens "
                   "holding this much probability, in (0, 1] (default: off)")
    s.add_argument("--num-samples", type=positive_int, default=1, help="samples per prompt, all decoded as one batch")
    s.add_argument("--cache-dtype", choices=sorted(DTYPES), help="the KV cache's dtype (default: the model's)")
    s.add_argument("--compile", action="store_true", help="torch.compile the decode step (as a CUDA graph on CUDA)")
    s.add_argument("--seed", type=seed_int, default=1337, help="seed of the sampling")
    add_tokenizer_argument(s)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    sampling = args.prompt is not None or args.prompt_file is not None
    if sampling and args.json:
        raise CLIError("--json applies to evaluation, not to sampling")
    device = torch.device(pick_device(args.device))
    if device.type == "cpu":
        keep_freed_memory()
    ckpt = with_eval_context(load_checkpoint(args.ckpt), args.block_size, args.yarn)
    model = model_from_checkpoint(ckpt).to(device).eval()
    if sampling:
        sample_command(model, args, device)
    else:
        eval_command(model, ckpt, args, device)


if __name__ == "__main__":
    run(main, memory_hint="lower --batch-size (evaluation), or --num-samples and --max-new-tokens (sampling)")
