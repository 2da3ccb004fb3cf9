"""Choose the cache model the config names.

Why a module of its own: the factory imports every model, and every model
imports the protocol in :mod:`kvern.cache_models.base`; kept beside the
protocol it would tie them in a circle.
"""

from __future__ import annotations

from kvern.cache_models.base import CacheModel
from kvern.cache_models.llamacpp import LlamaCppSlots
from kvern.cache_models.radix import SharedPrefixCache
from kvern.config import CacheModelConfig


def build_cache_model(config: CacheModelConfig, default_block_size: int) -> CacheModel:
    """The cache model the config names (one per upstream and model).

    ``auto`` is resolved before this (:mod:`kvern.cache_models.auto`); one
    still ``auto`` here is an upstream that said nothing: the default radix.
    """
    if config.kind == "llamacpp":
        return LlamaCppSlots(
            num_slots=config.slots,
            slot_prompt_similarity=config.slot_prompt_similarity,
            cache_ram=config.cache_ram,
            cache_ram_tokens=config.cache_ram_tokens,
            cache_idle_slots=config.cache_idle_slots,
            kv_unified=config.kv_unified,
        )
    return SharedPrefixCache(config.block_size or default_block_size, config.capacity_tokens)
