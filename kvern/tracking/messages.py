"""What the relay and the brain say to each other, in the order they say it.

Relay -> brain (one FIFO stream, so the brain sees requests in the order the
relay handled them)::

    Ask       a routing question: the prompt's longest prefix on each upstream   (+ body)
    Commit    where the asked request really went (None: nowhere)
    Begin     the request's first byte: predict and insert (no-op if committed)  (+ body)
    Complete  the answer is over: settle, then make the analytics row            (+ answer)
    Drop      an upstream's circuit opened: forget what it held
    Call      a read for an endpoint (/health, /trie/visualize, drain, ping)
    Shutdown  finish what is queued, then exit

Brain -> relay::

    Hello     ready (its pid)
    Answer    the reply to an Ask
    Record    one request's analytics row
    Parity    a finished parity check (the relay stores, logs and shows it)
    Reply     the reply to a Call
    Bye       everything queued was handled; exiting

Bodies travel as the message's raw blob, never inside the pickled header.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kvern.analytics.records import RequestRecord
from kvern.routing.prefix_answer import PrefixAnswer
from kvern.tracking.records import Outcome, RequestContext


@dataclass(slots=True)
class Start:
    """The first message to a brain: its configuration."""

    config: Any  # KvernConfig (pickled pydantic model)


@dataclass(slots=True)
class Ask:
    ctx: RequestContext


@dataclass(slots=True)
class Commit:
    ctx: RequestContext
    upstream: str | None  # None: the request was not sent (no upstream could take it)
    oldest_awaiting_s: dict[str, float] = field(default_factory=dict)  # per upstream


@dataclass(slots=True)
class Begin:
    ctx: RequestContext
    insert: bool  # False: the upstream refused it, so it cached nothing
    oldest_awaiting_s: dict[str, float] = field(default_factory=dict)


@dataclass(slots=True)
class Complete:
    ctx: RequestContext
    outcome: Outcome
    content_type: str


@dataclass(slots=True)
class Drop:
    upstream: str


@dataclass(slots=True)
class Call:
    call_id: int
    method: str  # "health", "visualize", "drain", "ping"
    args: tuple[Any, ...] = ()


@dataclass(slots=True)
class Shutdown:
    pass


@dataclass(slots=True)
class Hello:
    pid: int


@dataclass(slots=True)
class Answer:
    request_id: str
    answer: PrefixAnswer | None


@dataclass(slots=True)
class Record:
    record: RequestRecord


@dataclass(slots=True)
class Parity:
    report: Any  # kvern.parity.checker.ParityReport
    final: bool  # False: an error that will be retried


@dataclass(slots=True)
class Reply:
    call_id: int
    ok: bool
    value: Any  # the result, or the error's text


@dataclass(slots=True)
class Bye:
    pass
