"""An export checked through llama.cpp, logit for logit, and llama.cpp's batch-1 decode speed beside ours.

    python benchmarks/llama_cpp.py --ckpt out/shakespeare/best.pt --out-dir out/llama-cpp \\
        --converter PATH/llama.cpp/convert_hf_to_gguf.py --llama-python PATH/venv/bin/python
    python benchmarks/llama_cpp.py --preset gpt2-small --out-dir out/llama-cpp-gpt2 --bench 2048 8192

The model (a checkpoint, or a preset with random weights) is exported with convert_hf.py to OUT/hf, converted by
llama.cpp's own convert_hf_to_gguf.py to an f32 GGUF, and given the metadata llama.cpp's loader needs where the
converter leaves it out (gguf_convert.py): OUT/model-f32.gguf, with the converter's and llama.cpp's logs in
OUT/llama-cpp.log. llama.cpp then runs in another process (llama_cpp_worker.py, in --llama-python, a Python with
llama-cpp-python), and the checks are:
  * its cache is MLA's latent: one key head of kv_lora_rank + qk_rope_head_dim values and no separate values;
  * it tokenizes a 64-token prompt as we do;
  * its logits at every prompt position equal ours to 1e-4 with an f32 cache and flash attention off;
  * its 20 greedy tokens after the prompt are ours.
llama.cpp's defaults (f16 cache, flash attention on, which casts even an f32 cache to f16 inside its graph) are
shown beside, not checked. A failed check is one error line and exit code 2, after the table.

--bench times batch-1 decode at each context: one token at slot context - 1, attending to every slot, the same
step again and again. Ours is the model's own Transformer.decode_step (absorbed MLA, float32) over a cache filled
with random values, as benchmarks/bench_decode.py does; llama.cpp's cache is prefilled with random tokens once per
configuration. Each round runs every side's --steps steps in turn, the order rotating from round to round, so that
a change in the machine's load touches all alike; medians and ranges over all steps, as a markdown table.
"""
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import gguf_convert  # noqa: E402
from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint  # noqa: E402
from cli import ArgumentParser, CLIError, number, positive_int, run  # noqa: E402
from decode_benchmark import random_cache, timed  # noqa: E402
from fileio import atomic_write, owned_directory, refuse_overwrite  # noqa: E402
from model import Transformer  # noqa: E402
from model_config import PRESETS, ModelConfig  # noqa: E402
from report import markdown_table, table_header, table_row  # noqa: E402
from tokenizer import VOCAB_SIZE, Tokenizer  # noqa: E402

WORKER = Path(__file__).resolve().with_name("llama_cpp_worker.py")
GGUF_FILE, LOG_FILE = "model-f32.gguf", "llama-cpp.log"
PROMPT = ("The keeper of the lighthouse counted the ships that passed each night and wrote their names in a book "
          "that nobody read. When the winter storms came she climbed the stairs twice as often, trimming the wick "
          "and wiping the glass, because a light that nobody sees is still a promise kept to strangers at sea. In "
          "spring the ships came back.")
PROMPT_TOKENS, GREEDY_TOKENS, TOLERANCE = 64, 20, 1e-4
CHECKED, DEFAULTS = "f32 cache, flash attention off", "f16 cache, flash attention on (llama.cpp's defaults)"
LLAMA_CONFIGS = {CHECKED: {"f32_cache": True, "flash_attn": False},
                 DEFAULTS: {"f32_cache": False, "flash_attn": True}}
