"""Tokenize text with GPT-2's BPE into flat uint16 token files for training: the command line of corpus.py.

  python data_prepare.py --input PATH [PATH ...] --out-dir DIR [--val-fraction 0.1] [--seed S] [--workers N] [--force]
  python data_prepare.py   # downloads Tiny Shakespeare to data/shakespeare/input.txt (or OUT/input.txt) and prepares it

Inputs: a .txt file is one document; a directory stands for every .txt below it, sorted; a .jsonl file holds
one document per line in its "text" field (blank lines are skipped); .txt.gz and .jsonl.gz are read as they
decompress. Each document is followed by <|endoftext|> (id 50256); documents without text are skipped.

Split: a single document is cut at a token position: the last val-fraction of its tokens, then its separator,
go to val. Several documents are split whole: after a seeded shuffle, val takes documents until they hold
val-fraction of all tokens, leaving at least one document on each side.

Invalid UTF-8 is rejected with the file and byte offset (counted in the decompressed bytes of a .gz), never
replaced: altered text would break the exact round trip and the bits-per-byte accounting. NUL bytes (a binary
file) are rejected the same way.

Output in DIR: train.bin and val.bin (uint16 token ids, readable with np.memmap) and meta.json (tokenizer,
token counts and UTF-8 text bytes per split, source files with sizes and sha256, split settings), read by
dataset.PreparedData. All three are written to temporary files and renamed on success; a failure or Ctrl-C
leaves nothing behind, and an already prepared DIR is replaced only with --force.
"""
import os
from pathlib import Path

import cli
import corpus
import fileio
import tokenizer


def main(argv=None):
    """Prepare --input (or Tiny Shakespeare) into --out-dir."""
    args = parse_args(argv)
    if not 0 < args.val_fraction < 1:
        raise cli.CLIError(f"--val-fraction must be between 0 and 1, got {args.val_fraction}")
    if args.input and not args.out_dir:
        raise cli.CLIError("--out-dir is required with --input")
    out_dir = Path(args.out_dir or corpus.SHAKESPEARE_DIR)
    fileio.refuse_overwrite(out_dir, corpus.DATA_FILES, args.force, "prepared data")
    files = corpus.expand_inputs(args.input) if args.input else [corpus.fetch_shakespeare(out_dir / "input.txt")]
    tok = tokenizer.Tokenizer(args.tokenizer_file)
    meta = corpus.prepare(files, out_dir, tok, args.val_fraction, args.seed, args.workers, args.force)
    print(f"{out_dir}: {corpus.summary(meta)}")


def parse_args(argv):
    parser = cli.ArgumentParser(description=__doc__)
    parser.add_argument("--input", nargs="+", metavar="PATH", help=f"{', '.join(corpus.INPUT_SUFFIXES)} files or directories "
                        "(default: download Tiny Shakespeare)")
    parser.add_argument("--out-dir", metavar="DIR", help=f"output directory (without --input: {corpus.SHAKESPEARE_DIR})")
    parser.add_argument("--val-fraction", type=cli.finite_float, default=corpus.VAL_FRACTION, help="share of tokens for val")
    parser.add_argument("--seed", type=cli.seed_int, default=corpus.SPLIT_SEED, help="seed of the document shuffle")
    parser.add_argument("--workers", type=cli.positive_int, default=os.cpu_count() or 1, help="encoding threads")
    parser.add_argument("--force", action="store_true", help="replace an already prepared --out-dir's three files "
                        "(nothing else in it)")
    tokenizer.add_argument(parser)
    return parser.parse_args(argv)


if __name__ == "__main__":
    cli.run(main, memory_hint="lower --workers")
