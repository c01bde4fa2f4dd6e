"""tokenizer.py, corpus.py and data_prepare.py: exact round trips, the split, chunked streaming, the reader, bad inputs."""
import gzip
import hashlib
import io
import json
import os
import random
import shutil
import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch

import corpus
import data_prepare
import tokenizer
from cli import CLIError
from dataset import PreparedData
from conftest import REPO, SHAKESPEARE


# Where tiktoken keeps the ranks file in its cache (conftest.py points TIKTOKEN_CACHE_DIR at ../shared's copy).
CACHED_RANKS = (Path(os.environ.get("TIKTOKEN_CACHE_DIR", "/nonexistent"))
                / hashlib.sha1(tokenizer.RANKS_URL.encode()).hexdigest())

SAMPLES = [
    "Café crème, naïve façade: déjà vu.",
    "日本語のテキスト、漢字とかな。",
    "emoji 🙂👍🏽 and flags 🇫🇷🇯🇵",
    "a literal <|endoftext|> inside",
    "tabs\tand\r\nCRLF lines",
    "  double  spaces\n\n\n",
    "numbers 12345 or 67.89",
    "don't we'll they've",
    "\u3000ideographic\u00a0no-break\u2003em spaces",
    "Zwölf Boxkämpfer jagen Viktor quer über den großen Sylter Deich",
]


@pytest.fixture(scope="module")
def tok():
    if not CACHED_RANKS.is_file():
        pytest.skip("GPT-2's BPE ranks are not in TIKTOKEN_CACHE_DIR (../shared/tiktoken_cache is absent); "
                    "tests never download")
    return tokenizer.Tokenizer()


def random_text(seed: int, pieces: int) -> str:
    rng = random.Random(seed)
    return "".join(rng.choice(SAMPLES) + rng.choice([" ", "\n", "", "  ", "\n\n"]) for _ in range(pieces))


def prepare(*args):
    """Run data_prepare.main in-process."""
    data_prepare.main([str(arg) for arg in args])


def run_script(*args) -> subprocess.CompletedProcess:
    """Run data_prepare.py as a user would."""
    return subprocess.run([sys.executable, "data_prepare.py", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, env={**os.environ, "TIKTOKEN_CACHE_DIR": str(CACHED_RANKS.parent)})


def documents(tokens: np.ndarray, tok) -> list[str]:
    """Texts of the documents in a token stream, each ended by the separator."""
    ends = np.flatnonzero(tokens == tokenizer.EOT_ID)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tok.decode_bytes(tokens[start:end].tolist()).decode("utf-8") for start, end in zip(starts, ends)]


def encode_pieces(pieces, tok) -> list[int]:
    return [i for text, _ in pieces for i in tok.encode(text)]


# ---- tokenizer ----------------------------------------------------------------------------------

def test_endoftext_in_text_is_plain_text(tok):
    text = "end<|endoftext|>start"
    ids = tok.encode(text)
    assert tokenizer.EOT_ID not in ids
    assert tok.decode(ids) == text
    assert tok.encode_to_numpy(text).tolist() == ids


def test_explicit_ranks_file_loads_offline_without_writing_a_cache(tok, tmp_path, monkeypatch):
    empty_cache = tmp_path / "cache"
    empty_cache.mkdir()
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(empty_cache))
    monkeypatch.setattr(tiktoken, "get_encoding", None)  # any fallback to tiktoken's own loading would fail
    text = random_text(0, 50)
    assert tokenizer.Tokenizer(CACHED_RANKS).encode(text) == tok.encode(text)
    monkeypatch.setenv(tokenizer.FILE_ENV, str(CACHED_RANKS))
    assert tokenizer.Tokenizer().encode(text) == tok.encode(text)
    assert not any(empty_cache.iterdir())


def test_corrupted_or_missing_ranks_file_is_one_line_error(tok, tmp_path):
    corrupted = tmp_path / "r50k_base.tiktoken"
    data = bytearray(CACHED_RANKS.read_bytes())
    data[100] ^= 1
    corrupted.write_bytes(data)
    with pytest.raises(CLIError, match="sha256") as err:
        tokenizer.Tokenizer(corrupted)
    assert "\n" not in str(err.value)
    with pytest.raises(CLIError, match="missing.tiktoken"):
        tokenizer.Tokenizer(tmp_path / "missing.tiktoken")


