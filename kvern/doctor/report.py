"""What ``kvern doctor`` prints: one line per check on stdout, progress on stderr.

Why apart from the checks: every check says the same three things -- how it
went, what it found, what to do about it -- and the operator reads them as one
list, so the wording and the exit status are decided in one place::

    ✓ upstream 127.0.0.1:8081: reachable (12 ms), models: tiny
    ! upstream 127.0.0.1:8081: no cached-token figure in its answers → start vLLM with ...
    ✗ tokenizer for llama3: loading 'meta-llama/...' failed: ... → point its source at ...

``✓`` fine, ``!`` works but degraded, ``✗`` broken (exit 1). Lines are
printed as checks finish, so a slow upstream shows where the time goes; long
steps (tokenizer loads, requests to a backend) say on stderr what they are
doing and how long they took, and keep saying so while they last.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Literal, TextIO

Status = Literal["ok", "warn", "fail"]

SYMBOLS: dict[Status, str] = {"ok": "✓", "warn": "!", "fail": "✗"}
# For a terminal or pipe that cannot encode the symbols above.
ASCII_SYMBOLS: dict[Status, str] = {"ok": "+", "warn": "!", "fail": "x"}

EXIT_OK = 0
EXIT_FAILED = 1  # any ✗ (or any ! with --strict)
EXIT_BAD_CONFIG = 2  # as ``kvern serve``: the configuration does not load


@dataclass(slots=True)
class Check:
    """One line of the report."""

    status: Status
    subject: str  # what was checked: "upstream a", "tokenizer for tiny", "analytics db"
    message: str  # what was found
    fix: str | None = None  # what to do about it (every line that is not ✓ has one)

    def __post_init__(self) -> None:
        assert self.status == "ok" or self.fix, f"a {self.status} check needs a fix: {self}"

    def line(self, *, ascii_only: bool = False) -> str:
        symbol = (ASCII_SYMBOLS if ascii_only else SYMBOLS)[self.status]
        text = f"{symbol} {self.subject}: {self.message}"
        if self.fix:
            text += f" {'->' if ascii_only else '→'} {self.fix}"
        return text if not ascii_only else text.encode("ascii", "replace").decode("ascii")


def ok(subject: str, message: str) -> Check:
    return Check("ok", subject, message)


def warn(subject: str, message: str, fix: str) -> Check:
    return Check("warn", subject, message, fix)


def fail(subject: str, message: str, fix: str) -> Check:
    return Check("fail", subject, message, fix)


def _can_print_symbols(stream: TextIO) -> bool:
    encoding = getattr(stream, "encoding", None)
    if encoding is None:  # a text buffer (io.StringIO) holds any character
        return True
    try:
        ("".join(SYMBOLS.values()) + "→").encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return False
    return True


@dataclass(slots=True)
class Report:
    """The checks so far, each printed to ``out`` as it is added."""

    out: TextIO = field(default_factory=lambda: sys.stdout)
    checks: list[Check] = field(default_factory=list)

    def add(self, check: Check) -> Check:
        self.checks.append(check)
        print(check.line(ascii_only=not _can_print_symbols(self.out)), file=self.out, flush=True)
        return check

    def extend(self, checks: list[Check]) -> None:
        for check in checks:
            self.add(check)

    @contextmanager
    def guard(self, subject: str) -> Iterator[None]:
        """A check that raises becomes a ✗ line of its own, not a traceback ending the run."""
        try:
            yield
        except Exception as exc:  # noqa: BLE001 - the doctor reports, it does not crash
            said = " ".join(f"{type(exc).__name__}: {exc}".split())[:400]
            self.add(
                fail(
                    subject,
                    f"the check itself failed: {said}",
                    "rerun with --verbose and report it as a kvern bug",
                )
            )

    def count(self, status: Status) -> int:
        return sum(1 for c in self.checks if c.status == status)

    def exit_code(self, *, strict: bool = False) -> int:
        if self.count("fail") or (strict and self.count("warn")):
            return EXIT_FAILED
        return EXIT_OK

    def summary(self) -> str:
        return (
            f"kvern doctor: {self.count('ok')} ok, {self.count('warn')} warning(s), "
            f"{self.count('fail')} failure(s)"
        )


class Progress:
    """Says on stderr what a long step is doing, how long it has run, and how long it took.

    ``heartbeat_s``: while a step runs, a line every so often (a hub download
    or a GGUF build can take a minute; silence would look like a hang).
    """

    def __init__(self, err: TextIO | None = None, *, heartbeat_s: float = 5.0) -> None:
        self._err = err if err is not None else sys.stderr
        self._heartbeat_s = heartbeat_s

    def _say(self, text: str) -> None:
        print(text, file=self._err, flush=True)

    @contextmanager
    def step(self, what: str) -> Iterator[None]:
        """``with progress.step("loading tokenizer for m"):`` -- the step's start, then its time."""
        self._say(f"{what} ...")
        start = time.monotonic()
        done = threading.Event()

        def beat() -> None:
            while not done.wait(self._heartbeat_s):
                self._say(f"  ... still {what} ({time.monotonic() - start:.0f} s)")

        ticker = threading.Thread(target=beat, name="kvern-doctor-progress", daemon=True)
        ticker.start()
        try:
            yield
        finally:
            done.set()
            ticker.join()
            self._say(f"  {what}: {time.monotonic() - start:.2f} s")
