"""The prepared-data format that data_prepare.py writes and training and evaluation read: meta.json beside flat
uint16 token files train.bin and val.bin (results/data-prepare.md has the format with an example)."""
from pathlib import Path

import numpy as np

import cli
import fileio

DATA_FORMAT_VERSION = 1
SPLITS = ("train", "val")


class PreparedData:
    """A directory written by data_prepare.py: its meta.json and memory-mapped train/val token files."""

    def __init__(self, data_dir):
        self.data_dir = Path(data_dir)
        if not self.data_dir.is_dir():
            relative = "" if self.data_dir.is_absolute() else f" (a relative path, from {Path.cwd()})"
            raise cli.CLIError(f"{self.data_dir}: no such data directory{relative}; prepare it with data_prepare.py, "
                               "or pass the --data-dir it was prepared into")
        self.meta = _read_meta(self.data_dir / "meta.json")
        self.vocab_size = self.meta["vocab_size"]
        self.eot_id = self.meta["eot_id"]
        self._tokens = {split: _open_tokens(self.data_dir / f"{split}.bin", self.meta["splits"][split]["tokens"])
                        for split in SPLITS}

    def tokens(self, split: str) -> np.memmap:
        """The split's uint16 token ids."""
        return self._tokens[split]

    def text_bytes(self, split: str) -> int:
        """UTF-8 bytes of the text behind the split's tokens, separators excluded (for bits per byte)."""
        return self.meta["splits"][split]["text_bytes"]

    def get_batch(self, split, batch_size, block_size, generator, device="cpu"):
        """Random (x, y) int64 tensors of shape (batch_size, block_size); y is x one token ahead.

        Start offsets come from torch.randint with generator (a torch.Generator), so restoring
        generator.get_state() replays the same batches.
        """
        import torch  # here, not at the top: preparing data needs no torch and starts faster and leaner without it

        data = self._tokens[split]
        if len(data) < block_size + 1:
            raise cli.CLIError(f"the {split} split has {len(data)} tokens, not the block_size + 1 ({block_size + 1}) "
                               "a batch needs")
        starts = torch.randint(len(data) - block_size, (batch_size,), generator=generator).numpy()
        windows = torch.from_numpy(self._checked(split, data[starts[:, None] + np.arange(block_size + 1)]))
        x, y = windows[:, :-1].contiguous(), windows[:, 1:].contiguous()
        if torch.device(device).type == "cuda":
            return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
        return x.to(device), y.to(device)

    def _checked(self, split: str, tokens: np.ndarray) -> np.ndarray:
        """tokens (read from the split's file) as int64, refused when one is past the vocabulary."""
        if tokens.size and int(tokens.max()) >= self.vocab_size:
            raise cli.CLIError(f"{self.data_dir / f'{split}.bin'} holds token id {int(tokens.max())}, past the "
                               f"vocabulary of {self.vocab_size} that meta.json gives: the file is corrupt")
        return tokens.astype(np.int64)

    def eval_windows(self, split, block_size, stride=None):
        """1-D int64 (x, y) windows of length block_size that score every target of the split exactly once.

        y is -1 where a target is not scored. Windows start every stride tokens (default block_size: no overlap);
        each window after the first scores only its last stride targets, so each gets at least
        block_size - stride tokens of context. The last window is padded with x = 0, y = -1.
        """
        import torch

        stride = stride or block_size
        if not 0 < stride <= block_size:
            raise cli.CLIError(f"eval stride must be between 1 and block_size ({block_size}), got {stride}")
        data = self._tokens[split]
        last_start = max(len(data) - 1 - block_size, 0)
        for start in range(0, last_start + stride, stride):
            window = self._checked(split, data[start : start + block_size + 1])
            x = np.zeros(block_size, dtype=np.int64)
            y = np.full(block_size, -1, dtype=np.int64)
            x[: min(len(window), block_size)] = window[:block_size]
            y[: len(window) - 1] = window[1:]
            if start > 0:
                y[: block_size - stride] = -1  # scored by the previous window
            yield torch.from_numpy(x), torch.from_numpy(y)


def _read_meta(path: Path) -> dict:
    """meta.json, checked: its format version, dtype and every field the reader uses, by type and range."""
    if not path.is_file():
        raise cli.CLIError(f"{path}: missing; prepare the data with data_prepare.py first")
    meta = fileio.read_json(path)
    version = meta.get("format_version")
    if not fileio.is_of(version, int) or version != DATA_FORMAT_VERSION:
        raise cli.CLIError(f"{path}: unknown format_version {version!r} (this code reads {DATA_FORMAT_VERSION})")
    if meta.get("dtype") != "uint16":
        raise cli.CLIError(f"{path}: dtype {meta.get('dtype')!r}, expected 'uint16'")
    vocab_size = fileio.require(meta.get("vocab_size"), int, f"{path}: vocab_size", minimum=1)
    if vocab_size > 1 << 16:
        raise cli.CLIError(f"{path}: vocab_size {vocab_size} does not fit uint16 token ids")
    eot_id = fileio.require(meta.get("eot_id"), int, f"{path}: eot_id", minimum=0)
    if eot_id >= vocab_size:
        raise cli.CLIError(f"{path}: eot_id {eot_id} is not below vocab_size {vocab_size}")
    splits = fileio.require(meta.get("splits"), dict, f"{path}: splits")
    for split in SPLITS:
        counts = fileio.require(splits.get(split), dict, f"{path}: splits.{split}")
        for key in ("tokens", "text_bytes"):
            fileio.require(counts.get(key), int, f"{path}: splits.{split}.{key}", minimum=1)
    return meta


def _open_tokens(path: Path, n_tokens: int) -> np.memmap:
    """Memory-map a split's token file after checking its size against meta.json."""
    if not path.is_file():
        raise cli.CLIError(f"{path}: missing")
    size = path.stat().st_size
    if n_tokens < 1 or size != 2 * n_tokens:
        raise cli.CLIError(f"{path}: {size} bytes, but meta.json says {n_tokens} tokens ({2 * n_tokens} bytes)")
    return np.memmap(path, dtype=np.uint16, mode="r")
