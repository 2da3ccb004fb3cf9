"""Doctor: ``upstreams[].kv_events`` -- does each upstream's KV event stream reach kvern?

Why in two halves around the cached-token requests (:class:`KvEventsWatch`):
an endpoint that accepts a TCP connection only says something listens there.
Whether it is vLLM publishing this upstream's cache shows only when the
upstream does some work, and the doctor's own two 1-token chats
(:mod:`kvern.doctor.usage_checks`) are that work. So :meth:`KvEventsWatch.start`
finds the endpoints (as configured, or by the same :func:`detect` kvern runs
for ``auto``), checks each accepts a connection, and subscribes -- waiting
for ZeroMQ's handshake, since a PUB drops what it sends before a subscriber
joined; the requests run; :meth:`KvEventsWatch.finish` says how many batches
arrived and whether their sequence numbers ran without holes, asks the replay
endpoint (if any) once, as :class:`~kvern.upstream.kv_events.KvEventSubscriber`
does, and closes everything. :meth:`KvEventsWatch.close` closes it all too,
whatever happened in between (``diagnose`` calls it in a ``finally``).

With ``--no-requests`` nothing would make the engine publish, so only the
reachability lines are given.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import stat
import time
from dataclasses import dataclass, field

import httpx
import zmq
import zmq.asyncio

from kvern.config.urls import redact_text
from kvern.doctor.report import Check, fail, ok, warn
from kvern.doctor.upstream_checks import UpstreamFindings
from kvern.upstream.kv_events.endpoints import KvEventsEndpoints, configured, detect
from kvern.upstream.kv_events.wire import (
    END_SEQ,
    KvEventDecodeError,
    decode_frames,
    decode_seq,
    encode_seq,
)

SUBJECT = "kv events"
_QUIET_S = 0.2  # after the requests: no new batch for this long means the engine is done
# After the handshake ZeroMQ sends our subscription, and a PUB drops what it
# publishes before that reaches it: the doctor's first request could make a
# batch nobody receives (seen in tests: "1 batch (seq 101)" where two came).
_SUBSCRIBED_S = 0.2
_MAX_REPLAY_FRAMES = 10_000  # vLLM's buffer_steps: a replay never sends more


def _flag(port: str, replay_port: str | None) -> str:
    """vLLM's flag for publishing on ``port`` (and replaying on ``replay_port``)."""
    replay = f', "replay_endpoint": "tcp://*:{replay_port}"' if replay_port else ""
    return (
        'start vLLM with --kv-events-config \'{"enable_kv_cache_events": true, '
        f'"publisher": "zmq", "endpoint": "tcp://*:{port}"{replay}}}\''
    )


def _port(endpoint: str) -> str:
    return endpoint.rpartition(":")[2] if endpoint.startswith("tcp://") else "PORT"


async def _accepts(endpoint: str, timeout_s: float) -> str | None:
    """None when ``endpoint`` accepts a connection, else why not."""
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://") :]
        try:
            mode = os.stat(path).st_mode
        except OSError as exc:
            return f"{path}: {exc.strerror or exc}"
        return None if stat.S_ISSOCK(mode) else f"{path} is not a socket"
    if not endpoint.startswith("tcp://"):
        return None  # inproc: nothing outside this process to reach
    host, _, port = endpoint[len("tcp://") :].rpartition(":")
    try:
        _, writer = await asyncio.wait_for(
            asyncio.open_connection(host.strip("[]"), int(port)), timeout_s
        )
    except (TimeoutError, asyncio.TimeoutError):
        return f"no answer within {timeout_s:g} s"
    except ConnectionRefusedError:
        return "connection refused (nothing listens there)"
    except (OSError, ValueError) as exc:
        return f"{type(exc).__name__}: {getattr(exc, 'strerror', None) or exc}"
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return None


@dataclass(slots=True)
class _Watched:
    """One upstream being listened to while the requests run."""

    found: UpstreamFindings
    endpoints: KvEventsEndpoints
    replay_ok: bool  # the replay endpoint accepted a connection
    sub: zmq.asyncio.Socket | None = None
    reader: asyncio.Task[None] | None = None
    seqs: list[int] = field(default_factory=list)  # as they arrived
    last_at: float = 0.0  # time.monotonic of the last batch
    bad_frames: int = 0  # messages that are not vLLM's batches

    async def read(self) -> None:
        assert self.sub is not None
        while True:
            frames = await self.sub.recv_multipart()
            try:
                self.seqs.append(decode_frames(frames).seq)
            except KvEventDecodeError:
                self.bad_frames += 1
            self.last_at = time.monotonic()


