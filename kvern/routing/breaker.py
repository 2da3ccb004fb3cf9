"""A circuit breaker per upstream: stop sending to a replica that keeps failing.

States::

    closed --(failure_threshold consecutive failures)--> open
    open --(open_s elapsed: one trial request or health check)--> half_open
    half_open --success--> closed          half_open --failure--> open

Failures are counted from both sides: requests that could not reach the
upstream (passive) and the periodic health checks (active). A success from
either closes the circuit. The breaker itself is a plain object on the event
loop; the owner reacts to :meth:`failure` returning True (the circuit just
opened) by forgetting what that upstream's cache held.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

BreakerState = Literal["closed", "open", "half_open"]


@dataclass(slots=True)
class Breaker:
    """Consecutive-failure circuit breaker with a timed half-open trial."""

    failure_threshold: int
    open_s: float
    # False: failures are counted but never open the circuit. A lone upstream
    # has nowhere else to send to; refusing would only turn its errors into 503s.
    opens: bool = True
    state: BreakerState = "closed"
    consecutive_failures: int = 0
    opened_at_s: float = 0.0
    last_error: str | None = None
    times_opened: int = 0
    _trial_in_flight: bool = False

    def available(self, now_s: float) -> bool:
        """Whether a request may be sent now (without taking the half-open trial)."""
        if self.state == "closed":
            return True
        if self.state == "open":
            return now_s - self.opened_at_s >= self.open_s
        return not self._trial_in_flight

    def acquire(self, now_s: float) -> bool:
        """Take permission to send one request; an open circuit past ``open_s`` lets one through."""
        if self.state == "closed":
            return True
        if self.state == "open" and now_s - self.opened_at_s >= self.open_s:
            self.state = "half_open"
        if self.state == "half_open" and not self._trial_in_flight:
            self._trial_in_flight = True
            return True
        return False

    def success(self) -> None:
        self.state = "closed"
        self.consecutive_failures = 0
        self._trial_in_flight = False

    def failure(self, reason: str, now_s: float) -> bool:
        """Count a failure; True when this one opened the circuit."""
        self.last_error = reason
        self.consecutive_failures += 1
        self._trial_in_flight = False
        if not self.opens:
            return False
        if self.state == "half_open" or (
            self.state == "closed" and self.consecutive_failures >= self.failure_threshold
        ):
            self.state = "open"
            self.opened_at_s = now_s
            self.times_opened += 1
            return True
        if self.state == "open":
            self.opened_at_s = now_s  # still failing: wait a full open_s again
        return False
