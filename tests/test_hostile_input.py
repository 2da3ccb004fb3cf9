"""Input no backend would choke on must not make kvern answer 5xx, nor poison what it shows.

The upstream here answers every request with the same completion without
reading the body, so whatever status comes back is kvern's own doing; it
echoes one request header so forwarding can be checked byte for byte.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from kvern.app import create_app
from kvern.config import parse_config
from tests.raw_upstream import CHAT as CANNED
from tests.servers import serve, serve_chat

MODEL = "sim"


@contextmanager
def canned_upstream() -> Iterator[str]:
    async def chat(request: Request) -> Response:
        await request.body()
        thing = request.headers.raw
        echoed = next((v for k, v in thing if k == b"x-thing"), b"")
        return JSONResponse(CANNED, headers={"x-echo": echoed.hex()})

    with serve_chat(chat, MODEL) as url:
        yield url


@contextmanager
def kvern_in_front(tmp_path: Path, tokenizer_fixtures: dict[str, Any]) -> Iterator[str]:
    with canned_upstream() as up:
        config = parse_config(
            {
                "upstream": {"base_url": up + "/v1"},
                "tokenizers": {
                    "models": {"*": str(tokenizer_fixtures["qwen2"].directory)},
                    "parity_check": False,
                },
                "analytics": {"db_path": str(tmp_path / "kvern.db"), "flush_interval_ms": 20},
            }
        )
        with serve(create_app(config)) as url:
            yield url


def post(url: str, raw: bytes, **headers: Any) -> httpx.Response:
    return httpx.post(
        url + "/v1/chat/completions",
        content=raw,
        headers={"content-type": "application/json", **headers},
        timeout=30,
    )


def row_count(db: Path) -> int:
    con = sqlite3.connect(db)
    try:
        return int(con.execute("SELECT count(*) FROM requests").fetchone()[0])
    finally:
        con.close()


def test_a_lone_surrogate_in_model_or_user_never_breaks_health_or_the_trie(
    tmp_path: Path, tokenizer_fixtures: dict[str, Any]
) -> None:
    chat = b'"messages": [{"role": "user", "content": "hi"}]'
    with kvern_in_front(tmp_path, tokenizer_fixtures) as url:
        assert post(url, b'{"model": "m\\ud800", ' + chat + b"}").status_code == 200
        assert post(url, b'{"model": "sim", "user": "u\\udc00", ' + chat + b"}").status_code == 200
        assert post(url, b'{"model": "sim", ' + chat + b"}").status_code == 200
        # Rows first (a tokenizer loading on a busy machine may hold the brain
        # past /trie/visualize's 1 s default): this test is about the surrogates.
        report = httpx.get(url + "/analytics", params={"wait_s": 20}, timeout=30)
        health = httpx.get(url + "/health", timeout=30)
        trie = httpx.get(url + "/trie/visualize", timeout=30)
    assert (health.status_code, trie.status_code, report.status_code) == (200, 200, 200), trie.text
    assert "m\ufffd\ufffd\ufffd" in health.json()["tokenizers"]
    assert report.json()["summary"]["requests"] == 3
    assert row_count(tmp_path / "kvern.db") == 3


def test_a_header_value_that_is_not_ascii_is_forwarded_as_sent(
    tmp_path: Path, tokenizer_fixtures: dict[str, Any]
) -> None:
    body = b'{"model": "sim", "messages": [{"role": "user", "content": "hi"}]}'
    with kvern_in_front(tmp_path, tokenizer_fixtures) as url:
        reply = httpx.post(
            url + "/v1/chat/completions",
            content=body,
            headers=[(b"content-type", b"application/json"), (b"x-thing", b"caf\xe9")],
            timeout=30,
        )
    assert reply.status_code == 200
    assert bytes.fromhex(reply.headers["x-echo"]) == b"caf\xe9"


def test_json_nested_past_pythons_parser_is_forwarded_untracked(
    tmp_path: Path, tokenizer_fixtures: dict[str, Any]
) -> None:
    deep = b"[" * 5000 + b"]" * 5000
    raw = b'{"model": "sim", "messages": [{"role": "user", "content": "hi"}], "x": ' + deep + b"}"
    with kvern_in_front(tmp_path, tokenizer_fixtures) as url:
        reply = post(url, raw)
        normal = post(url, b'{"model": "sim", "messages": [{"role": "user", "content": "hi"}]}')
        httpx.get(url + "/analytics", params={"wait_s": 20}, timeout=30)
    assert reply.status_code == 200 and reply.json() == CANNED
    assert normal.status_code == 200
    # The deep body names no model kvern could read: its row has no model and
    # no tracking figures; the next request is tracked as usual.
    assert row_count(tmp_path / "kvern.db") == 2


def test_stream_given_as_the_string_false_is_recorded_as_not_streamed(
    tmp_path: Path, tokenizer_fixtures: dict[str, Any]
) -> None:
    chat = b'"messages": [{"role": "user", "content": "hi"}]'
    with kvern_in_front(tmp_path, tokenizer_fixtures) as url:
        assert post(url, b'{"model": "sim", "stream": "false", ' + chat + b"}").status_code == 200
        assert post(url, b'{"model": "sim", "stream": false, ' + chat + b"}").status_code == 200
        httpx.get(url + "/analytics", params={"wait_s": 20}, timeout=30)
    con = sqlite3.connect(tmp_path / "kvern.db")
    try:
        streams = [r[0] for r in con.execute("SELECT stream FROM requests ORDER BY ts_s")]
    finally:
        con.close()
    assert streams == [0, 0]
