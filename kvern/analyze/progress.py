"""The progress bar of a long analysis: on stderr, a terminal's or when asked, never on stdout.

Why so careful: ``--json`` output is read by machines from stdout, and a bar
written into a log file or a pipe is noise. The bar redraws one line
(``\\r``) at most ten times a second, so a million-line log costs nothing
measurable, and ends with a newline so later output starts clean::

    analyze rule 2/3 [##########..........]  50%  12,345 requests  3.1 s
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final, TextIO

_WIDTH: Final[int] = 20
_EVERY_S: Final[float] = 0.1


class Progress:
    """One bar per pass over a file of ``size_bytes``; silent when not ``enabled``."""

    def __init__(
        self,
        stream: TextIO,
        size_bytes: int,
        *,
        enabled: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream
        self._size = max(1, size_bytes)
        self.enabled = enabled
        self._clock = clock
        self._label = ""
        self._started = 0.0
        self._last = 0.0
        self._open = False
        self._seen = (0, 0)  # the last (bytes read, requests) reported

    def phase(self, label: str) -> Callable[[int, int], None] | None:
        """Start a pass called ``label``; the callback to hand it (None when silent)."""
        if not self.enabled:
            return None
        self.finish()
        self._label = label
        self._started = self._last = self._clock()
        self._seen = (0, 0)
        self._draw(0, 0)
        return self.update

    def update(self, bytes_read: int, requests: int) -> None:
        self._seen = (bytes_read, requests)
        now = self._clock()
        if now - self._last >= _EVERY_S:
            self._last = now
            self._draw(bytes_read, requests)

    def finish(self) -> None:
        """End the bar under way (its line kept, a newline after it)."""
        if self._open:
            self._draw(*self._seen)
            self._stream.write("\n")
            self._stream.flush()
            self._open = False

    def _draw(self, bytes_read: int, requests: int) -> None:
        share = min(1.0, bytes_read / self._size)
        filled = round(share * _WIDTH)
        bar = "#" * filled + "." * (_WIDTH - filled)
        took = self._clock() - self._started
        self._stream.write(
            f"\ranalyze {self._label} [{bar}] {share:4.0%}  {requests:,} requests  {took:.1f} s"
        )
        self._stream.flush()
        self._open = True
