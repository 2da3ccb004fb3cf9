"""kvern's own log lines while a command-line tool (``doctor``, ``analyze``) runs.

Why shared: both tools report in their own words what kvern's modules also
log for a running proxy (a tokenizer falling back logs an ERROR, the hub a
WARNING); those lines are shown on stderr with ``--verbose`` only, and the
logger is put back as it was afterwards.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO


@contextmanager
def kvern_logs(verbose: bool, err: TextIO) -> Iterator[None]:
    """kvern's log lines on ``err`` with ``verbose``; silenced otherwise."""
    logger = logging.getLogger("kvern")
    level, propagate = logger.level, logger.propagate
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("  log: %(levelname)s %(name)s: %(message)s"))
    if verbose:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    else:
        logger.setLevel(logging.CRITICAL + 1)
    logger.propagate = False
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
