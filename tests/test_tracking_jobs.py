"""JobThread: one worker thread, an urgent lane ahead of ordinary jobs, futures, draining shutdown.

Ordering tests hold the worker on a gate (a job waiting on an Event) while
they queue work behind it, so what runs next is decided by the lanes alone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future

import pytest

from kvern.tracking.jobs import JobThread

WAIT_S = 5.0  # generous bound on any wait; the tests take milliseconds


@pytest.fixture
def jobs() -> Iterator[JobThread]:
    worker = JobThread("test-jobs")
    yield worker
    worker.shutdown()


class Gate:
    """A job that holds the worker until released, and tells when it has started."""

    def __init__(self) -> None:
        self.started = threading.Event()
        self.released = threading.Event()

    def __call__(self) -> str:
        self.started.set()
        assert self.released.wait(WAIT_S), "gate never released"
        return "gate"

    def hold(self, jobs: JobThread) -> Future[str]:
        """Submit the gate and wait until the worker is inside it."""
        future = jobs.submit(self)
        assert self.started.wait(WAIT_S)
        return future


def test_a_job_result_lands_in_its_future(jobs: JobThread) -> None:
    future = jobs.submit(lambda a, b: a * b, 6, 7)

    assert future.result(WAIT_S) == 42


def test_jobs_run_on_the_one_worker_thread(jobs: JobThread) -> None:
    futures = [jobs.submit(threading.current_thread) for _ in range(3)]
    futures.append(jobs.submit(threading.current_thread, urgent=True))

    threads = {f.result(WAIT_S) for f in futures}

    assert len(threads) == 1
    (worker,) = threads
    assert worker is not threading.current_thread()
    assert worker.name == "test-jobs"
    assert worker.daemon


def test_an_exception_lands_in_the_future_and_the_worker_goes_on(jobs: JobThread) -> None:
    error = ValueError("bad prompt")

    def fail() -> None:
        raise error

    failed = jobs.submit(fail)
    after = jobs.submit(lambda: "still running")

    with pytest.raises(ValueError) as raised:
        failed.result(WAIT_S)
    assert raised.value is error
    assert after.result(WAIT_S) == "still running"


def test_urgent_jobs_overtake_queued_ordinary_jobs(jobs: JobThread) -> None:
    gate, ran = Gate(), []
    gate.hold(jobs)
    futures = [jobs.submit(ran.append, f"normal {i}") for i in range(3)]
    futures += [jobs.submit(ran.append, f"urgent {i}", urgent=True) for i in range(2)]
    futures.append(jobs.submit(ran.append, "normal 3"))

    gate.released.set()
    for future in futures:
        future.result(WAIT_S)

    assert ran == ["urgent 0", "urgent 1", "normal 0", "normal 1", "normal 2", "normal 3"]


def test_an_urgent_job_does_not_interrupt_the_running_one(jobs: JobThread) -> None:
    gate, ran = Gate(), []

    def running() -> None:
        gate()
        ran.append("running")

    jobs.submit(running)
    assert gate.started.wait(WAIT_S)
    urgent = jobs.submit(ran.append, "urgent", urgent=True)
    gate.released.set()
    urgent.result(WAIT_S)

    assert ran == ["running", "urgent"]


def test_urgent_waiting_tells_while_an_urgent_job_is_queued(jobs: JobThread) -> None:
    gate = Gate()
    gate.hold(jobs)
    jobs.submit(lambda: None)
    assert not jobs.urgent_waiting

    urgent = jobs.submit(lambda: None, urgent=True)
    assert jobs.urgent_waiting

    gate.released.set()
    urgent.result(WAIT_S)
    assert not jobs.urgent_waiting


def test_a_cancelled_job_never_runs(jobs: JobThread) -> None:
    gate, ran = Gate(), []
    gate.hold(jobs)
    cancelled = jobs.submit(ran.append, "cancelled")
    kept = jobs.submit(ran.append, "kept")

    assert cancelled.cancel()
    gate.released.set()
    kept.result(WAIT_S)

    assert ran == ["kept"]
    assert cancelled.cancelled()


def test_shutdown_runs_what_is_queued_then_stops() -> None:
    jobs = JobThread("draining")
    gate, ran = Gate(), []
    gate.hold(jobs)
    queued = [jobs.submit(ran.append, i) for i in range(5)]
    queued.append(jobs.submit(ran.append, "urgent", urgent=True))
    stopper = threading.Thread(target=jobs.shutdown)
    stopper.start()
    # Wait until shutdown has closed the queue: new jobs are refused from then on.
    deadline = time.monotonic() + WAIT_S
    while True:
        try:
            queued.append(jobs.submit(ran.append, "before close"))
        except RuntimeError:
            break
        assert time.monotonic() < deadline, "shutdown never closed the queue"
        time.sleep(0.001)

    gate.released.set()
    stopper.join(WAIT_S)

    assert not stopper.is_alive()
    assert all(f.done() and f.exception() is None for f in queued)
    num_late = len(queued) - 6
    assert ran == ["urgent", 0, 1, 2, 3, 4] + ["before close"] * num_late


def test_submit_after_shutdown_is_refused() -> None:
    jobs = JobThread("closed")
    jobs.shutdown()

    with pytest.raises(RuntimeError, match="shut down"):
        jobs.submit(lambda: None)
    jobs.shutdown()  # a second shutdown is harmless
