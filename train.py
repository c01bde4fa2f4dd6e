"""Train the language model, in one process or under torchrun with DistributedDataParallel.

    python train.py                                   # the shakespeare preset on data/shakespeare -> out/shakespeare
    python train.py --preset tiny --attention mha --max-iters 200 --out-dir out/tiny-mha
    python train.py --out-dir out/shakespeare --resume --max-iters 8000
    python train.py --init-from out/shakespeare/best.pt --out-dir out/yarn-512 --block-size 512 \\
        --rope-scaling yarn --rope-factor 4 --original-seq-len 128    # fine-tune at 4x the context with YaRN
    torchrun --standalone --nproc-per-node 8 train.py --preset gpt2-small --data-dir data/owt --out-dir out/gpt2

Every TrainConfig and ModelConfig field is a flag (--lr, --n-layer, ...). With --resume the checkpoint's configs
are the base and the flags given override them; the model's must still match the checkpoint's.
OUT receives ckpt.pt (latest), best.pt (lowest val loss), metrics.jsonl and, when matplotlib is installed, loss.png.
On first use, the default --data-dir (data/shakespeare) is downloaded and prepared (corpus.prepare_shakespeare,
as `python data_prepare.py` does). The run itself lives in training.py (TrainConfig, Trainer); this file is its
command line.
"""
import argparse
import os
import sys
import types
from dataclasses import fields, replace
from pathlib import Path

import corpus
from checkpoint import load_checkpoint, model_config_of
from cli import ArgumentParser, CLIError, finite_float, number, run, seed_int
from model_config import ATTENTION_KINDS, PRESETS, ModelConfig
from runtime import DEVICES, DTYPES, keep_freed_memory, pick_device
from training import RUN_FILES, TrainConfig, saved_train_config, train

CHOICES = {"attention": ATTENTION_KINDS, "device": DEVICES, "dtype": ("auto", *DTYPES)}
FLAG_TYPES = {float: finite_float, int: number(int), "seed": seed_int}  # by field name, else by the field's type
MODEL_HELP = {  # what each ModelConfig field without a help of its own means; its default comes from the preset
    "vocab_size": "token ids the model knows (GPT-2's 50257 padded to 50304)",
    "block_size": "longest sequence the model takes, and the training sequence length",
    "n_layer": "transformer blocks", "d_model": "width of the residual stream", "n_head": "attention heads",
    "attention": "mla (latent attention), mha or gqa", "n_kv_head": "key/value heads of gqa",
    "q_lora_rank": "MLA query compression rank (0: none)", "kv_lora_rank": "MLA key/value latent rank",
    "qk_nope_head_dim": "MLA per-head query/key dims without RoPE", "qk_rope_head_dim": "MLA per-head RoPE dims",
    "v_head_dim": "MLA per-head value dims", "rope_theta": "RoPE base", "ffn_hidden": "SwiGLU hidden width",
    "norm_eps": "RMSNorm epsilon", "dropout": "dropout probability while training",
    "tie_embeddings": "share the token embedding with the LM head",
}


def add_flags(parser: argparse.ArgumentParser, config_class, title: str, help_of) -> None:
    """One --flag per dataclass field; the parsed namespace holds only the flags given."""
    group = parser.add_argument_group(title)
    for f in fields(config_class):
        kind = f.type
        if isinstance(kind, types.UnionType):  # X | None
            kind = next(t for t in kind.__args__ if t is not type(None))
        flag = "--" + f.name.replace("_", "-")
        common = dict(dest=f.name, default=argparse.SUPPRESS, help=help_of(f))
        if kind is bool:
            group.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
        else:
            group.add_argument(flag, type=FLAG_TYPES.get(f.name, FLAG_TYPES.get(kind, kind)),
                               choices=CHOICES.get(f.name), **common)


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default=argparse.SUPPRESS,
                        help="model preset (default: shakespeare, or the checkpoint's model with --resume or "
                             "--init-from)")
    add_flags(parser, TrainConfig, "training",
              lambda f: f"{f.metadata['help']} (default: {f.default})")
    add_flags(parser, ModelConfig, "model (override the preset)",
              lambda f: f"{f.metadata.get('help') or MODEL_HELP[f.name]} (default: from the preset)")
    parser.add_argument("--force", action="store_true", help="start afresh over the run in --out-dir: its "
                        f"{', '.join(RUN_FILES)} are removed first (without it, such a run is refused)")
    return parser.parse_args(argv)


def configs_from_args(argv=None) -> tuple[TrainConfig, ModelConfig, dict | None, bool]:
    """TrainConfig and ModelConfig from the command line, the checkpoint the run starts from (read once here),
    and --force: with --resume the checkpoint's configs are the base and the flags given override them; with
    --init-from its model config is."""
    args = vars(parse_args(argv))
    force = args.pop("force")
    train_names = {f.name for f in fields(TrainConfig)}
    train_flags = {k: v for k, v in args.items() if k in train_names}
    model_flags = {k: v for k, v in args.items() if k not in train_names and k != "preset"}
    preset = args.get("preset")
    start = None
    try:
        if train_flags.get("resume"):
            out_dir = train_flags.setdefault("out_dir", TrainConfig.out_dir)
            start = load_checkpoint(Path(out_dir) / "ckpt.pt")
            saved = {k: v for k, v in saved_train_config(start).items() if k in train_names}
            try:
                TrainConfig(**saved)
            except (TypeError, ValueError) as err:
                raise CLIError(f"{Path(out_dir) / 'ckpt.pt'}: train_config: {err}") from None
            tc = TrainConfig(**saved | train_flags)
        else:
            tc = TrainConfig(**train_flags)
            start = load_checkpoint(tc.init_from) if tc.init_from else None
        base = (ModelConfig.from_preset(preset or "shakespeare") if preset or start is None
                else model_config_of(start))
        return tc, replace(base, **model_flags), start, force
    except (TypeError, ValueError) as err:
        raise CLIError(str(err)) from None


def prepare_default_data(tc: TrainConfig) -> None:
    """Download and prepare Tiny Shakespeare when the default data dir is asked for and is not there yet (in a
    single process: under torchrun, prepare it first)."""
    default = tc.data_dir == TrainConfig.data_dir and Path(tc.data_dir) == corpus.SHAKESPEARE_DIR
    if default and not Path(tc.data_dir).exists() and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        print(f"{tc.data_dir} is not there yet: preparing Tiny Shakespeare (once)")
        print(f"{tc.data_dir}: {corpus.summary(corpus.prepare_shakespeare())}")


def main(argv=None):
    tc, mc, start, force = configs_from_args(argv)
    prepare_default_data(tc)
    if pick_device(tc.device) == "cpu":
        keep_freed_memory()  # a CPU step's large buffers are reused instead of mapped afresh (runtime.py)
    stopped_by = train(tc, mc, start, force)
    if stopped_by:
        print(f"continue with: python train.py --resume --out-dir {tc.out_dir}", file=sys.stderr)
        sys.exit(128 + stopped_by)


if __name__ == "__main__":
    run(main, memory_hint="lower --batch-size (and raise --grad-accum to keep the tokens per step) or --block-size")
