"""llama.cpp's side of benchmarks/llama_cpp.py, run by it as a separate process with a Python that has
llama-cpp-python (and needs nothing of this project's, nor torch): llama.cpp's OpenMP threads and torch's then
never share a process.

It reads one JSON request per line on stdin and answers each with one JSON line on stdout; llama.cpp logs to
stderr. A request is {"op": ..., "name": MODEL, ...}; a reply holds its results, or "error".
"""
import json
import sys
import time
from pathlib import Path

# This file's directory holds benchmarks/llama_cpp.py, which would shadow the llama_cpp package.
sys.path = [entry for entry in sys.path if Path(entry or ".").resolve() != Path(__file__).resolve().parent]
import llama_cpp  # noqa: E402
import numpy as np  # noqa: E402

MODELS = {}


def load(name, gguf, n_ctx, threads, f32_cache, flash_attn, all_logits):
    """Load the GGUF as MODELS[name], with an f32 cache or llama.cpp's f16; all_logits keeps every position's
    logits (for logits and greedy; an (n_ctx, vocab) array), else none."""
    cache_type = llama_cpp.GGML_TYPE_F32 if f32_cache else llama_cpp.GGML_TYPE_F16
    begin = time.perf_counter()
    MODELS[name] = llama_cpp.Llama(gguf, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                   flash_attn=flash_attn, type_k=cache_type, type_v=cache_type,
                                   logits_all=all_logits, seed=0, verbose=True)
    return {"seconds": time.perf_counter() - begin, "version": llama_cpp.__version__}


def tokenize(name, text):
    return {"ids": MODELS[name].tokenize(text.encode("utf-8"), add_bos=False, special=False)}


def logits(name, tokens, path):
    """Evaluate tokens from an empty cache and save the logits of every position (len(tokens), vocab) to path."""
    model = MODELS[name]
    model.reset()
    model.eval(tokens)
    np.save(path, np.asarray(model.scores[:len(tokens)], dtype=np.float32))
    return {}


def greedy(name, tokens, n, vocab_limit):
    """n tokens after the prompt tokens, each the argmax of the ids below vocab_limit."""
    model = MODELS[name]
    model.reset()
    model.eval(tokens)
    new = []
    for _ in range(n):
        new.append(int(np.argmax(model.scores[model.n_tokens - 1][:vocab_limit])))
        model.eval(new[-1:])
    return {"tokens": new}


def prefill(name, tokens):
    model = MODELS[name]
    model.reset()
    begin = time.perf_counter()
    model.eval(tokens)
    return {"seconds": time.perf_counter() - begin}


def steps(name, token, position, count):
    """Seconds of count decode steps, each of token at slot position (attending to position + 1 slots): before each,
    the cache is cut back to position slots (eval drops the slots from n_tokens on)."""
    model = MODELS[name]
    seconds = []
    for _ in range(count):
        model.n_tokens = position
        begin = time.perf_counter()
        model.eval([token])
        seconds.append(time.perf_counter() - begin)
    return {"seconds": seconds}


def free(name):
    MODELS.pop(name).close()
    return {}


OPS = {op.__name__: op for op in (load, tokenize, logits, greedy, prefill, steps, free)}


def main():
    replies = sys.stdout
    sys.stdout = sys.stderr  # llama-cpp-python prints too; only replies go to the reply channel
    for line in sys.stdin:
        request = json.loads(line)
        op = OPS[request.pop("op")]
        try:
            reply = op(**request)
        except Exception as err:  # the caller reports it, in one line
            reply = {"error": f"{op.__name__}: {type(err).__name__}: {err}"}
        sys.stderr.flush()
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


if __name__ == "__main__":
    main()
