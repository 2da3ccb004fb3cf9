"""Processes and figures the load benchmarks share (``capacity.py``, ``soak.py``).

Why a module of its own: each bench starts the same pieces -- a scripted
streaming upstream and the thin pass-through in processes of their own, kvern
as users run it (``python -m kvern serve --config``), multi-turn chats whose
sessions grow by turn -- and reads the same figures of kvern's processes from
``/proc`` (the relay and its brain child). Kept here once, a fix to any of them
reaches every bench.

Run as ``python bench/harness.py --serve upstream|thin --port P ...`` by
:func:`start_server`; nothing else calls it directly.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODEL = "llama3.2:bench"
WORDS = (
    "cache prefix token model latency request answer system user block decode "
    "queue replica stream router tenant prompt budget eviction reuse"
).split()


# -- the scripted upstream -----------------------------------------------------------


def upstream_app(
    name: str,
    *,
    prefill_s_per_token: float,
    prefill_max_tokens: int,
    decode_s_per_chunk: float,
) -> Any:
    """A streaming chat backend with no model: waits a prefill time, then streams chunks.

    The prefill wait is proportional to the prompt (4 characters a token) up
    to ``prefill_max_tokens``; ``max_tokens`` chunks follow, ``decode_s_per_chunk``
    apart, then a usage chunk and ``[DONE]``. ``metadata.bench_answer_bytes``
    asks for one huge answer instead (64 KiB chunks, no pauses).
    """
    from starlette.applications import Starlette
    from starlette.requests import ClientDisconnect, Request
    from starlette.responses import JSONResponse, Response, StreamingResponse
    from starlette.routing import Route

    async def chat(request: Request) -> Response:
        try:
            body = json.loads(await request.body())
        except ClientDisconnect:  # the proxy gave up on it (its client left): no traceback
            return Response(status_code=499)
        chars = sum(len(m.get("content") or "") for m in body.get("messages", []))
        tokens = chars // 4
        await asyncio.sleep(min(tokens, prefill_max_tokens) * prefill_s_per_token)
        big = int((body.get("metadata") or {}).get("bench_answer_bytes") or 0)
        n = int(body.get("max_tokens") or 32)
        head = {"id": f"{name}-x", "object": "chat.completion.chunk", "model": body["model"]}

        def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "finish_reason": finish}
            return f"data: {json.dumps({**head, 'choices': [choice]})}\n\n".encode()

        async def stream() -> Any:
            yield event({"role": "assistant", "content": ""})
            if big:
                piece = ("lorem ipsum " * 5462)[:65536]
                for _ in range(big // len(piece)):
                    yield event({"content": piece})
                    await asyncio.sleep(0)
            else:
                for i in range(n):
                    await asyncio.sleep(decode_s_per_chunk)
                    yield event({"content": f"w{i} "})
            yield event({}, "length")
            usage = {
                "prompt_tokens": tokens,
                "completion_tokens": n,
                "prompt_tokens_details": {"cached_tokens": 0},
            }
            yield f"data: {json.dumps({**head, 'choices': [], 'usage': usage})}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": MODEL, "object": "model"}]})

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
        ]
    )


def serve_main(args: argparse.Namespace) -> None:
    """The ``--serve`` entry: one scripted upstream or thin pass-through, until killed."""
    import uvicorn

    from bench.proxy_overhead import thin_app

    if args.serve == "upstream":
        app = upstream_app(
            args.name,
            prefill_s_per_token=args.prefill_us_per_token / 1e6,
            prefill_max_tokens=args.prefill_max_tokens,
            decode_s_per_chunk=args.decode_ms_per_chunk / 1e3,
        )
    else:
        app = thin_app(args.upstreams.split(",")[0])
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)


# -- starting processes --------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[bytes], what: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{what} did not start")


def start_server(
    kind: str,
    upstreams: list[str],
    name: str = "",
    *,
    prefill_us_per_token: float = 190.0,
    prefill_max_tokens: int = 8192,
    decode_ms_per_chunk: float = 15.0,
) -> tuple[subprocess.Popen[bytes], str]:
    """A scripted ``upstream`` or the ``thin`` pass-through in front of ``upstreams[0]``."""
    port = free_port()
    cmd = [
        sys.executable,
        __file__,
        "--serve",
        kind,
        "--port",
        str(port),
        "--name",
        name,
        "--upstreams",
        ",".join(upstreams),
        "--prefill-us-per-token",
        str(prefill_us_per_token),
        "--prefill-max-tokens",
        str(prefill_max_tokens),
        "--decode-ms-per-chunk",
        str(decode_ms_per_chunk),
    ]
    proc = subprocess.Popen(cmd)
    wait_port(port, proc, kind)
    return proc, f"http://127.0.0.1:{port}"


def deep_merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``extra`` laid over it, nested mappings merged key by key."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def start_kvern(
    upstreams: list[str],
    workdir: Path,
    kvern_path: Path,
    name: str,
    extra: dict[str, Any] | None = None,
) -> tuple[subprocess.Popen[bytes], str]:
    """kvern in front of ``upstreams``: one (tracking only) or several (cache-aware routing).

    The real Llama 3 tokenizer and template, SQLite analytics in ``workdir``;
    ``extra`` is laid over that config (e.g. ``{"trie": {"max_tokens": N}}``).
    Its output goes to ``workdir/<name>.log``.
    """
    import yaml

    from tests.assets import tokenizer_fixture

    port = free_port()
    config: dict[str, Any] = {
        "proxy": {"port": port},
        "upstream": {"base_url": upstreams[0] + "/v1", "read_timeout_s": 300},
        "tokenizers": {"models": {"llama3.2*": str(tokenizer_fixture("llama3").directory)}},
        "analytics": {"db_path": str(workdir / f"{name}.db")},
    }
    if len(upstreams) > 1:
        config["upstreams"] = [
            {"name": f"u{i}", "url": u + "/v1", "kv_capacity_tokens": 400_000}
            for i, u in enumerate(upstreams)
        ]
        config["routing"] = {"policy": "cache_aware"}
    config = deep_merge(config, extra or {})
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {
        **os.environ,
        "PYTHONPATH": str(kvern_path),
        "TRANSFORMERS_VERBOSITY": "error",
        "HF_HUB_OFFLINE": "1",
    }
    log = open(workdir / f"{name}.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = subprocess.Popen(
        [sys.executable, "-m", "kvern", "serve", "--config", str(path), "--log-level", "warning"],
        cwd=str(kvern_path),
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    wait_port(port, proc, "kvern")
    return proc, f"http://127.0.0.1:{port}"


def stop(procs: list[subprocess.Popen[bytes]], timeout_s: float = 30) -> None:
    """SIGTERM every process (a graceful stop), then SIGKILL those that linger."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# -- the load ------------------------------------------------------------------------