def test_no_network_and_no_cache_says_how_to_fix(monkeypatch):
    def offline(name):
        raise OSError("Name or service not known")

    monkeypatch.delenv(tokenizer.FILE_ENV, raising=False)
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    with pytest.raises(CLIError) as err:
        tokenizer.Tokenizer()
    message = str(err.value)
    assert "--tokenizer-file" in message and tokenizer.FILE_ENV in message and tokenizer.RANKS_URL in message
    assert "\n" not in message


# ---- chunked streaming --------------------------------------------------------------------------

@pytest.mark.parametrize("block_bytes", [1, 2, 3, 7, 64])
def test_chunked_streaming_encodes_like_the_whole_text(tok, block_bytes):
    text = random_text(1, 200)
    raw = text.encode("utf-8")
    blocks = (raw[i : i + block_bytes] for i in range(0, len(raw), block_bytes))  # cuts inside words and characters
    pieces = list(corpus._safe_pieces(corpus._decode_utf8(Path("t.txt"), blocks)))
    assert len(pieces) > 20
    assert "".join(text for text, _ in pieces) == text
    assert [end for _, end in pieces] == [False] * (len(pieces) - 1) + [True]
    assert encode_pieces(pieces, tok) == tok.encode(text)


def test_safe_cuts_on_random_whitespace_mixes(tok):
    """Runs of every kind of space, including ones Python and GPT-2's pattern disagree on (\\x1c)."""
    rng = random.Random(2)
    alphabet = [" ", " ", "\n", "\t", "\r", "\u3000", "\xa0", "\x1c", "a", "b", "é", "日", "🙂", "'", "s", "1", "."]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
        size = rng.randint(1, 5)
        pieces = list(corpus._safe_pieces(text[i : i + size] for i in range(0, len(text), size)))
        assert encode_pieces(pieces, tok) == tok.encode(text), repr(text)


@pytest.mark.parametrize("raw, offset", [
    (b"ab\xffcd", 2),  # a byte that never starts a character
    ("caf\u00e9".encode() + b"\xe6\x97x", 5),  # a three-byte character cut short, then text
    (b"abc" + "\u65e5".encode()[:2], 3),  # the file ends inside a character
])
def test_invalid_utf8_names_its_byte_offset_across_blocks(raw, offset):
    blocks = (raw[i : i + 1] for i in range(len(raw)))
    with pytest.raises(CLIError, match=f"t.txt: invalid UTF-8 at byte {offset}$"):
        list(corpus._decode_utf8(Path("t.txt"), blocks))


# ---- Tiny Shakespeare ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shakespeare(tok, tmp_path_factory):
    if not SHAKESPEARE.is_file():
        pytest.skip(f"{SHAKESPEARE} is absent")
    out = tmp_path_factory.mktemp("shakespeare")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(corpus, "CHUNK_BYTES", 1 << 16)  # 17 chunks, so cuts are exercised
        prepare("--input", SHAKESPEARE, "--out-dir", out, "--force")
    return PreparedData(out)


def test_shakespeare_exact_counts_and_round_trip(shakespeare, tok):
    text = SHAKESPEARE.read_text(encoding="utf-8")
    train, val = shakespeare.tokens("train"), shakespeare.tokens("val")
    # 338,025 text tokens; the last int(338,025 * 0.1) = 33,802 go to val, followed by the separator.
    assert (len(train), len(val)) == (304_223, 33_803)
    assert val[-1] == tokenizer.EOT_ID and tokenizer.EOT_ID not in train and tokenizer.EOT_ID not in val[:-1]
    text_tokens = np.concatenate([train, val[:-1]])
    assert len(text_tokens) == 338_025
    assert text_tokens.tolist() == tok.encode(text)  # chunked streaming changed no token
    assert tok.decode_bytes(text_tokens.tolist()).decode("utf-8") == text
    assert shakespeare.text_bytes("train") + shakespeare.text_bytes("val") == SHAKESPEARE.stat().st_size
    assert shakespeare.text_bytes("val") == len(tok.decode_bytes(val[:-1].tolist()))


def test_meta_json_matches_the_files(shakespeare):
    meta = json.loads((shakespeare.data_dir / "meta.json").read_text())
    assert meta["format_version"] == 1 and meta["dtype"] == "uint16" and meta["tokenizer"] == "r50k_base"
    assert (meta["vocab_size"], meta["eot_id"]) == (50257, 50256) == (shakespeare.vocab_size, shakespeare.eot_id)
    for split in ("train", "val"):
        assert (shakespeare.data_dir / f"{split}.bin").stat().st_size == 2 * meta["splits"][split]["tokens"]
    assert meta["split"] == {"val_fraction": 0.1, "seed": 0} and meta["documents"] == 1
    [source] = meta["sources"]
    assert source["bytes"] == SHAKESPEARE.stat().st_size
    assert source["sha256"] == hashlib.sha256(SHAKESPEARE.read_bytes()).hexdigest()
    assert sorted(p.name for p in shakespeare.data_dir.iterdir()) == ["meta.json", "train.bin", "val.bin"]


