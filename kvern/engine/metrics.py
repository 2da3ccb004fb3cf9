"""The engine's ``/metrics``: Prometheus text read from the service's counters at scrape time.

Why a collector over the live counters (not instruments updated on the hot
path): the worker thread only bumps plain ints; a scrape reads them, so
serving pays nothing for metrics. ``kvern_engine_cache_config_info`` carries
the cache's rules as labels, the way vLLM's ``vllm:cache_config_info`` does;
kvern's discovery reads it to detect the engine.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from kvern.engine.service import EngineService


class _EngineCollector(Collector):
    def __init__(self, service: EngineService) -> None:
        self._service = service

    def collect(self) -> Iterator[InfoMetricFamily | CounterMetricFamily | GaugeMetricFamily]:
        s = self._service
        facts = s.facts()
        info = InfoMetricFamily("kvern_engine_cache_config", "The engine's KV block store")
        info.add_metric(
            [],
            {
                "block_size": str(facts["block_size"]),
                "kv_bits": str(facts["kv_bits"]),
                "capacity_bytes": str(facts["capacity_bytes"]),
                "capacity_tokens": str(facts["capacity_tokens"]),
                "policy": str(facts["policy"]),
                "enable_prefix_caching": str(facts["reuse"]).lower(),
                "model": s.name,
                "fingerprint": str(facts["fingerprint"]),
            },
        )
        yield info
        counters = {
            "requests": ("Requests answered", s.requests),
            "prompt_tokens": ("Prompt tokens of answered requests", s.prompt_tokens),
            "cached_tokens": ("Prompt tokens reused from the block store", s.cached_tokens),
            "chunk_reused_tokens": (
                "Prompt tokens reused from stored chunks after another prefix (opt-in)",
                s.chunk_reused_tokens,
            ),
            "completion_tokens": ("Tokens generated", s.completion_tokens),
            "blocks_stored": ("Blocks added to the store", s.store.stats.stored_blocks),
            "blocks_evicted": ("Blocks evicted from memory", s.store.stats.evicted_blocks),
            "blocks_promoted": ("Blocks brought back from disk", s.store.stats.promoted_blocks),
        }
        for key, (doc, value) in counters.items():
            yield CounterMetricFamily(f"kvern_engine_{key}", doc, value=value)
        gauges = {
            "store_blocks": ("Blocks held in memory", s.store.num_blocks),
            "store_bytes": ("Bytes of KV held in memory", s.store.num_bytes),
            "disk_blocks": ("Blocks held on disk", len(s.disk) if s.disk is not None else 0),
            "requests_running": ("Requests decoding", s.scheduler.running),
            "requests_waiting": ("Requests not prefilled yet", s.scheduler.waiting),
        }
        for key, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"kvern_engine_{key}", doc, value=value)


def render_metrics(service: EngineService) -> tuple[bytes, str]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_EngineCollector(service))
    return generate_latest(registry), CONTENT_TYPE_LATEST
