"""The servers ``bench/engine.py`` compares, each started fresh, and one timed chat request.

Why the anchors are real servers on the same weights: a user without a
backend would pick llama-server (its own prefix cache, serving the same
GGUF) or ``transformers serve --continuous-batching`` (block sharing in a
paged cache, on the folder the engine converts the GGUF into). Each is a
process of its own, started fresh, with two threads, one at a time.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.llama_server import build_llama_server  # noqa: E402
from tests.servers import free_port, serving_process  # noqa: E402

VENV_BIN = Path(sys.executable).parent


@dataclass(slots=True)
class Answer:
    """One streamed request as the client saw it."""

    ttft_ms: float  # request sent -> first content byte
    total_ms: float
    text: str
    prompt_tokens: int | None
    cached_tokens: int | None  # what the server reported reusing (None: it says nothing)


@dataclass(slots=True)
class Server:
    """A started contender: where it listens, its process id and the model id to send."""

    name: str
    url: str
    pid: int
    model: str


def rss_mib(pid: int) -> float:
    """Resident memory of ``pid`` and its children (MiB), from /proc."""
    total = 0
    pids = [pid]
    seen: set[int] = set()
    while pids:
        p = pids.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
            children = Path(f"/proc/{p}/task/{p}/children").read_text().split()
            pids += [int(c) for c in children]
        except OSError:
            continue
    return total / 1024


@contextmanager
def engine(
    gguf: Path, name: str, *, reuse: bool, kv_bits: int, cache_bytes: int, dtype: str, device: str
) -> Iterator[Server]:
    port = free_port()
    args = [
        sys.executable, "-m", "kvern", "engine", "--model", str(gguf), "--served-model-name",
        name, "--port", str(port), "--kv-bits", str(kv_bits), "--cache-bytes", str(cache_bytes),
        "--dtype", dtype, "--log-level", "warning",
    ]  # fmt: skip
    args += ["--device", device] + (["--threads", "2"] if device == "cpu" else [])
    if not reuse:
        args.append("--no-reuse")
    label = "kvern engine" + ("" if reuse else " (no reuse)")
    with serving_process(args, port=port, name="engine", start_timeout_s=300) as (proc, url):
        yield Server(label, url, proc.pid, name)


@contextmanager
def llama_server(gguf: Path) -> Iterator[Server]:
    port = free_port()
    args = [
        str(build_llama_server()), "-m", str(gguf), "--host", "127.0.0.1", "--port", str(port),
        "-np", "1", "-c", "8192", "--jinja", "-t", "2", "--no-webui",
    ]  # fmt: skip
    with serving_process(args, port=port, name="llama-server", start_timeout_s=120) as (p, url):
        yield Server("llama-server", url, p.pid, "smollm2")


@contextmanager
def transformers_serve(folder: Path, *, num_blocks: int, device: str) -> Iterator[Server]:
    """``transformers serve --continuous-batching`` on ``folder`` (its cache cut to ``num_blocks``).

    Left alone it sizes its paged cache from 90% of the machine's memory;
    ``--cb-num-blocks`` keeps it to what the prompts need, with its default
    block size (256 tokens).
    """
    port = free_port()
    args = [
        str(VENV_BIN / "transformers"), "serve", str(folder), "--continuous-batching",
        "--cb-num-blocks", str(num_blocks), "--host", "127.0.0.1", "--port", str(port),
        "--device", device, "--log-level", "warning",
    ]  # fmt: skip
    env = dict(os.environ, OMP_NUM_THREADS="2") if device == "cpu" else None
    with serving_process(
        args, port=port, name="transformers-serve", env=env, start_timeout_s=300
    ) as (proc, url):
        server = Server("transformers serve --cb", url, proc.pid, str(folder))
        ask(server, [{"role": "user", "content": "Hi"}], max_tokens=2)  # loads the model
        yield server


def ask(server: Server, messages: list[dict[str, str]], *, max_tokens: int) -> Answer:
    """One greedy streamed chat request; times its first content byte."""
    body: dict[str, Any] = {
        "model": server.model,
        "messages": messages,
        "stream": True,
        "stream_options": {"include_usage": True},
        "temperature": 0,
        "max_tokens": max_tokens,
    }
    parts: list[str] = []
    usage: dict[str, Any] = {}
    timings: dict[str, Any] = {}
    first: float | None = None
    start = time.perf_counter()
    with httpx.stream(
        "POST", server.url + "/v1/chat/completions", json=body, timeout=600
    ) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or []:
                text = (choice.get("delta") or {}).get("content") or ""
                if text and first is None:
                    first = time.perf_counter()
                parts.append(text)
            usage = chunk.get("usage") or usage
            timings = chunk.get("timings") or timings
    end = time.perf_counter()
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens")
    if cached is None and "cache_n" in timings:
        cached = timings["cache_n"]
    return Answer(
        ttft_ms=((first or end) - start) * 1000,
        total_ms=(end - start) * 1000,
        text="".join(parts),
        prompt_tokens=usage.get("prompt_tokens"),
        cached_tokens=cached,
    )
