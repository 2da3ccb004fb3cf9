"""``analytics.capture``: forwarded bodies as OpenAI Batch input lines, off the request path.

End to end through kvern (a scripted upstream): what lands in the file and
what does not; then the writer alone: rotation at the cap, the file's mode,
drops while the writer is stuck, and a write error that turns capture off
without touching a request.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from kvern.analytics.capture import Capture, CaptureFile
from kvern.app import create_app
from kvern.config import KvernConfig, parse_config
from tests.servers import chat_answer, serve

API_KEY = "sk-capture-test-secret-key"


async def _models(request: Request) -> Response:
    return JSONResponse({"object": "list", "data": [{"id": "m"}]})


def upstream_app() -> Starlette:
    paths = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/api/chat")
    routes = [Route(p, chat_answer, methods=["POST"]) for p in paths]
    return Starlette(routes=[*routes, Route("/v1/models", _models, methods=["GET"])])


def config_for(tmp_path: Path, url: str, **analytics: Any) -> KvernConfig:
    return parse_config(
        {
            "upstream": {"base_url": url + "/v1", "cache_model": {"kind": "radix"}},
            "tokenizers": {"parity_check": False},
            "analytics": {"db_path": str(tmp_path / "kvern.db"), **analytics},
            "tracking": {"isolation": "thread"},
            "routing": {"health": {"interval_s": 0}},
        }
    )


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_tracked_bodies_land_as_batch_input_lines_and_nothing_else_does(tmp_path: Path) -> None:
    path = tmp_path / "capture" / "requests.jsonl"
    chat = {
        "model": "m",
        "messages": [
            {"role": "system", "content": "Be brief.\nReally."},
            {"role": "user", "content": "hi"},
        ],
        "user": "ada",
    }
    completion = {"model": "m", "prompt": "Once upon a time", "max_tokens": 3}
    ollama = {"model": "m", "messages": [{"role": "user", "content": "héllo"}], "stream": False}
    with serve(upstream_app()) as up:
        config = config_for(tmp_path, up, capture={"path": str(path)})
        with serve(create_app(config)) as kvern:
            auth = {"authorization": f"Bearer {API_KEY}"}
            # Pretty-printed, as some clients send it: still one line in the file.
            a = httpx.post(
                kvern + "/v1/chat/completions",
                content=json.dumps(chat, indent=2).encode(),
                headers={**auth, "content-type": "application/json"},
            )
            b = httpx.post(kvern + "/v1/completions", json=completion)
            c = httpx.post(kvern + "/api/chat", json=ollama)
            # Not captured: another endpoint, a GET, and a body kvern refuses.
            embed = {"model": "m", "input": "x"}
            assert httpx.post(kvern + "/v1/embeddings", json=embed).is_success
            assert httpx.get(kvern + "/v1/models").is_success
            assert httpx.post(kvern + "/v1/chat/completions", content=b"[1]").status_code == 400
            health = httpx.get(kvern + "/health").json()
            metrics = httpx.get(kvern + "/metrics").text
    assert [r.status_code for r in (a, b, c)] == [200, 200, 200]
    got = lines(path)
    assert [g["custom_id"] for g in got] == [r.headers["x-kvern-request-id"] for r in (a, b, c)]
    assert [g["url"] for g in got] == ["/v1/chat/completions", "/v1/completions", "/api/chat"]
    assert {g["method"] for g in got} == {"POST"}
    assert [g["body"] for g in got] == [chat, completion, ollama]
    first = got[0]["kvern"]
    assert first["endpoint"] == "chat"
    assert first["tenant"].startswith("key:") and first["end_user"].startswith("user:")
    assert got[1]["kvern"]["tenant"] is None
    assert [g["kvern"]["endpoint"] for g in got[1:]] == ["completions", "ollama_chat"]
    assert all(isinstance(g["kvern"]["ts_s"], float) for g in got)
    text = path.read_text()
    assert API_KEY not in text and "authorization" not in text.lower()
    assert path.stat().st_mode & 0o777 == 0o600
    # Shown in /health (beside the store's counters) and /metrics; the close wrote all three.
    assert health["analytics"]["capture"]["enabled"] is True
    assert "written" in health["analytics"]  # the store's figures are still there
    assert "kvern_capture_written_total" in metrics
    assert 'kvern_capture_dropped_total{reason="queue_full"} 0.0' in metrics


def test_capture_is_off_by_default(tmp_path: Path) -> None:
    assert parse_config({}).analytics.capture is None
    with serve(upstream_app()) as up, serve(create_app(config_for(tmp_path, up))) as kvern:
        assert httpx.post(kvern + "/v1/completions", json={"model": "m", "prompt": "x"}).is_success
        health = httpx.get(kvern + "/health").json()
        metrics = httpx.get(kvern + "/metrics").text
    assert "capture" not in health["analytics"]
    assert "kvern_capture" not in metrics
    assert not list(tmp_path.rglob("*.jsonl"))


def test_a_request_is_answered_normally_when_the_capture_path_is_unwritable(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with serve(upstream_app()) as up:
        config = config_for(tmp_path, up, capture={"path": str(blocker / "requests.jsonl")})
        with caplog.at_level(logging.ERROR), serve(create_app(config)) as kvern:
            answers = [
                httpx.post(kvern + "/v1/completions", json={"model": "m", "prompt": str(i)})
                for i in range(3)
            ]
            health = httpx.get(kvern + "/health").json()
    assert [r.status_code for r in answers] == [200, 200, 200]
    capture = health["analytics"]["capture"]
    assert capture["enabled"] is False and "a-file" in capture["error"]
    assert capture["written"] == 0 and capture["dropped_disabled"] == 3
    assert len([r for r in caplog.records if "capture" in r.getMessage()]) == 1


# -- the writer alone ----------------------------------------------------------


class _Ctx:
    def __init__(self, i: int) -> None:
        self.request_id = f"kv-{i}"
        self.ts_s = 1000.0 + i
        self.endpoint = "chat"
        self.tenant: str | None = None
        self.end_user: str | None = None


def _body(i: int, pad: int = 0) -> bytes:
    messages = [{"role": "user", "content": f"{i}" + "x" * pad}]
    return json.dumps({"model": "m", "messages": messages}).encode()


def test_the_file_is_rotated_before_it_would_pass_the_cap(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    one = len(_body(0, 100)) + 200  # a line: the body and the rest of the line, about
    capture = Capture(str(path), max_bytes=one * 5)
    capture.start()
    for i in range(8):
        assert capture.offer(_Ctx(i), _body(i, 100))
    capture.close()
    old, new = path.with_name("requests.jsonl.1"), path
    # Every line whole, in order, across the two files; neither over the cap.
    ids = [g["custom_id"] for g in lines(old) + lines(new)]
    assert ids == [f"kv-{i}" for i in range(8)]
    assert 0 < len(lines(new)) < 8
    assert old.stat().st_size <= one * 5 and new.stat().st_size <= one * 5
    assert capture.stats()["rotations"] == 1
    for p in (old, new):
        assert p.stat().st_mode & 0o777 == 0o600


def test_a_second_rotation_replaces_the_previous_old_file(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    capture = Capture(str(path), max_bytes=1)  # every line alone in its file
    capture.start()
    for i in range(3):
        capture.offer(_Ctx(i), _body(i))
    capture.close()
    assert [g["custom_id"] for g in lines(path.with_name("requests.jsonl.1"))] == ["kv-1"]
    assert [g["custom_id"] for g in lines(path)] == ["kv-2"]
    assert capture.stats()["rotations"] == 2


def test_an_existing_file_is_appended_to_and_made_0600(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    path.write_text('{"custom_id": "earlier"}\n')
    path.chmod(0o644)
    capture = Capture(str(path), max_bytes=1 << 20)
    capture.start()
    capture.offer(_Ctx(0), _body(0))
    capture.close()
    assert [g["custom_id"] for g in lines(path)] == ["earlier", "kv-0"]
    assert path.stat().st_mode & 0o777 == 0o600


class _StuckFile(CaptureFile):
    """A file whose first append waits until the test lets it go."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, 1 << 20)
        self.entered = threading.Event()
        self.release = threading.Event()

    def append(self, line: bytes) -> None:
        self.entered.set()
        assert self.release.wait(30)
        super().append(line)