class KvEventsWatch:
    """The kv-events lines of the upstreams that set ``kv_events``; see the module docstring.

    ``listen``: subscribe during the requests (False with ``--no-requests``).
    ``connect_timeout_s`` bounds each connection; ``timeout_s`` (the doctor's)
    bounds detection and the replay answer; ``settle_s`` is how long
    :meth:`finish` waits for batches the engine publishes after answering.
    """

    def __init__(
        self,
        client: httpx.AsyncClient,
        upstreams: list[UpstreamFindings],
        *,
        listen: bool,
        timeout_s: float,
        connect_timeout_s: float,
        settle_s: float = 1.0,
    ) -> None:
        self._client = client
        self._upstreams = [u for u in upstreams if u.entry.kv_events is not None]
        self._listen = listen
        self._timeout_s = timeout_s
        self._connect_s = min(connect_timeout_s, timeout_s)
        self._settle_s = settle_s
        self._context: zmq.asyncio.Context | None = None
        self._watched: list[_Watched] = []

    async def start(self) -> list[Check]:
        """Find and reach each endpoint; subscribe where the requests will make events."""
        if not self._upstreams:
            return [ok(SUBJECT, "not used (no upstreams[].kv_events): kvern models each cache")]
        checks: list[Check] = []
        for found in self._upstreams:
            checks.extend(await self._start_one(found))
        if self._watched:  # once for all: every subscription was sent at its handshake
            await asyncio.sleep(_SUBSCRIBED_S)
        return checks

    async def _start_one(self, found: UpstreamFindings) -> list[Check]:
        subject = f"upstream {found.upstream.name} {SUBJECT}"
        key = found.key.removesuffix(".url") + ".kv_events"
        how = ""
        endpoints = configured(found.entry)
        if endpoints is None:  # auto: ask vLLM, as kvern serve does
            detection = await detect(self._client, found.entry.url, self._timeout_s)
            if detection.endpoints is None:
                return [
                    warn(
                        subject,
                        f"auto: not found ({redact_text(detection.reason)}); kvern models "
                        "its cache instead",
                        f"set {key} to vLLM's endpoint by hand (tcp://HOST:PORT)",
                    )
                ]
            endpoints = detection.endpoints
            how = "auto, from /server_info: "
        replay = endpoints.replay_endpoint
        fix = _flag(_port(endpoints.endpoint), _port(replay) if replay else None)
        checks: list[Check] = []
        refused = await _accepts(endpoints.endpoint, self._connect_s)
        if refused is None:
            topic = f", topic {endpoints.topic!r}" if endpoints.topic else ""
            checks.append(ok(subject, f"{how}{endpoints.endpoint} accepts connections{topic}"))
        else:
            instead = f"set {key} to its endpoint by hand" if how else f"correct {key}"
            checks.append(
                fail(
                    subject, f"{how}{endpoints.endpoint} refused: {refused}", f"{fix}, or {instead}"
                )
            )
        replay_ok = False
        if replay is not None:
            why = await _accepts(replay, self._connect_s)
            replay_ok = why is None
            checks.append(
                ok(f"upstream {found.upstream.name} kv replay", f"{replay} accepts connections")
                if why is None
                else fail(
                    f"upstream {found.upstream.name} kv replay",
                    f"{replay} refused: {why}",
                    f"{fix}, or correct {key.removesuffix('kv_events')}kv_events_replay",
                )
            )
        if refused is None and self._listen and found.reachable:
            watched = _Watched(found, endpoints, replay_ok)
            self._watched.append(watched)
            if not await self._subscribe(watched):
                self._watched.remove(watched)
                await self._close_one(watched)
                checks.append(
                    warn(
                        subject,
                        f"{endpoints.endpoint} accepts connections but no ZeroMQ handshake "
                        f"came within {self._connect_s:g} s: another process has that port",
                        f"give vLLM's publisher a free port ({fix}) and set {key} to it",
                    )
                )
        return checks

    async def _subscribe(self, watched: _Watched) -> bool:
        """A SUB on the endpoint, connected and past ZeroMQ's handshake (False: none came)."""
        if self._context is None:
            self._context = zmq.asyncio.Context()
        sub = self._context.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.SUBSCRIBE, watched.endpoints.topic.encode("utf-8"))
        watched.sub = sub
        monitor = sub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
        try:
            sub.connect(watched.endpoints.endpoint)
            await asyncio.wait_for(monitor.recv_multipart(), self._connect_s)
        except (TimeoutError, asyncio.TimeoutError):
            return False
        finally:
            sub.disable_monitor()
            monitor.close(linger=0)
        watched.reader = asyncio.get_running_loop().create_task(watched.read())
        return True

    async def finish(self) -> list[Check]:
        """After the requests: what arrived from each upstream, its replay's answer; then close."""
        try:
            if not self._watched:
                return []
            await self._settle()
            checks: list[Check] = []
            for watched in self._watched:
                checks.append(self._verdict(watched))
                if watched.replay_ok:
                    checks.append(await self._replay(watched))
            return checks
        finally:
            await self.close()

    async def _settle(self) -> None:
        """Wait for batches the engines publish after answering (each step's, at its end)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settle_s
        while loop.time() < deadline:
            now = time.monotonic()
            if all(w.seqs and now - w.last_at >= _QUIET_S for w in self._watched):
                return
            await asyncio.sleep(0.05)

    def _verdict(self, watched: _Watched) -> Check:
        found = watched.found
        subject = f"upstream {found.upstream.name} {SUBJECT}"
        endpoint = watched.endpoints.endpoint
        seqs = sorted(set(watched.seqs))
        bad = f"; {watched.bad_frames} message(s) not in vLLM's form" if watched.bad_frames else ""
        if not seqs and not found.chats_sent:
            return warn(
                subject,
                f"not checked end to end: the doctor sent no request that would make events{bad}",
                f"see upstream {found.upstream.name}'s cached-tokens line for why",
            )
        if not seqs:
            return warn(
                subject,
                f"no events arrived on {endpoint} while the doctor's requests ran{bad}",
                "check that vLLM runs with enable_kv_cache_events and prefix caching, that "
                f"{endpoint} is its publisher's port (not another process's) and that the "
                f"topic is the one it publishes ({watched.endpoints.topic!r})",
            )
        first, last = seqs[0], seqs[-1]
        span = f"seq {first}" if first == last else f"seq {first}-{last}"
        noun = "batch" if len(seqs) == 1 else "batches"
        missing = last - first + 1 - len(seqs)
        said = f"{len(seqs)} {noun} ({span}) during the doctor's requests{bad}"
        if missing:
            return warn(
                subject,
                f"{said}, {missing} missing between them: the publisher drops batches",
                "set kv_events_replay (vLLM's replay_endpoint) so kvern can fill holes, and "
                "check the network between kvern and the upstream",
            )
        if bad:
            return warn(subject, said, "check that nothing else publishes on that port")
        return ok(subject, said)

    async def _replay(self, watched: _Watched) -> Check:
        """One replay request, as the subscriber makes it: from the first batch seen (or 0)."""
        subject = f"upstream {watched.found.upstream.name} kv replay"
        assert self._context is not None and watched.endpoints.replay_endpoint is not None
        endpoint = watched.endpoints.replay_endpoint
        start = min(watched.seqs) if watched.seqs else 0
        dealer = self._context.socket(zmq.DEALER)
        dealer.setsockopt(zmq.LINGER, 0)
        loop = asyncio.get_running_loop()
        began = loop.time()
        deadline = began + min(2.0, self._timeout_s)
        batches = 0
        try:
            dealer.connect(endpoint)
            await dealer.send_multipart([b"", encode_seq(start)])
            while batches <= _MAX_REPLAY_FRAMES:
                frames = await asyncio.wait_for(dealer.recv_multipart(), deadline - loop.time())
                if len(frames) != 4:
                    raise KvEventDecodeError(f"{len(frames)} frames, not 4")
                if decode_seq(frames[2]) == END_SEQ:
                    break
                batches += 1
        except (TimeoutError, asyncio.TimeoutError, KvEventDecodeError, zmq.ZMQError) as exc:
            why = "no end of the answer" if isinstance(exc, TimeoutError) else str(exc)
            return warn(
                subject,
                f"{endpoint}: a replay request from seq {start} got {batches} batch(es) and "
                f"{why} within {deadline - began:g} s",
                "check that it is vLLM's replay_endpoint (a ROUTER), not its publisher or "
                "another process",
            )
        finally:
            dealer.close(linger=0)
        took_ms = (loop.time() - began) * 1000
        return ok(
            subject,
            f"{endpoint} answered a replay request from seq {start} in {took_ms:.0f} ms "
            f"({batches} batch(es) buffered from there)",
        )

    async def _close_one(self, watched: _Watched) -> None:
        if watched.reader is not None:
            watched.reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watched.reader
            watched.reader = None
        if watched.sub is not None:
            watched.sub.close(linger=0)
            watched.sub = None

    async def close(self) -> None:
        """Close every socket and the context (safe to call more than once)."""
        for watched in self._watched:
            await self._close_one(watched)
        self._watched = []
        if self._context is not None:
            self._context.term()
            self._context = None
