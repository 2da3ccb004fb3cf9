"""kvern's GGUF -> HF tokenizer conversion reproduces llama.cpp's own test vectors."""

from __future__ import annotations

from typing import Any

import pytest

from kvern.tokenize.gguf import GGUFTokenizerError, read_gguf_metadata
from tests import assets


def test_derived_tokenizers_match_llama_cpp_test_vectors(
    real_tokenizer: Any, real_tokenizer_name: str, tokenizer_fixtures: dict[str, Any]
) -> None:
    vectors = tokenizer_fixtures[real_tokenizer_name].vectors
    assert len(vectors) >= 40
    mismatches = [
        text
        for text, ids in vectors
        if real_tokenizer.encode(text, add_special_tokens=False) != ids
    ]
    assert mismatches == []


def test_metadata_reader_reads_header_fields() -> None:
    meta = read_gguf_metadata(assets.models_dir() / "ggml-vocab-qwen2.gguf")
    assert meta["general.architecture"] == "qwen2"
    assert meta["tokenizer.ggml.pre"] == "qwen2"
    assert len(meta["tokenizer.ggml.tokens"]) == len(meta["tokenizer.ggml.token_type"])


def test_non_gguf_file_is_rejected(tmp_path: Any) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(b"NOPE" + b"\0" * 32)
    with pytest.raises(GGUFTokenizerError, match="not a GGUF file"):
        read_gguf_metadata(path)


def test_unsupported_vocabulary_is_refused() -> None:
    from kvern.tokenize.gguf import build_tokenizer_from_gguf

    with pytest.raises(GGUFTokenizerError, match="only byte-level BPE"):
        build_tokenizer_from_gguf(assets.models_dir() / "ggml-vocab-llama-spm.gguf")


def test_special_tokens_are_atomic(real_tokenizer: Any, real_tokenizer_name: str) -> None:
    special = "<|eot_id|>" if real_tokenizer_name == "llama3" else "<|im_end|>"
    ids = real_tokenizer.encode(f"hi{special}there", add_special_tokens=False)
    assert real_tokenizer.convert_tokens_to_ids(special) in ids
