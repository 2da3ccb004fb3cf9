"""``config.yaml``: its schema, validated once at start-up, and how it is loaded.

Underneath every other floor: no kvern module is imported from here, and the
caller loads the file and hands the :class:`KvernConfig` to ``create_app``.
``schema`` holds the core sections, ``routing`` the sections for several
upstreams, ``loading`` reading the file and the environment, ``urls`` the
redaction of credentials in URLs. This module is the package's public API.
"""

from kvern.config.loading import ConfigError, apply_env_overrides, load_config, parse_config
from kvern.config.observe import DiagnosisConfig, MetricsConfig
from kvern.config.routing import HealthConfig, RoutingConfig, RoutingPolicy, UpstreamEntry
from kvern.config.schema import (
    AnalyticsConfig,
    CacheModelConfig,
    EvictionConfig,
    KvernConfig,
    NormalizationRule,
    ProxyConfig,
    TokenizerEntry,
    TokenizersConfig,
    TrackingConfig,
    TrieConfig,
    TrieOverride,
    UpstreamConfig,
)

__all__ = [
    "AnalyticsConfig",
    "CacheModelConfig",
    "ConfigError",
    "EvictionConfig",
    "HealthConfig",
    "KvernConfig",
    "NormalizationRule",
    "ProxyConfig",
    "RoutingConfig",
    "RoutingPolicy",
    "TokenizerEntry",
    "TokenizersConfig",
    "DiagnosisConfig",
    "MetricsConfig",
    "TrackingConfig",
    "TrieConfig",
    "TrieOverride",
    "UpstreamConfig",
    "UpstreamEntry",
    "apply_env_overrides",
    "load_config",
    "parse_config",
]
