"""Expected time to first token in milliseconds, learned per replica from its first bytes.

Why learn it: the router compares replicas in prompt-token equivalents (queue
wait + uncached prefill), which needs no clock. But an operator checking the
model wants milliseconds: "kvern expected 180 ms here and it took 240". Each
replica's first bytes teach the conversion -- ``ttft ~ a + b * tokens`` (a:
the fixed cost of a request, b: seconds per token-equivalent) -- by least
squares over recent requests, so a replica that slows down (a bigger model,
a noisy neighbour) is seen within a few dozen requests.

Why exponential forgetting: load and hardware drift; old requests should
weigh less. With ``decay`` 0.98 per request the fit remembers about the last
50 requests.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

# Requests observed before the fit is trusted enough to print.
MIN_SAMPLES = 8


@dataclass(frozen=True, slots=True)
class TtftFit:
    """``ttft_s = fixed_s + s_per_token * tokens`` (both >= 0)."""

    fixed_s: float
    s_per_token: float
    samples: int

    def ms(self, tokens: float) -> float:
        return 1000.0 * (self.fixed_s + self.s_per_token * max(0.0, tokens))


class TtftModel:
    """Weighted least squares of observed TTFT on expected token-equivalents, one replica.

    Written by the event loop (first bytes) and read by it (decisions); the lock
    keeps it safe for a reader on another thread (/metrics).
    """

    def __init__(self, decay: float = 0.98) -> None:
        if not 0.0 < decay <= 1.0:
            raise ValueError(f"decay must be in (0, 1], got {decay}")
        self._decay = decay
        self._lock = threading.Lock()
        self._w = self._x = self._y = self._xx = self._xy = 0.0
        self._n = 0

    def observe(self, tokens: float, ttft_s: float) -> None:
        """One request's expected token-equivalents and its real time to first byte."""
        if tokens < 0 or ttft_s < 0:
            return
        d = self._decay
        with self._lock:
            self._w = self._w * d + 1.0
            self._x = self._x * d + tokens
            self._y = self._y * d + ttft_s
            self._xx = self._xx * d + tokens * tokens
            self._xy = self._xy * d + tokens * ttft_s
            self._n += 1

    def fit(self) -> TtftFit | None:
        """The current line; None until ``MIN_SAMPLES`` requests were seen."""
        with self._lock:
            if self._n < MIN_SAMPLES or self._w <= 0:
                return None
            mx, my = self._x / self._w, self._y / self._w
            var = self._xx / self._w - mx * mx
            cov = self._xy / self._w - mx * my
            n = self._n
        if var <= 1e-9 * max(1.0, mx * mx):
            # Every request cost the same: one point, no slope to learn.
            slope = my / mx if mx > 0 else 0.0
            return TtftFit(0.0 if mx > 0 else my, max(0.0, slope), n)
        slope = max(0.0, cov / var)
        fixed = my - slope * mx
        if fixed < 0:
            # A line through the origin fits better than a negative fixed cost.
            slope, fixed = (my / mx if mx > 0 else 0.0), 0.0
        return TtftFit(fixed, slope, n)

    def expected_ms(self, tokens: float) -> float | None:
        fit = self.fit()
        return None if fit is None else fit.ms(tokens)
