"""GPT-2's tokenizer files in Hugging Face's formats, generated offline from tiktoken's r50k_base ranks, so that an
exported model directory carries its own tokenizer (convert_hf.py writes them into every export whose vocabulary
holds GPT-2's ids).

r50k_base is GPT-2's byte-level BPE: a token's rank is its id, ranks 0..255 are the 256 single bytes, rank
256 + i is made by the i-th merge, and <|endoftext|> = 50256 is the one special token. Hugging Face writes a
token's bytes as printable characters (GPT-2's bytes-to-unicode map) and keeps the merges as an ordered list of
pairs, where tiktoken keeps only the ranks. Each merge is recovered from the ranks: BPE on a token's own bytes,
with only the merges ranked below it, ends in exactly two parts, and those are the pair its rank merges.

The files (what transformers' AutoTokenizer and llama.cpp's converter read):
  tokenizer.json           the fast tokenizer: BPE, ByteLevel pre-tokenizer (GPT-2's split pattern, no prefix
                           space) and decoder, <|endoftext|> as a special added token
  vocab.json, merges.txt   the same vocabulary and merges in the older two-file layout
  tokenizer_config.json    GPT2Tokenizer, bos = eos = unk = <|endoftext|>, no padding token, no BOS added, and
                           no clean-up of spaces on decode (decode gives the text back exactly)
  special_tokens_map.json  bos, eos, unk
"""
import json

from tokenizer import EOT_ID, Tokenizer

EOT = "<|endoftext|>"
FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json")


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character map: the printable Latin-1 bytes stand for themselves, and the other 68 (controls,
    space, 0x7f-0xa0, 0xad) take the characters from U+0100 up, in byte order. Every token is then printable text
    without whitespace: a leading space shows as 'Ġ', a newline as 'Ċ'."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)}
    table, stand_ins = {}, iter(range(256, 512))
    for byte in range(256):
        table[byte] = chr(byte) if byte in printable else chr(next(stand_ins))
    return table


def recover_merge(token: bytes, ranks: dict[bytes, int]) -> tuple[bytes, bytes]:
    """The pair whose merge makes token: BPE on token's bytes with only the merges ranked below token's own."""
    limit = ranks[token]
    parts = [token[i:i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, lowest = None, limit
        for i in range(len(parts) - 1):
            rank = ranks.get(parts[i] + parts[i + 1], limit)
            if rank < lowest:
                best, lowest = i, rank
        if best is None:
            break
        parts[best:best + 2] = [parts[best] + parts[best + 1]]
    if len(parts) != 2:
        raise ValueError(f"token {token!r} is not the merge of two lower-ranked tokens")
    return parts[0], parts[1]


def vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Hugging Face's vocabulary (byte-level strings -> id, the special token left out) and its merges in rank
    order, merge i making token 256 + i."""
    table = bytes_to_unicode()

    def shown(token: bytes) -> str:
        return "".join(table[byte] for byte in token)

    by_rank = sorted(ranks, key=ranks.get)
    if [ranks[token] for token in by_rank] != list(range(EOT_ID)) or any(len(t) != 1 for t in by_rank[:256]):
        raise ValueError("these are not r50k_base's ranks: 0..255 single bytes, then merges up to 50255")
    merges = [tuple(map(shown, recover_merge(token, ranks))) for token in by_rank[256:]]
    return {shown(token): ranks[token] for token in by_rank}, merges


def tokenizer_json(vocab: dict[str, int], merges: list[tuple[str, str]]) -> dict:
    """tokenizer.json as the tokenizers library serialises a byte-level BPE (its layout version 1.0)."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [{"id": EOT_ID, "content": EOT, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True}],
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": {**byte_level, "trim_offsets": False},
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {**vocab, EOT: EOT_ID}, "merges": [list(pair) for pair in merges]},
    }


def tokenizer_config(model_max_length: int) -> dict:
    return {
        "tokenizer_class": "GPT2Tokenizer",
        "bos_token": EOT, "eos_token": EOT, "unk_token": EOT,
        "add_bos_token": False, "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,  # else decode turns " ." into "." and " 's" into "'s"
        "errors": "replace",
        "model_max_length": model_max_length,
        "added_tokens_decoder": {str(EOT_ID): {"content": EOT, "lstrip": False, "normalized": False,
                                               "rstrip": False, "single_word": False, "special": True}},
    }


def tokenizer_files(model_max_length: int, tokenizer: Tokenizer | None = None) -> dict[str, str]:
    """The text of each of FILES, from tokenizer's ranks (default: Tokenizer(), offline when they are cached or
    given as a file); model_max_length is the context the model takes. About a second of CPU."""
    vocab, merges = vocab_and_merges((tokenizer or Tokenizer()).mergeable_ranks())
    return {
        "tokenizer.json": json.dumps(tokenizer_json(vocab, merges), ensure_ascii=False) + "\n",
        "vocab.json": json.dumps({**vocab, EOT: EOT_ID}, ensure_ascii=False) + "\n",
        "merges.txt": "#version: 0.2\n" + "".join(f"{left} {right}\n" for left, right in merges),
        "tokenizer_config.json": json.dumps(tokenizer_config(model_max_length), indent=2) + "\n",
        "special_tokens_map.json": json.dumps({"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}, indent=2) + "\n",
    }
