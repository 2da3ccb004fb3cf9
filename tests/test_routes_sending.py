"""Sending upstream through kvern: what is sent again, what is not, and what a 502 says.

The upstream is scripted on a raw socket (:mod:`tests.raw_upstream`), so each
fault happens exactly where it should: on a fresh or a reused connection,
before or after the first byte of the answer.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from kvern.app import create_app
from kvern.config import parse_config
from tests.raw_upstream import CHAT, Reply, Seen, answer, normal, raw_upstream
from tests.servers import free_port, serve

BODY = {"model": "sim", "messages": [{"role": "user", "content": "hi"}]}


@contextmanager
def kvern_before(
    tmp_path: Path, tokenizer_fixtures: dict[str, Any], **upstreams: Any
) -> Iterator[str]:
    """kvern with one connection pool before ``base_url=`` (one upstream) or ``upstreams=``."""
    data: dict[str, Any] = {
        # One shard, so the second request reuses the first one's connection.
        "upstream": {
            "max_keepalive_connections": 1,
            "read_timeout_s": 10.0,
            # Set, so kvern asks the upstream nothing at start-up: each
            # connection's place in the script is the test's to decide.
            "cache_model": {"kind": "radix", "block_size": 16},
        },
        "tokenizers": {
            "models": {"*": str(tokenizer_fixtures["qwen2"].directory)},
            "parity_check": False,
        },
        "analytics": {"db_path": str(tmp_path / "kvern.db"), "flush_interval_ms": 20},
    }
    if "base_url" in upstreams:
        data["upstream"]["base_url"] = upstreams["base_url"]
    else:
        data["upstreams"] = upstreams["upstreams"]
        data["routing"] = {"health": {"interval_s": 0}}
    with serve(create_app(parse_config(data))) as url:
        yield url


def chat(url: str) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=BODY, timeout=30)


def second_on_a_connection(then: Reply) -> Callable[[Seen], Reply]:
    """Answer a connection's first request; meet the second with ``then``."""
    return lambda seen: then if seen.number == 2 else normal(seen)


def health_of_the_upstream(url: str) -> dict[str, Any]:
    upstream: dict[str, Any] = httpx.get(url + "/health", timeout=30).json()["upstream"]
    return upstream


def test_a_reused_connection_dropped_unanswered_is_sent_again_and_counted(
    tmp_path: Path, tokenizer_fixtures: dict[str, Any]
) -> None:
    with raw_upstream(second_on_a_connection(Reply(b"", close=True))) as up:
        with kvern_before(tmp_path, tokenizer_fixtures, base_url=up.url + "/v1") as kvern:
            first, second = chat(kvern), chat(kvern)
            assert first.status_code == 200, first.text
            assert second.status_code == 200, second.text
            assert second.json() == CHAT
            assert up.places() == [(1, 1), (1, 2), (2, 1)]
            assert health_of_the_upstream(kvern)["stale_retries"] == 1


def test_a_fresh_connection_dropped_unanswered_is_a_502_naming_the_upstream(
    tmp_path: Path, tokenizer_fixtures: dict[str, Any]
) -> None:
    with raw_upstream(lambda seen: Reply(b"", close=True)) as up:
        with kvern_before(tmp_path, tokenizer_fixtures, base_url=up.url + "/v1") as kvern:
            response = chat(kvern)
            assert response.status_code == 502
            message = response.json()["error"]["message"]
            assert message.startswith(f"upstream {up.url.removeprefix('http://')}: ")
            assert "connection closed early" in message
            assert up.places() == [(1, 1)]  # not sent again: nothing was reused


def test_an_answer_cut_after_it_began_is_not_sent_again(
    tmp_path: Path, tokenizer_fixtures: dict[str, Any]
) -> None:
    cut = Reply(answer(CHAT)[:-5], close=True)
    with raw_upstream(second_on_a_connection(cut)) as up:
        with kvern_before(tmp_path, tokenizer_fixtures, base_url=up.url + "/v1") as kvern:
            assert chat(kvern).status_code == 200
            response = chat(kvern)
            assert response.status_code == 502
            assert "connection closed early" in response.json()["error"]["message"]
            assert up.places() == [(1, 1), (1, 2)]
            assert health_of_the_upstream(kvern)["stale_retries"] == 0


def test_a_reset_in_the_middle_of_the_body_says_so_and_why(
    tmp_path: Path, tokenizer_fixtures: dict[str, Any]
) -> None:
    with raw_upstream(lambda seen: Reply(answer(CHAT)[:-5], reset=True)) as up:
        with kvern_before(tmp_path, tokenizer_fixtures, base_url=up.url + "/v1") as kvern:
            response = chat(kvern)
    assert response.status_code == 502
    message = response.json()["error"]["message"]
    assert "connection reset by the upstream while reading the answer" in message, message
    assert "ConnectionResetError: [Errno 104]" in message, message


def test_when_every_upstream_refuses_the_502_names_each_and_why(
    tmp_path: Path, tokenizer_fixtures: dict[str, Any]
) -> None:
    closed = [f"http://127.0.0.1:{free_port()}/v1" for _ in range(2)]
    upstreams = [{"name": name, "url": url} for name, url in zip(["a", "b"], closed, strict=True)]
    with kvern_before(tmp_path, tokenizer_fixtures, upstreams=upstreams) as kvern:
        response = chat(kvern)
    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "upstream_unreachable"
    message = error["message"]
    assert message.startswith("all 2 upstreams tried failed: "), message
    for name in ("a", "b"):
        assert f"upstream {name}: cannot connect (" in message, message
    assert message.count("ConnectionRefusedError: [Errno 111]") == 2, message
