"""One radix trie per model, built on first use with that model's settings.

Why per model: two models never share KV cache entries, even for identical
token ids, so their prefixes must never share trie nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvern.cache_models.base import CacheModel
from kvern.cache_models.factory import build_cache_model
from kvern.config import CacheModelConfig, EvictionConfig, TrieConfig
from kvern.trie import RadixTrie
from kvern.trie.policies import EvictionPolicy, make_policy


@dataclass(slots=True)
class ModelTrie:
    """A model's trie and the budget it is held to."""

    model: str  # request model name
    trie: RadixTrie  # the model's prefixes
    max_tokens: int  # memory cap in tokens
    block_size: int  # the backend's KV block size for aligned figures
    cache_model: CacheModel  # the upstream's own cache, replayed to predict its reuse
    insertions: int = 0  # prompts inserted (for /metrics)
    evicted_nodes: int = 0  # nodes removed by eviction or expiry (for /metrics)
    evicted_tokens: int = 0  # tokens those nodes held


def policy_from_config(eviction: EvictionConfig) -> EvictionPolicy:
    """Build the configured eviction policy with only the parameters it takes."""
    params: dict[str, float | int | None] = {"ttl_s": eviction.ttl_s}
    if eviction.policy in ("lfu", "cost_aware"):
        params["half_life_s"] = eviction.half_life_s
    if eviction.policy == "cost_aware":
        params["attention_tokens"] = eviction.attention_tokens
    return make_policy(eviction.policy, **params)


class TrieForest:
    """Model name -> :class:`ModelTrie`; only ever touched from the tracking thread."""

    def __init__(
        self,
        trie_config: TrieConfig,
        eviction: EvictionConfig,
        cache_model: CacheModelConfig | None = None,
        *,
        min_max_tokens: int = 0,
    ) -> None:
        self._config = trie_config
        # With several upstreams the trie must hold at least what they hold
        # together, or it would evict prefixes routing still counts on.
        self._min_max_tokens = min_max_tokens
        self._eviction = eviction
        self._cache_model = cache_model or CacheModelConfig.model_validate({})
        self._tries: dict[str, ModelTrie] = {}
        policy_from_config(eviction)  # fail at start-up, not on the first request

    def get(self, model: str) -> ModelTrie:
        found = self._tries.get(model)
        if found is None:
            max_tokens, block_size = self._config.for_model(model)
            found = ModelTrie(
                model,
                RadixTrie(policy_from_config(self._eviction)),
                max(max_tokens, self._min_max_tokens),
                block_size,
                build_cache_model(self._cache_model, block_size),
            )
            self._tries[model] = found
        return found

    def reset_cache_model(self, cache_model: CacheModelConfig) -> None:
        """Replace every model's cache model (the upstream came back with other settings)."""
        self._cache_model = cache_model
        for mt in self._tries.values():
            mt.cache_model.release(mt.trie)
            mt.cache_model = build_cache_model(cache_model, mt.block_size)

    def peek(self, model: str) -> ModelTrie | None:
        return self._tries.get(model)

    def models(self) -> list[str]:
        return sorted(self._tries)
