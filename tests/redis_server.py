"""A real ``redis-server`` on 127.0.0.1 for the shared-state tests: started, killed, restarted.

Debian's ``redis-server`` package (7.0 here; ``.ci/system-deps`` installs it).
Each server gets a free port and a temporary directory, and never writes a
snapshot (``--save ''``, no AOF), so a restart starts empty -- as a store
that crashed. Tests skip with the reason where the binary or redis-py is
missing.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.servers import free_port


def redis_or_skip() -> str:
    """The ``redis-server`` binary's path; skips the test when it or redis-py is missing."""
    pytest.importorskip("redis", reason="redis-py is not installed (pip install 'kvern[redis]')")
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no redis-server on PATH (.ci/system-deps installs Debian's redis-server)")
    return binary


class RedisServer:
    """One redis-server process on a fixed port, which a test may kill and start again."""

    def __init__(self, binary: str, directory: Path) -> None:
        self.binary = binary
        self.directory = directory
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = directory / "redis.log"

    def start(self, timeout_s: float = 10.0) -> None:
        """Start it and wait until it answers PING."""
        import redis

        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", "127.0.0.1",
            "--save", "",
            "--appendonly", "no",
            "--dir", str(self.directory),
            "--logfile", str(self._log),
        ]  # fmt: skip
        self._proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        client = redis.Redis(port=self.port, socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                try:
                    if client.ping():
                        return
                except redis.RedisError:
                    pass
                if self._proc.poll() is not None or time.monotonic() > deadline:
                    log = self._log.read_text(errors="replace") if self._log.exists() else ""
                    raise RuntimeError(f"redis-server did not start:\n{log[-2000:]}")
                time.sleep(0.05)
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL, as a crash: no goodbye to connected clients, nothing saved."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=10)
        self._proc = None

    def client(self) -> Any:
        import redis

        return redis.Redis(port=self.port, socket_timeout=2, socket_connect_timeout=2)


@contextmanager
def redis_server(directory: Path) -> Iterator[RedisServer]:
    """A running redis-server (skipping the test where there is none), killed on exit."""
    server = RedisServer(redis_or_skip(), directory)
    server.start()
    try:
        yield server
    finally:
        server.kill()
