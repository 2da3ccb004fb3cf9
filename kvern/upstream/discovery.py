"""Asking an upstream what it is: which server, its KV block size, capacity and slots.

Why: predicting what a backend serves from its KV cache needs its cache's
rules (one shared prefix cache in whole blocks, or llama.cpp's slots) and
their sizes, which operators should not have to copy into ``config.yaml``
by hand -- and get wrong (vLLM's CPU build refuses 16-token blocks; its
default is 128). Each server says it somewhere:

- vLLM: ``GET /metrics`` carries ``vllm:cache_config_info`` with
  ``block_size``, ``num_gpu_blocks`` (so capacity) and ``enable_prefix_caching``;
- llama.cpp's server: ``GET /props`` (``total_slots``, the slot context);
- SGLang: ``GET /get_server_info`` (``page_size``, ``max_total_num_tokens``);
- Ollama: ``GET /api/version`` (it runs llama.cpp; its OpenAI API reports no
  cached tokens);
- kvern's own engine (``kvern engine``): ``GET /metrics`` carries
  ``kvern_engine_cache_config_info`` with ``block_size`` and
  ``enable_prefix_caching``. Its block store follows the ``radix`` rules in
  whole blocks; its capacity is not passed on, because it evicts by kvern's
  policies, not by vLLM's LRU pool that a ``radix`` capacity replays.

Every probe is short and optional: a backend that answers none is
``unknown``, and kvern keeps its configured (or default) model.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import httpx

BackendKind = Literal["vllm", "llamacpp", "sglang", "ollama", "kvern_engine", "unknown"]

PROBE_TIMEOUT_S = 2.0

_CACHE_INFO = re.compile(r"^vllm:cache_config_info\{(?P<labels>[^}]*)\}", re.MULTILINE)
_ENGINE_INFO = re.compile(r"^kvern_engine_cache_config_info\{(?P<labels>[^}]*)\}", re.MULTILINE)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


@dataclass(slots=True)
class BackendFacts:
    """What one upstream said about itself (None: it did not say)."""

    kind: BackendKind = "unknown"
    block_size: int | None = None  # KV block (page) size in tokens
    capacity_tokens: int | None = None  # KV tokens its cache holds
    slots: int | None = None  # llama.cpp: parallel sequences (-np)
    context_tokens: int | None = None  # llama.cpp: context per slot
    prefix_caching: bool | None = None  # whether it reuses prefixes at all
    # Whether its OpenAI answers carry a cached-token figure: False for
    # Ollama; None where only answers can tell (vLLM needs
    # --enable-prompt-tokens-details, which it does not advertise).
    reports_cached_tokens: bool | None = None
    source: str | None = None  # the endpoint that told
    errors: list[str] = field(default_factory=list)  # probes that failed, and why

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _int(value: Any) -> int | None:
    try:
        number = int(float(value))
    except (TypeError, ValueError):
        return None
    return number if number > 0 else None


def parse_vllm_metrics(text: str) -> BackendFacts | None:
    """The facts in vLLM's Prometheus text, or None if it is not vLLM's."""
    found = _CACHE_INFO.search(text)
    if found is None:
        return None
    labels = dict(_LABEL.findall(found["labels"]))
    block = _int(labels.get("block_size"))
    blocks = _int(labels.get("num_gpu_blocks"))
    caching = labels.get("enable_prefix_caching")
    return BackendFacts(
        kind="vllm",
        block_size=block,
        capacity_tokens=block * blocks if block and blocks else None,
        prefix_caching=None if caching is None else caching.lower() == "true",
        source="/metrics vllm:cache_config_info",
    )


def parse_engine_metrics(text: str) -> BackendFacts | None:
    """The facts in ``kvern engine``'s Prometheus text, or None if it is not the engine's."""
    found = _ENGINE_INFO.search(text)
    if found is None:
        return None
    labels = dict(_LABEL.findall(found["labels"]))
    caching = labels.get("enable_prefix_caching")
    return BackendFacts(
        kind="kvern_engine",
        block_size=_int(labels.get("block_size")),
        prefix_caching=None if caching is None else caching.lower() == "true",
        reports_cached_tokens=True,
        source="/metrics kvern_engine_cache_config_info",
    )


def parse_llamacpp_props(props: dict[str, Any]) -> BackendFacts | None:
    """The facts in llama-server's ``/props``, or None if it is not llama-server's."""
    if "total_slots" not in props and "default_generation_settings" not in props:
        return None
    settings = props.get("default_generation_settings")
    ctx = _int(settings.get("n_ctx")) if isinstance(settings, dict) else None
    return BackendFacts(
        kind="llamacpp",
        block_size=1,
        slots=_int(props.get("total_slots")),
        context_tokens=ctx,
        prefix_caching=True,
        reports_cached_tokens=True,
        source="/props",
    )


def parse_sglang_info(info: dict[str, Any]) -> BackendFacts | None:
    """The facts in SGLang's ``/get_server_info``, or None if it is not SGLang's."""
    if "page_size" not in info and "max_total_num_tokens" not in info:
        return None
    disabled = info.get("disable_radix_cache")
    return BackendFacts(
        kind="sglang",
        block_size=_int(info.get("page_size")) or 1,
        capacity_tokens=_int(info.get("max_total_num_tokens")),
        prefix_caching=None if disabled is None else not bool(disabled),
        source="/get_server_info",
    )


async def _get(client: httpx.AsyncClient, url: str) -> httpx.Response:
    return await client.get(url, timeout=PROBE_TIMEOUT_S)


async def discover(client: httpx.AsyncClient, origin: str) -> BackendFacts:
    """Ask the upstream at ``origin`` (its URL without ``/v1``) what it is; never raises."""
    probes = {
        "/metrics": _get(client, origin + "/metrics"),
        "/props": _get(client, origin + "/props"),
        "/get_server_info": _get(client, origin + "/get_server_info"),
        "/api/version": _get(client, origin + "/api/version"),
    }
    answers = await asyncio.gather(*probes.values(), return_exceptions=True)
    got: dict[str, httpx.Response] = {}
    errors: list[str] = []
    for path, answer in zip(probes, answers, strict=True):
        if isinstance(answer, BaseException):
            errors.append(f"{path}: {type(answer).__name__}")
        elif answer.status_code == 200:
            got[path] = answer
    facts = _facts_from(got)
    facts.errors = errors
    return facts


def _facts_from(got: dict[str, httpx.Response]) -> BackendFacts:
    if "/metrics" in got:
        text = got["/metrics"].text
        found = parse_vllm_metrics(text) or parse_engine_metrics(text)
        if found is not None:
            return found
    for path, parse in (("/props", parse_llamacpp_props), ("/get_server_info", parse_sglang_info)):
        if path in got:
            body = _json(got[path])
            found = parse(body) if isinstance(body, dict) else None
            if found is not None:
                return found
    if "/api/version" in got and isinstance(_json(got["/api/version"]), dict):
        return BackendFacts(
            kind="ollama",
            block_size=1,
            prefix_caching=True,
            reports_cached_tokens=False,
            source="/api/version",
        )
    return BackendFacts()


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        return None