def test_bodies_are_dropped_and_counted_while_the_writer_is_stuck(tmp_path: Path) -> None:
    stuck = _StuckFile(tmp_path / "requests.jsonl")
    capture = Capture(str(stuck.path), max_bytes=1 << 20, queue_items=2, file=stuck)
    capture.start()
    assert capture.offer(_Ctx(0), _body(0))
    assert stuck.entered.wait(30)  # the writer holds body 0 and is stuck writing it
    offered = [capture.offer(_Ctx(i), _body(i)) for i in range(1, 5)]
    assert offered == [True, True, False, False]
    assert capture.stats()["dropped_queue_full"] == 2
    stuck.release.set()
    capture.close()
    assert [g["custom_id"] for g in lines(stuck.path)] == ["kv-0", "kv-1", "kv-2"]
    assert capture.stats()["written"] == 3


def test_a_queue_over_its_byte_bound_drops_too(tmp_path: Path) -> None:
    stuck = _StuckFile(tmp_path / "requests.jsonl")
    big = _body(0, 1000)
    capture = Capture(str(stuck.path), max_bytes=1 << 20, queue_bytes=len(big) * 2, file=stuck)
    capture.start()
    assert capture.offer(_Ctx(0), big)
    assert stuck.entered.wait(30)
    assert [capture.offer(_Ctx(i), big) for i in range(1, 4)] == [True, True, False]
    stuck.release.set()
    capture.close()


class _BrokenFile(CaptureFile):
    def append(self, line: bytes) -> None:
        raise OSError(28, "No space left on device")


def test_a_write_error_is_logged_once_and_turns_capture_off(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broken = _BrokenFile(tmp_path / "requests.jsonl", 1 << 20)
    capture = Capture(str(broken.path), max_bytes=1 << 20, file=broken)
    with caplog.at_level(logging.ERROR):
        capture.start()
        capture.offer(_Ctx(0), _body(0))
        capture.close()  # the writer met the error and stopped
        assert [capture.offer(_Ctx(i), _body(i)) for i in range(1, 4)] == [False] * 3
    stats = capture.stats()
    assert stats["enabled"] is False and "No space left" in stats["error"]
    assert stats["written"] == 0 and stats["dropped"] == 4  # the body it failed on counts
    assert len([r for r in caplog.records if "capture" in r.getMessage()]) == 1


def test_a_body_in_utf16_or_with_a_bom_is_written_as_utf8_json(tmp_path: Path) -> None:
    path = tmp_path / "requests.jsonl"
    capture = Capture(str(path), max_bytes=1 << 20)
    capture.start()
    body = {"model": "m", "prompt": "naïve\n"}
    capture.offer(_Ctx(0), json.dumps(body).encode("utf-16"))
    capture.offer(_Ctx(1), b"\xef\xbb\xbf" + json.dumps(body, indent=1).encode())
    capture.close()
    assert [g["body"] for g in lines(path)] == [body, body]
