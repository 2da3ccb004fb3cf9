"""Rows the relay owes when the brain that held their requests is lost."""

from __future__ import annotations

from kvern.analytics.records import RequestRecord
from kvern.tracking.pending import PendingRows
from kvern.tracking.records import Outcome, RequestContext


def ctx(rid: str) -> RequestContext:
    return RequestContext(rid, 1.0, 0.0, "chat", "m", None, False, "up")


def test_a_lost_brain_owes_the_rows_of_requests_that_had_ended_only() -> None:
    written: list[RequestRecord] = []
    pending = PendingRows(written.append)
    for rid in ("ended-1", "running", "ended-2", "returned"):
        pending.handed(ctx(rid))
    pending.completed(ctx("ended-1"), Outcome(200, None, 5.0, 9.0))
    pending.completed(ctx("ended-2"), Outcome(None, "client_disconnected", None, 3.0))
    pending.completed(ctx("returned"), Outcome(200, None, 5.0, 9.0))
    pending.returned("returned")
    assert len(pending) == 3
    pending.brain_lost()
    assert [(r.request_id, r.status, r.error) for r in written] == [
        ("ended-1", 200, None),
        ("ended-2", None, "client_disconnected"),
    ]
    assert all(r.prompt_tokens is None for r in written)  # no tracking figures
    assert len(pending) == 0 and pending.num_untracked == 2
    assert not pending.holds("running")  # it writes its own row when it ends
