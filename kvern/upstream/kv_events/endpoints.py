"""Where an upstream's KV events are: from its configuration, or asked of vLLM itself.

Why a resolver: vLLM *binds* its publisher (``tcp://*:5557``, its default) and
a user copies that string into kvern's config, where it must be *connected*:
a wildcard host means the upstream's own host, taken from its URL.

Why detection asks ``/server_info``: it is the one place vLLM says over HTTP
how it publishes (``vllm_config.kv_events_config`` in
``GET /server_info?config_format=json``). Neither ``/metrics`` (its
``vllm:cache_config_info`` carries the cache config, not the events config)
nor ``/v1/models`` says it. But vLLM mounts ``/server_info`` only with
``VLLM_SERVER_DEV_MODE=1``, which it warns is not for production: elsewhere
detection answers "cannot tell" and ``upstreams[].kv_events`` must be set.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from kvern.config.routing import UpstreamEntry

# Hosts vLLM binds that a subscriber cannot connect to: "every interface".
_WILDCARD_HOSTS = ("*", "0.0.0.0", "[::]")


@dataclass(slots=True, frozen=True)
class KvEventsEndpoints:
    """What a subscriber connects to, wildcards resolved."""

    endpoint: str  # the PUB socket
    replay_endpoint: str | None  # the ROUTER serving missed batches; None if there is none
    topic: str


@dataclass(slots=True, frozen=True)
class Detection:
    """What asking vLLM gave: endpoints, or why not, and whether asking again may help."""

    endpoints: KvEventsEndpoints | None
    reason: str  # why there are no endpoints ("" when there are)
    final: bool  # True: the answer will not change by asking again (no events, not vLLM)


def connectable(endpoint: str, upstream_url: str) -> str:
    """``endpoint`` as a subscriber connects to it: a wildcard host becomes the upstream's."""
    if not endpoint.startswith("tcp://"):
        return endpoint  # ipc:// and inproc:// name a path, not a host
    host, sep, port = endpoint[len("tcp://") :].rpartition(":")
    if not sep or host not in _WILDCARD_HOSTS:
        return endpoint
    upstream_host = urlsplit(upstream_url).hostname or "127.0.0.1"
    if ":" in upstream_host:  # an IPv6 literal
        upstream_host = f"[{upstream_host}]"
    return f"tcp://{upstream_host}:{port}"


def configured(entry: UpstreamEntry) -> KvEventsEndpoints | None:
    """The endpoints ``entry`` names (None when it names none, or asks for detection)."""
    if entry.kv_events is None or entry.kv_events == "auto":
        return None
    replay = entry.kv_events_replay
    return KvEventsEndpoints(
        endpoint=connectable(entry.kv_events, entry.url),
        replay_endpoint=connectable(replay, entry.url) if replay is not None else None,
        topic=entry.kv_events_topic,
    )


def _origin(url: str) -> str:
    """The server's root: vLLM serves ``/server_info`` beside ``/v1``, not under it."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"


def from_server_info(body: Any, upstream_url: str) -> Detection:
    """Read ``kv_events_config`` out of vLLM's ``/server_info?config_format=json`` answer."""
    config = body.get("vllm_config") if isinstance(body, dict) else None
    if not isinstance(config, dict):
        return Detection(None, "its /server_info has no vllm_config in JSON form", final=True)
    events = config.get("kv_events_config")
    if not isinstance(events, dict) or not events.get("enable_kv_cache_events"):
        return Detection(None, "vLLM publishes no KV events (enable_kv_cache_events off)", True)
    if events.get("publisher") != "zmq" or not isinstance(events.get("endpoint"), str):
        return Detection(None, f"vLLM's KV events publisher is {events.get('publisher')!r}", True)
    replay = events.get("replay_endpoint")
    topic = events.get("topic")
    return Detection(
        KvEventsEndpoints(
            endpoint=connectable(events["endpoint"], upstream_url),
            replay_endpoint=connectable(replay, upstream_url) if isinstance(replay, str) else None,
            topic=topic if isinstance(topic, str) else "",
        ),
        "",
        final=True,
    )


async def detect(client: httpx.AsyncClient, upstream_url: str, timeout_s: float) -> Detection:
    """Ask the upstream how it publishes KV events (see the module docstring for the limits)."""
    url = _origin(upstream_url) + "/server_info"
    try:
        response = await client.get(url, params={"config_format": "json"}, timeout=timeout_s)
    except httpx.HTTPError as exc:
        return Detection(None, f"{url}: {type(exc).__name__}: {exc}"[:300], final=False)
    if response.status_code == 404:
        return Detection(
            None,
            f"{url} answered 404: vLLM serves it only with VLLM_SERVER_DEV_MODE=1 "
            "(or this is not vLLM); set upstreams[].kv_events instead",
            final=True,
        )
    if response.status_code != 200:
        return Detection(None, f"{url} answered HTTP {response.status_code}", final=False)
    try:
        body = response.json()
    except ValueError:
        return Detection(None, f"{url} did not answer JSON", final=True)
    return from_server_info(body, upstream_url)
