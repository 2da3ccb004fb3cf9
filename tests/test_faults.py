"""Fault injection: every way an upstream (or a client) breaks, and what kvern makes of it.

The upstream is scripted on a raw socket (:mod:`tests.raw_upstream`), its URL
carrying credentials, and misbehaves on the first chat request only. For
each fault the suite checks the status the client gets, the OpenAI error
shape of kvern's own errors, that the upstream is named with its
credentials redacted, that the request has its analytics row, and that the
next, normal request works.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import socket
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from kvern.app import create_app
from kvern.config import parse_config
from tests.raw_upstream import CHAT, Reply, Seen, normal, raw_upstream
from tests.servers import free_port, serve

SECRET = "pw-never-shown"
BODY = {"model": "sim", "messages": [{"role": "user", "content": "hi"}]}
STREAM_BODY = {**BODY, "stream": True}


def sse(*events: dict[str, Any] | str) -> bytes:
    return b"".join(
        f"data: {e if isinstance(e, str) else json.dumps(e)}\n\n".encode() for e in events
    )


def delta(text: str, finish: str | None = None) -> dict[str, Any]:
    return {
        "id": "s",
        "object": "chat.completion.chunk",
        "model": "sim",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}],
    }


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)


def chunked(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


END_CHUNKS = b"0\r\n\r\n"


def whole(
    body: bytes, *, status: int = 200, ctype: str = "application/json", extra: str = ""
) -> bytes:
    head = f"HTTP/1.1 {status} X\r\ncontent-type: {ctype}\r\n{extra}"
    return head.encode() + f"content-length: {len(body)}\r\n\r\n".encode() + body


def first_chat_only(fault: Reply) -> Callable[[Seen], Reply]:
    """The fault for the first chat request; a healthy answer to everything after it."""
    done: list[bool] = []

    def script(seen: Seen) -> Reply:
        if seen.method == "POST" and not done:
            done.append(True)
            return fault
        return normal(seen)

    return script


@dataclass
class Kvern:
    url: str
    upstream_name: str
    db: Path


@contextmanager
def kvern_before(
    tmp_path: Path, port: int, read_timeout_s: float = 1.5, **proxy: Any
) -> Iterator[Kvern]:
    config = parse_config(
        {
            "proxy": proxy,
            "upstream": {
                "base_url": f"http://kvern:{SECRET}@127.0.0.1:{port}/v1",
                "read_timeout_s": read_timeout_s,
                "connect_timeout_s": 2,
                # Set, so kvern asks the upstream nothing at start-up: the first
                # chat request is the first on its connection.
                "cache_model": {"kind": "radix", "block_size": 16},
            },
            "tokenizers": {"parity_check": False},
            "analytics": {"db_path": str(tmp_path / "kvern.db"), "flush_interval_ms": 20},
            "routing": {"health": {"interval_s": 0}},
        }
    )
    with serve(create_app(config)) as url:
        yield Kvern(url, f"127.0.0.1:{port}", tmp_path / "kvern.db")


def rows(db: Path) -> list[dict[str, Any]]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in con.execute("SELECT * FROM requests ORDER BY rowid")]
    finally:
        con.close()


def assert_kvern_error(response: httpx.Response, status: int, code: str, upstream: str) -> None:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert upstream in error["message"]
    assert SECRET not in response.text


def chat(url: str, body: dict[str, Any] = BODY) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=30)


@pytest.mark.parametrize(
    ("fault", "status", "code"),
    [
        (Reply(b"", close=True), 502, "upstream_unreachable"),  # closed before headers
        (Reply(b"", reset=True), 502, "upstream_unreachable"),  # reset before headers
        (
            Reply(b'HTTP/1.1 200 OK\r\ncontent-length: 50\r\n\r\n{"id"', close=True),
            502,
            "upstream_unreachable",
        ),  # closed mid-body
        (Reply(b"SSH-2.0-OpenSSH_9.6\r\n\r\n", close=True), 502, "upstream_protocol_error"),
        (
            Reply(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n\r\n", then=((4.0, b""),)),
            504,
            "upstream_timeout",
        ),  # headers, then a stall past the read timeout
    ],
    ids=[
        "closed-before-headers",
        "reset-before-headers",
        "closed-mid-body",
        "not-http",
        "stall-past-read-timeout",
    ],
)
def test_an_upstream_failing_a_whole_answer_gives_an_openai_error_naming_it(
    tmp_path: Path, fault: Reply, status: int, code: str
) -> None:
    with raw_upstream(first_chat_only(fault)) as up:
        port = int(up.url.rsplit(":", 1)[1])
        with kvern_before(tmp_path, port) as k:
            failed = chat(k.url)
            after = chat(k.url)
    assert_kvern_error(failed, status, code, k.upstream_name)
    assert after.status_code == 200 and after.json() == CHAT
    recorded = rows(k.db)
    assert [r["error"] for r in recorded] == [code, None]
    assert recorded[0]["status"] == status
    assert all(SECRET not in json.dumps(r) for r in recorded)


def test_a_refused_upstream_gives_a_502_and_the_request_after_it_comes_up_works(
    tmp_path: Path,
) -> None:
    port = free_port()
    with kvern_before(tmp_path, port) as k:
        refused = chat(k.url)
        with raw_upstream(port=port):
            after = chat(k.url)
    assert_kvern_error(refused, 502, "upstream_unreachable", k.upstream_name)
    assert after.status_code == 200
    assert [r["error"] for r in rows(k.db)] == ["upstream_unreachable", None]


@pytest.mark.parametrize("status", [429, 500, 503])
def test_an_upstream_error_status_is_relayed_unchanged_with_a_row(
    tmp_path: Path, status: int
) -> None:
    body = json.dumps({"error": {"message": "slow down", "type": "rate_limit"}}).encode()
    fault = Reply(whole(body, status=status, extra="retry-after: 7\r\n"))
    with raw_upstream(first_chat_only(fault)) as up:
        with kvern_before(tmp_path, int(up.url.rsplit(":", 1)[1])) as k:
            failed = chat(k.url)
            after = chat(k.url)
    assert failed.status_code == status and failed.content == body
    assert failed.headers["retry-after"] == "7"
    assert failed.headers["x-kvern-upstream"] == k.upstream_name
    assert after.status_code == 200
    assert [r["status"] for r in rows(k.db)] == [status, 200]


@pytest.mark.parametrize(
    "garbage",
    [b"this is not json", b"\xff\xfe\x00garbage", b'{"choices": "nope", "usage": -1}'],
)
def test_a_garbage_body_is_relayed_as_it_is_and_recorded(tmp_path: Path, garbage: bytes) -> None:
    with raw_upstream(first_chat_only(Reply(whole(garbage)))) as up:
        with kvern_before(tmp_path, int(up.url.rsplit(":", 1)[1])) as k:
            odd = chat(k.url)
            after = chat(k.url)
    assert odd.status_code == 200 and odd.content == garbage
    assert after.status_code == 200
    assert [r["status"] for r in rows(k.db)] == [200, 200]


def stream_client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="sk-x", max_retries=0, timeout=30)


@pytest.mark.parametrize(
    ("then", "code"),
    [
        (((0.1, b""),), "upstream_unreachable"),  # reset after two events
        (((4.0, b""),), "upstream_timeout"),  # stall past the read timeout
    ],
    ids=["reset-mid-stream", "stall-mid-stream"],
)
def test_a_stream_cut_by_the_upstream_ends_with_an_error_event_the_sdk_raises(
    tmp_path: Path, then: tuple[tuple[float, bytes], ...], code: str
) -> None:
    events = chunked(sse(delta("Hel"), delta("lo")))
    fault = Reply(STREAM_HEAD + events, reset=code == "upstream_unreachable", then=then)
    with raw_upstream(first_chat_only(fault)) as up:
        with kvern_before(tmp_path, int(up.url.rsplit(":", 1)[1])) as k:
            client = stream_client(k.url)
            got = []
            with pytest.raises(openai.APIError) as raised:
                for chunk in client.chat.completions.create(**STREAM_BODY):
                    got.append(chunk.choices[0].delta.content)
            after = chat(k.url)
    assert got == ["Hel", "lo"]
    assert k.upstream_name in str(raised.value) and SECRET not in str(raised.value)
    assert after.status_code == 200
    assert [r["error"] for r in rows(k.db)] == [code, None]


def test_malformed_sse_is_relayed_unchanged_and_recorded(tmp_path: Path) -> None:
    mess = b"data: {not json\n\nevent: ???\ndata:\n\n: comment\n\ndata: [DONE]\n\n"
    fault = Reply(STREAM_HEAD + chunked(mess) + END_CHUNKS)
    with raw_upstream(first_chat_only(fault)) as up:
        with kvern_before(tmp_path, int(up.url.rsplit(":", 1)[1])) as k:
            with httpx.stream("POST", k.url + "/v1/chat/completions", json=STREAM_BODY) as r:
                relayed = b"".join(r.iter_raw())
                status = r.status_code
            after = chat(k.url)
    assert status == 200 and relayed == mess
    assert after.status_code == 200
    assert [(r["status"], r["error"]) for r in rows(k.db)] == [(200, None), (200, None)]


def test_a_client_closing_right_after_done_is_not_a_disconnect(tmp_path: Path) -> None:
    # The upstream keeps the stream open a while after [DONE] (a second proxy
    # hop, or a server that flushes late); the official SDK closes at [DONE].
    events = chunked(sse(delta("ok", "stop"), "[DONE]"))
    fault = Reply(STREAM_HEAD + events, then=((1.0, END_CHUNKS),))
    with raw_upstream(first_chat_only(fault)) as up:
        with kvern_before(tmp_path, int(up.url.rsplit(":", 1)[1])) as k:
            stream = stream_client(k.url).chat.completions.create(**STREAM_BODY)
            text = "".join(c.choices[0].delta.content or "" for c in stream)
            stream.close()
            time.sleep(1.5)  # the relay notices the client left
    assert text == "ok"
    assert [(r["status"], r["error"]) for r in rows(k.db)] == [(200, None)]


def test_a_client_leaving_mid_stream_is_recorded_as_a_disconnect(tmp_path: Path) -> None:
    events = chunked(sse(delta("Hel")))
    fault = Reply(STREAM_HEAD + events, then=((2.0, chunked(sse(delta("lo")))),))
    with raw_upstream(first_chat_only(fault)) as up:
        with kvern_before(tmp_path, int(up.url.rsplit(":", 1)[1])) as k:
            stream = stream_client(k.url).chat.completions.create(**STREAM_BODY)
            next(iter(stream))
            stream.close()
            time.sleep(3.0)
    assert [r["error"] for r in rows(k.db)] == ["client_disconnected"]


def test_a_gzipped_answer_reaches_the_client_as_sent_and_its_usage_is_read(
    tmp_path: Path,
) -> None:
    packed = gzip.compress(json.dumps(CHAT).encode())
    fault = Reply(whole(packed, extra="content-encoding: gzip\r\n"))
    with raw_upstream(first_chat_only(fault)) as up:
        with kvern_before(tmp_path, int(up.url.rsplit(":", 1)[1])) as k:
            got = chat(k.url)  # httpx decodes per the relayed content-encoding
    assert got.status_code == 200 and got.json() == CHAT
    assert got.headers["content-encoding"] == "gzip"
    (row,) = rows(k.db)
    assert row["completion_tokens"] == 1


def test_a_false_gzip_header_is_relayed_without_a_500_and_recorded(tmp_path: Path) -> None:
    plain = json.dumps(CHAT).encode()
    fault = Reply(whole(plain, extra="content-encoding: gzip\r\n"))
    with raw_upstream(first_chat_only(fault)) as up:
        with kvern_before(tmp_path, int(up.url.rsplit(":", 1)[1])) as k:
            with httpx.stream("POST", k.url + "/v1/chat/completions", json=BODY) as r:
                relayed = b"".join(r.iter_raw())
                status = r.status_code
            after = chat(k.url)
    assert status == 200 and relayed == plain  # the upstream's bytes, its header with them
    assert after.status_code == 200
    assert [(r["status"], r["error"]) for r in rows(k.db)] == [(200, None), (200, None)]


def test_a_large_answer_is_relayed_as_it_arrives_not_buffered_whole(tmp_path: Path) -> None:
    # 24 MB, the first 2 MB at once and the rest after a pause: the client
    # has its first bytes during the pause, and every byte in the end.
    size = 24 * 1024 * 1024
    body = (b'{"data": "' + b"x" * (size - 12) + b'"}')[:size]
    head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {size}\r\n\r\n"
    split = 2 * 1024 * 1024
    fault = Reply(head.encode() + body[:split], then=((3.0, body[split:]),))
    with raw_upstream(first_chat_only(fault)) as up:
        with kvern_before(tmp_path, int(up.url.rsplit(":", 1)[1]), read_timeout_s=10) as k:
            start = time.monotonic()
            with httpx.stream("POST", k.url + "/v1/chat/completions", json=BODY, timeout=30) as r:
                parts = r.iter_raw()
                first = next(parts)
                first_s = time.monotonic() - start
                digest = hashlib.sha256(first)
                for part in parts:
                    digest.update(part)
                length = r.headers["content-length"]
    assert first_s < 2.5  # before the upstream's pause ended
    assert length == str(size)
    assert digest.hexdigest() == hashlib.sha256(body).hexdigest()
    assert [r["status"] for r in rows(k.db)] == [200]


def test_a_large_answer_cut_midway_is_cut_for_the_client_too(tmp_path: Path) -> None:
    size = 4 * 1024 * 1024
    head = f"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {size}\r\n\r\n"
    fault = Reply(head.encode() + b"x" * (2 * 1024 * 1024), reset=True)
    with raw_upstream(first_chat_only(fault)) as up:
        with kvern_before(tmp_path, int(up.url.rsplit(":", 1)[1])) as k:
            with pytest.raises(httpx.RemoteProtocolError):
                with httpx.stream(
                    "POST", k.url + "/v1/chat/completions", json=BODY, timeout=30
                ) as r:
                    for _ in r.iter_raw():
                        pass
            after = chat(k.url)
    assert after.status_code == 200
    assert [r["error"] for r in rows(k.db)] == ["upstream_unreachable", None]


def test_a_client_stalling_its_body_gets_a_408_and_its_connection_back(tmp_path: Path) -> None:
    with raw_upstream() as up:
        with kvern_before(tmp_path, int(up.url.rsplit(":", 1)[1]), body_read_timeout_s=1) as k:
            host, port = k.url.removeprefix("http://").split(":")
            with socket.create_connection((host, int(port)), timeout=10) as sock:
                sock.sendall(
                    b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                    b'content-type: application/json\r\ncontent-length: 100\r\n\r\n{"mod'
                )
                start = time.monotonic()
                reply = sock.recv(65536)
                waited = time.monotonic() - start
            after = chat(k.url)
    assert reply.startswith(b"HTTP/1.1 408")
    assert b"body_read_timeout" in reply
    assert waited < 5
    assert after.status_code == 200
    chats = [s for s in up.seen if s.path.endswith("/chat/completions")]
    assert len(chats) == 1  # the stalled request was never forwarded


def test_a_client_leaving_while_sending_its_body_logs_no_traceback(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    with raw_upstream() as up:
        with kvern_before(tmp_path, int(up.url.rsplit(":", 1)[1])) as k:
            host, port = k.url.removeprefix("http://").split(":")
            for _ in range(3):
                with socket.create_connection((host, int(port)), timeout=10) as sock:
                    sock.sendall(
                        b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                        b"content-type: application/json\r\ncontent-length: 100\r\n\r\n{"
                    )
                time.sleep(0.2)
            after = chat(k.url)
    assert after.status_code == 200
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]
    chats = [s for s in up.seen if s.path.endswith("/chat/completions")]
    assert len(chats) == 1  # none of the cut requests was forwarded
