"""Raw text into prepared data (dataset.py's format): reading .txt, .jsonl and .gz inputs as they stream, checking
them, tokenizing on several threads, splitting into train and val, and writing the three files atomically. Also
Tiny Shakespeare, the default corpus, downloaded and prepared on first use. data_prepare.py is its command line;
train.py prepares the default data through it."""
import array
import codecs
import collections
import contextlib
import gzip
import hashlib
import itertools
import json
import os
import re
import urllib.request
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm import tqdm

import cli
import fileio
import tokenizer
from dataset import DATA_FORMAT_VERSION, SPLITS

assert tokenizer.VOCAB_SIZE <= 1 << 16, "token ids must fit uint16"

DATA_FILES = ("train.bin", "val.bin", "meta.json")  # in the order they are renamed into place
SHAKESPEARE_URL = "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
SHAKESPEARE_DIR = Path("data/shakespeare")
JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
INPUT_SUFFIXES = (".txt", ".txt.gz", *JSONL_SUFFIXES)
VAL_FRACTION, SPLIT_SEED = 0.1, 0  # the default split
CHUNK_BYTES = 1 << 20  # text read and encoded per piece
COPY_TOKENS = 1 << 22  # tokens copied per step when splitting

# The end of the last non-whitespace character that is followed by a space or newline: see _safe_pieces.
_LAST_CUT = re.compile(r".*\S(?=[ \n])", re.DOTALL)
_SURROGATE = re.compile("[\ud800-\udfff]")


def fetch_shakespeare(path: Path) -> Path:
    """Download Tiny Shakespeare to path, unless it is there already."""
    if not path.exists():
        try:
            with urllib.request.urlopen(SHAKESPEARE_URL, timeout=60) as response:
                data = response.read()
        except OSError as err:
            raise cli.CLIError(f"cannot download Tiny Shakespeare ({err}); fetch {SHAKESPEARE_URL} yourself and "
                               f"run: python data_prepare.py --input PATH --out-dir {path.parent}") from None
        path.parent.mkdir(parents=True, exist_ok=True)
        with fileio.atomic_write(path) as temp:
            temp.write_bytes(data)
    return path


def expand_inputs(paths) -> list[Path]:
    """The input files: directories replaced by the .txt files below them, sorted."""
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(p for p in path.rglob("*.txt") if p.is_file())
            if not found:
                raise cli.CLIError(f"{path}: directory holds no .txt file")
            files += found
        elif not path.exists():
            raise cli.CLIError(f"{path}: no such file or directory")
        elif not path.is_file():  # a named pipe or a device would block, or never end
            raise cli.CLIError(f"{path}: not a regular file")
        elif not path.name.endswith(INPUT_SUFFIXES):
            raise cli.CLIError(f"{path}: unsupported file type (use {', '.join(INPUT_SUFFIXES)} or a directory)")
        else:
            files.append(path)
    return files


def prepare(files: list[Path], out_dir: Path, tok: tokenizer.Tokenizer, val_fraction: float, seed: int,
            workers: int, force: bool = False) -> dict:
    """Tokenize files into out_dir/train.bin, val.bin and meta.json, which out_dir must not hold already unless
    force; returns the meta. Leaves nothing on failure; one process at a time writes into out_dir.

    Memory stays bounded whatever the corpus size: files are read CHUNK_BYTES at a time, and all documents'
    tokens stream into one temporary file; only each document's token count stays in memory (a few int64s per
    document). Once every count is known, the split is decided (exact token shares, documents kept whole) and
    carried out by copying ranges of that file into the split files; see _write_splits.
    """
    with fileio.owned_directory(out_dir, "prepared data"):
        fileio.refuse_overwrite(out_dir, DATA_FILES, force, "prepared data")
        stream = out_dir / ".tokens.tmp"
        try:
            return _prepare_into(files, out_dir, stream, tok, val_fraction, seed, workers)
        finally:
            stream.unlink(missing_ok=True)


