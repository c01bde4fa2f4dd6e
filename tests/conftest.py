"""Shared test setup: GPT-2's BPE ranks load offline from ../shared when it is there, and the tests that need
Tiny Shakespeare or those ranks skip, saying why, when they are absent (tests never download)."""
import hashlib
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "input.txt"
RANKS_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"

if (SHARED / "tiktoken_cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))


def shakespeare_bytes(n: int) -> bytes:
    """The first n bytes of Tiny Shakespeare from ../shared; skips the calling test when it is absent."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is absent: this test trains or evaluates on Tiny Shakespeare")
    return SHAKESPEARE.read_bytes()[:n]


def require_gpt2_ranks() -> None:
    """Skip the calling test unless GPT-2's BPE ranks are in tiktoken's cache (TIKTOKEN_CACHE_DIR)."""
    cached = Path(os.environ.get("TIKTOKEN_CACHE_DIR", "/nonexistent")) / hashlib.sha1(RANKS_URL.encode()).hexdigest()
    if not cached.is_file() and not os.environ.get("MLA_TIKTOKEN_FILE"):
        pytest.skip("GPT-2's BPE ranks are not in TIKTOKEN_CACHE_DIR (../shared/tiktoken_cache is absent); "
                    "tests never download")
