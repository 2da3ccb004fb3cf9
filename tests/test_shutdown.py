"""Stopping kvern: SIGTERM ends every request with an answer and a row; SIGKILL loses little.

kvern runs as users run it (``python -m kvern serve``), in front of a raw
scripted upstream whose answers are told apart by the prompt: ``long`` streams
for half a minute, ``short`` for a second, ``stall`` sends nothing at all.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.raw_upstream import Reply, Seen, normal, raw_upstream
from tests.servers import kvern_process

STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)
END = b"0\r\n\r\n"


def event(text: str, finish: str | None = None) -> bytes:
    chunk = {
        "id": "s",
        "object": "chat.completion.chunk",
        "model": "sim",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}],
    }
    data = f"data: {json.dumps(chunk)}\n\n".encode()
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


DONE = b"e\r\ndata: [DONE]\n\n\r\n"


def script(seen: Seen) -> Reply:
    if seen.method != "POST":
        return normal(seen)
    if b"long" in seen.body:
        return Reply(STREAM_HEAD + event("a"), then=tuple((0.2, event("b")) for _ in range(150)))
    if b"short" in seen.body:
        steps = tuple((0.2, event("b")) for _ in range(5)) + (
            (0.0, event("", "stop") + DONE + END),
        )
        return Reply(STREAM_HEAD + event("a"), then=steps)
    if b"stall" in seen.body:
        return Reply(b"", then=((60.0, b""),))
    return normal(seen)


@contextmanager
def kvern_with(tmp_path: Path, upstream_url: str, **proxy: Any) -> Iterator[tuple[Any, str]]:
    config = {
        "proxy": proxy,
        "upstream": {"base_url": upstream_url + "/v1"},
        "tokenizers": {"parity_check": False},
        "analytics": {"db_path": str(tmp_path / "kvern.db"), "flush_interval_ms": 200},
        "routing": {"health": {"interval_s": 0}},
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    with kvern_process(
        ["-m", "kvern", "serve", "--config", str(path)], cwd=tmp_path, log_path=tmp_path / "log"
    ) as served:
        yield served


def rows(db: Path) -> dict[str, dict[str, Any]]:
    con = sqlite3.connect(db)
    con.row_factory = sqlite3.Row
    try:
        return {r["request_id"]: dict(r) for r in con.execute("SELECT * FROM requests")}
    finally:
        con.close()


def stream_chat(url: str, word: str, out: dict[str, Any]) -> None:
    """Stream one chat; ``out`` gets its request id, the raw stream and how it ended."""
    body = {"model": "sim", "stream": True, "messages": [{"role": "user", "content": word}]}
    try:
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=60) as r:
            out["status"] = r.status_code
            out["id"] = r.headers.get("x-kvern-request-id")
            out["text"] = b"".join(r.iter_raw()).decode()
    except httpx.HTTPError as exc:
        out["failure"] = repr(exc)


def test_sigterm_lets_short_streams_finish_and_ends_long_ones_with_an_event_and_a_row(
    tmp_path: Path,
) -> None:
    with raw_upstream(script) as up:
        with kvern_with(tmp_path, up.url, shutdown_grace_s=2) as (proc, url):
            results: dict[str, dict[str, Any]] = {w: {} for w in ("long", "short", "stall")}
            threads = [
                threading.Thread(target=stream_chat, args=(url, w, results[w])) for w in results
            ]
            for t in threads:
                t.start()
            time.sleep(0.6)  # all three are in flight
            start = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            for t in threads:
                t.join(timeout=30)
            returncode = proc.wait(timeout=30)
            stopped_s = time.monotonic() - start
    long, short, stall = results["long"], results["short"], results["stall"]
    assert "[DONE]" in short["text"] and "error" not in short["text"]
    assert long["status"] == 200 and '"code": "shutting_down"' in long["text"]
    assert stall["status"] == 503
    assert stopped_s < 2 + 5 + 3  # the grace, the margin, and start-up noise
    assert returncode == 0  # a graceful stop is a clean exit
    recorded = rows(tmp_path / "kvern.db")
    assert recorded[short["id"]]["error"] is None
    assert recorded[long["id"]]["error"] == "shutting_down"
    assert len(recorded) == 3
    assert sorted(r["error"] or "-" for r in recorded.values()) == [
        "-",
        "shutting_down",
        "shutting_down",
    ]


def run_load(url: str, stop: threading.Event, done: list[tuple[float, str]]) -> None:
    body = {"model": "sim", "messages": [{"role": "user", "content": "hi"}]}
    with httpx.Client(timeout=10) as client:
        while not stop.is_set():
            try:
                r = client.post(url + "/v1/chat/completions", json=body)
            except httpx.HTTPError:
                return  # kvern is gone
            if r.status_code == 200:
                done.append((time.monotonic(), r.headers["x-kvern-request-id"]))


@contextmanager
def under_load(url: str, workers: int = 4) -> Iterator[list[tuple[float, str]]]:
    done: list[tuple[float, str]] = []
    stop = threading.Event()
    with ThreadPoolExecutor(workers) as pool:
        for _ in range(workers):
            pool.submit(run_load, url, stop, done)
        try:
            yield done
        finally:
            stop.set()


def test_sigterm_under_load_loses_no_row(tmp_path: Path) -> None:
    with raw_upstream() as up:
        with kvern_with(tmp_path, up.url) as (proc, url):
            with under_load(url) as done:
                time.sleep(3)
                proc.send_signal(signal.SIGTERM)
                proc.wait(timeout=60)
    recorded = rows(tmp_path / "kvern.db")
    assert len(done) > 50
    missing = [rid for _, rid in done if rid not in recorded]
    assert missing == []


def test_sigkill_under_load_loses_at_most_the_last_flush_interval_of_rows(
    tmp_path: Path,
) -> None:
    flush_s = 0.2  # analytics.flush_interval_ms in kvern_with
    with raw_upstream() as up:
        with kvern_with(tmp_path, up.url) as (proc, url):
            with under_load(url) as done:
                time.sleep(3)
                killed_at = time.monotonic()
                proc.kill()
                proc.wait(timeout=30)
    recorded = rows(tmp_path / "kvern.db")
    assert len(done) > 50
    missing_ages = sorted(killed_at - t for t, rid in done if rid not in recorded)
    print(f"rows lost at SIGKILL: {len(missing_ages)} of {len(done)}; ages {missing_ages[-3:]}")
    # Every row of a request answered more than one flush interval (plus the
    # hop through the tracking process, on a noisy machine) before the kill is on disk.
    assert all(age <= flush_s + 0.5 for age in missing_ages)
