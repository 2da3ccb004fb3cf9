"""No silent fallback: a model without a tokenizer of its own is tokenized by the upstream.

When a configured tokenizer cannot be loaded (or none is configured) and the
upstream can tokenize, kvern asks it and stays exact; when it cannot, the
approximate tokenizer is used as the last resort, logged as an ERROR naming
the model and why, ``/health`` turns ``degraded`` and lists the model, and
every analytics figure computed from it says it is an estimate.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kvern.app import create_app
from kvern.config import parse_config
from tests.llama_server import llama_server, tiny_model
from tests.raw_upstream import CHAT
from tests.servers import serve, serve_chat
from tests.test_truth_llamacpp import MODEL, run_conversation
from tests.truth import flush, rows


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with llama_server(tiny_model("qwen2"), slots=1) as url:
        yield url


def test_a_tokenizer_that_cannot_load_gives_way_to_the_upstreams_and_stays_exact(
    tmp_path: Path, server: str
) -> None:
    config = parse_config(
        {
            "upstream": {"base_url": server + "/v1", "cache_model": {"kind": "llamacpp"}},
            "tokenizers": {"models": {MODEL: str(tmp_path / "no-such-tokenizer")}},
            "trie": {"block_size": 1, "min_prefix_tokens": 1},
            "analytics": {"db_path": str(tmp_path / "kvern.db"), "flush_interval_ms": 10},
        }
    )
    with serve(create_app(config)) as kvern:
        run_conversation(kvern, 3, own_replies=False)
        flush(kvern)
        health = httpx.get(kvern + "/health", timeout=30).json()
    state = health["tokenizers"][MODEL]
    assert state["kind"] == "exact" and state["source"].startswith("upstream:")
    assert "no-such-tokenizer" in state["error"] and "llamacpp" in state["error"]
    assert health["approximate_tokenizers"] == [] and health["status"] == "ok"
    recorded = rows(tmp_path / "kvern.db")
    assert [r["tokenizer_kind"] for r in recorded] == ["exact"] * 3
    assert all(r["prompt_tokens"] == r["upstream_prompt_tokens"] for r in recorded)
    assert [r["predicted_cached_tokens"] for r in recorded] == [
        r["reported_cached_tokens"] for r in recorded
    ]


def test_with_no_upstream_tokenizer_the_approximate_one_is_loud(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def chat(request: Request) -> Response:
        await request.body()
        return JSONResponse(CHAT)

    caplog.set_level(logging.WARNING)
    with serve_chat(chat, "sim") as up:
        config = parse_config(
            {
                "upstream": {"base_url": up + "/v1"},
                "tokenizers": {"parity_check": False},
                "analytics": {"db_path": str(tmp_path / "kvern.db"), "flush_interval_ms": 10},
                "tracking": {"isolation": "thread"},  # its log lines land in this process
                "routing": {"health": {"interval_s": 0}},
            }
        )
        with serve(create_app(config)) as kvern:
            body: dict[str, Any] = {"model": "sim", "messages": [{"role": "user", "content": "x"}]}
            assert httpx.post(kvern + "/v1/chat/completions", json=body, timeout=30).is_success
            report = httpx.get(kvern + "/analytics", params={"wait_s": 30}, timeout=60).json()
            health = httpx.get(kvern + "/health", timeout=30).json()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert any("sim" in r.getMessage() and "APPROXIMATE" in r.getMessage() for r in errors)
    assert health["status"] == "degraded" and health["approximate_tokenizers"] == ["sim"]
    assert health["tokenizers"]["sim"]["kind"] == "fallback"
    assert "cannot tokenize" in health["tokenizers"]["sim"]["error"]
    assert report["summary"]["approximate"] is True
    assert report["by_model"][0]["approximate_requests"] == 1