def _prepare_into(files: list[Path], out_dir: Path, stream: Path, tok, val_fraction: float, seed: int,
                  workers: int) -> dict:
    """prepare()'s work, with stream as the temporary file of every document's tokens."""
    with fileio.atomic_write_all([out_dir / name for name in DATA_FILES]) as temps:
        temps = dict(zip(DATA_FILES, temps))
        digests = [hashlib.sha256() for _ in files]
        doc_tokens, text_bytes = _encode_documents(files, digests, stream, tok, workers)
        ranges = _split_ranges(doc_tokens, val_fraction, seed)
        split_files = {split: temps[f"{split}.bin"] for split in SPLITS}
        meta = {
            "format_version": DATA_FORMAT_VERSION,
            "tokenizer": tokenizer.NAME,
            "vocab_size": tokenizer.VOCAB_SIZE,
            "eot_id": tokenizer.EOT_ID,
            "dtype": "uint16",
            "documents": len(doc_tokens),
            "splits": _write_splits(stream, split_files, ranges, text_bytes, tok),
            "split": {"val_fraction": val_fraction, "seed": seed},
            "sources": [{"path": str(p), "bytes": p.stat().st_size, "sha256": digest.hexdigest()}
                        for p, digest in zip(files, digests)],
        }
        temps["meta.json"].write_text(json.dumps(meta, indent=2) + "\n")
        (out_dir / "meta.json").unlink(missing_ok=True)  # never new .bin files beside an old meta.json
    return meta


def _encode_documents(files, digests, stream_path: Path, tok, workers: int) -> tuple[np.ndarray, int]:
    """Tokenize every document into stream_path, each followed by the eot id; hash each file into its digest.

    Returns the documents' token counts and the UTF-8 bytes of all their text.
    """
    total_bytes = sum(path.stat().st_size for path in files)
    progress = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=None)
    text_bytes = 0
    with open(stream_path, "wb") as f, progress:
        stream = _DocumentStream(f)
        for ids, piece_bytes, doc_end in _encode_pieces(_pieces(files, digests, progress), tok, workers):
            stream.write(ids, doc_end)
            text_bytes += piece_bytes
    if not stream.doc_tokens:
        raise cli.CLIError("the inputs hold no text")
    return np.frombuffer(stream.doc_tokens, dtype=np.int64), text_bytes


class _DocumentStream:
    """Appends documents' tokens to a file, each document followed by the eot id; counts each one's tokens."""

    _EOT = np.array([tokenizer.EOT_ID], dtype=np.uint16)

    def __init__(self, file):
        self.file = file
        self.doc_tokens = array.array("q")
        self._written = 0  # tokens so far of the document being written

    def write(self, ids: np.ndarray, doc_end: bool):
        self.file.write(ids.astype(np.uint16))
        self._written += len(ids)
        if doc_end and self._written:
            self.file.write(self._EOT)
            self.doc_tokens.append(self._written + 1)
            self._written = 0


def _encode_pieces(pieces, tok, workers: int):
    """(token ids, UTF-8 bytes, doc_end) of each (text, doc_end) piece, in order, encoded on worker threads.

    At most 2 * workers pieces are queued or being encoded at a time, which bounds memory; the calling thread
    reads, decodes and writes meanwhile.
    """
    with ThreadPoolExecutor(workers) as pool:
        in_flight = collections.deque()
        for text, doc_end in pieces:
            in_flight.append((pool.submit(_encode, tok, text), doc_end))
            if len(in_flight) == 2 * workers:
                future, end = in_flight.popleft()
                yield *future.result(), end
        for future, end in in_flight:
            yield *future.result(), end


def _encode(tok, text: str) -> tuple[np.ndarray, int]:
    """text's token ids and its UTF-8 bytes."""
    return tok.encode_to_numpy(text), len(text.encode())


def _pieces(files, digests, progress):
    """(text, doc_end) pieces of about CHUNK_BYTES of every document in order; doc_end marks a document's last."""
    for path, digest in zip(files, digests):
        blocks = _read_blocks(path, digest, progress)
        if path.name.endswith(JSONL_SUFFIXES):
            for text in _jsonl_texts(path, blocks):
                yield from _safe_pieces(text[i : i + CHUNK_BYTES] for i in range(0, len(text), CHUNK_BYTES))
        else:
            yield from _safe_pieces(_decode_utf8(path, blocks))


