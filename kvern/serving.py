"""Serving kvern with uvicorn, and shutting down gracefully on SIGTERM.

Why not plain ``uvicorn.run``: on SIGTERM uvicorn stops accepting and waits
for connections, then cancels whatever still runs and at once shuts the app
down, tracking included; a stream cut that way had no error event and no
row. Here the wait is kvern's: streams may finish for
``proxy.shutdown_grace_s``; then kvern ends what is still in flight itself
(:meth:`kvern.routes.inflight.InFlight.cut_all`: an error event, or a 503
before any byte), each with its row, and only then does uvicorn's own
timeout, :data:`CUT_MARGIN_S` later, come into play.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from types import FrameType

import uvicorn
from fastapi import FastAPI

from kvern.config import KvernConfig

logger = logging.getLogger(__name__)

# Time given to requests ended after the grace to send their last bytes.
CUT_MARGIN_S = 5.0


class GracefulServer(uvicorn.Server):
    """A uvicorn server whose shutdown lets requests finish, then ends them with a row each."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, grace_s: float) -> None:
        super().__init__(config)
        self._app = app
        self._grace_s = grace_s

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal once it has shut down, so the process
        # dies of SIGTERM (status -15). A graceful stop is a clean exit: 0.
        captured = self._captured_signals
        if sig == signal.SIGTERM and captured and captured[-1] == sig:
            captured.pop()

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        cutter = asyncio.ensure_future(self._cut_after_grace())
        try:
            await super().shutdown(sockets)
        finally:
            cutter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await cutter

    async def _cut_after_grace(self) -> None:
        await asyncio.sleep(self._grace_s)
        services = getattr(self._app.state, "services", None)
        if services is not None:
            services.inflight.cut_all()


def uvicorn_config(app: FastAPI, config: KvernConfig, log_level: str = "info") -> uvicorn.Config:
    """uvicorn's settings for kvern: its own timeout comes after kvern's grace and margin."""
    return uvicorn.Config(
        app,
        host=config.proxy.host,
        port=config.proxy.port,
        log_level=log_level,
        timeout_graceful_shutdown=int(config.proxy.shutdown_grace_s + CUT_MARGIN_S + 0.999),
    )


def serve_app(app: FastAPI, config: KvernConfig, log_level: str = "info") -> None:
    """Run until SIGINT or SIGTERM, then shut down gracefully."""
    server = GracefulServer(
        uvicorn_config(app, config, log_level), app, config.proxy.shutdown_grace_s
    )
    server.run()
