"""data_prepare.py's throughput and peak memory, against single-threaded tiktoken on the same text, in one run.

  python benchmarks/bench_data_prepare.py [--size-mb 200] [--rounds 3]

Writes a deterministic corpus (made-up words, Zipf-distributed, in lines and paragraphs) to a temporary
directory. Each round times tiktoken's encode_ordinary on it on one thread; then tiktoken alone on all cores (the
text read into memory first: the most data_prepare.py could reach on this machine at that moment); then runs
data_prepare.py on it as a subprocess with all cores and reads the subprocess's peak RSS and CPU time. The two take turns, so that a slow
spell of a shared machine hits both alike; the round with the median speed-up is reported, with the range of
speed-ups. It also shows how many cores data_prepare.py kept busy (its CPU seconds over wall-clock seconds).
"""
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import tokenizer  # noqa: E402
from cli import ArgumentParser, CLIError, positive_int, run  # noqa: E402
from report import markdown_table  # noqa: E402
from runtime import check_memory  # noqa: E402

BASELINE_PIECE_CHARS = 1 << 20


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=positive_int, default=200, help="corpus size in MB")
    parser.add_argument("--rounds", type=positive_int, default=3, help="turns each side takes")
    args = parser.parse_args(argv)
    size = args.size_mb * 10**6
    with tempfile.TemporaryDirectory() as tmp:
        # The corpus, each round's prepared copy (2 bytes a token, about half the text's bytes) on disk; the whole
        # text in memory for the all-threads baseline.
        if shutil.disk_usage(tmp).free < size * (1 + args.rounds):
            raise CLIError(f"--size-mb {args.size_mb}: the corpus and {args.rounds} prepared copies need about "
                           f"{size * (1 + args.rounds) / 10**9:,.1f} GB, more than {tmp} has free")
        check_memory(2 * size, "cpu", f"a {args.size_mb} MB corpus held in memory as text")
        corpus = Path(tmp) / "corpus.txt"
        write_corpus(corpus, size)
        size_mb = corpus.stat().st_size / 10**6
        rounds = [(time_single_thread(corpus), *run_data_prepare(corpus, Path(tmp) / f"prepared{i}"),
                   time_all_threads(corpus)) for i in range(args.rounds)]
    rounds.sort(key=lambda r: r[0] / r[1])  # by speed-up: single-thread seconds over data_prepare's
    single_s, prepare_s, prepare_cpu_s, peak_rss, threads_s = rounds[len(rounds) // 2]
    cores = os.cpu_count()
    print(markdown_table([f"{size_mb:.0f} MB corpus, median of {args.rounds} rounds", "MB/s", "cores busy", "peak RSS"], [
        ["tiktoken encode_ordinary, 1 thread (encoding only)", f"{size_mb / single_s:.2f}", "", ""],
        [f"tiktoken encode_to_numpy, {cores} threads (encoding only, text in memory)", f"{size_mb / threads_s:.2f}",
         "", ""],
        [f"data_prepare.py --workers {cores} (whole run, wall clock)", f"{size_mb / prepare_s:.2f}",
         f"{prepare_cpu_s / prepare_s:.2f}", f"{peak_rss / 10**6:.0f} MB"]]))
    print(f"speed-up over one thread: {single_s / prepare_s:.2f}x (goal >= 1.7x on 2 cores; rounds "
          f"{', '.join(f'{r[0] / r[1]:.2f}x' for r in rounds)}); peak RSS goal < 500 MB")
    print(f"tiktoken alone on {cores} threads in the same rounds: "
          f"{', '.join(f'{r[0] / r[4]:.2f}x' for r in rounds)}")


def write_corpus(path: Path, size_bytes: int, seed: int = 0):
    """Deterministic English-like text of about size_bytes: lines of Zipf-distributed made-up words."""
    rng = np.random.default_rng(seed)
    syllables = ["ka", "lo", "mi", "ne", "ru", "sa", "te", "vo", "an", "el", "is", "or", "th", "st", "ing", "er"]
    vocabulary = np.array(["".join(rng.choice(syllables, size=rng.integers(1, 5))) for _ in range(20_000)])
    vocabulary[rng.random(len(vocabulary)) < 0.1] += ","
    weights = 1 / np.arange(1, len(vocabulary) + 1)
    weights /= weights.sum()
    written = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < size_bytes:
            lines = vocabulary[rng.choice(len(vocabulary), size=(10_000, 12), p=weights)]
            block = "\n".join(" ".join(line) for line in lines) + ".\n\n"
            written += f.write(block)


def read_pieces(corpus: Path):
    """The corpus's text in pieces of about BASELINE_PIECE_CHARS, cut at line ends."""
    with open(corpus, encoding="utf-8") as f:
        while piece := f.read(BASELINE_PIECE_CHARS) + f.readline():
            yield piece


def time_single_thread(corpus: Path) -> float:
    """Seconds tiktoken's encode_ordinary takes over the corpus, one thread."""
    tok = tokenizer.Tokenizer()
    elapsed = 0.0
    for piece in read_pieces(corpus):
        start = time.perf_counter()
        tok.encode(piece)
        elapsed += time.perf_counter() - start
    return elapsed


def time_all_threads(corpus: Path) -> float:
    """Seconds tiktoken's encode_to_numpy takes over the corpus's pieces on one thread per core, all of the
    text read into memory beforehand: tokenizing alone, with nothing else to do."""
    tok = tokenizer.Tokenizer()
    pieces = list(read_pieces(corpus))
    start = time.perf_counter()
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        for _ in pool.map(tok.encode_to_numpy, pieces):
            pass
    return time.perf_counter() - start


def run_data_prepare(corpus: Path, out_dir: Path) -> tuple[float, float, int]:
    """Wall-clock and CPU seconds of a data_prepare.py run on all cores, and the peak RSS in bytes of the largest
    run so far."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / "data_prepare.py"), "--input", str(corpus), "--out-dir",
                           str(out_dir)], cwd=REPO, stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise CLIError(f"data_prepare.py failed: {(done.stderr.strip().splitlines() or ['no message'])[-1]}")
    elapsed = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime - before.ru_utime - before.ru_stime
    return elapsed, cpu, usage.ru_maxrss * 1024  # Linux reports ru_maxrss in KiB


if __name__ == "__main__":
    run(main, memory_hint="lower --size-mb")