def _safe_pieces(blocks):
    """Re-cut one document's text blocks into (text, doc_end) pieces that encode exactly as the whole text does.

    Each cut falls between a non-whitespace character and a space or newline. GPT-2's split pattern never puts
    both in one pre-token (a pre-token is all whitespace, or an optional leading space and then no whitespace),
    has no look-behind, and its look-aheads ((?!\\S) and $) see only characters on the same side of such a cut.
    So each side splits into the same pre-tokens alone as inside the whole text, and BPE, which merges within
    pre-tokens only, gives the same tokens. (Python's \\S excludes all of Unicode's White_Space, which is
    tiktoken's \\s.) Text with no such place, such as a long run of whitespace, waits whole for the next one.
    """
    pending = ""
    for block in blocks:
        cut = _LAST_CUT.match(pending)
        if cut:
            yield pending[: cut.end()], False
            pending = pending[cut.end() :]
        pending += block
    yield pending, True


def _read_blocks(path: Path, digest, progress):
    """The file's bytes, decompressed if .gz, in CHUNK_BYTES blocks. Rejects NUL. The bytes as on disk go to
    digest (one read serves hashing and tokenizing) and their count to progress."""
    offset = 0
    with open(path, "rb") as file:
        disk = _HashingReader(file, digest, progress)
        with gzip.open(disk) if path.suffix == ".gz" else contextlib.nullcontext(disk) as stream:
            try:
                while block := stream.read(CHUNK_BYTES):
                    if (nul := block.find(b"\0")) >= 0:
                        raise cli.CLIError(f"{path}: NUL at byte {offset + nul}: a binary file, not text")
                    yield block
                    offset += len(block)
            except (gzip.BadGzipFile, EOFError, zlib.error) as err:
                raise cli.CLIError(f"{path}: corrupt gzip data ({err})") from None


class _HashingReader:
    """A binary file whose read() also feeds what it returns to a hash and counts its bytes in a progress bar."""

    def __init__(self, file, digest, progress):
        self.file, self.digest, self.progress = file, digest, progress

    def read(self, size=-1) -> bytes:
        data = self.file.read(size)
        self.digest.update(data)
        self.progress.update(len(data))
        return data


