"""What kvern adds to a request: ``python bench/proxy_overhead.py [--quick]``.

Starts, each in its own process on 127.0.0.1: a fast streaming upstream (SSE,
vLLM-shaped chunks with a usage chunk, no model), the thinnest possible Python
pass-through (a few lines of Starlette + httpx streaming the body back, no
tracking: the floor for any Python proxy on this machine), and kvern with
tracking on (real Llama 3 tokenizer and template, trie, SQLite analytics).
The same requests -- multi-turn chats of about 2,000 prompt tokens, streaming
-- are sent at concurrency 1 and 64 three ways, directly, through the thin
pass-through and through kvern, in interleaved rounds so machine noise hits
all three alike. Prints added time to first byte and total latency (p50/p99)
over direct, and each way's throughput over direct. The last line is
machine-readable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODEL = "llama3.2:bench"
WIDTHS = (14, 9, 11, 9, 15, 9, 11, 9)
CHUNKS = 16


# -- servers (each runs in its own process) ---------------------------------------------


def upstream_app() -> Any:
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    async def chat(request: Request) -> StreamingResponse:
        body = json.loads(await request.body())
        prompt_chars = sum(len(m.get("content") or "") for m in body["messages"])

        async def stream() -> Any:
            head = {"id": "x", "object": "chat.completion.chunk", "model": body["model"]}
            for i in range(CHUNKS):
                chunk = {
                    **head,
                    "choices": [
                        {"index": 0, "delta": {"content": f"w{i} "}, "finish_reason": None}
                    ],
                }
                yield f"data: {json.dumps(chunk)}\n\n".encode()
            done = {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
            yield f"data: {json.dumps(done)}\n\n".encode()
            usage = {
                **head,
                "choices": [],
                "usage": {
                    "prompt_tokens": prompt_chars // 4,
                    "completion_tokens": CHUNKS,
                    "prompt_tokens_details": {"cached_tokens": 0},
                },
            }
            yield f"data: {json.dumps(usage)}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(stream(), media_type="text/event-stream")

    return Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])


def thin_app(upstream: str) -> Any:
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import StreamingResponse
    from starlette.routing import Route

    client = httpx.AsyncClient(
        base_url=upstream, timeout=60, limits=httpx.Limits(max_connections=256)
    )

    async def proxy(request: Request) -> StreamingResponse:
        req = client.build_request(
            "POST",
            "/v1/chat/completions",
            content=await request.body(),
            headers={"content-type": "application/json"},
        )
        resp = await client.send(req, stream=True)

        async def body() -> Any:
            try:
                async for chunk in resp.aiter_raw():
                    yield chunk
            finally:
                await resp.aclose()

        return StreamingResponse(
            body(), status_code=resp.status_code, media_type=resp.headers.get("content-type")
        )

    return Starlette(routes=[Route("/v1/chat/completions", proxy, methods=["POST"])])


def kvern_app(upstream: str, db_path: str) -> Any:
    from kvern.app import create_app
    from kvern.config import parse_config
    from tests.assets import tokenizer_fixture

    config = parse_config(
        {
            "upstream": {"base_url": upstream + "/v1"},
            "tokenizers": {"models": {"llama3.2*": str(tokenizer_fixture("llama3").directory)}},
            "analytics": {"db_path": db_path},
        }
    )
    return create_app(config)


def serve_main(kind: str, port: int, upstream: str, db_path: str) -> None:
    import uvicorn

    app = {
        "upstream": lambda: upstream_app(),
        "thin": lambda: thin_app(upstream),
        "kvern": lambda: kvern_app(upstream, db_path),
    }[kind]()
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


# -- load generator --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start(kind: str, upstream: str = "", db_path: str = "") -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--serve",
            kind,
            "--port",
            str(port),
            "--upstream",
            upstream,
            "--db",
            db_path,
        ],
        env={**os.environ, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1"},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise RuntimeError(f"{kind} did not start")


def make_chats(n: int, rng: random.Random) -> list[bytes]:
    """Bodies of multi-turn chats of about 2,000 prompt tokens, a few conversations long."""
    words = "cache prefix token model latency request answer system user block decode".split()

    def text(k: int) -> str:
        return " ".join(rng.choice(words) for _ in range(k))

    bodies = []
    system = text(900)
    while len(bodies) < n:
        messages = [{"role": "system", "content": system}]
        for _turn in range(4):
            messages = messages + [{"role": "user", "content": text(rng.randint(60, 150))}]
            bodies.append(
                json.dumps({"model": MODEL, "messages": messages, "stream": True}).encode()
            )
            messages = messages + [{"role": "assistant", "content": text(rng.randint(60, 150))}]
    return bodies[:n]


async def run_load(
    url: str, bodies: list[bytes], concurrency: int
) -> tuple[list[float], list[float], float]:
    import httpx

    ttfb: list[float] = []
    total: list[float] = []
    queue = list(bodies)
    limits = httpx.Limits(
        max_connections=concurrency + 8, max_keepalive_connections=concurrency + 8
    )
    async with httpx.AsyncClient(base_url=url, timeout=60, limits=limits) as client:

        async def worker() -> None:
            while queue:
                body = queue.pop()
                t0 = time.perf_counter()
                first = None
                async with client.stream(
                    "POST",
                    "/v1/chat/completions",
                    content=body,
                    headers={"content-type": "application/json"},
                ) as resp:
                    async for _ in resp.aiter_raw():
                        if first is None:
                            first = time.perf_counter()
                    assert resp.status_code == 200
                end = time.perf_counter()
                ttfb.append(((first or end) - t0) * 1000)
                total.append((end - t0) * 1000)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return ttfb, total, len(bodies) / elapsed


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--serve", choices=["upstream", "thin", "kvern"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream", default="")
    parser.add_argument("--db", default="")
    args = parser.parse_args()
    if args.serve:
        serve_main(args.serve, args.port, args.upstream, args.db)
        return

    from tests.assets import tokenizer_fixture

    tokenizer_fixture("llama3")  # build the cached tokenizer before timing anything
    tmp = tempfile.mkdtemp(prefix="kvern-bench-")
    procs = []
    try:
        up, up_url = start("upstream")
        procs.append(up)
        thin, thin_url = start("thin", up_url)
        procs.append(thin)
        kv, kv_url = start("kvern", up_url, str(Path(tmp) / "bench.db"))
        procs.append(kv)
        targets = {"direct": up_url, "thin": thin_url, "kvern": kv_url}
        rounds = 2 if args.quick else 3
        n1 = 20 if args.quick else 60
        n64 = 128 if args.quick else 384
        # Warm-up: loads kvern's tokenizer, opens connections.
        for url in targets.values():
            asyncio.run(run_load(url, make_chats(8, random.Random(0)), 4))
        results: dict[tuple[str, int], dict[str, list[float]]] = {}
        for r in range(rounds):
            for conc, n in ((1, n1), (64, n64)):
                bodies = make_chats(n, random.Random(1000 * r + conc))
                order = list(targets)
                random.Random(r).shuffle(order)
                for name in order:
                    ttfb, total, tput = asyncio.run(run_load(targets[name], bodies, conc))
                    slot = results.setdefault((name, conc), {"ttfb": [], "total": [], "tput": []})
                    slot["ttfb"] += ttfb
                    slot["total"] += total
                    slot["tput"].append(tput)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)

    def stat(name: str, conc: int, key: str, q: float) -> float:
        return pct(results[(name, conc)][key], q)

    def tput(name: str, conc: int) -> float:
        return statistics.median(results[(name, conc)]["tput"])

    print(
        f"\n{'':24}{'c=1 ttfb p50':>14}{'p99':>9}{'total p50':>11}{'p99':>9}"
        f"{'c=64 ttfb p50':>15}{'p99':>9}{'total p50':>11}{'p99':>9}{'req/s c64':>11}"
    )
    for name in targets:
        row = [
            stat(name, 1, "ttfb", 50),
            stat(name, 1, "ttfb", 99),
            stat(name, 1, "total", 50),
            stat(name, 1, "total", 99),
            stat(name, 64, "ttfb", 50),
            stat(name, 64, "ttfb", 99),
            stat(name, 64, "total", 50),
            stat(name, 64, "total", 99),
        ]
        print(
            f"{name + ' (ms)':24}"
            + "".join(f"{v:>{w}.2f}" for v, w in zip(row, WIDTHS, strict=True))
            + f"{tput(name, 64):>11.1f}"
        )
    print("\nadded over direct (ms)       c=1 ttfb p50   p99   total p50   c=64 ttfb p50   p99")
    for name in ("thin", "kvern"):
        print(
            f"  {name:<26}{stat(name, 1, 'ttfb', 50) - stat('direct', 1, 'ttfb', 50):>9.2f}"
            f"{stat(name, 1, 'ttfb', 99) - stat('direct', 1, 'ttfb', 99):>8.2f}"
            f"{stat(name, 1, 'total', 50) - stat('direct', 1, 'total', 50):>11.2f}"
            f"{stat(name, 64, 'ttfb', 50) - stat('direct', 64, 'ttfb', 50):>15.2f}"
            f"{stat(name, 64, 'ttfb', 99) - stat('direct', 64, 'ttfb', 99):>8.2f}"
        )
    for name in ("thin", "kvern"):
        print(
            f"throughput ratio {name} / direct at c=64: {tput(name, 64) / tput('direct', 64):.3f}"
        )
    x = stat("kvern", 1, "ttfb", 50) - stat("direct", 1, "ttfb", 50)
    f = stat("thin", 1, "ttfb", 50) - stat("direct", 1, "ttfb", 50)
    y = stat("kvern", 64, "ttfb", 99) - stat("direct", 64, "ttfb", 99)
    z = tput("kvern", 64) / tput("direct", 64)
    print(f"kvern added / thin added at c=1 (ttfb p50): {x / f if f > 0 else float('nan'):.2f}")
    print(
        f"added_ttfb_p50_ms_c1={x:.3f} floor_added_ttfb_p50_ms_c1={f:.3f} "
        f"added_ttfb_p99_ms_c64={y:.3f} throughput_ratio_c64={z:.3f}"
    )


if __name__ == "__main__":
    main()
