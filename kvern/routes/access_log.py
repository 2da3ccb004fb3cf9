"""Log lines without credentials: query-string keys and URL userinfo.

Why: a client that sends ``?api_key=sk-...`` (some SDKs and curl habits do)
would otherwise leave its key in every access-log line uvicorn writes, and
httpx logs each upstream request with its full URL, userinfo included
(``http://user:pass@host``). The filter rewrites the arguments of those
records that hold a path or URL; it changes nothing else and never drops a line.
"""

from __future__ import annotations

import logging

from kvern.config.urls import redact_query, redact_text

# uvicorn's access lines, and httpx's line per upstream request.
LOGGERS = ("uvicorn.access", "httpx")


class RedactingFilter(logging.Filter):
    """Replaces secret query values and URL userinfo in a record's arguments."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and args:
            record.args = tuple(_redact(a) for a in args)
        return True


def _redact(value: object) -> object:
    if value is None or isinstance(value, (int, float)):
        return value  # %d and %f arguments stay numbers
    text = str(value)  # a str, or an httpx.URL
    path, sep, query = text.partition("?")
    shown = redact_text(f"{path}?{redact_query(query)}" if sep else text)
    return value if shown == text else shown


def install(names: tuple[str, ...] = LOGGERS) -> None:
    """Put the filter on those loggers once (idempotent: apps built in one process share it)."""
    for name in names:
        logger = logging.getLogger(name)
        if not any(isinstance(f, RedactingFilter) for f in logger.filters):
            logger.addFilter(RedactingFilter())