def test_one_document_cut_inside_a_character_splits_its_bytes(tok, tmp_path):
    """The cut at a token position can fall among one character's byte tokens: each split counts its bytes."""
    corpus = tmp_path / "in.txt"
    corpus.write_text("\ua66e" * 34, encoding="utf-8")  # 3 byte tokens each: 102 tokens, the last 10 go to val
    prepare("--input", corpus, "--out-dir", tmp_path / "out")
    data = PreparedData(tmp_path / "out")
    train = tok.decode_bytes(np.asarray(data.tokens("train")).tolist())
    val = tok.decode_bytes(np.asarray(data.tokens("val"))[:-1].tolist())
    with pytest.raises(UnicodeDecodeError):
        train.decode("utf-8")  # the cut is inside a character
    assert train + val == corpus.read_bytes()
    assert (data.text_bytes("train"), data.text_bytes("val")) == (len(train), len(val))


# ---- many documents -----------------------------------------------------------------------------

def write_corpus(root: Path) -> tuple[list[Path], list[str]]:
    """A directory of .txt files, a .jsonl, and gzipped copies of both kinds; returns the inputs and documents."""
    docs = [random_text(seed, 5 + 7 * seed) for seed in range(14)]
    corpus = root / "corpus"
    for i, name in enumerate(["a.txt", "sub/b.txt", "sub/deeper/c.txt", "z.txt"]):
        (corpus / name).parent.mkdir(parents=True, exist_ok=True)
        (corpus / name).write_text(docs[i], encoding="utf-8", newline="")
    (corpus / "empty.txt").write_text("")  # no text: skipped
    (corpus / "notes.md").write_text("not a .txt: ignored")
    lines = [json.dumps({"text": doc, "id": i}, ensure_ascii=i % 2 == 0) for i, doc in enumerate(docs[4:9])]
    (root / "docs.jsonl").write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n", encoding="utf-8")
    (root / "more.txt.gz").write_bytes(gzip.compress(docs[9].encode()))
    jsonl = "".join(json.dumps({"text": doc}) + "\n" for doc in docs[10:])
    (root / "more.jsonl.gz").write_bytes(gzip.compress(jsonl.encode()))
    return [corpus, root / "docs.jsonl", root / "more.txt.gz", root / "more.jsonl.gz"], docs


def test_many_documents_round_trip_whole_documents(tok, tmp_path, monkeypatch):
    monkeypatch.setattr(corpus, "CHUNK_BYTES", 16)
    inputs, docs = write_corpus(tmp_path)
    out = tmp_path / "out"
    prepare("--input", *inputs, "--out-dir", out, "--val-fraction", 0.3, "--seed", 5, "--workers", 2)
    data = PreparedData(out)
    split_docs = {split: documents(np.asarray(data.tokens(split)), tok) for split in ("train", "val")}
    assert sorted(split_docs["train"] + split_docs["val"]) == sorted(docs)  # no document straddles the split
    assert split_docs["train"] and split_docs["val"]
    total = len(data.tokens("train")) + len(data.tokens("val"))
    assert len(data.tokens("val")) >= 0.3 * total
    for split in ("train", "val"):
        assert data.text_bytes(split) == sum(len(doc.encode()) for doc in split_docs[split])
    assert data.meta["documents"] == len(docs)
    sources = data.meta["sources"]
    assert len(sources) == 5 + 3  # the directory's five .txt files, then the three files
    assert all(s["sha256"] == hashlib.sha256(Path(s["path"]).read_bytes()).hexdigest() for s in sources)

    before = {split: (out / f"{split}.bin").read_bytes() for split in ("train", "val")}
    prepare("--input", *inputs, "--out-dir", out, "--val-fraction", 0.3, "--seed", 5, "--force")
    assert {split: (out / f"{split}.bin").read_bytes() for split in ("train", "val")} == before


