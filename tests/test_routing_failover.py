"""A replica process is killed mid-run: no request fails that had not started streaming.

Three simulated replicas run as real processes; kvern routes a steady stream
of concurrent streaming chats over them; one replica gets SIGKILL while it is
prefilling several of them. Requests it had not answered yet must fail over
(the answer's first chunk is read before kvern sends any header to the
client); only those already streaming may end early.
"""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from kvern.app import create_app
from kvern.config import parse_config
from tests.servers import free_port, serve, serving_process

ROOT = Path(__file__).resolve().parent.parent
MODEL = "sim"


@dataclass
class Outcome:
    started: bool = False  # got at least one chunk
    ok: bool = False  # got the whole answer
    upstream: str | None = None
    error: str | None = None


@pytest.fixture
def replica_urls() -> Iterator[list[tuple[Any, str]]]:
    with ExitStack() as stack:
        procs = []
        for i in range(3):
            port = free_port()
            args = [sys.executable, "-m", "tests.replica_main", "--name", f"r{i}"]
            args += ["--port", str(port), "--capacity-blocks", "4096", "--max-concurrency", "4"]
            args += ["--prefill-us-per-token", "10000", "--decode-ms-per-token", "15"]
            procs.append(
                stack.enter_context(serving_process(args, port=port, name=f"r{i}", cwd=ROOT))
            )
        yield procs


def one_chat(client: openai.OpenAI, i: int) -> Outcome:
    out = Outcome()
    messages = [
        {"role": "system", "content": f"tenant {i % 5} " + "shared words " * 40},
        {"role": "user", "content": f"question {i}"},
    ]
    try:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, max_tokens=6, stream=True
        )
        out.upstream = raw.headers.get("x-kvern-upstream")
        for chunk in raw.parse():
            out.started = True
            if chunk.choices and chunk.choices[0].finish_reason:
                out.ok = True  # a whole answer, not one cut off
    except openai.APIError as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    return out


def test_killing_a_replica_mid_run_fails_no_request_that_had_not_started_streaming(
    tmp_path: Path, tokenizer_fixtures: dict[str, Any], replica_urls: list[tuple[Any, str]]
) -> None:
    data = {
        "upstream": {"read_timeout_s": 20.0, "connect_timeout_s": 2.0},
        "upstreams": [
            {"name": f"r{i}", "url": url + "/v1", "kv_capacity_tokens": 65536}
            for i, (_, url) in enumerate(replica_urls)
        ],
        "routing": {"policy": "least_load", "health": {"interval_s": 0.5}},
        "tokenizers": {
            "models": {MODEL: str(tokenizer_fixtures["qwen2"].directory)},
            "parity_check": False,
        },
        "analytics": {"db_path": str(tmp_path / "kvern.db"), "flush_interval_ms": 20},
    }
    victim_proc, _ = replica_urls[0]
    with serve(create_app(parse_config(data))) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="k", max_retries=0, timeout=30)
        outcomes: list[Outcome] = []
        lock = threading.Lock()

        def run(i: int) -> None:
            result = one_chat(client, i)
            with lock:
                outcomes.append(result)

        with ThreadPoolExecutor(max_workers=9) as pool:
            futures = [pool.submit(run, i) for i in range(9)]
            time.sleep(0.3)  # every replica is prefilling three chats now
            victim_proc.send_signal(signal.SIGKILL)
            futures += [pool.submit(run, i) for i in range(9, 40)]
            for f in futures:
                f.result()
        health = httpx.get(url + "/health").json()
    unstarted_failures = [o for o in outcomes if not o.ok and not o.started]
    assert not unstarted_failures, unstarted_failures
    assert len(outcomes) == 40 and sum(o.ok for o in outcomes) >= 40 - 4
    served_after = [o.upstream for o in outcomes if o.ok]
    assert served_after.count("r0") <= 4  # r0 only answered what it finished before dying
    r0 = next(u for u in health["routing"]["upstreams"] if u["name"] == "r0")
    assert r0["circuit"] == "open" and r0["failovers"] >= 1
