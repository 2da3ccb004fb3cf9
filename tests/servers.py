"""Run ASGI apps on real 127.0.0.1 sockets in background threads, for end-to-end tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import uvicorn


@contextmanager
def serve(app: Any, *, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve ``app`` on ``port`` (0: a free one); yields its base URL; shuts down gracefully."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="on", timeout_graceful_shutdown=10)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("server did not start")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


@contextmanager
def serve_chat(chat: Any, model: str) -> Iterator[str]:
    """A scripted backend: ``chat`` answers ``POST /v1/chat/completions``; it lists ``model``."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": model}]})

    app = Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
        ]
    )
    with serve(app) as url:
        yield url


async def chat_answer(request: Any) -> Any:
    """A scripted ``/v1/chat/completions`` answer: "ok", one token, the model echoed.

    For :func:`serve_chat` where the test is about kvern, not the backend.
    """
    import json

    from starlette.responses import JSONResponse

    raw = await request.body()
    try:
        body = json.loads(raw)
    except ValueError:
        body = {}
    message = {"role": "assistant", "content": "ok"}
    return JSONResponse(
        {
            "id": "x",
            "object": "chat.completion",
            "model": body.get("model") if isinstance(body, dict) else None,
            "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
        }
    )


@contextmanager
def blackhole() -> Iterator[str]:
    """A URL whose server completes every connect and then never says a byte (a hung peer)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)  # connections wait in the backlog; none is ever accepted
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        sock.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def serving_process(
    args: list[str],
    *,
    port: int,
    name: str,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
    start_timeout_s: float = 60.0,
    log_path: Path | None = None,
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Start a server process on 127.0.0.1:``port``; yield (process, URL) once ``/health`` is 200.

    Output goes to a file (``log_path``, else a temporary one), not a pipe, so a
    chatty process can never block on a full pipe; its tail is shown if the
    server does not come up. On exit the process gets SIGTERM (a graceful
    stop), then SIGKILL if it lingers.
    """
    log: Any = (
        open(log_path, "wb")  # closed in the finally below
        if log_path is not None
        else tempfile.NamedTemporaryFile(prefix=f"{name}-", suffix=".log", delete=False)
    )
    proc = subprocess.Popen(args, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + start_timeout_s
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                output = Path(log.name).read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} did not start; its output:\n{output}")
            time.sleep(0.2)
        yield proc, url
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


@contextmanager
def kvern_process(
    args: list[str],
    cwd: Path,
    env: dict[str, str] | None = None,
    log_path: Path | None = None,
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """kvern in its own process, as users run it; yields (process, base URL).

    ``args`` follow the Python executable (``["-m", "kvern", "serve", ...]`` or
    ``["run_proxy.py", ...]``); ``--port`` is added. Its output (the brain's
    included) goes to ``log_path`` when given.
    """
    port = free_port()
    with serving_process(
        [sys.executable, *args, "--port", str(port)],
        port=port,
        name="kvern",
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error", **(env or {})},
        log_path=log_path,
    ) as served:
        yield served
