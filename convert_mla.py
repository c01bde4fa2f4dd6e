"""Convert a trained MHA, GQA or MQA checkpoint of this project into an MLA checkpoint (TransMLA's route), to
evaluate, sample, benchmark, export and heal like any MLA checkpoint.

    python convert_mla.py --ckpt out/gqa/best.pt --out out/gqa-mla.pt --kv-lora-rank 64 --rope-dim 16   # 960 B/token
    python convert_mla.py --ckpt out/gqa/best.pt --out out/gqa-svd.pt --kv-lora-rank 64 --decomposition svd
    python train.py --init-from out/gqa-mla.pt --out-dir out/gqa-healed --max-iters 100 --lr 1e-3 --warmup-iters 10

The steps, and which of them are exact, are in latent_conversion.py. Calibration runs the source over evenly
spaced windows of the train split of --data-dir (deterministic). The checkpoint holds "model", "model_config"
and "conversion": the options, each layer's retained energies and latent-norm fit, the time and peak memory.
"""
import resource
import time
from dataclasses import asdict
from pathlib import Path

from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from cli import ArgumentParser, positive_float, positive_int, run
from dataset import PreparedData
from fileio import refuse_overwrite
from latent_conversion import (
    DECOMPOSITIONS,
    LATENT_NORMS,
    ConvertOptions,
    add_source_arguments,
    check_kind,
    check_source,
    convert,
)


def report_table(report: dict) -> str:
    """The per-layer report as aligned text."""
    keys = list(report["layers"][0])
    lines = ["layer  " + "  ".join(f"{k:>18}" for k in keys)]
    for i, layer in enumerate(report["layers"]):
        lines.append(f"{i:>5}  " + "  ".join(f"{layer[k]:>18.4f}" for k in keys))
    return "\n".join(lines)


def alpha_value(text: str) -> float | str:
    """An argparse type for --alpha: auto, calibrated, or a positive number."""
    return text if text in ("auto", "calibrated") else positive_float(text)


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    add_source_arguments(p)
    p.add_argument("--out", required=True, help="MLA checkpoint to write")
    p.add_argument("--data-dir", default="data/shakespeare", help="prepared data (data_prepare.py's) to calibrate on: "
                                                                  "its train split")
    p.add_argument("--kv-lora-rank", type=positive_int, required=True, help="latent rank r (the cache holds r + "
                                                                            "rope dim values per layer)")
    p.add_argument("--rope-dim", type=positive_int, help="qk_rope_head_dim: an even divisor of the source's head_dim "
                                                         "(default: head_dim / 4)")
    p.add_argument("--decomposition", default="pca", choices=DECOMPOSITIONS,
                   help="pca: of calibration activations, with balancing; svd: weight-only (MHA2MLA's)")
    p.add_argument("--alpha", default="auto", type=alpha_value,
                   help="key/value balancing: auto (calibrated for pca, 1 for svd), calibrated, or a fixed factor "
                        "(1: none)")
    p.add_argument("--latent-norm", default="fit", choices=LATENT_NORMS,
                   help="fit: kv_a_layernorm with least-squares weights; fit-full: weights 1 and kv_b_proj refitted")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    out = Path(args.out)
    refuse_overwrite(out.parent, [out.name], args.force, "a checkpoint")
    start = time.perf_counter()
    source = model_from_checkpoint(load_checkpoint(args.ckpt))
    check_kind(source.config)
    opts = ConvertOptions(kv_lora_rank=args.kv_lora_rank, rope_dim=args.rope_dim or source.config.head_dim // 4,
                          decomposition=args.decomposition, alpha=args.alpha,
                          latent_norm=args.latent_norm, calib_tokens=args.calib_tokens, batch_size=args.batch_size)
    check_source(source.config, opts)  # before reading the data
    model, report = convert(source, PreparedData(args.data_dir), opts)
    seconds = time.perf_counter() - start
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    report |= {"seconds": seconds, "peak_rss_bytes": peak_rss, "source": str(args.ckpt), "options": asdict(opts)}
    out.parent.mkdir(parents=True, exist_ok=True)
    save_checkpoint({"model": model.state_dict(), "model_config": model.config.to_dict(), "conversion": report}, out)
    print(report_table(report))
    c, values = model.config, report["cache_values_per_token_per_layer"]
    source_values = report["source_cache_values_per_token_per_layer"]
    print(f"wrote {out}: MLA kv_lora_rank {c.kv_lora_rank}, qk_rope_head_dim {c.qk_rope_head_dim}; cache "
          f"{values * c.n_layer * 2:,} B/token in bf16 (source {source_values * c.n_layer * 2:,}); "
          f"{report['calibration_tokens']:,} calibration tokens; {seconds:.1f} s, peak RSS {peak_rss / 2**20:,.0f} MiB")


if __name__ == "__main__":
    run(main, memory_hint="lower --batch-size")
