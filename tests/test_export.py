"""The self-contained export (convert_hf.py export): GPT-2's tokenizer files against tiktoken on real text."""
import json

import pytest

import hf_tokenizer
from conftest import require_gpt2_ranks, shakespeare_bytes
from tokenizer import EOT_ID, Tokenizer

transformers = pytest.importorskip("transformers", reason="these tests read the files with transformers: "
                                                          "pip install -r requirements-dev.txt")
EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    require_gpt2_ranks()
    directory = tmp_path_factory.mktemp("tokenizer")
    for name, text in hf_tokenizer.tokenizer_files(model_max_length=1024).items():
        (directory / name).write_text(text, encoding="utf-8")
    return directory


@pytest.fixture(scope="module")
def theirs(tokenizer_dir):
    """transformers' tokenizer, read from the files alone."""
    return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)


@pytest.fixture(scope="module")
def ours():
    return Tokenizer()


def test_tokenizer_files_encode_tiny_shakespeare_as_tiktoken(theirs, ours):
    text = shakespeare_bytes(2_000_000).decode("utf-8")  # all of it: 1,115,394 characters
    ids = theirs(text, add_special_tokens=False)["input_ids"]
    assert ids == ours.encode(text)
    assert theirs.decode(ids) == text


@pytest.mark.parametrize("text", [
    f"First.{EOT}Second.", EOT, f" {EOT}\n{EOT}x", "Ünïcödé 日本語 😀👍🏽 \u00a0\u3000 tabs\t\r\n  trailing  ",
    "numbers 1234567 3.14 -42", "it's we've I'M", ""])
def test_special_tokens_are_tiktokens_and_split_they_are_plain_text(theirs, ours, text):
    """transformers reads <|endoftext|> in text as the special token 50256, and with split_special_tokens as
    plain text, as this project's Tokenizer.encode does."""
    pieces = [ours.encode(piece) for piece in text.split(EOT)]
    ids = theirs(text, add_special_tokens=False)["input_ids"]
    assert ids == [*pieces[0], *(id for piece in pieces[1:] for id in (EOT_ID, *piece))]
    assert theirs(text, add_special_tokens=False, split_special_tokens=True)["input_ids"] == ours.encode(text)
    assert theirs.decode(ids) == text


def test_special_tokens_and_defaults_are_gpt2s(theirs):
    assert theirs.is_fast and len(theirs) == 50257
    assert theirs.eos_token == theirs.bos_token == theirs.unk_token == EOT and theirs.eos_token_id == 50256
    assert theirs.pad_token is None  # GPT-2 has none; generation_config.json names one for generate()
    assert theirs("Hello")["input_ids"] == [15496]  # no BOS added
    assert theirs.decode(theirs("a .  b 's")["input_ids"]) == "a .  b 's"  # spaces are not cleaned up


def test_the_two_file_layout_holds_the_same_vocabulary_and_merges(tokenizer_dir):
    fast = json.loads((tokenizer_dir / "tokenizer.json").read_text(encoding="utf-8"))["model"]
    assert json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8")) == fast["vocab"]
    lines = (tokenizer_dir / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert lines[:5] == ["#version: 0.2", "Ġ t", "Ġ a", "h e", "i n"]  # as GPT-2's own merges.txt begins
    assert [line.split(" ") for line in lines[1:]] == fast["merges"] and len(fast["merges"]) == 50000
