"""Read the key/value header of a GGUF file (llama.cpp's model format).

Why a reader of our own: the ``gguf`` package maps every field into numpy
views first, which takes ~15 s for a 128k-token vocabulary; this one takes
well under a second and needs no extra dependency. Only the metadata is read,
never the tensors: the file is memory-mapped, so a model of many gigabytes
(an Ollama blob) costs only the pages its header spans.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any


class GGUFTokenizerError(ValueError):
    """The GGUF file holds no tokenizer kvern can rebuild exactly (the message says why)."""


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

    def __init__(self, data: bytes | mmap.mmap) -> None:
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
    """Every key/value of a GGUF file's header (not its tensors), as plain Python values."""
    with open(path, "rb") as fh:
        if fh.read(4) != _GGUF_MAGIC:
            raise GGUFTokenizerError(f"{path}: not a GGUF file")
        with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as data:
            cur = _Cursor(data)
            cur.pos = 4
            try:
                version = cur.unpack("<I")
                if version < 2:
                    raise GGUFTokenizerError(f"{path}: GGUF version {version} is too old")
                cur.unpack("<Q")  # tensor count
                kv_count = cur.unpack("<Q")
                out: dict[str, Any] = {}
                for _ in range(kv_count):
                    key = cur.string()
                    out[key] = cur.value(cur.unpack("<I"))
            except struct.error as exc:
                raise GGUFTokenizerError(f"{path}: truncated GGUF header ({exc})") from None
    return out