def _decode_utf8(path: Path, blocks):
    """Text of UTF-8 byte blocks (a character may straddle two). Invalid UTF-8 is an error naming its offset."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset = 0
    for block in itertools.chain(blocks, [b""]):  # the empty block flushes the decoder
        try:
            text = decoder.decode(block, final=not block)
        except UnicodeDecodeError as err:
            held_back = len(err.object) - len(block)  # bytes of an unfinished character from earlier blocks
            raise cli.CLIError(f"{path}: invalid UTF-8 at byte {offset - held_back + err.start}") from None
        offset += len(block)
        yield text


def _jsonl_texts(path: Path, blocks):
    """The "text" field of every non-blank line."""
    for line_number, (offset, line) in enumerate(_lines(blocks), start=1):
        if line.strip():
            yield _jsonl_text(f"{path}:{line_number}", offset, line)


def _lines(blocks):
    """(byte offset, line without its newline) for every line of byte blocks."""
    pending, offset = b"", 0
    for block in blocks:
        *lines, pending = (pending + block).split(b"\n")
        for line in lines:
            yield offset, line
            offset += len(line) + 1
    if pending:
        yield offset, pending


def _jsonl_text(where: str, offset: int, line: bytes) -> str:
    try:
        line = line.decode("utf-8")
    except UnicodeDecodeError as err:
        raise cli.CLIError(f"{where}: invalid UTF-8 at byte {offset + err.start}") from None
    record = fileio.parse_json(line, where)
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise cli.CLIError(f'{where}: no "text" string field')
    if _SURROGATE.search(text):
        raise cli.CLIError(f"{where}: text holds an unpaired surrogate escape (\\ud800-\\udfff): not Unicode")
    return text


def _split_ranges(doc_tokens: np.ndarray, val_fraction: float, seed: int) -> dict:
    """For each split, the (starts, ends) arrays of the token ranges of the stream it gets."""
    ends = np.cumsum(doc_tokens)
    starts = ends - doc_tokens
    if len(doc_tokens) == 1:
        text_tokens = int(doc_tokens[0]) - 1  # the separator goes with the last tokens, to val
        val_tokens = int(text_tokens * val_fraction)
        if val_tokens == 0:
            raise cli.CLIError(f"{text_tokens} tokens are too few to split with --val-fraction {val_fraction}")
        cut = np.array([text_tokens - val_tokens])
        return {"train": (starts, cut), "val": (cut, ends)}
    order = np.random.default_rng(seed).permutation(len(doc_tokens))
    val_docs = int(np.searchsorted(np.cumsum(doc_tokens[order]), val_fraction * ends[-1])) + 1
    in_val = np.zeros(len(doc_tokens), dtype=bool)
    in_val[order[: min(val_docs, len(doc_tokens) - 1)]] = True
    return {"train": (starts[~in_val], ends[~in_val]), "val": (starts[in_val], ends[in_val])}


def _write_splits(stream_path: Path, split_paths: dict, ranges: dict, text_bytes: int, tok) -> dict:
    """Write each split's token ranges of the token stream into its file; returns each split's counts.

    Val's ranges are copied out, summing their tokens' UTF-8 bytes. If train's one range is the start of the
    stream (always so for one document), the stream itself, cut to that length, becomes train's file, and its
    text bytes are the rest of text_bytes (all the text's): the same sum, as tokens carry whole bytes, even when
    the cut falls among one character's bytes. Otherwise train's ranges are copied too.
    """
    byte_lengths = _token_byte_lengths(tok)
    tokens = {split: int((ends - starts).sum()) for split, (starts, ends) in ranges.items()}
    train_starts, _ = ranges["train"]
    in_place = len(train_starts) == 1 and train_starts[0] == 0
    to_copy = ["val"] if in_place else ["val", "train"]
    progress = tqdm(total=sum(tokens[split] for split in to_copy), unit="tok", unit_scale=True, desc="splitting",
                    disable=None)
    with open(stream_path, "rb") as stream, progress:
        split_bytes = {split: _copy_ranges(stream, *ranges[split], split_paths[split], byte_lengths, progress)
                       for split in to_copy}
    if in_place:
        os.truncate(stream_path, 2 * tokens["train"])
        os.replace(stream_path, split_paths["train"])
        split_bytes["train"] = text_bytes - split_bytes["val"]
    return {split: {"tokens": tokens[split], "text_bytes": split_bytes[split]} for split in SPLITS}


def _copy_ranges(stream, starts, ends, path: Path, byte_lengths, progress) -> int:
    """Copy the token ranges [starts, ends) of stream to a new file at path; returns their text's UTF-8 bytes.

    Plain reads rather than a memory map, whose pages would count towards the process's memory.
    """
    text_bytes = 0
    with open(path, "wb") as out:
        for start, end in zip(starts, ends):
            stream.seek(2 * int(start))
            for low in range(start, end, COPY_TOKENS):
                tokens = np.frombuffer(stream.read(2 * min(COPY_TOKENS, end - low)), dtype=np.uint16)
                out.write(tokens)
                text_bytes += int(byte_lengths[tokens].sum())
                progress.update(len(tokens))
    return text_bytes


def _token_byte_lengths(tok) -> np.ndarray:
    """UTF-8 bytes of text each token id stands for; 0 for the separator."""
    lengths = np.array([len(tok.decode_bytes([i])) for i in range(tokenizer.VOCAB_SIZE)])
    lengths[tokenizer.EOT_ID] = 0
    return lengths


def prepare_shakespeare(out_dir: Path = SHAKESPEARE_DIR) -> dict:
    """Download Tiny Shakespeare into out_dir/input.txt (unless it is there) and prepare it there with the
    default split, as `python data_prepare.py` does; returns the meta."""
    fileio.refuse_overwrite(out_dir, DATA_FILES, False, "prepared data")
    files = [fetch_shakespeare(out_dir / "input.txt")]
    return prepare(files, out_dir, tokenizer.Tokenizer(), VAL_FRACTION, SPLIT_SEED, os.cpu_count() or 1)


def summary(meta: dict) -> str:
    """One line saying what a preparation made: "train 304,223 tokens, val 33,803 tokens, documents 1"."""
    counts = ", ".join(f"{split} {meta['splits'][split]['tokens']:,} tokens" for split in SPLITS)
    return f"{counts}, documents {meta['documents']:,}"
