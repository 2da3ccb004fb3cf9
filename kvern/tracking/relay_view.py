"""What the relay knows of the brain: its state, why it cannot answer, how far a drain got.

Why apart from :mod:`kvern.tracking.client`: these are the plain values
``/health`` and the admin endpoints show, kept by the relay whatever the
brain is doing; the client that supervises the brain fills them in.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

BrainState = Literal["starting", "up", "down", "stopped"]

# The longest an admin endpoint may be asked to wait for tracking (?wait_s=).
MAX_DRAIN_WAIT_S = 300.0


class BrainUnavailable(RuntimeError):
    """The brain is down, restarting, or did not answer in time."""


@dataclass(slots=True)
class DrainState:
    """How far tracking had got when an admin endpoint stopped waiting for it."""

    drained: bool  # every request handed over before the drain has its row back
    pending: int  # answered requests whose row the brain has not sent back yet
    # Model -> tracking jobs (a request's start, its end) held until its tokenizer loads.
    waiting_for_tokenizer: dict[str, int]
    error: str | None = None  # why the brain did not say (down, no answer in time)

    def to_dict(self) -> dict[str, Any]:
        return {
            "drained": self.drained,
            "pending": self.pending,
            "waiting_for_tokenizer": self.waiting_for_tokenizer,
            "error": self.error,
        }


@dataclass(slots=True)
class BrainStats:
    """What /health shows of the brain, counted on the relay."""

    state: BrainState = "starting"
    isolation: str = "process"
    pid: int | None = None
    restarts: int = 0  # brains started after the first
    last_exit: str | None = None  # why the last brain went away
    skipped_backlog: int = 0  # requests not handed over: the queue to the brain was full
    skipped_down: int = 0  # requests not handed over: no brain was up
    late_answers: int = 0  # routing answers that came after the router gave up
