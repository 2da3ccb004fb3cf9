"""Doctor: each upstream -- reachable? what it serves, what it is, how kvern will model its cache.

Why these three together: they are what kvern asks an upstream at start-up.
Reachability is the GET kvern's own health check makes
(``routing.health.path``, ``/models`` by default, whose answer is also the
model list); transport errors read as kvern words them
(:func:`kvern.upstream.client.mapped_errors`); what the backend is comes from
:func:`kvern.upstream.discovery.discover`, and the cache model kvern would run
from :mod:`kvern.cache_models.auto` -- the very functions ``kvern serve``
uses, so the doctor says what kvern will do, not a guess of it. URLs are shown
with their credentials replaced.
"""

from __future__ import annotations

import asyncio
import fnmatch
import time
from dataclasses import dataclass
from typing import Any

import httpx

from kvern.cache_models.auto import describe, resolve_cache_model, resolve_entry
from kvern.config import CacheModelConfig, KvernConfig, UpstreamEntry
from kvern.doctor.report import Check, fail, ok, warn
from kvern.errors import UpstreamError, UpstreamTimeout
from kvern.upstream.client import Upstream, mapped_errors
from kvern.upstream.discovery import BackendFacts, discover

KIND_NAMES = {
    "vllm": "vLLM",
    "llamacpp": "llama.cpp's server",
    "sglang": "SGLang",
    "ollama": "Ollama",
    "kvern_engine": "kvern's engine",
    "unknown": "an unrecognised backend",
}


@dataclass(slots=True)
class UpstreamFindings:
    """What the doctor learned of one upstream (later checks build on it)."""

    entry: UpstreamEntry  # as configured (its url keeps its credentials; show redacted)
    upstream: Upstream
    key: str  # the configuration key of its URL: upstream.base_url or upstreams[i].url
    reachable: bool = False
    models: list[str] | None = None  # None: it did not list its models
    facts: BackendFacts | None = None  # None: not asked (unreachable)
    chats_sent: int = 0  # the cached-token check's chats it answered (any status)

    def serves(self, model: str) -> bool:
        """Whether kvern would route ``model`` here (the entry's ``models`` globs)."""
        return any(m == model or fnmatch.fnmatchcase(model, m) for m in self.entry.models)

    def lists(self, model: str) -> bool | None:
        """Whether its model list names ``model`` (None: there is no list)."""
        return None if self.models is None else model in self.models


def model_ids(body: Any) -> list[str] | None:
    """The model names of an OpenAI ``/models`` answer (with llama.cpp's aliases), or None."""
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        return None
    names: list[str] = []
    for item in body["data"]:
        if not isinstance(item, dict):
            continue
        for name in [item.get("id"), *(item.get("aliases") or [])]:
            if isinstance(name, str) and name not in names:
                names.append(name)
    return names


async def _reach(
    client: httpx.AsyncClient, found: UpstreamFindings, path: str, timeout_s: float
) -> Check:
    subject = f"upstream {found.upstream.name}"
    shown = found.upstream.shown_url
    start = time.perf_counter()
    try:
        with mapped_errors(found.upstream):
            response = await client.get(found.upstream.base_url + path, timeout=timeout_s)
            if path != "/models" and response.status_code < 500:
                listing = await client.get(found.upstream.base_url + "/models", timeout=timeout_s)
            else:
                listing = response
    except UpstreamTimeout as exc:
        return fail(
            subject,
            f"{shown} did not answer GET {path} within {timeout_s:g} s ({exc.reason}): "
            "kvern's health check would count it as down",
            "see why it is slow, or raise routing.health.timeout_s",
        )
    except UpstreamError as exc:
        return fail(
            subject,
            f"{shown} unreachable: {exc.reason}",
            f"start the backend, or correct {found.key}",
        )
    ms = (time.perf_counter() - start) * 1000.0
    if response.status_code >= 500:
        return fail(
            subject,
            f"{shown} answered GET {path} with HTTP {response.status_code} "
            "(kvern's health check counts that as down)",
            "look at the backend's log; it may still be loading its model",
        )
    found.reachable = True
    if listing.status_code != 200:
        return warn(
            subject,
            f"{shown} reachable ({ms:.0f} ms), but GET /models answered "
            f"HTTP {listing.status_code}: its models are unknown",
            "pass --api-key if it needs one (kvern forwards clients' own keys)",
        )
    try:
        found.models = model_ids(listing.json())
    except ValueError:
        found.models = None
    if found.models is None:
        return warn(
            subject,
            f"{shown} reachable ({ms:.0f} ms), but GET /models is not an OpenAI model list",
            f"check {found.key}: it needs the API prefix (…/v1)",
        )
    if not found.models:
        return warn(subject, f"{shown} reachable ({ms:.0f} ms), lists no models", "load a model")
    return ok(subject, f"{shown} reachable ({ms:.0f} ms); models: {', '.join(found.models)}")


def _served(found: UpstreamFindings) -> Check | None:
    """A routed upstream whose ``models`` globs match nothing it lists."""
    globs = found.entry.models
    if globs == ["*"] or not found.models:
        return None
    if any(found.serves(m) for m in found.models):
        return None
    return warn(
        f"upstream {found.upstream.name}",
        f"configured for {globs}, but lists only {found.models}",
        f"correct {found.key.removesuffix('.url')}.models",
    )


