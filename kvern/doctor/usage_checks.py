"""Doctor: does each upstream report the cached tokens kvern checks its predictions against?

Why by asking: no backend advertises it (vLLM reports
``usage.prompt_tokens_details.cached_tokens`` only when started with
``--enable-prompt-tokens-details``), and without a figure every prediction of
kvern's for that backend is "unreported", never checked. So the doctor sends
the same small chat twice (``max_tokens: 1``; a fresh nonce first, so the
first is a miss) and reads both answers with kvern's own reader
(:func:`kvern.upstream.usage.parse_response`), which names the field the
figure came from. The prompt spans at least two of the backend's KV blocks,
so a prefix cache in whole blocks has something to reuse. ``--no-requests``
skips it: these are real inference requests, billed where the backend bills.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx

from kvern.config import KvernConfig
from kvern.doctor.report import Check, Progress, fail, ok, warn
from kvern.doctor.upstream_checks import KIND_NAMES, UpstreamFindings
from kvern.errors import UpstreamError
from kvern.parity.checker import is_glob
from kvern.upstream.client import mapped_errors
from kvern.upstream.usage import ResponseFacts, parse_response

_SENTENCE = "A doctor checks that every part of the set-up works before the first user arrives. "
_MIN_PROMPT_WORDS = 256

# What to do when a backend of this kind reports no cached-token figure.
_NO_FIGURE_FIX = {
    "vllm": "restart vLLM with --enable-prompt-tokens-details",
    "sglang": "upgrade SGLang to a release whose usage carries prompt_tokens_details",
    "ollama": "nothing in kvern: Ollama's OpenAI API reports none (its /api/chat "
    "reports prompt_eval_count); its requests are counted as unreported",
    "llamacpp": "upgrade llama.cpp's server (it reports timings.cache_n)",
    "unknown": "enable the backend's prompt-token details in usage, if it has them; "
    "until then its requests are counted as unreported",
}


def probe_body(model: str, block_size: int | None, nonce: str) -> dict[str, Any]:
    """A chat whose prompt spans at least two KV blocks, answered with one token."""
    words = max(_MIN_PROMPT_WORDS, 2 * (block_size or 16))
    sentence_words = len(_SENTENCE.split())
    system = f"Check {nonce}. " + _SENTENCE * (words // sentence_words + 1)
    return {
        "model": model,
        "messages": [
            {"role": "system", "content": system},
            {"role": "user", "content": "Say OK."},
        ],
        "max_tokens": 1,
        "temperature": 0,
        "stream": False,
    }


def pick_model(config: KvernConfig, upstream: UpstreamFindings) -> str | None:
    """A configured model the upstream serves (and lists), else the first it lists."""
    for key in config.tokenizers.models:
        if not is_glob(key) and upstream.serves(key) and upstream.lists(key) is not False:
            return key
    return upstream.models[0] if upstream.models else None


async def _ask(
    client: httpx.AsyncClient,
    upstream: UpstreamFindings,
    body: dict[str, Any],
    timeout_s: float,
) -> httpx.Response:
    with mapped_errors(upstream.upstream):
        return await client.post(
            upstream.upstream.base_url + "/chat/completions",
            json=body,
            timeout=timeout_s,
        )


def _verdict(subject: str, kind: str, model: str, second: ResponseFacts) -> Check:
    source = second.reported_cached_source
    if source is None:
        return warn(
            subject,
            f"its answers for {model} carry no cached-token figure: kvern's predictions for "
            "it are counted as unreported, never checked",
            _NO_FIGURE_FIX.get(kind, _NO_FIGURE_FIX["unknown"]),
        )
    cached = second.reported_cached_tokens or 0
    prompt = second.upstream_prompt_tokens
    of = f" of {prompt}" if prompt is not None else ""
    if cached == 0:
        return warn(
            subject,
            f"reports cached tokens ({source}) but reused 0{of} prompt tokens of an identical "
            f"second request for {model}: its prefix cache is off or too small",
            "enable prefix caching on the backend (vLLM: --enable-prefix-caching), "
            "or give it more KV cache",
        )
    return ok(
        subject,
        f"reports cached tokens in {source}: {cached}{of} prompt tokens reused by an identical "
        f"second request for {model}",
    )


async def check_one(
    client: httpx.AsyncClient,
    config: KvernConfig,
    upstream: UpstreamFindings,
    progress: Progress,
    *,
    send: bool,
    timeout_s: float,
) -> Check:
    subject = f"upstream {upstream.upstream.name} cached tokens"
    facts = upstream.facts
    kind = facts.kind if facts is not None else "unknown"
    if facts is not None and facts.reports_cached_tokens is False:
        return warn(
            subject,
            f"{KIND_NAMES[kind]} reports no cached-token figure in its OpenAI answers",
            _NO_FIGURE_FIX.get(kind, _NO_FIGURE_FIX["unknown"]),
        )
    if not send:
        return warn(
            subject,
            "not checked (--no-requests)",
            "run without --no-requests to send two 1-token requests",
        )
    model = pick_model(config, upstream)
    if model is None:
        return warn(subject, "not checked: it lists no model to ask", "load a model on it")
    body = probe_body(model, facts.block_size if facts is not None else None, uuid.uuid4().hex)
    answers: list[httpx.Response] = []
    try:
        with progress.step(f"sending 2 one-token requests for {model} to {upstream.upstream.name}"):
            for _ in range(2):
                answers.append(await _ask(client, upstream, body, timeout_s))
                upstream.chats_sent += 1  # the KV events check asks whether they made events
                if answers[-1].status_code != 200:
                    break
    except UpstreamError as exc:
        return fail(
            subject,
            f"a chat request for {model} failed: {exc.reason}",
            "check the backend's log",
        )
    last = answers[-1]
    if last.status_code != 200:
        said = f"a chat request for {model} answered HTTP {last.status_code}: {last.text[:200]}"
        if last.status_code >= 500:
            return fail(subject, said, "check the backend's log")
        return warn(
            subject, said, "pass --api-key if it needs one, or check the model name it serves"
        )
    facts_of = parse_response(last.content, last.headers.get("content-type", ""))
    return _verdict(subject, kind, model, facts_of)


async def check_cached_tokens(
    client: httpx.AsyncClient,
    config: KvernConfig,
    upstreams: list[UpstreamFindings],
    progress: Progress,
    *,
    send: bool,
    timeout_s: float,
) -> list[Check]:
    """One line per reachable upstream, asked one after the other."""
    return [
        await check_one(client, config, u, progress, send=send, timeout_s=timeout_s)
        for u in upstreams
        if u.reachable
    ]
