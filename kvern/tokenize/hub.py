"""Can the tokenizer hub be reached? Asked once per process, quickly, before any hub load.

Why: ``AutoTokenizer.from_pretrained("org/name")`` on a machine without hub
access does not fail fast. huggingface_hub retries each file with back-off
(1 + 2 + 4 + 8 + 8 s), logging a warning per retry, so the first request for
a model mapped to a hub id started a ~47 s load, and every other hub id did
the same again. One short probe of the hub's endpoint answers for all of them:

    hub id to load --> HubProbe.check() --(first call only)--> HEAD <endpoint>, ~2 s at most
                             |
              reachable -----+----- unreachable / offline
                  |                        |
       from_pretrained as usual     the local cache only (no network, no
                                    retries); not cached: HubUnreachable

The answer is kept for the life of the process: a model whose tokenizer
could not load is tracked with the approximate tokenizer from then on and is
never reloaded, so probing again could change nothing already decided.
``HF_HUB_OFFLINE=1`` (huggingface_hub's own switch) skips the probe: the
cache is all there is.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import httpx

logger = logging.getLogger(__name__)

HubState = Literal["unchecked", "checking", "reachable", "unreachable", "offline"]

# "org/name" or "name": what the hub takes as a repository id (a path that
# does not exist on disk is not one: it fails by itself, with no network).
_REPO_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
_PROBE_TIMEOUT_S = 2.0


class HubUnreachable(OSError):
    """A hub id's tokenizer is neither reachable on the hub nor in the local cache."""


def is_hub_id(source: str) -> bool:
    """True when ``source`` names a hub repository rather than a local file or directory."""
    if source.endswith(".gguf") or source.startswith((".", "/", "~")):
        return False
    return _REPO_ID.match(source) is not None and not Path(source).exists()


@dataclass(slots=True)
class HubStatus:
    """What /health shows of the hub."""

    endpoint: str  # the hub's base URL (HF_ENDPOINT, else huggingface.co)
    state: HubState  # unchecked until the first hub id is loaded, checking during the probe
    error: str | None = None  # why it is unreachable
    probe_ms: float | None = None  # how long the one probe took

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _hub_settings() -> tuple[str, bool]:
    """huggingface_hub's endpoint and offline switch, read from its environment."""
    from huggingface_hub import constants

    return constants.ENDPOINT, constants.is_offline_mode()


class HubProbe:
    """Decides once, in at most ``timeout_s`` or so, whether hub ids can be fetched (thread-safe).

    ``endpoint`` and ``offline`` default to huggingface_hub's own settings
    (``HF_ENDPOINT``, ``HF_HUB_OFFLINE``), read on the first check, so a
    process that never loads a hub id never imports huggingface_hub here.
    """

    def __init__(
        self,
        *,
        endpoint: str | None = None,
        offline: bool | None = None,
        timeout_s: float = _PROBE_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self._endpoint = endpoint
        self._offline = offline
        self._timeout_s = timeout_s
        self._transport = transport
        self._lock = threading.Lock()
        self._status: HubStatus | None = None
        self._checking = False  # a probe is under way (shown as "checking")

    def status(self) -> HubStatus:
        """The hub's state as last decided, without probing."""
        status = self._status
        if status is not None:
            return status
        state: HubState = "checking" if self._checking else "unchecked"
        return HubStatus(self._endpoint or "(huggingface_hub default)", state)

    def check(self) -> HubStatus:
        """The hub's state; the first caller probes, concurrent callers wait for that probe."""
        with self._lock:
            if self._status is None:
                self._checking = True
                try:
                    self._status = self._decide()
                finally:
                    self._checking = False
            return self._status

    def _decide(self) -> HubStatus:
        endpoint, offline = self._endpoint, self._offline
        if endpoint is None or offline is None:
            default_endpoint, default_offline = _hub_settings()
            endpoint = endpoint or default_endpoint
            offline = default_offline if offline is None else offline
        if offline:
            logger.info("tokenizer hub: HF_HUB_OFFLINE is set; hub ids load from the local cache")
            return HubStatus(endpoint, "offline", "HF_HUB_OFFLINE is set")
        start = time.perf_counter()
        error = self._probe(endpoint)
        probe_ms = round((time.perf_counter() - start) * 1000.0, 1)
        if error is None:
            return HubStatus(endpoint, "reachable", None, probe_ms)
        # The one warning about the hub: every hub id is decided by this probe.
        logger.warning(
            "tokenizer hub %s is unreachable (%s); models mapped to hub ids use a cached copy "
            "or the approximate tokenizer, and are proxied unchanged. Map them to a local "
            "directory or .gguf file, or set HF_HUB_OFFLINE=1 to skip this check",
            endpoint,
            error,
        )
        return HubStatus(endpoint, "unreachable", error, probe_ms)

    def _probe(self, endpoint: str) -> str | None:
        """One HEAD of the endpoint, no retries; any HTTP answer means reachable. None: reached."""
        try:
            with httpx.Client(
                timeout=self._timeout_s, transport=self._transport, trust_env=True
            ) as client:
                client.head(endpoint)
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}: {exc}"[:300] if str(exc) else type(exc).__name__
        except ValueError as exc:  # a malformed HF_ENDPOINT
            return f"invalid endpoint: {exc}"[:300]
        return None
