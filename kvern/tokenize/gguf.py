"""Build a HuggingFace fast tokenizer straight from a GGUF file's metadata.

Why: Ollama and llama.cpp users already hold their model as a GGUF file, and
the GGUF carries the complete BPE tokenizer (tokens, merges, token types, the
pre-tokenizer name and often the chat template). Building a ``tokenizers``
object from those fields gives kvern an exact tokenizer with no hub access
and no torch (transformers' own GGUF loader needs torch).

Only byte-level BPE vocabularies (``tokenizer.ggml.model == "gpt2"``) are
supported; their pre-tokenizer split regex is chosen from
``tokenizer.ggml.pre`` and must be one kvern knows. Anything else raises
:class:`GGUFTokenizerError` so the caller can fall back rather than tokenize
wrongly.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

# Token types as llama.cpp writes them (gguf-py ``TokenType``).
_TOKEN_TYPE_CONTROL = 3
_TOKEN_TYPE_USER_DEFINED = 4

# Pre-tokenizer split regexes, as the models' own tokenizer.json files define
# them, keyed by the ``tokenizer.ggml.pre`` names llama.cpp assigns.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_PRE_TOKENIZERS: dict[str, dict[str, Any]] = {
    # ignore_merges: Llama 3's tokenizer.json looks whole pre-tokens up in the
    # vocabulary before merging; Qwen2's does not.
    # add_bos: llama.cpp's default when the file has no tokenizer.ggml.add_bos_token.
    "llama-bpe": {"split": _LLAMA3_SPLIT, "nfc": False, "ignore_merges": True, "add_bos": True},
    "smaug-bpe": {"split": _LLAMA3_SPLIT, "nfc": False, "ignore_merges": True, "add_bos": True},
    "qwen2": {"split": _QWEN2_SPLIT, "nfc": True, "ignore_merges": False, "add_bos": False},
}


class GGUFTokenizerError(ValueError):
    """The GGUF file holds no tokenizer kvern can rebuild exactly."""


# GGUF value types (gguf-py ``GGUFValueType``) -> struct format of one item.
_SCALAR_FORMATS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
_TYPE_STRING = 8
_TYPE_ARRAY = 9
_GGUF_MAGIC = b"GGUF"


class _Cursor:
    """A read position in a GGUF header; only the key/value section is read."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def unpack(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self.data, self.pos)[0]
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        length = self.unpack("<Q")
        raw = self.data[self.pos : self.pos + length]
        self.pos += length
        return raw.decode("utf-8", errors="replace")

    def value(self, value_type: int) -> Any:
        if value_type == _TYPE_STRING:
            return self.string()
        if value_type == _TYPE_ARRAY:
            item_type = self.unpack("<I")
            count = self.unpack("<Q")
            if item_type in _SCALAR_FORMATS:
                fmt = _SCALAR_FORMATS[item_type]
                size = struct.calcsize(fmt)
                items = list(struct.unpack_from(f"<{count}{fmt[1]}", self.data, self.pos))
                self.pos += size * count
                return items
            return [self.value(item_type) for _ in range(count)]
        scalar_fmt = _SCALAR_FORMATS.get(value_type)
        if scalar_fmt is None:
            raise GGUFTokenizerError(f"unknown GGUF value type {value_type}")
        return self.unpack(scalar_fmt)


def read_gguf_metadata(path: str | Path) -> dict[str, Any]:
    """Read every key/value of a GGUF file's header (not its tensors).

    Written by hand because the ``gguf`` package maps every field into numpy
    views first, which takes ~15 s for a 128k-token vocabulary; this reader
    takes well under a second and needs no extra dependency.
    """
    with open(path, "rb") as fh:
        data = fh.read()
    if data[:4] != _GGUF_MAGIC:
        raise GGUFTokenizerError(f"{path}: not a GGUF file")
    cur = _Cursor(data)
    cur.pos = 4
    version = cur.unpack("<I")
    if version < 2:
        raise GGUFTokenizerError(f"{path}: GGUF version {version} is too old")
    cur.unpack("<Q")  # tensor count
    kv_count = cur.unpack("<Q")
    out: dict[str, Any] = {}
    for _ in range(kv_count):
        key = cur.string()
        out[key] = cur.value(cur.unpack("<I"))
    return out


def read_gguf_tokenizer_fields(path: str | Path) -> dict[str, Any]:
    """Return the tokenizer fields of a GGUF file as plain Python values."""
    meta = read_gguf_metadata(path)
    keys = (
        "tokenizer.ggml.model",
        "tokenizer.ggml.pre",
        "tokenizer.ggml.tokens",
        "tokenizer.ggml.token_type",
        "tokenizer.ggml.merges",
        "tokenizer.ggml.bos_token_id",
        "tokenizer.ggml.eos_token_id",
        "tokenizer.ggml.add_bos_token",
        "tokenizer.chat_template",
    )
    return {key: meta.get(key) for key in keys}


def build_tokenizer_from_gguf(path: str | Path) -> Any:
    """Build a transformers fast tokenizer (with chat template) from a GGUF file."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
    from tokenizers import pre_tokenizers as pre
    from transformers import PreTrainedTokenizerFast

    fields = read_gguf_tokenizer_fields(path)
    if fields["tokenizer.ggml.model"] != "gpt2":
        raise GGUFTokenizerError(
            f"{path}: tokenizer.ggml.model is {fields['tokenizer.ggml.model']!r}; "
            "only byte-level BPE ('gpt2') is supported"
        )
    pre_name = fields["tokenizer.ggml.pre"]
    spec = _PRE_TOKENIZERS.get(pre_name)
    if spec is None:
        raise GGUFTokenizerError(
            f"{path}: pre-tokenizer {pre_name!r} is unknown; known: {sorted(_PRE_TOKENIZERS)}"
        )
    tokens: list[str] = list(fields["tokenizer.ggml.tokens"])
    token_types: list[int] = [int(t) for t in fields["tokenizer.ggml.token_type"]]
    merges = [tuple(m.split(" ", 1)) for m in fields["tokenizer.ggml.merges"]]
    vocab = {tok: i for i, tok in enumerate(tokens)}

    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            ignore_merges=spec["ignore_merges"],
            byte_fallback=False,
            fuse_unk=False,
        )
    )
    if spec["nfc"]:
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre.Sequence(
        [
            pre.Split(Regex(spec["split"]), behavior="isolated", invert=False),
            pre.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    added = [
        AddedToken(
            tokens[i],
            special=token_types[i] == _TOKEN_TYPE_CONTROL,
            normalized=False,
            lstrip=False,
            rstrip=False,
            single_word=False,
        )
        for i in range(len(tokens))
        if token_types[i] in (_TOKEN_TYPE_CONTROL, _TOKEN_TYPE_USER_DEFINED)
    ]
    tok.add_tokens(added)

    add_bos = fields["tokenizer.ggml.add_bos_token"]
    bos_id = fields["tokenizer.ggml.bos_token_id"]
    if (spec["add_bos"] if add_bos is None else bool(add_bos)) and bos_id is not None:
        # What a backend prepends to a raw (non-chat) prompt.
        bos = tokens[int(bos_id)]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, int(bos_id))]
        )

    def _name(key: str) -> str | None:
        token_id = fields[key]
        return None if token_id is None else tokens[int(token_id)]

    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tok,
        bos_token=_name("tokenizer.ggml.bos_token_id"),
        eos_token=_name("tokenizer.ggml.eos_token_id"),
    )
    if fields["tokenizer.chat_template"]:
        fast.chat_template = fields["tokenizer.chat_template"]
    return fast
