"""The load generator of ``bench/routing.py``: sessions played turn by turn, streamed.

One ``httpx.AsyncClient`` for the whole trace; each turn is sent once the
previous answer has arrived and carries it, and TTFT is the time to the first
non-empty content token, measured here.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Callable
from typing import Any, Protocol

import httpx
from routing_trace import Trace, TurnResult

MODEL = "sim"  # the model name the simulated replicas and kvern's config use


class RunLimits(Protocol):
    """What the load generator reads of the bench's run spec."""

    @property
    def drain_s(self) -> float: ...

    @property
    def request_timeout_s(self) -> float: ...


def chat_body(messages: list[dict[str, str]], max_tokens: int) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": messages,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


async def send_turn(
    client: httpx.AsyncClient, url: str, body: dict[str, Any], result: TurnResult, t0: float
) -> str:
    """Stream one chat into ``result`` (TTFT = first non-empty content); returns the answer."""
    start = time.perf_counter()
    parts: list[str] = []
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
            result.upstream = resp.headers.get("x-kvern-upstream", "")
            result.request_id = resp.headers.get("x-kvern-request-id", "")
            if resp.status_code != 200:
                await resp.aread()
                result.error = f"HTTP {resp.status_code}"
                return ""
            async for line in resp.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices") or []:
                    text = (choice.get("delta") or {}).get("content") or ""
                    if text and result.ttft_s is None:
                        result.ttft_s = time.perf_counter() - start
                    parts.append(text)
                usage = chunk.get("usage") or {}
                if usage:
                    result.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    details = usage.get("prompt_tokens_details") or {}
                    result.cached_tokens = int(details.get("cached_tokens") or 0)
    except (httpx.HTTPError, ValueError) as exc:  # ValueError: a chunk that is not JSON
        result.error = type(exc).__name__
        return ""
    finally:
        result.done_s = time.perf_counter() - t0
    result.ok = result.ttft_s is not None
    result.error = "" if result.ok else "no content"
    return "".join(parts)


async def run_session(
    client: httpx.AsyncClient,
    urls: Callable[[], str],
    trace: Trace,
    index: int,
    t0: float,
    out: list[TurnResult],
) -> None:
    """One conversation, turn after turn, each with the real earlier answers; stops at a failure.

    ``urls()`` names the router each turn goes to: one, or the next of several
    kvern instances (a round-robin client, so a session's turns change instance).
    """
    session = trace.sessions[index]
    await asyncio.sleep(max(0.0, t0 + session.start_s - time.perf_counter()))
    messages = [{"role": "system", "content": trace.system_prompts[session.tenant]}]
    for turn, question in enumerate(session.questions):
        if turn:
            await asyncio.sleep(session.think_s[turn - 1])
        messages.append({"role": "user", "content": question})
        now = time.perf_counter() - t0
        result = TurnResult(session.session_id, turn, ok=False, sent_s=now, done_s=now)
        out.append(result)
        try:
            body = chat_body(messages, trace.spec.max_tokens)
            answer = await send_turn(client, urls(), body, result, t0)
        except asyncio.CancelledError:
            result.error = "drain deadline"
            raise
        if not result.ok:
            return
        messages.append({"role": "assistant", "content": answer})


async def run_trace(
    urls: list[str], trace: Trace, run: RunLimits
) -> tuple[list[TurnResult], float]:
    """Play the whole trace against ``urls`` (round robin per request); every turn and the length.

    Sessions still going ``drain_s`` after the last arrival are cut off (a router
    that sends everything to one replica would otherwise take minutes).
    """
    limits = httpx.Limits(max_connections=1024, max_keepalive_connections=256)
    timeout = httpx.Timeout(run.request_timeout_s, connect=10)
    results: list[TurnResult] = []
    turns = itertools.count()

    def next_url() -> str:
        return urls[next(turns) % len(urls)]

    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:
        t0 = time.perf_counter()
        tasks = [
            asyncio.create_task(run_session(client, next_url, trace, i, t0, results))
            for i in range(len(trace.sessions))
        ]
        done, pending = await asyncio.wait(tasks, timeout=trace.arrival_window_s + run.drain_s)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for task in done:
            task.result()  # a session that raised is a bug here, not a failed request
        duration = time.perf_counter() - t0
    finished = [r.done_s for r in results if r.ok]
    return results, max(finished) if finished else duration


async def warm_up(url: str) -> None:
    """One tiny request first, so that no contender's lazy start-up work is timed."""
    async with httpx.AsyncClient(timeout=60) as client:
        result = TurnResult(-1, 0, ok=False, sent_s=0, done_s=0)
        body = chat_body([{"role": "user", "content": "Warm-up."}], 1)
        await send_turn(client, url, body, result, time.perf_counter())
    if not result.ok:
        raise RuntimeError(f"warm-up request failed: {result.error}")
