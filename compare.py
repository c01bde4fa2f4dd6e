"""The controlled study: MLA against MHA, GQA and MQA (and MLA without query compression), trained the same way.

    python compare.py --data-dir data/shakespeare --preset shakespeare --out-dir out/study
    python compare.py --data-dir data/tiny --preset tiny --max-iters 50 --out-dir out/study-tiny

Every variant (model_config.VARIANTS) trains on the same data with the same seed, tokens, optimiser and schedule
(train.py's defaults plus the flags given here), then, on the device it trained on, is evaluated on the whole val
split (evaluation.evaluate, on best.pt) and benchmarked (decode_benchmark: decode at --bench-context, batch 1,
float32). The study writes OUT/study.md (a markdown table), OUT/study.json and, with matplotlib, OUT/study.png (val
loss against step per run; whole-val loss against cache size). Each run lives in OUT/<variant>-seed<seed>/ and checkpoints as it trains, so running the same command again
resumes where it stopped and skips what is done.
"""
import functools
import json
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch

import tokenizer
from checkpoint import load_checkpoint, model_from_checkpoint
from cli import ArgumentParser, CLIError, number, positive_int, run, seed_int
from dataset import PreparedData
from decode_benchmark import MEMORY_MARGIN, benchmark, cache_bytes
from evaluation import evaluate
from fileio import atomic_write, atomic_write_all, owned_directory, read_json, require
from model import Transformer
from model_config import PRESETS, VARIANTS, ModelConfig
from optim import OPTIMIZERS
from report import figure, markdown_table, save_figure
from runtime import available_memory, keep_freed_memory, pick_device
from training import TrainConfig, read_metrics, train

COLUMNS = {  # key -> (heading, format)
    "variant": ("variant", "{}"), "seed": ("seed", "{}"),
    "params_non_embedding": ("params (non-emb)", "{:,}"), "params_total": ("params (total)", "{:,}"),
    "val_loss": ("val loss (nats/token)", "{:.4f}"), "nats_per_char": ("nats/char", "{:.4f}"),
    "bits_per_byte": ("bits/byte", "{:.4f}"), "kv_cache_bytes_per_token_bf16": ("KV cache B/token (bf16)", "{:,}"),
    "train_tokens_per_sec": ("train tok/s", "{:,.0f}"), "decode_tokens_per_sec": ("decode tok/s @ctx", "{:,.1f}"),
    "wall_seconds": ("wall time (s)", "{:,.0f}"),
}
RESULT_KINDS = {"variant": str, "seed": int, "params_non_embedding": int, "params_total": int,
                "kv_cache_bytes_per_token_bf16": int}  # the other columns are numbers


def run_variant(name: str, mc: ModelConfig, tc: TrainConfig, bench_context: int) -> dict:
    """Train (or resume, or skip when done), evaluate and benchmark one variant -> its row of the table."""
    run_dir = Path(tc.out_dir)
    result_path = run_dir / "result.json"
    if result_path.exists():
        row = read_json(result_path)
        for key in COLUMNS:
            require(row.get(key), RESULT_KINDS.get(key, float), f"{result_path}: {key}")
        return row
    tc = replace(tc, resume=(run_dir / "ckpt.pt").exists())
    wall_seconds = timed_training(tc, mc, run_dir / "wall_seconds.json")
    device = pick_device(tc.device)  # where it trained
    model = model_from_checkpoint(load_checkpoint(run_dir / "best.pt")).to(device)
    data = PreparedData(tc.data_dir)
    scores = evaluate(model, data, "val", mc.block_size, batch_size=8, device=device)
    row = {"variant": name, "seed": tc.seed,
           "params_non_embedding": mc.non_embedding_params(), "params_total": mc.num_params(),
           "val_loss": scores["loss"], "nats_per_char": scores["loss"] * scores["tokens"] / val_characters(data),
           "bits_per_byte": scores["bits_per_byte"], "kv_cache_bytes_per_token_bf16": cache_bytes_per_token(model),
           "train_tokens_per_sec": training_tokens_per_sec(run_dir / "metrics.jsonl"),
           "decode_tokens_per_sec": decode_tokens_per_sec(mc, bench_context, device), "wall_seconds": wall_seconds,
           "val_tokens": scores["tokens"]}
    write_json_atomic(result_path, row)
    return row


def timed_training(tc: TrainConfig, mc: ModelConfig, clock_path: Path) -> float:
    """Train, adding this call's seconds to those recorded in clock_path by earlier, interrupted calls.
    Returns the run's total; a run stopped by a signal ends the study (exit 128 + signal)."""
    earlier = 0.0
    if clock_path.exists():
        earlier = require(read_json(clock_path).get("seconds"), float, f"{clock_path}: seconds", minimum=0)
    start = time.perf_counter()
    stopped_by = train(tc, mc)
    total = earlier + time.perf_counter() - start
    write_json_atomic(clock_path, {"seconds": total})
    if stopped_by:
        print("run the same command again to continue: finished runs are skipped and this one resumes",
              file=sys.stderr)
        raise SystemExit(128 + stopped_by)
    return total


