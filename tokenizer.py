"""GPT-2's byte-pair encoding through tiktoken, usable offline.

tiktoken's "r50k_base" is GPT-2's BPE: the same merges, split pattern and <|endoftext|> = 50256.
Its ranks come from one file, found in this order:
  1. an explicit file: Tokenizer(path), the --tokenizer-file flag, or $MLA_TIKTOKEN_FILE (sha256-checked);
  2. tiktoken's cache ($TIKTOKEN_CACHE_DIR), or a download into it when the network is up.
"""
import base64
import hashlib
import os

import numpy as np
import tiktoken
from tiktoken_ext import openai_public

import cli
import fileio

NAME = "r50k_base"
VOCAB_SIZE = 50257
EOT_ID = 50256
RANKS_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
FILE_ENV = "MLA_TIKTOKEN_FILE"


def holds_gpt2_ids(vocab_size: int) -> bool:
    """Whether a model of vocab_size token ids takes GPT-2's 50257 (a byte-level model, say, does not)."""
    return vocab_size >= VOCAB_SIZE


class Tokenizer:
    """GPT-2 BPE. encode() treats "<|endoftext|>" inside text as plain text; EOT_ID separates documents."""

    def __init__(self, path=None):
        path = path or os.environ.get(FILE_ENV)
        self._enc = _encoding_from_file(path) if path else _encoding_from_tiktoken()

    def encode(self, text: str) -> list[int]:
        """Token ids of plain text."""
        return self._enc.encode_ordinary(text)

    def encode_to_numpy(self, text: str) -> np.ndarray:
        """Token ids of plain text as a uint32 array: encode() without building a Python list, so faster, leaner,
        and parallel on threads (tiktoken releases the GIL while encoding)."""
        return self._enc.encode_to_numpy(text, disallowed_special=())  # no special tokens allowed: all is text

    def decode(self, ids) -> str:
        """Text of token ids; bytes that are not valid UTF-8 on their own become U+FFFD."""
        return self._enc.decode(ids)

    def decode_bytes(self, ids) -> bytes:
        """The exact bytes of token ids (a token may hold part of a multibyte character)."""
        return self._enc.decode_bytes(ids)

    def mergeable_ranks(self) -> dict[bytes, int]:
        """Every token but <|endoftext|>: its bytes -> its rank, which is its id (hf_tokenizer.py recovers the
        merges from them)."""
        return self._enc._mergeable_ranks  # tiktoken keeps them only under this private name


def add_argument(parser):
    """Add --tokenizer-file, for scripts that tokenize."""
    parser.add_argument(
        "--tokenizer-file",
        help=f"local r50k_base.tiktoken ranks file for offline use (default: ${FILE_ENV}, else tiktoken's cache "
        f"or a download; get it from {RANKS_URL})",
    )


def _encoding_from_file(path) -> tiktoken.Encoding:
    path = fileio.regular_file(path, "tokenizer file")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise cli.CLIError(f"tokenizer file {path}: {err.strerror}") from None
    digest = hashlib.sha256(data).hexdigest()
    if digest != RANKS_SHA256:
        raise cli.CLIError(f"tokenizer file {path}: sha256 {digest} is not r50k_base.tiktoken's ({RANKS_SHA256})")
    # Parsed here rather than by tiktoken.load.load_tiktoken_bpe, which writes a copy of every file it reads
    # into tiktoken's cache directory. The format: one "base64(token bytes) rank" pair per line.
    ranks = {}
    for line in data.splitlines():
        token, rank = line.split()
        ranks[base64.b64decode(token)] = int(rank)
    return tiktoken.Encoding(
        NAME,
        pat_str=openai_public.r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={openai_public.ENDOFTEXT: EOT_ID},
        explicit_n_vocab=VOCAB_SIZE,
    )


def _encoding_from_tiktoken() -> tiktoken.Encoding:
    try:
        return tiktoken.get_encoding(NAME)
    except (OSError, ValueError) as err:
        raise cli.CLIError(
            f"cannot load GPT-2's BPE ranks ({type(err).__name__}; no network and nothing in tiktoken's cache). "
            f"Fix: download {RANKS_URL} on a machine with network and pass it with --tokenizer-file PATH "
            f"(or set {FILE_ENV}=PATH), or point TIKTOKEN_CACHE_DIR at a cache that holds it"
        ) from None
