"""Editing ``config.yaml`` while kvern runs: watch the file, reload it, say what changed.

Why: users tune normalization rules by trying them on live traffic, and a
restart throws the tries (everything kvern learnt) away. So ``kvern serve``
looks at its file every ``proxy.config_poll_s`` (mtime, size and inode:
editors save by writing a new file and renaming it over the old one) and on
SIGHUP, loads it exactly as at start-up (same file, same ``KVERN_*`` and
flags, same :class:`~kvern.config.ConfigError` messages) and hands what
changed to the app::

    poll / SIGHUP --> load + validate --> error: logged, the running config stays
                                      --> changes(running, new)
                                            normalization.* --> apply (brain, mark)
                                            anything else   --> "needs a restart", once

Only the normalization rules apply live; every other key is built into
services at start-up, and is logged once as needing a restart. This module
knows nothing of those services: the app passes ``apply``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvern.config.loading import ConfigError
from kvern.config.schema import KvernConfig

logger = logging.getLogger(__name__)

# The section whose changes apply without a restart.
LIVE_SECTION = "normalization"
# A change seen by the poll is read once the file has held still this long
# (an editor writing in place may be caught half-way).
_SETTLE_S = 0.05


@dataclass(frozen=True, slots=True)
class ConfigSource:
    """Where the running config came from, and how to load it again the same way."""

    path: Path  # the file to watch
    load: Callable[[], KvernConfig]  # reads, validates and overrides it, as at start-up


@dataclass(frozen=True, slots=True)
class Changes:
    """What differs between the running config and a newly loaded one."""

    rules_models: list[str] = field(default_factory=list)  # normalization keys whose rules changed
    needs_restart: list[str] = field(default_factory=list)  # other key paths (section.key)

    @property
    def rules_changed(self) -> bool:
        return bool(self.rules_models)


def rules_hash(config: KvernConfig) -> str:
    """A short hash of the normalization rules in force, in file order (their order matters)."""
    dumped = json.dumps(config.model_dump(mode="json")[LIVE_SECTION], separators=(",", ":"))
    return hashlib.sha256(dumped.encode()).hexdigest()[:12]


def changes(old: KvernConfig, new: KvernConfig) -> Changes:
    """Which models' rules changed, and which other keys (``section.key``) did."""
    old_rules, new_rules = old.normalization, new.normalization
    models = [k for k in {**old_rules, **new_rules} if old_rules.get(k) != new_rules.get(k)]
    if not models and list(old_rules) != list(new_rules):
        models = list(new_rules)  # the same rules in another order apply in another order
    old_dump = old.model_dump(mode="json")
    new_dump = new.model_dump(mode="json")
    others = sorted(
        {
            ".".join(path[:2])
            for path in _differing(old_dump, new_dump, ())
            if path[0] != LIVE_SECTION
        }
    )
    return Changes(models, others)


def _differing(old: Any, new: Any, path: tuple[str, ...]) -> list[tuple[str, ...]]:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[tuple[str, ...]] = []
        for key in {**old, **new}:
            out.extend(_differing(old.get(key), new.get(key), (*path, str(key))))
        return out
    return [path] if old != new else []


def _stamp(path: Path) -> tuple[int, int, int, int] | None:
    """What the poll compares: device, inode, size, mtime; None when the file is gone."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


Apply = Callable[[KvernConfig, Changes], Awaitable[None]]


class ConfigWatcher:
    """Reloads ``source`` when it changes on disk or :meth:`trigger` is called; one at a time."""

    def __init__(
        self, source: ConfigSource, running: KvernConfig, apply: Apply, *, poll_s: float
    ) -> None:
        self._source = source
        self.running = running  # the config in force: the start-up one with live changes applied
        self._apply = apply
        self._poll_s = poll_s
        self._stamp = _stamp(source.path)
        self._asked = asyncio.Event()  # SIGHUP
        self._task: asyncio.Task[None] | None = None
        # Restart-only changes already logged, with the value they were logged for.
        self._told: dict[str, str] = {}
        self.num_reloads = 0  # reloads applied (any change)
        self.num_errors = 0  # reloads refused (the file did not load)

    def start(self) -> None:
        """Begin watching (on the running loop)."""
        self._task = asyncio.create_task(self._run(), name="kvern-config-watch")

    def trigger(self) -> None:
        """Reload now, changed or not (SIGHUP; on the loop's thread)."""
        self._asked.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            await self._wait()
            try:
                await self.reload()
            except Exception:  # noqa: BLE001 - a failed apply must not end the watch
                logger.exception("kvern: applying the reloaded %s failed", self._source.path.name)

    async def _wait(self) -> None:
        """Until SIGHUP, or until the poll sees the file change (and hold still)."""
        while True:
            timeout = self._poll_s if self._poll_s > 0 else None
            with contextlib.suppress(TimeoutError, asyncio.TimeoutError):
                await asyncio.wait_for(self._asked.wait(), timeout)
            if self._asked.is_set():
                self._asked.clear()
                self._stamp = _stamp(self._source.path)
                return
            stamp = _stamp(self._source.path)
            if stamp == self._stamp:
                continue
            await asyncio.sleep(_SETTLE_S)
            if _stamp(self._source.path) != stamp:
                continue  # still being written: look again at the next poll
            self._stamp = stamp
            return

    async def reload(self) -> Changes | None:
        """Load the file as at start-up and apply what changed; None when it did not load."""
        name = self._source.path.name
        try:
            new = await asyncio.to_thread(self._source.load)
        except ConfigError as exc:
            self.num_errors += 1
            logger.error("kvern: %s not reloaded: %s", name, exc)
            return None
        found = changes(self.running, new)
        self._told = {p: v for p, v in self._told.items() if p in found.needs_restart}
        fresh = [p for p in found.needs_restart if self._told.get(p) != _value_at(new, p)]
        for path in fresh:
            self._told[path] = _value_at(new, path)
        if fresh:
            logger.warning("kvern: %s changed; needs a restart: %s", name, ", ".join(fresh))
        if not found.rules_changed:
            if not found.needs_restart:
                logger.info("kvern: %s reloaded: nothing changed", name)
            return found
        self.running = self.running.model_copy(update={LIVE_SECTION: new.normalization})
        await self._apply(self.running, found)
        self.num_reloads += 1
        logger.info(
            "kvern: %s reloaded: normalization rules changed for %s (rules %s)",
            name,
            ", ".join(found.rules_models),
            rules_hash(self.running),
        )
        return found


def _value_at(config: KvernConfig, path: str) -> str:
    value: Any = config.model_dump(mode="json")
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    return json.dumps(value, sort_keys=True)


def listen_for_sighup(callback: Callable[[], None]) -> Callable[[], object]:
    """Call ``callback`` on SIGHUP; returns what stops listening.

    Works where the running loop may take signals (``kvern serve``: the main
    thread); elsewhere (an app served on a test's thread, a platform without
    SIGHUP) it is a no-op, and so is what it returns.
    """
    sighup = getattr(signal, "SIGHUP", None)
    loop = asyncio.get_running_loop()
    if sighup is None:
        return lambda: None
    try:
        loop.add_signal_handler(sighup, callback)
    except (ValueError, RuntimeError, NotImplementedError):  # not the main thread, or no signals
        return lambda: None
    return lambda: loop.remove_signal_handler(sighup)
