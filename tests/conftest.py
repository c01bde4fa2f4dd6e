"""Shared test setup: Tiny Shakespeare and GPT-2's BPE ranks come from ../shared when it is beside the checkout,
or from the files that MLA_TINY_SHAKESPEARE (its input.txt) and MLA_TIKTOKEN_FILE (r50k_base.tiktoken) name; the
tests that need them skip, saying why, when they are absent (tests never download). Also the helpers and fixtures
that several test modules use: tiny models, random tokens, prepared byte-token data, the kernels forced, one
thread."""
import contextlib
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import attention
import dataset
import kernels
from model import Transformer
from model_config import ModelConfig

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
SHAKESPEARE = Path(os.environ.get("MLA_TINY_SHAKESPEARE", SHARED / "data" / "tinyshakespeare" / "input.txt"))
SHAKESPEARE_SHA256 = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
RANKS_URL = "https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken"

if SHAKESPEARE.is_file() and hashlib.sha256(SHAKESPEARE.read_bytes()).hexdigest() != SHAKESPEARE_SHA256:
    pytest.exit(f"{SHAKESPEARE} is not Tiny Shakespeare (its sha256 differs); the tests count its exact tokens", 2)

if (SHARED / "tiktoken_cache").is_dir():
    os.environ.setdefault("TIKTOKEN_CACHE_DIR", str(SHARED / "tiktoken_cache"))


def shakespeare_bytes(n: int) -> bytes:
    """The first n bytes of Tiny Shakespeare from ../shared; skips the calling test when it is absent."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is absent (set MLA_TINY_SHAKESPEARE): this test trains or evaluates on Tiny "
                    "Shakespeare")
    return SHAKESPEARE.read_bytes()[:n]


def require_gpt2_ranks() -> None:
    """Skip the calling test unless GPT-2's BPE ranks are in tiktoken's cache (TIKTOKEN_CACHE_DIR)."""
    cached = Path(os.environ.get("TIKTOKEN_CACHE_DIR", "/nonexistent")) / hashlib.sha1(RANKS_URL.encode()).hexdigest()
    if not cached.is_file() and not os.environ.get("MLA_TIKTOKEN_FILE"):
        pytest.skip("GPT-2's BPE ranks are not in TIKTOKEN_CACHE_DIR (../shared/tiktoken_cache is absent) and "
                    "MLA_TIKTOKEN_FILE is not set; tests never download")


VOCAB = 101
KINDS = [dict(attention="mla"), dict(attention="mla", q_lora_rank=0), dict(attention="mha"), dict(attention="gqa")]
KIND_IDS = ["mla", "mla-no-q-lora", "mha", "gqa"]


def tiny_model(seed=0, **overrides) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig.from_preset("tiny", vocab_size=VOCAB, **overrides)).eval()


def random_tokens(batch, length, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def write_byte_data(directory: Path, tokens: np.ndarray, val_tokens: int) -> Path:
    """A prepared data dir (train.bin, val.bin, meta.json as data_prepare.py writes them) of byte tokens
    (vocab 256): the last val_tokens of tokens for val, the rest for train."""
    tokens = tokens.astype(np.uint16)
    splits = {"train": tokens[:-val_tokens], "val": tokens[-val_tokens:]}
    for split, ids in splits.items():
        ids.tofile(directory / f"{split}.bin")
    meta = {"format_version": dataset.DATA_FORMAT_VERSION, "tokenizer": "utf-8 bytes", "vocab_size": 256,
            "eot_id": 0, "dtype": "uint16",
            "splits": {split: {"tokens": len(ids), "text_bytes": len(ids)} for split, ids in splits.items()}}
    (directory / "meta.json").write_text(json.dumps(meta))
    return directory


@pytest.fixture(scope="module")
def byte_data(tmp_path_factory) -> Path:
    """The first 200 kB of Tiny Shakespeare as byte tokens: 180,000 for train, 20,000 for val."""
    tokens = np.frombuffer(shakespeare_bytes(200_000), dtype=np.uint8)
    return write_byte_data(tmp_path_factory.mktemp("bytes"), tokens, val_tokens=20_000)


@pytest.fixture(params=["chosen", "forced"])
def kernel_choice(request, monkeypatch):
    """A test that uses it runs twice: with kernels.py's choices as they fall for tiny models (tiny caches are too
    short to split and tiny weights too small to chunk), and with the CPU's alternatives forced: MLA's latent
    attention split into 3 chunks, and every weight with an even number of rows multiplied in 2 blocks. With
    EVERY_KERNEL, a third time with "flex": MLA's absorbed attention on flex_latent_attention, as a compiled step
    on CUDA takes it (here flex_attention's unfused path), without gradients (as decoding runs; flex_attention
    has no backward on the CPU)."""
    if request.param == "forced":
        monkeypatch.setattr(kernels, "latent_chunks", lambda batch, slots, threads, dtype: 3)
        monkeypatch.setattr(kernels, "linear_chunks", lambda rows, out_features, *_: 2 - out_features % 2)
    if request.param == "flex":
        monkeypatch.setattr(attention, "latent_attention", lambda q, latent, mask, pad, input_pos, scale, r:
                            kernels.flex_latent_attention(q, latent, pad, input_pos, scale, r))
    with torch.no_grad() if request.param == "flex" else contextlib.nullcontext():
        yield


EVERY_KERNEL = pytest.mark.parametrize("kernel_choice", ["chosen", "forced", "flex"], indirect=True)


@pytest.fixture
def fresh_compiler():
    """torch.compile's caches emptied: every model compiled in this process is an entry in the one cache of
    decode_step's code, and past torch._dynamo.config.recompile_limit a fullgraph compile fails."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from a second thread, and on a busy machine each of their many small ops waits
    for it (two threads can be 4x slower): one thread keeps the tests fast however loaded the machine is."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