def test_gzip_source_hash_covers_every_byte_on_disk(tok, tmp_path, monkeypatch):
    """Two gzip members and zero padding after them: the text is both members', the sha256 the whole file's."""
    monkeypatch.setattr(corpus, "CHUNK_BYTES", 7)
    text = random_text(4, 60)
    half = len(text) // 2
    path = tmp_path / "two.txt.gz"
    path.write_bytes(gzip.compress(text[:half].encode()) + gzip.compress(text[half:].encode()) + bytes(100))
    prepare("--input", path, "--out-dir", tmp_path / "out")
    data = PreparedData(tmp_path / "out")
    tokens = np.concatenate([data.tokens("train"), data.tokens("val")])
    assert documents(tokens, tok) == [text]
    assert data.meta["sources"][0]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()


def test_existing_prepared_dir_needs_force(tok, tmp_path):
    corpus = tmp_path / "in.txt"
    corpus.write_text(random_text(3, 100))
    out = tmp_path / "out"
    prepare("--input", corpus, "--out-dir", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(CLIError, match="--force"):
        prepare("--input", corpus, "--out-dir", out, "--val-fraction", 0.2)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    prepare("--input", corpus, "--out-dir", out, "--val-fraction", 0.2, "--force")
    assert json.loads((out / "meta.json").read_text())["split"]["val_fraction"] == 0.2


class InterruptingProgress:
    """A stand-in for tqdm whose second update, on the bar named `desc`, is a Ctrl-C."""

    desc = None

    def __init__(self, *args, desc, **kwargs):
        self.interrupt = desc == InterruptingProgress.desc
        self.updates = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, n):
        self.updates += 1
        if self.interrupt and self.updates == 2:
            raise KeyboardInterrupt


@pytest.mark.parametrize("phase", ["tokenizing", "splitting", "renaming"])
def test_ctrl_c_leaves_nothing_behind(tok, tmp_path, monkeypatch, phase):
    monkeypatch.setattr(corpus, "CHUNK_BYTES", 64)
    monkeypatch.setattr(corpus, "COPY_TOKENS", 16)
    InterruptingProgress.desc = phase
    monkeypatch.setattr(corpus, "tqdm", InterruptingProgress)
    if phase == "renaming":  # after train.bin is in place, before val.bin and meta.json
        real_replace, calls = os.replace, []

        def interrupted_replace(src, dst):
            calls.append(dst)
            if len(calls) == 2:
                raise KeyboardInterrupt
            real_replace(src, dst)

        monkeypatch.setattr(corpus.os, "replace", interrupted_replace)
    inputs, _ = write_corpus(tmp_path)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        prepare("--input", *inputs, "--out-dir", out)
    assert not out.exists()


def test_default_input_offline_fails_naming_input(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(corpus.urllib.request, "urlopen", offline)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CLIError, match="--input") as err:
        prepare()
    assert "\n" not in str(err.value)
    assert not any(tmp_path.iterdir())


def test_default_input_downloads_then_prepares_data_shakespeare(tok, tmp_path, monkeypatch):
    text = random_text(4, 100)
    monkeypatch.setattr(corpus.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(text.encode()))
    monkeypatch.chdir(tmp_path)
    prepare()
    out = tmp_path / "data" / "shakespeare"
    assert sorted(p.name for p in out.iterdir()) == ["input.txt", "meta.json", "train.bin", "val.bin"]
    assert (out / "input.txt").read_bytes() == text.encode()


# ---- bad input: one line on stderr, non-zero exit, nothing written ------------------------------

def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


