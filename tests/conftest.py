"""Shared fixtures: real tokenizers derived offline (see tests/assets.py)."""

from __future__ import annotations

import os
from typing import Any

import pytest

from tests import assets

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REAL_TOKENIZERS = ("llama3", "qwen2")


@pytest.fixture(scope="session")
def tokenizer_fixtures() -> dict[str, assets.TokenizerFixture]:
    return {name: assets.tokenizer_fixture(name) for name in REAL_TOKENIZERS}


@pytest.fixture(scope="session")
def hf_tokenizers(tokenizer_fixtures: dict[str, assets.TokenizerFixture]) -> dict[str, Any]:
    from transformers import AutoTokenizer

    return {
        name: AutoTokenizer.from_pretrained(str(fx.directory))
        for name, fx in tokenizer_fixtures.items()
    }


@pytest.fixture(params=REAL_TOKENIZERS)
def real_tokenizer_name(request: pytest.FixtureRequest) -> str:
    """Parametrizes a test over the Llama 3.2 and Qwen2.5 pair."""
    return str(request.param)


@pytest.fixture
def real_tokenizer(hf_tokenizers: dict[str, Any], real_tokenizer_name: str) -> Any:
    return hf_tokenizers[real_tokenizer_name]


@pytest.fixture(scope="session")
def small_bpe_dir() -> str:
    return str(assets.small_bpe_fixture())