def val_characters(data: PreparedData) -> int:
    """Unicode characters of the val split's text: its UTF-8 bytes less the continuation bytes (0b10xxxxxx)."""
    tokens = np.asarray(data.tokens("val"))
    tok = tokenizer.Tokenizer()
    chars = 0
    for start in range(0, len(tokens), 1 << 20):
        chunk = tokens[start:start + (1 << 20)]
        text = np.frombuffer(tok.decode_bytes(chunk[chunk != data.eot_id].tolist()), dtype=np.uint8)
        chars += int(((text & 0xC0) != 0x80).sum())
    return chars


def cache_bytes_per_token(model: Transformer) -> int:
    """Bytes per token of a real bfloat16 decode cache of the model."""
    capacity = 16
    return model.make_cache(1, capacity, dtype=torch.bfloat16).nbytes // capacity


def training_tokens_per_sec(metrics_path: Path) -> float:
    """Median training throughput over the run's logged windows (evaluation and saving excluded)."""
    return statistics.median(r["tokens_per_sec"] for r in read_metrics(metrics_path) if "loss" in r and r.get("tokens_per_sec"))


@functools.cache
def decode_tokens_per_sec(mc: ModelConfig, context: int, device: str) -> float:
    """Absorbed-cache decode throughput (MLA) or K/V-cache decode (MHA, GQA) at one context, batch 1, float32,
    of random weights: measured once per model config, so every seed of a variant shows the same measurement."""
    rows = benchmark(mc, contexts=[context], batches=[1], device=device, dtype=torch.float32)
    wanted = "mla absorbed" if mc.attention == "mla" else mc.attention
    return next(r["decode_tokens_per_s"] for r in rows if r["attention"] == wanted)


def summary_rows(rows: list[dict]) -> list[dict]:
    """One row per variant with each number averaged over seeds, and the val-loss spread between its seeds."""
    out = []
    for name in dict.fromkeys(r["variant"] for r in rows):
        group = [r for r in rows if r["variant"] == name]
        mean = {k: statistics.mean(r[k] for r in group) for k in COLUMNS if k not in ("variant", "seed")}
        spread = max(r["val_loss"] for r in group) - min(r["val_loss"] for r in group)
        out.append({**mean, "variant": name, "seed": "mean", "val_loss_seed_spread": spread})
    return out


def markdown(rows: list[dict], context: int) -> str:
    headings = [heading.replace("@ctx", f"@{context}") for heading, _ in COLUMNS.values()]
    cells = [[r[k] if isinstance(r[k], str) else fmt.format(r[k]) for k, (_, fmt) in COLUMNS.items()] for r in rows]
    return markdown_table(headings, cells)


