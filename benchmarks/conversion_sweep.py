"""One-shot (no healing) whole-val loss of one MHA/GQA/MQA source converted to MLA under many options: ranks, rope
widths, the two decompositions, balancing, the latent-norm fits, and the latent norm taken out (measured only:
what the norm costs; such a model is never saved, as it is not DeepSeek-V3's MLA). One calibration pass for the
moments and one for every variant's latent norm together, then latent_conversion's math, as convert_mla.py runs
it. Writes JSON lines: a header (the source, its loss, the calibration's seconds), then one line a variant.

    python benchmarks/conversion_sweep.py --ckpt out/src-gqa/best.pt --data-dir data/shakespeare --out oneshot-gqa.jsonl
"""
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from checkpoint import load_checkpoint, model_from_checkpoint  # noqa: E402
from cli import ArgumentParser, run  # noqa: E402
from dataset import PreparedData  # noqa: E402
from evaluation import evaluate  # noqa: E402
from fileio import atomic_write, refuse_overwrite  # noqa: E402
from latent_conversion import (  # noqa: E402
    ConvertOptions,
    add_source_arguments,
    calibration_windows,
    check_kind,
    convert_layers,
    fit_latent_norms,
    input_moments,
    mla_model,
    norm_moments,
)

NO_NORM = "none"  # a variant's latent_norm: kv_a_layernorm replaced by the identity, for this measurement only


def variants(config) -> list[dict]:
    """Every variant's options: rank and rope-dim sweeps, the decompositions, balancing, latent norms."""
    d, G = config.head_dim, config.kv_heads
    out = []

    def add(r, dr, **options):
        if 1 <= r <= 2 * G * d - dr:
            out.append(dict(kv_lora_rank=r, rope_dim=dr, **options))

    for r in (8, 16, 32, 64, 96, 128, 192, 256):
        add(r, 16)
    for r, dr in ((72, 8), (48, 32), (40, 8), (16, 32)):  # 960 and 576 B/token with other rope dims
        add(r, dr)
    add(64, 16, decomposition="svd")
    add(32, 16, decomposition="svd")
    add(64, 16, alpha=1.0)  # PCA without balancing
    add(64, 16, decomposition="svd", alpha="calibrated")  # weight-only SVD after calibrated balancing
    for norm in (NO_NORM, "fit-full"):
        add(64, 16, latent_norm=norm)
        add(32, 16, latent_norm=norm)
    add(2 * G * d - 16, 16, latent_norm=NO_NORM)  # full rank, no norm: partial RoPE's loss alone
    add(2 * G * d - 16, 16)  # full rank with the norm: partial RoPE + the norm
    if G == 1:
        add(d, d, latent_norm=NO_NORM)  # MQA, whole head as k_rope: exact
        add(d, d)
    return out


def main(argv=None):
    p = ArgumentParser(description=__doc__)
    add_source_arguments(p)
    p.add_argument("--data-dir", required=True, help="prepared data: calibration on train, loss on val")
    p.add_argument("--out", required=True, help="JSON lines file to write")
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    args = p.parse_args(argv)
    out = Path(args.out)
    refuse_overwrite(out.parent, [out.name], args.force, "a sweep")
    source = model_from_checkpoint(load_checkpoint(args.ckpt))
    config = source.config
    check_kind(config)
    data = PreparedData(args.data_dir)
    start = time.perf_counter()
    windows = calibration_windows(data, config.block_size, args.calib_tokens)
    moments = input_moments(source, windows, args.batch_size)
    moment_seconds = time.perf_counter() - start
    built = []
    for variant in variants(config):
        options = {k: v for k, v in variant.items() if k != "latent_norm"}
        opts = ConvertOptions(**options, calib_tokens=args.calib_tokens, batch_size=args.batch_size)
        built.append((variant, variant.get("latent_norm", "fit"), *convert_layers(source, moments, opts)))
    normed = [b for b in built if b[1] != NO_NORM]
    start = time.perf_counter()
    stats = iter(norm_moments(source, windows, [layers for _, _, layers, _ in normed], args.batch_size))
    norm_seconds = time.perf_counter() - start
    source_loss = evaluate(source, data, "val", config.block_size, 8, "cpu")["loss"]
    lines = [{"source": args.ckpt, "source_val_loss": source_loss, "moment_seconds": moment_seconds,
              "norm_pass_seconds_all_variants": norm_seconds, "calib_tokens": int(windows.numel()),
              "n_variants": len(built)}]
    for variant, norm, layers, reports in built:
        if norm != NO_NORM:
            layers = fit_latent_norms(layers, reports, next(stats), norm)  # normed's order is built's
        model = mla_model(source, layers)
        if norm == NO_NORM:
            for block in model.layers:
                block.self_attn.kv_a_layernorm = torch.nn.Identity()
        loss = evaluate(model, data, "val", config.block_size, 8, "cpu")["loss"]
        cache_bytes = 2 * config.n_layer * model.config.kv_cache_values_per_token_per_layer()
        lines.append({"variant": variant, "val_loss": loss, "gap": loss - source_loss, "cache_bytes_per_token_bf16": cache_bytes,
                      "mean": {k: sum(r[k] for r in reports) / len(reports) for k in reports[0]}, "layers": reports})
        print(f"{json.dumps(variant)}: {loss:.4f} (gap {loss - source_loss:+.4f})", flush=True)
    with atomic_write(out) as tmp:
        tmp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    print(f"wrote {out}: {len(built)} variants")


if __name__ == "__main__":
    run(main, memory_hint="lower --batch-size")