OURS = "ours: Transformer.decode_step, float32"


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    model = p.add_mutually_exclusive_group(required=True)
    model.add_argument("--ckpt", help="an MLA checkpoint with GPT-2's vocabulary")
    model.add_argument("--preset", choices=sorted(PRESETS), help="a model of this preset with random weights, its "
                       "block_size raised to the largest --bench context")
    p.add_argument("--out-dir", required=True, help="where the export (OUT/hf), the GGUF and the log go")
    p.add_argument("--converter", help=f"llama.cpp's convert_hf_to_gguf.py (default: ${gguf_convert.CONVERTER_ENV})")
    p.add_argument("--llama-python", default=sys.executable, help="a Python where `import llama_cpp` works")
    p.add_argument("--threads", type=positive_int, default=torch.get_num_threads(), help="CPU threads of each side")
    p.add_argument("--bench", type=number(int, minimum=2), nargs="+", metavar="CONTEXT",
                   help="also time batch-1 decode at these contexts")
    p.add_argument("--rounds", type=positive_int, default=5, help="--bench: interleaved rounds per context")
    p.add_argument("--steps", type=positive_int, default=4, help="--bench: decode steps per round and side")
    p.add_argument("--force", action="store_true", help="replace the files this writes if they exist (never any "
                                                        "other file)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    converter = gguf_convert.find_converter(args.converter)
    if converter is None:
        raise CLIError(f"llama.cpp's convert_hf_to_gguf.py not found: pass --converter PATH or set "
                       f"{gguf_convert.CONVERTER_ENV} (it ships with llama.cpp, and in the llama-cpp-python sdist "
                       "under vendor/llama.cpp)")
    version = llama_cpp_version(args.llama_python)
    torch.set_num_threads(args.threads)
    out_dir = Path(args.out_dir)
    refuse_overwrite(out_dir, [GGUF_FILE, LOG_FILE], args.force, "a llama.cpp check")
    with owned_directory(out_dir, "a llama.cpp check"), tempfile.TemporaryDirectory(dir=out_dir) as scratch:
        scratch = Path(scratch)
        model, ckpt = model_to_check(args, scratch)
        print(f"llama-cpp-python {version} ({args.llama_python}), converter {converter}; torch {torch.__version__}; "
              f"{args.threads} thread(s) each; {cpu_name()}; load average {os.getloadavg()[0]:.1f}", flush=True)
        export(ckpt, out_dir / "hf", args.force)
        llama_log = scratch / "llama.log"
        convert_log = ""
        try:
            convert_log, gguf_path = make_gguf(converter, out_dir / "hf", model.config, out_dir / GGUF_FILE, scratch)
            with open(llama_log, "w") as log, llama_worker(args.llama_python, log) as llama:
                failures = check(llama, model, gguf_path, llama_log, args.threads)
                if args.bench:
                    bench(llama, model, gguf_path, args)
        finally:
            with atomic_write(out_dir / LOG_FILE) as tmp:
                tmp.write_text(convert_log + (llama_log.read_text(errors="replace") if llama_log.exists() else ""))
    if failures:
        raise CLIError(f"llama.cpp does not compute what this model computes: {'; '.join(failures)} "
                       f"(see {out_dir / LOG_FILE})")


def export(ckpt: Path, hf_dir: Path, force: bool) -> None:
    """convert_hf.py export of ckpt into hf_dir, in its own process (scripts never import one another); its error
    line becomes ours."""
    command = [sys.executable, str(REPO / "convert_hf.py"), "export", "--ckpt", str(ckpt), "--out-dir", str(hf_dir)]
    result = subprocess.run(command + ["--force"] * force, capture_output=True, text=True)
    if result.returncode:
        lines = result.stderr.strip().splitlines() or ["no message"]
        raise CLIError(f"convert_hf.py export failed: {lines[-1].removeprefix('error: ')}")


def llama_cpp_version(python: str) -> str:
    result = subprocess.run([python, "-c", "import llama_cpp; print(llama_cpp.__version__)"], capture_output=True,
                            text=True)
    if result.returncode != 0:
        raise CLIError(f"{python} cannot import llama_cpp: pass --llama-python with a Python that has "
                       "llama-cpp-python (pip install llama-cpp-python builds llama.cpp)")
    return result.stdout.strip()


def model_to_check(args, scratch: Path) -> tuple[Transformer, Path]:
    """The model to check, and a checkpoint of it to export: --ckpt's, or --preset's with random weights."""
    if args.ckpt:
        ckpt = Path(args.ckpt)
        model = model_from_checkpoint(load_checkpoint(ckpt))
    else:
        config = ModelConfig.from_preset(args.preset)
        config = replace(config, block_size=max(config.block_size, *(args.bench or [0])))
        torch.manual_seed(0)
        model = Transformer(config)
        ckpt = scratch / f"{args.preset}.pt"
        save_checkpoint({"model": model.state_dict(), "model_config": config.to_dict()}, ckpt)
    config = model.config
    if config.vocab_size < VOCAB_SIZE:
        raise CLIError(f"the model's vocabulary of {config.vocab_size} is not GPT-2's: llama.cpp's converter needs "
                       "the tokenizer files an export has only for GPT-2's vocabulary")
    too_long = [context for context in args.bench or [] if context > config.block_size]
    if too_long:
        raise CLIError(f"--bench {too_long[0]} is more than the model's block_size {config.block_size}")
    return model.eval(), ckpt


def make_gguf(converter: Path, hf_dir: Path, config: ModelConfig, target: Path, scratch: Path) -> tuple[str, Path]:
    """llama.cpp's GGUF of the export hf_dir at target, fixed where it needs to be -> (the converter's log, target)."""
    gguf = gguf_convert.gguf_package(converter)
    converted = scratch / "converted.gguf"
    begin = time.perf_counter()
    log = gguf_convert.convert(converter, hf_dir, converted)
    fixes = gguf_convert.needed_fixes(config, gguf_convert.read_metadata(gguf, converted)[0])
    with atomic_write(target) as tmp:
        if fixes:
            gguf_convert.rewrite(gguf, converted, tmp, fixes)
        else:
            os.replace(converted, tmp)
    added = ", ".join(f"{key} = {value:.9g}" for key, (_, value) in fixes.items()) or "none needed"
    print(f"{target}: converted in {time.perf_counter() - begin:.1f} s; metadata added: {added}", flush=True)
    return log, target


@contextmanager
def llama_worker(python: str, log):
    """A call(op, **arguments) -> reply to llama_cpp_worker.py, running in python with its log to the file log;
    an error reply is a CLIError."""
    process = subprocess.Popen([python, str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                               text=True)

    def call(op: str, **arguments) -> dict:
        process.stdin.write(json.dumps({"op": op, **arguments}) + "\n")
        process.stdin.flush()
        line = process.stdout.readline()
        if not line:
            raise CLIError(f"llama.cpp's process ended (exit code {process.wait()}) during {op}; its log is "
                           f"{LOG_FILE} in --out-dir")
        reply = json.loads(line)
        if "error" in reply:
            raise CLIError(f"llama.cpp: {reply['error']}")
        return reply

    try:
        yield call
    finally:
        process.stdin.close()
        process.wait()


# ---- the checks ---------------------------------------------------------------------------------

def check(llama, model: Transformer, gguf_path: Path, llama_log: Path, threads: int) -> list[str]:
    """Compare llama.cpp with model on the prompt, in each of LLAMA_CONFIGS, and print what was found (a markdown
    table) -> the checks that failed. llama_log is llama.cpp's log, beside which its logits are saved a moment."""
    config, tokenizer = model.config, Tokenizer()
    prompt = tokenizer.encode(PROMPT)[:min(PROMPT_TOKENS, config.block_size)]
    greedy_prompt = prompt[:config.block_size - GREEDY_TOKENS]  # prompt + new tokens within block_size
    with torch.no_grad():
        ours = model(torch.tensor([prompt]))[0][0]
        ours_greedy = model.generate(torch.tensor([greedy_prompt]), GREEDY_TOKENS, temperature=0,
                                     vocab_limit=VOCAB_SIZE)[0, len(greedy_prompt):].tolist()
    failures, rows = [], []
    for name, options in LLAMA_CONFIGS.items():
        llama("load", name=name, gguf=str(gguf_path), n_ctx=256, threads=threads, all_logits=True, **options)
        if name == CHECKED:
            failures += check_cache_and_tokenizer(llama, name, config, llama_log, tokenizer)
        logits_file = llama_log.with_name("logits.npy")
        llama("logits", name=name, tokens=prompt, path=str(logits_file))
        theirs = torch.from_numpy(np.load(logits_file))
        greedy = llama("greedy", name=name, tokens=greedy_prompt, n=GREEDY_TOKENS, vocab_limit=VOCAB_SIZE)["tokens"]
        llama("free", name=name)
        difference = (theirs - ours).abs().max().item()
        same = "identical" if greedy == ours_greedy else f"differ from token {first_difference(greedy, ours_greedy)}"
        rows.append([name, f"{difference:.2g}", f"{(theirs.argmax(-1) == ours.argmax(-1)).float().mean():.1%}", same])
        if name == CHECKED and difference > TOLERANCE:
            failures.append(f"logits differ by up to {difference:.2g} (more than {TOLERANCE:g})")
        if name == CHECKED and greedy != ours_greedy:
            failures.append(f"greedy tokens {same}")
    print(f"\nllama.cpp against this model: {len(prompt)}-token prompt, logits at every position "
          f"({len(prompt)} x {config.vocab_size}), then {GREEDY_TOKENS} greedy tokens (logit std "
          f"{ours.std():.2f})\n")
    print(markdown_table(["llama.cpp", "max abs logit difference", "same argmax", f"{GREEDY_TOKENS} greedy tokens"],
                         rows), flush=True)
    return failures


def check_cache_and_tokenizer(llama, name: str, config: ModelConfig, llama_log: Path, tokenizer) -> list[str]:
    """Check, from llama.cpp's log, that its cache is MLA's latent, and that it tokenizes PROMPT as we do; print
    what it found -> the checks that failed."""
    log = llama_log.read_text(errors="replace")
    heads = dict(re.findall(r"print_info: (n_head_kv|n_embd_head_k|n_embd_head_v)\s+= (\d+)", log))
    values = re.search(r"llama_kv_cache: size = .*, V \(\w+\):\s+([\d.]+) MiB", log)
    latent = {"n_head_kv": "1", "n_embd_head_k": f"{config.kv_lora_rank + config.qk_rope_head_dim}",
              "n_embd_head_v": f"{config.kv_lora_rank}"}
    failures = []
    if heads == latent and values and float(values.group(1)) == 0:
        print(f"llama.cpp's cache: one key head of {latent['n_embd_head_k']} = {config.kv_lora_rank} + "
              f"{config.qk_rope_head_dim} values per token and layer, no separate values: MLA's latent")
    else:
        failures.append(f"llama.cpp's cache is not MLA's latent ({heads}, values {values and values.group(1)} MiB)")
    if llama("tokenize", name=name, text=PROMPT)["ids"] != tokenizer.encode(PROMPT):
        failures.append("llama.cpp tokenizes the prompt differently")
    else:
        print(f"llama.cpp tokenizes the prompt ({len(tokenizer.encode(PROMPT))} tokens) as we do")
    return failures


def first_difference(a: list[int], b: list[int]) -> int:
    return next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)


# ---- decode speed -------------------------------------------------------------------------------

def bench(llama, model: Transformer, gguf_path: Path, args) -> None:
    """Batch-1 decode tok/s of ours and of llama.cpp's LLAMA_CONFIGS at each --bench context, as table rows."""
    print(f"\nbatch-1 decode, {args.rounds} rounds of {args.steps} steps a side, interleaved; load average "
          f"{os.getloadavg()[0]:.1f}\n")
    print(table_header(["context", "decode", "tok/s (median)", "tok/s (min–max)", "ms/step (median)",
                        "prefill s"]), flush=True)
    for context in args.bench:
        for side, (seconds, prefill) in bench_context(llama, model, gguf_path, context, args).items():
            median, fastest, slowest = statistics.median(seconds), min(seconds), max(seconds)
            print(table_row([f"{context}", side, f"{1 / median:.2f}", f"{1 / slowest:.2f}–{1 / fastest:.2f}",
                             f"{1e3 * median:.0f}", prefill]), flush=True)
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


def bench_context(llama, model: Transformer, gguf_path: Path, context: int, args) -> dict:
    """side -> (seconds of each timed step, llama.cpp's prefill time) at context."""
    tokens = torch.randint(VOCAB_SIZE, (context - 1,), generator=torch.Generator().manual_seed(context)).tolist()
    token, position = tokens[-1], context - 1
    prefill = {OURS: "– (cache filled at random)"}
    for name, options in LLAMA_CONFIGS.items():
        llama("load", name=name, gguf=str(gguf_path), n_ctx=context, threads=args.threads, all_logits=False,
              **options)
        prefill[name] = f"{llama('prefill', name=name, tokens=tokens)['seconds']:.1f}"
    cache = random_cache(model, 1, context)
    ours_token = torch.tensor([[token]])

    def steps(side: str, count: int) -> list[float]:
        if side == OURS:
            return [timed(model.decode_step, ours_token, cache, position, absorb=True) for _ in range(count)]
        return llama("steps", name=side, token=token, position=position, count=count)["seconds"]

    sides = [OURS, *LLAMA_CONFIGS]
    for side in sides:
        steps(side, 1)  # warm-up, not timed
    seconds = {side: [] for side in sides}
    for r in range(args.rounds):
        for side in sides[r % len(sides):] + sides[:r % len(sides)]:
            seconds[side] += steps(side, args.steps)
    for name in LLAMA_CONFIGS:
        llama("free", name=name)
    return {side: (seconds[side], prefill[side]) for side in sides}


def cpu_name() -> str:
    try:
        names = re.findall(r"^model name\s*: (.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
    except OSError:
        names = []
    return f"{names[0] if names else 'CPU'} ({os.cpu_count()} logical CPUs)"


if __name__ == "__main__":
    run(main, memory_hint="use smaller --bench contexts")