BAD_INPUTS = {  # case: (files to make under root -> arguments before --out-dir, a piece of the message)
    "missing path": (lambda root: ["--input", root / "nope.txt"], "nope.txt: no such file or directory"),
    "empty corpus": (lambda root: ["--input", write(root / "empty.txt", b"")], "the inputs hold no text"),
    "directory without .txt": (lambda root: ["--input", write(root / "no_txt" / "notes.md", b"text").parent],
                               "no_txt: directory holds no .txt file"),
    "binary file": (lambda root: ["--input", write(root / "fine.txt", b"fine text\n"),
                                  write(root / "image.txt", b"GIF89a\x00\x01")], "image.txt: NUL at byte 6"),
    "jsonl line not JSON": (lambda root: ["--input", write(root / "bad.jsonl", b'{"text": "fine"}\n{"text": oops}\n')],
                            "bad.jsonl:2: not valid JSON"),
    "jsonl line without text": (lambda root: ["--input", write(root / "no_text.jsonl", b'{"text": "a"}\n\n{"b": 1}\n')],
                                'no_text.jsonl:3: no "text" string field'),
    "invalid UTF-8": (lambda root: ["--input", write(root / "latin1.txt", "caf\u00e9 cr\u00e8me".encode("latin-1"))],
                      "latin1.txt: invalid UTF-8 at byte 3"),
    "invalid UTF-8 in gzip": (lambda root: ["--input", write(root / "l1.txt.gz", gzip.compress(b"plain, then \xe9"))],
                              "l1.txt.gz: invalid UTF-8 at byte 12"),
    "unsupported file type": (lambda root: ["--input", write(root / "table.csv", b"a,b\n")],
                              "table.csv: unsupported file type"),
    "corrupted ranks file": (lambda root: ["--input", write(root / "fine.txt", b"fine text\n"), "--tokenizer-file",
                                           write(root / "r50k_base.tiktoken", b"not the ranks")], "sha256"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_one_line_and_writes_nothing(tok, tmp_path, case):
    make_inputs, message = BAD_INPUTS[case]
    out = tmp_path / "out"
    result = run_script(*make_inputs(tmp_path), "--out-dir", out)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert message in result.stderr
    assert not out.exists()


# ---- the reader ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small(tok, tmp_path_factory) -> PreparedData:
    """One document of about 3,000 tokens: val holds about 300."""
    root = tmp_path_factory.mktemp("small")
    (root / "in.txt").write_text(random_text(6, 400), encoding="utf-8")
    prepare("--input", root / "in.txt", "--out-dir", root / "out")
    return PreparedData(root / "out")


def test_reader_rejects_inconsistent_dirs(small, tmp_path):
    def broken(name, change):
        path = tmp_path / name
        shutil.copytree(small.data_dir, path)
        change(path)
        return path

    meta = json.loads((small.data_dir / "meta.json").read_text())
    cases = {
        "val.bin: ": broken("short", lambda p: (p / "val.bin").write_bytes((p / "val.bin").read_bytes()[:-2])),
        "train.bin: missing": broken("no_bin", lambda p: (p / "train.bin").unlink()),
        "nowhere: no such data directory": tmp_path / "nowhere",
        "not valid JSON": broken("bad_json", lambda p: (p / "meta.json").write_text("{")),
        "unknown format_version 2": broken("v2", lambda p: (p / "meta.json").write_text(
            json.dumps({**meta, "format_version": 2}))),
        "eot_id is missing": broken("no_eot", lambda p: (p / "meta.json").write_text(
            json.dumps({k: v for k, v in meta.items() if k != "eot_id"}))),
    }
    for message, path in cases.items():
        with pytest.raises(CLIError, match=message) as err:
            PreparedData(path)
        assert "\n" not in str(err.value)


def test_get_batch_is_shifted_windows_replayable_from_generator_state(small):
    tokens = np.asarray(small.tokens("train"), dtype=np.int64)
    generator = torch.Generator().manual_seed(1)
    x, y = small.get_batch("train", 8, 32, generator)
    assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
    windows = np.lib.stride_tricks.sliding_window_view(tokens, 33)
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        assert (windows == np.concatenate([row_x, row_y[-1:]])).all(axis=1).any()
    assert torch.equal(x[:, 1:], y[:, :-1])

    state = generator.get_state()
    first = small.get_batch("train", 8, 32, generator)
    generator.set_state(state)
    again = small.get_batch("train", 8, 32, generator)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    fresh = small.get_batch("train", 8, 32, torch.Generator().manual_seed(1))
    assert torch.equal(fresh[0], x)

    with pytest.raises(CLIError, match="not the block_size"):
        small.get_batch("val", 1, len(small.tokens("val")), generator)


@pytest.mark.parametrize("block_size, stride", [(16, None), (16, 16), (16, 5), (16, 1), (64, 24), (1000, None)])
def test_eval_windows_score_every_target_once(small, block_size, stride):
    tokens = np.asarray(small.tokens("val"), dtype=np.int64)
    step = stride or block_size
    targets = []
    for k, (x, y) in enumerate(small.eval_windows("val", block_size, stride)):
        assert x.shape == y.shape == (block_size,) and x.dtype == y.dtype == torch.int64
        start = k * step
        inputs = tokens[start : start + block_size]
        assert (x[: len(inputs)].numpy() == inputs).all() and (x[len(inputs) :] == 0).all()
        scored = np.flatnonzero(y.numpy() != -1)
        if k > 0:
            assert scored.min() >= block_size - step  # every scored target has this much context
        assert (y.numpy()[scored] == tokens[start + scored + 1]).all()
        targets += (start + scored + 1).tolist()
    assert len(targets) == len(tokens) - 1
    assert sorted(targets) == list(range(1, len(tokens)))