def plot_study(rows: list[dict], run_dirs: list[Path], png_path: Path) -> None:
    """Left: each run's val-loss estimates against step (its metrics.jsonl), a colour per variant and a line style
    per seed. Right: each run's whole-val loss against its KV-cache bytes per token."""
    fig = figure(png_path, "val loss against step per run, and whole-val loss against cache size",
                 "run the same command again (finished runs are not retrained)", figsize=(11, 4), layout="constrained")
    if fig is None:
        return
    colours = {name: f"C{i}" for i, name in enumerate(VARIANTS)}
    styles = {seed: style for seed, style in zip(dict.fromkeys(r["seed"] for r in rows), ("-", "--", ":", "-."))}
    curves, costs = fig.subplots(1, 2)
    for row, run_dir in zip(rows, run_dirs):
        points = [(r["step"], r["val_loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if "val_loss" in r and r["step"] > 0]
        curves.plot(*zip(*points), styles.get(row["seed"], "-"), color=colours[row["variant"]], marker="o",
                    label=f"{row['variant']}, seed {row['seed']}")
        costs.scatter(row["kv_cache_bytes_per_token_bf16"], row["val_loss"], color=colours[row["variant"]])
        costs.annotate(f"{row['variant']} {row['seed']}", (row["kv_cache_bytes_per_token_bf16"], row["val_loss"]),
                       fontsize=7, xytext=(4, 2), textcoords="offset points")
    curves.set(xlabel="step", ylabel="val loss, 10-batch estimate (nats/token)", title="training")
    curves.legend(fontsize=7, ncol=2)
    sizes = sorted({r["kv_cache_bytes_per_token_bf16"] for r in rows})
    costs.set(xscale="log", xlabel="KV cache bytes per token (bf16, log scale)",
              ylabel="whole-val loss of best.pt (nats/token)", title="quality against cache")
    costs.set_xticks(sizes, [f"{size:,}" for size in sizes], minor=False)
    costs.minorticks_off()
    save_figure(fig, png_path)


def write_json_atomic(path: Path, obj) -> None:
    with atomic_write(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")


def parse_args(argv=None):
    p = ArgumentParser(description=__doc__)
    p.add_argument("--data-dir", default="data/shakespeare", help="prepared data (data_prepare.py's output)")
    p.add_argument("--preset", choices=sorted(PRESETS), default="shakespeare", help="model preset of every variant")
    p.add_argument("--out-dir", default="out/study", help="where the runs, study.md and study.json go")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="variants to run")
    p.add_argument("--seeds", type=seed_int, nargs="+", default=[1337, 1338], help="seeds each variant trains with")
    p.add_argument("--bench-context", type=number(int, minimum=2), default=2048,
                   help="context of the decode benchmark")
    for flag in ("--max-iters", "--eval-interval", "--eval-iters"):
        p.add_argument(flag, type=positive_int, help="override train.py's default")
    p.add_argument("--optimizer", choices=OPTIMIZERS, help="override train.py's default")
    return p.parse_args(argv)


def refuse_other_settings(out: Path, settings: dict) -> None:
    """A study directory holds one study: its runs resume and its rows are reused only with the same training and
    benchmark settings, recorded in OUT/settings.json by the first call."""
    path = out / "settings.json"
    if not path.exists():
        write_json_atomic(path, settings)
        return
    recorded = read_json(path)
    diffs = [f"{key} {recorded.get(key)!r} there, {value!r} now" for key, value in settings.items()
             if recorded.get(key) != value]
    if diffs:
        raise CLIError(f"{out} holds a study with other settings ({'; '.join(diffs)}); its rows would mix with "
                       "these: choose another --out-dir")


def check_bench_fits(config: ModelConfig, context: int, device: str) -> None:
    """Refuse, before anything trains, a --bench-context whose decode caches would not fit in memory here."""
    needs = max(cache_bytes(replace(config, **VARIANTS[variant]), 1, context, 4) for variant in ("mla", "mha", "gqa"))
    available = available_memory(torch.device(device))
    if available is not None and needs + MEMORY_MARGIN > available:
        raise CLIError(f"--bench-context {context}: a batch-1 float32 decode cache of that length needs "
                       f"{needs / 2**30:,.1f} GiB and {available / 2**30:,.1f} GiB are free here; choose a shorter one")


def study_configs(args) -> dict[tuple[str, int], tuple[ModelConfig, TrainConfig]]:
    """(variant, seed) -> the run's configs, all built (and so checked) before anything trains."""
    for flag, values in (("--seeds", args.seeds), ("--variants", args.variants)):
        if len(set(values)) < len(values):
            raise CLIError(f"{flag} names {', '.join(map(str, values))}: each only once")
    train_overrides = {k: getattr(args, k) for k in ("max_iters", "eval_interval", "eval_iters", "optimizer")
                       if getattr(args, k) is not None}
    try:
        base = TrainConfig(data_dir=args.data_dir, **train_overrides)
        models = {name: ModelConfig.from_preset(args.preset, **VARIANTS[name]) for name in args.variants}
    except ValueError as err:
        raise CLIError(str(err)) from None
    return {(name, seed): (models[name], replace(base, seed=seed, out_dir=str(Path(args.out_dir) / f"{name}-seed{seed}")))
            for seed in args.seeds for name in args.variants}


def main(argv=None):
    args = parse_args(argv)
    runs = study_configs(args)
    device = pick_device(next(iter(runs.values()))[1].device)
    if device == "cpu":
        keep_freed_memory()  # as train.py does
    PreparedData(args.data_dir)  # fail now, not after the first run, if the data is missing
    check_bench_fits(ModelConfig.from_preset(args.preset), args.bench_context, device)
    with owned_directory(args.out_dir, "a study") as out:
        study(args, runs, out)


def study(args, runs: dict, out: Path) -> None:
    """Train, evaluate and benchmark every run of runs in the study directory out, then write its table. A study
    that fails before any of its runs wrote anything leaves no settings.json behind either."""
    _, tc = next(iter(runs.values()))
    training = {k: v for k, v in asdict(tc).items() if k not in ("seed", "out_dir")}
    settings = out / "settings.json"
    new = not settings.exists()
    refuse_other_settings(out, {"preset": args.preset, "bench_context": args.bench_context, **training})
    try:
        run_all(args, runs, out)
    except BaseException:
        if new and [path.name for path in out.iterdir()] == ["settings.json"]:
            settings.unlink()
        raise


def run_all(args, runs: dict, out: Path) -> None:
    """Each run's row (trained, resumed or read back), then OUT/study.json, study.md and study.png."""
    rows = []
    for (name, seed), (mc, tc) in runs.items():
        print(f"== {name}, seed {seed}")
        rows.append(run_variant(name, mc, tc, args.bench_context))
    table = rows + summary_rows(rows) if len(args.seeds) > 1 else rows
    summary = {"preset": args.preset, "data_dir": args.data_dir, "bench_context": args.bench_context,
               "seeds": args.seeds, "torch": torch.__version__, "threads": torch.get_num_threads(), "rows": table}
    with atomic_write_all([out / "study.json", out / "study.md"]) as (json_tmp, markdown_tmp):  # both or neither
        json_tmp.write_text(json.dumps(summary, indent=2) + "\n")
        markdown_tmp.write_text(markdown(table, args.bench_context))
    plot_study(rows, [Path(tc.out_dir) for _, tc in runs.values()], out / "study.png")
    print(markdown(table, args.bench_context))


if __name__ == "__main__":
    run(main, memory_hint="use a smaller --preset")
