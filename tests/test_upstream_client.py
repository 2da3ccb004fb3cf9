"""httpx errors become kvern's, naming the upstream and saying what happened."""

from __future__ import annotations

import anyio
import httpcore
import httpx
import pytest

from kvern.errors import UpstreamUnreachable
from kvern.upstream.client import Upstream, describe, mapped_errors

UPSTREAM = Upstream.at("http://10.0.0.9:8000/v1")


def _chained(*errors: BaseException) -> BaseException:
    """``errors[0]`` raised from ``errors[1]``, raised from ``errors[2]``, and so on."""
    for outer, inner in zip(errors, errors[1:], strict=False):
        outer.__cause__ = inner
    return errors[0]


def _reset_mid_body() -> BaseException:
    """What a reset while reading a body looks like: every message empty but the socket's."""
    reset = ConnectionResetError(104, "Connection reset by peer")
    broken = anyio.BrokenResourceError()
    return _chained(httpx.ReadError(""), httpcore.ReadError(broken), broken, reset)


def test_a_reset_with_an_empty_message_says_what_happened_and_the_errno() -> None:
    with pytest.raises(UpstreamUnreachable) as caught, mapped_errors(UPSTREAM):
        raise _reset_mid_body()
    assert caught.value.message == (
        "upstream 10.0.0.9:8000: connection reset by the upstream while reading the answer "
        "(ConnectionResetError: [Errno 104] Connection reset by peer)"
    )


def test_an_error_with_no_message_and_no_errno_is_named_by_its_causes() -> None:
    assert describe(_chained(httpx.ReadError(""), anyio.BrokenResourceError())) == (
        "BrokenResourceError"
    )
    assert describe(httpx.ReadError("")) == "ReadError with no detail"


def test_a_refused_connect_keeps_its_message_and_adds_the_errno() -> None:
    refused = ConnectionRefusedError(111, "Connect call failed ('10.0.0.9', 8000)")
    exc = _chained(httpx.ConnectError("All connection attempts failed"), refused)
    assert describe(exc) == (
        "All connection attempts failed; "
        "ConnectionRefusedError: [Errno 111] Connect call failed ('10.0.0.9', 8000)"
    )