def _kind(config: KvernConfig, found: UpstreamFindings, first: bool) -> list[Check]:
    """What the upstream is and the cache model kvern runs for it; settings that contradict it."""
    facts = found.facts
    assert facts is not None
    subject = f"upstream {found.upstream.name}"
    cache_config = config.upstream.cache_model
    resolved = resolve_cache_model(cache_config, facts)
    said = describe(resolved, facts)
    checks: list[Check] = []
    if facts.kind == "unknown":
        tried = "; ".join(facts.errors) or "no probe answered"
        checks.append(
            warn(
                subject,
                f"did not say what it is ({tried}); {said}",
                "set upstream.cache_model (kind, block_size, capacity_tokens) as the backend runs",
            )
        )
    else:
        checks.append(ok(subject, f"{KIND_NAMES[facts.kind]} (from {facts.source}); {said}"))
    if facts.prefix_caching is False:
        flag = (
            "drop --disable-radix-cache"
            if facts.kind == "sglang"
            else "add --enable-prefix-caching"
        )
        checks.append(
            warn(
                subject,
                "prefix caching is OFF: it reuses no prompt prefix, whatever kvern predicts",
                f"restart it with prefix caching ({flag})",
            )
        )
    if first:
        checks.extend(_disagreements(config, resolved, facts, subject))
    entry = found.entry
    if config.upstreams and facts.kind != "unknown":
        routed = resolve_entry(entry, facts)
        if facts.block_size and routed.block_size != facts.block_size:
            checks.append(
                warn(
                    subject,
                    f"kvern will route by {routed.block_size}-token blocks, but it says its "
                    f"KV blocks hold {facts.block_size}",
                    f"set {found.key.removesuffix('.url')}.block_size: {facts.block_size}",
                )
            )
    return checks


def _disagreements(
    config: KvernConfig, resolved: CacheModelConfig, facts: BackendFacts, subject: str
) -> list[Check]:
    """Where the cache model kvern will run differs from what the upstream said.

    Compared with what kvern *runs* (configured values and detection together),
    so a stale explicit setting and a detection that did not take both show.
    """
    if facts.kind == "unknown":
        return []
    key = "upstream.cache_model"
    expected = resolve_cache_model(CacheModelConfig.model_validate({}), facts).kind  # auto
    if resolved.kind != expected:
        return [
            warn(
                subject,
                f"kvern will model a {resolved.kind} cache, but {KIND_NAMES[facts.kind]} "
                f"caches as {expected}",
                f"set {key}.kind: {expected} (or auto)",
            )
        ]
    out: list[Check] = []
    # (key, what kvern will model, what the upstream said), each worded.
    runs: list[tuple[str, int | None, int | None, str, str]] = []
    if resolved.kind == "radix":
        block = resolved.block_size or config.trie.block_size
        said_block = facts.block_size
        runs.append(
            (
                "block_size",
                block,
                said_block,
                f"{block}-token KV blocks",
                f"{said_block}-token ones",
            )
        )
        if facts.kind == "vllm":
            capacity, said_capacity = resolved.capacity_tokens, facts.capacity_tokens
            ours = "an unbounded cache" if capacity is None else f"{capacity} KV tokens"
            runs.append(
                ("capacity_tokens", capacity, said_capacity, ours, f"{said_capacity} KV tokens")
            )
    else:
        slots, said_slots = resolved.slots, facts.slots
        runs.append(("slots", slots, said_slots, f"{slots} slot(s)", f"{said_slots} slot(s)"))
    for name, kvern_value, said, ours, theirs in runs:
        if said is not None and kvern_value != said:
            out.append(
                warn(
                    subject,
                    f"kvern will model {ours}, but the upstream has {theirs}: "
                    "its predicted cached tokens will be off",
                    f"set {key}.{name}: {said}",
                )
            )
    return out


def findings_for(config: KvernConfig) -> list[UpstreamFindings]:
    entries = config.upstream_entries()
    keys = (
        ["upstream.base_url"]
        if not config.upstreams
        else [f"upstreams[{i}].url" for i in range(len(entries))]
    )
    return [
        UpstreamFindings(entry=e, upstream=Upstream.at(e.url, e.name), key=k)
        for e, k in zip(entries, keys, strict=True)
    ]


async def _one(
    config: KvernConfig,
    client: httpx.AsyncClient,
    found: UpstreamFindings,
    first: bool,
    timeout_s: float,
) -> list[Check]:
    checks = [await _reach(client, found, config.routing.health.path, timeout_s)]
    if not found.reachable:
        return checks
    served = _served(found)
    if served is not None:
        checks.append(served)
    found.facts = await discover(client, found.upstream.origin)
    return checks + _kind(config, found, first)


async def check_upstreams(
    config: KvernConfig, client: httpx.AsyncClient, *, timeout_s: float
) -> tuple[list[UpstreamFindings], list[Check]]:
    """Every upstream, asked at once; their checks in configuration order."""
    found = findings_for(config)
    results = await asyncio.gather(
        *(_one(config, client, f, i == 0, timeout_s) for i, f in enumerate(found))
    )
    return found, [check for checks in results for check in checks]
