"""``cache_model.kind: auto``: the cache model and its sizes, from what the upstream says.

Why: the rules and sizes of a backend's cache decide every prediction, and
the backend knows them (:mod:`kvern.upstream.discovery`). Explicit settings
always win: only a field the configuration leaves unset is taken from the
upstream, so an operator can pin one figure and let the rest be detected.
An upstream that says nothing keeps the defaults (one shared prefix cache in
``trie.block_size`` blocks), and /health says it was not detected.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

from kvern.config import CacheModelConfig, KvernConfig, UpstreamEntry
from kvern.upstream.discovery import BackendFacts

# Which cache model replays which server's cache.
_KIND_OF: dict[str, Literal["radix", "llamacpp"]] = {
    "vllm": "radix",
    "sglang": "radix",
    "llamacpp": "llamacpp",
    "ollama": "llamacpp",
    "kvern_engine": "radix",  # whole blocks, the longest stored run, the last token computed
}


def resolve_cache_model(config: CacheModelConfig, facts: BackendFacts | None) -> CacheModelConfig:
    """The cache model to run for an upstream that said ``facts`` (None: nothing)."""
    explicit = config.model_fields_set
    kind = config.kind
    if kind == "auto":
        kind = _KIND_OF.get(facts.kind, "radix") if facts is not None else "radix"
    update: dict[str, Any] = {"kind": kind}
    if facts is not None:
        if kind == "radix" and "block_size" not in explicit and facts.block_size:
            update["block_size"] = facts.block_size
        # vLLM's pool is what the radix model replays; SGLang evicts radix-tree leaves.
        vllm = kind == "radix" and facts.kind == "vllm"
        if vllm and "capacity_tokens" not in explicit and facts.capacity_tokens:
            update["capacity_tokens"] = facts.capacity_tokens
        if kind == "llamacpp" and "slots" not in explicit and facts.slots:
            update["slots"] = facts.slots
    return config.model_copy(update=update)


def resolve_entry(entry: UpstreamEntry, facts: BackendFacts | None) -> UpstreamEntry:
    """A routed upstream's block size and KV capacity, where the config leaves them unset."""
    if facts is None:
        return entry
    explicit = entry.model_fields_set
    update: dict[str, Any] = {}
    if "block_size" not in explicit and facts.block_size:
        update["block_size"] = facts.block_size
    capacity = facts.capacity_tokens
    if capacity is None and facts.slots and facts.context_tokens:
        capacity = facts.slots * facts.context_tokens  # llama.cpp: -c, split over slots
    if "kv_capacity_tokens" not in explicit and capacity:
        update["kv_capacity_tokens"] = capacity
    return entry.model_copy(update=update) if update else entry


def detected_config(config: KvernConfig, facts: Mapping[str, BackendFacts]) -> KvernConfig:
    """``config`` with what the upstreams said (by upstream name) filled in where unset."""
    entries = config.upstream_entries()
    first = facts.get(entries[0].name) if entries else None
    upstream = config.upstream.model_copy(
        update={"cache_model": resolve_cache_model(config.upstream.cache_model, first)}
    )
    update: dict[str, Any] = {"upstream": upstream}
    if config.upstreams:
        update["upstreams"] = [resolve_entry(e, facts.get(e.name)) for e in config.upstreams]
    return config.model_copy(update=update)


def describe(config: CacheModelConfig, facts: BackendFacts | None) -> str:
    """One line for the start-up log and /health: what was detected, what kvern runs."""
    said = "nothing (not detected)" if facts is None or facts.kind == "unknown" else facts.kind
    parts = [f"upstream said {said}"]
    if facts is not None and facts.kind != "unknown":
        if facts.block_size:
            parts.append(f"block {facts.block_size}")
        if facts.capacity_tokens:
            parts.append(f"{facts.capacity_tokens} KV tokens")
        if facts.slots:
            parts.append(f"{facts.slots} slot(s)")
        if facts.prefix_caching is False:
            parts.append("prefix caching OFF")
        if facts.reports_cached_tokens is False:
            parts.append("reports no cached tokens (requests counted as unreported)")
    model = f"cache model {config.kind}"
    if config.kind == "radix" and config.block_size:
        model += f" block {config.block_size}"
    if config.kind == "radix" and config.capacity_tokens:
        model += f" capacity {config.capacity_tokens} tokens"
    if config.kind == "llamacpp":
        model += f" slots {config.slots}"
    return ", ".join(parts) + f" -> {model}"
