"""Loading ``config.yaml``: read, validate, apply the environment, resolve relative paths.

Why apart from the schema (:mod:`kvern.config.schema`): what the file may
contain and how it reaches kvern change for different reasons. Every
validation problem becomes one :class:`ConfigError` naming the key path, the
value and what was expected; secrets and deployment settings may come from
``KVERN_*`` environment variables instead of the file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kvern.config.schema import KvernConfig

ENV_UPSTREAM_URL = "KVERN_UPSTREAM_URL"
ENV_HOST = "KVERN_HOST"
ENV_PORT = "KVERN_PORT"
ENV_ADMIN_KEY = "KVERN_ADMIN_KEY"
ENV_TENANT_SECRET = "KVERN_TENANT_SECRET"


class ConfigError(ValueError):
    """The configuration file (or an override) is invalid; the message says where and why."""


def _format_error(source: str, exc: ValidationError) -> str:
    lines = [f"{source}: invalid configuration"]
    for err in exc.errors():
        path = ".".join(str(part) for part in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {path}: unknown key (value {err['input']!r}); check the spelling")
            continue
        message = err["msg"].removeprefix("Value error, ")
        lines.append(f"  {path}: got {err['input']!r}; expected: {message}")
    return "\n".join(lines)


def parse_config(data: Mapping[str, Any] | None, source: str = "config") -> KvernConfig:
    """Validate a mapping (as read from YAML) into a :class:`KvernConfig`."""
    try:
        return KvernConfig.model_validate(dict(data or {}))
    except ValidationError as exc:
        raise ConfigError(_format_error(source, exc)) from None


def apply_env_overrides(config: KvernConfig, env: Mapping[str, str]) -> KvernConfig:
    """Return ``config`` with the ``KVERN_*`` environment variables applied.

    ``KVERN_UPSTREAM_URL``, ``KVERN_HOST``, ``KVERN_PORT``, ``KVERN_ADMIN_KEY``
    and ``KVERN_TENANT_SECRET``: secrets need not be written in the file.
    """
    overrides: list[tuple[str, str, str]] = [
        (section, key, env[name])
        for name, section, key in (
            (ENV_UPSTREAM_URL, "upstream", "base_url"),
            (ENV_HOST, "proxy", "host"),
            (ENV_PORT, "proxy", "port"),
            (ENV_ADMIN_KEY, "proxy", "admin_api_key"),
            (ENV_TENANT_SECRET, "analytics", "tenant_secret"),
        )
        if env.get(name)
    ]
    return with_overrides(config, overrides, source="environment overrides")


def with_overrides(
    config: KvernConfig, overrides: list[tuple[str, str, Any]], *, source: str
) -> KvernConfig:
    """``config`` with ``(section, key, value)`` set, every other field as set (or unset) as it was.

    Why not a plain ``model_dump()`` round trip: what the operator left unset
    must stay unset -- ``cache_model.kind: auto`` and the routed upstreams
    fill exactly those fields from what each upstream says, and a dump of
    every default would read as the operator having set them all.
    """
    if not overrides:
        return config
    data = config.model_dump(exclude_unset=True)
    for section, key, value in overrides:
        data.setdefault(section, {})[key] = value
    return parse_config(data, source=source)


def load_config(path: str | Path | None, env: Mapping[str, str] | None = None) -> KvernConfig:
    """Read, validate and return the configuration at ``path`` (defaults when None).

    ``env`` defaults to ``os.environ``; pass ``{}`` to ignore the environment.
    Relative tokenizer and template paths are resolved against the file's folder.
    """
    data: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{source}: cannot read configuration: {exc.strerror}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{source}: not valid YAML: {exc}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{source}: expected a mapping at the top level, got {loaded!r}")
        data = _resolve_relative_paths(loaded or {}, Path(path).resolve().parent)
    config = parse_config(data, source=source)
    return apply_env_overrides(config, os.environ if env is None else env)


def _resolve_relative_paths(data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Make ``./``-relative tokenizer sources and template paths relative to the config file."""
    models = (data.get("tokenizers") or {}).get("models")
    if not isinstance(models, dict):
        return data
    for key, entry in list(models.items()):
        if isinstance(entry, str):
            entry = {"source": entry}
            models[key] = entry
        if not isinstance(entry, dict):
            continue
        for field in ("source", "chat_template"):
            value = entry.get(field)
            if isinstance(value, str) and value.startswith(("./", "../")):
                entry[field] = str((base / value).resolve())
    return data