class Conversations:
    """Multi-turn chats (1-8k tokens at up to 8 turns): tenants share a system prompt.

    Every turn adds new random words, so every request brings a prefix no
    earlier request had: a trie fed by these keeps growing until its cap.
    """

    def __init__(self, seed: int, *, max_turns: int = 8) -> None:
        self._rng = random.Random(seed)
        self._max_turns = max_turns
        self._systems = [self._text(self._rng.randint(700, 1200)) for _ in range(8)]
        self._idle: list[dict[str, Any]] = []  # sessions whose last turn has ended
        self._count = 0

    def _text(self, words: int) -> str:
        return " ".join(self._rng.choice(WORDS) for _ in range(words))

    def next(self) -> dict[str, Any]:
        """The next request: an idle session's next turn, or a new session."""
        if self._idle and self._rng.random() < 0.7:
            session = self._idle.pop(self._rng.randrange(len(self._idle)))
        else:
            self._count += 1
            tenant = self._rng.randrange(len(self._systems))
            session = {
                "id": f"s{self._count}",
                "messages": [{"role": "system", "content": self._systems[tenant]}],
                "turns": 0,
                "max_turns": self._rng.randint(1, self._max_turns),
            }
        session["messages"].append(
            {"role": "user", "content": self._text(self._rng.randint(80, 500))}
        )
        session["turns"] += 1
        return session

    def done(self, session: dict[str, Any], answer_chunks: int) -> None:
        answer = "".join(f"w{i} " for i in range(answer_chunks))
        session["messages"].append({"role": "assistant", "content": answer})
        if session["turns"] < session["max_turns"]:
            self._idle.append(session)


def body_of(session: dict[str, Any], chunks: int, **extra: Any) -> bytes:
    """A streamed chat request (with usage) for ``session``'s messages."""
    body = {
        "model": MODEL,
        "messages": session["messages"],
        "stream": True,
        "stream_options": {"include_usage": True},
        "max_tokens": chunks,
        **extra,
    }
    return json.dumps(body).encode()


# -- kvern's own figures -------------------------------------------------------------


def get_json(url: str, timeout_s: float = 60) -> dict[str, Any]:
    import httpx

    response = httpx.get(url, timeout=timeout_s)
    data: dict[str, Any] = response.json()
    return data


def process_tree(pid: int) -> list[int]:
    """``pid`` and its direct children (kvern's relay and its brain)."""
    pids = [pid]
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                pids.append(int(entry))
    return pids


def is_brain(pid: int) -> bool:
    """True for kvern's tracking process (``python -m kvern.tracking.brain``)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"kvern.tracking.brain" in cmdline


def cpu_s(pids: list[int]) -> float:
    tick = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / tick
    return total


def rss_mb(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total / 1024


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="a bench server (started by the benches)")
    parser.add_argument("--serve", choices=["upstream", "thin"], required=True)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--name", default="")
    parser.add_argument("--upstreams", default="")
    parser.add_argument("--prefill-us-per-token", type=float, default=190.0)
    parser.add_argument("--prefill-max-tokens", type=int, default=8192)
    parser.add_argument("--decode-ms-per-chunk", type=float, default=15.0)
    return parser


if __name__ == "__main__":
    serve_main(_parser().parse_args())
