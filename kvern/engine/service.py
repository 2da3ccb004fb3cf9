"""The engine's parts, built once from its settings: model, block store, runner, worker thread.

Why a service object passed to the app factory (not globals): tests build an
engine on a real model once and serve it from several apps, and the bench
builds one with reuse off as its baseline.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from kvern.engine.chunks import ChunkIndex
from kvern.engine.disk_tier import DiskTier
from kvern.engine.kv_codec import KV_BITS, KvBits, encoded_bytes
from kvern.engine.runner import Runner, block_shape
from kvern.engine.scheduler import Scheduler
from kvern.engine.store import BlockStore
from kvern.engine.weights import LoadedModel, load_model
from kvern.trie.policies import make_policy

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "kvern" / "engine"


@dataclass(slots=True)
class EngineSettings:
    """``kvern engine``'s options (each a command-line flag)."""

    model: str
    served_name: str | None = None
    block_tokens: int = 16  # tokens per stored KV block (the hash granularity)
    kv_bits: KvBits = 16  # storage of stored blocks: 32 (as computed), 16, 8 or 4
    cache_bytes: int = 1 << 30  # memory budget of the block store
    policy: str = "cost_aware"  # kvern's eviction policy for the store
    disk_dir: Path | None = None  # the cold tier's folder; None: no disk tier
    disk_bytes: int = 4 << 30  # the cold tier's file size
    reuse: bool = True  # False: compute every prompt whole (a baseline)
    dtype: str = "float32"  # compute dtype; bfloat16 halves prefill time on AVX-512 CPUs
    threads: int | None = None  # torch threads; None: torch's default
    device: str = "cpu"  # where the model runs ("cuda" on a GPU); stored blocks stay in RAM
    chunk_reuse: bool = False  # reuse stored blocks after a different prefix (approximate)
    chunk_recompute_tokens: int = 16  # computed again after each seam of a reused chunk
    cache_dir: Path = field(default_factory=default_cache_dir)  # converted GGUFs

    def __post_init__(self) -> None:
        if self.kv_bits not in KV_BITS:
            raise ValueError(f"kv_bits must be one of {KV_BITS}, got {self.kv_bits!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.block_tokens < 1:
            raise ValueError(f"block_tokens must be >= 1, got {self.block_tokens}")


class EngineService:
    """Everything one ``kvern engine`` process serves with."""

    def __init__(self, settings: EngineSettings, loaded: LoadedModel | None = None) -> None:
        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.settings = settings
        self.loaded = (
            loaded
            if loaded is not None
            else load_model(
                settings.model,
                settings.cache_dir,
                dtype=DTYPES[settings.dtype],
                name=settings.served_name,
                device=settings.device,
            )
        )
        self.name = settings.served_name or self.loaded.name
        self.started_s = time.time()
        config = self.loaded.model.config.get_text_config()
        self.max_model_len = int(getattr(config, "max_position_embeddings", 0) or 4096)
        shape = block_shape(self.loaded.model, settings.block_tokens)
        dtype = next(self.loaded.model.parameters()).dtype
        self.block_bytes = encoded_bytes(shape, settings.kv_bits, dtype)
        self.disk: DiskTier | None = None
        if settings.disk_dir is not None:
            key = f"{self.loaded.fingerprint}-b{settings.block_tokens}-k{settings.kv_bits}"
            self.disk = DiskTier(
                settings.disk_dir / key, shape, settings.kv_bits, settings.disk_bytes, dtype=dtype
            )
        self.store = BlockStore(
            settings.block_tokens,
            settings.cache_bytes,
            make_policy(settings.policy),
            cold=self.disk,
            clock=time.monotonic,
        )
        self.chunks = (
            ChunkIndex(self.store, recompute_tokens=settings.chunk_recompute_tokens)
            if settings.chunk_reuse
            else None
        )
        self.runner = Runner(self.loaded.model, self.store, settings.kv_bits, self.chunks)
        tokenizer = self.loaded.tokenizer
        eos = self.loaded.model.generation_config.eos_token_id
        eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None:
            eos_ids.add(tokenizer.eos_token_id)
        self.scheduler = Scheduler(
            self.runner,
            lambda ids: str(tokenizer.decode(ids, skip_special_tokens=True)),
            eos_ids,
            reuse=settings.reuse,
        )
        self.requests = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.chunk_reused_tokens = 0
        self.completion_tokens = 0

    def start(self) -> None:
        self.scheduler.start()

    def stop(self) -> None:
        self.scheduler.stop()
        if self.disk is not None:
            self.disk.close()

    def chat_ids(self, messages: list[dict[str, Any]], extra: dict[str, Any]) -> list[int]:
        """The chat rendered by the model's own template and tokenized."""
        options = {"add_generation_prompt": True, **extra}
        rendered = self.loaded.tokenizer.apply_chat_template(messages, tokenize=False, **options)
        return self.text_ids(str(rendered), special=False)

    def text_ids(self, text: str, special: bool = True) -> list[int]:
        ids = self.loaded.tokenizer(text, add_special_tokens=special)["input_ids"]
        return [int(i) for i in ids]

    def facts(self) -> dict[str, Any]:
        """What the engine says about its cache (kvern's discovery reads this)."""
        s = self.settings
        stats = self.store.stats
        return {
            "engine": "kvern",
            "model": self.name,
            "fingerprint": self.loaded.fingerprint,
            "block_size": s.block_tokens,
            "kv_bits": s.kv_bits,
            "dtype": str(self.runner.dtype).removeprefix("torch."),
            "reuse": s.reuse,
            "chunk_reuse": s.chunk_reuse,
            "policy": s.policy,
            "capacity_bytes": s.cache_bytes,
            "capacity_tokens": s.cache_bytes // self.block_bytes * s.block_tokens,
            "block_bytes": self.block_bytes,
            "stored_blocks": self.store.num_blocks,
            "stored_bytes": self.store.num_bytes,
            "max_model_len": self.max_model_len,
            "disk": None if self.disk is None else self.disk.facts(),
            "counters": {
                "lookups": stats.lookups,
                "hit_blocks": stats.hit_blocks,
                "promoted_blocks": stats.promoted_blocks,
                "stored_blocks": stats.stored_blocks,
                "evicted_blocks": stats.evicted_blocks,
            },
        }
