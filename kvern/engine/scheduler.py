"""The worker thread: runs every request's prefill and decode steps, interleaved.

Why one thread that interleaves: the model is one set of weights on one
device, and torch already spreads one forward pass over the cores; two
threads would only contend. Requests are served concurrently in the sense
that matters to a client: a new request's prefill runs at the next step
(between other requests' decode steps, never after them), then all running
requests take one decode step each in turn, so every stream advances.
Batching several requests into one forward pass (transformers'
``continuous_batching``) would raise throughput; it is not done here, and
its paged cache does not keep blocks once requests end, which is what the
block store is for.

Why prefills run in arrival order, one at a time: a request reuses what
every request that arrived before it stored, so which tokens it reports as
cached follows from the order requests arrive -- the order kvern in front of
the engine sees them. The answer's first byte goes out only after prefill.

Events to the request's side (an asyncio queue, fed thread-safely):
``Started`` (prompt and reused tokens), then ``Text`` deltas, then
``Finished`` (reason and token counts) or ``Failed``.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from kvern.engine.runner import Runner, SequenceState
from kvern.engine.sampling import Sampler, SamplingParams, held_back, stop_at

# How long an idle loop sleeps before it looks again. Why not forever: a
# SIGTERM the kernel hands to another thread (the HTTP one, an OpenMP worker)
# leaves its Python handler pending until the main thread runs bytecode, and a
# main thread blocked on an empty queue never would (CI: ``kvern engine`` took
# over 30 s to stop, and stopped on the second SIGTERM).
_IDLE_WAKE_S = 0.25

log = logging.getLogger("kvern.engine")


@dataclass(slots=True)
class Started:
    prompt_tokens: int
    cached_tokens: int
    chunk_reused_tokens: int = 0


@dataclass(slots=True)
class Text:
    delta: str


@dataclass(slots=True)
class Finished:
    reason: str  # "stop" | "length" | "cancelled"
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    chunk_reused_tokens: int = 0  # prompt tokens reused from chunks after a seam


@dataclass(slots=True)
class Failed:
    message: str


Event = Started | Text | Finished | Failed


@dataclass(slots=True, eq=False)
class Job:
    """One request as the worker sees it."""

    prompt: list[int]
    params: SamplingParams
    emit: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass(slots=True, eq=False)
class _Running:
    job: Job
    state: SequenceState
    sampler: Sampler
    logits: torch.Tensor
    generated: list[int] = field(default_factory=list)
    sent_chars: int = 0


class Scheduler:
    """Owns the worker thread; :meth:`submit` hands it a request."""

    def __init__(
        self,
        runner: Runner,
        decode: Callable[[list[int]], str],
        eos_ids: set[int],
        *,
        reuse: bool = True,
    ) -> None:
        self._runner = runner
        self._decode = decode
        self._eos = eos_ids
        self._reuse = reuse
        self._inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.running = 0  # requests prefilled and decoding (read by /metrics)

    def start(self) -> None:
        """Run the worker loop on a thread of its own (tests; apps that own the main thread)."""
        self._thread = threading.Thread(target=self.run, name="kvern-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """End the loop (from any thread or a signal handler); joins the worker thread if any."""
        self._stopping = True
        self._inbox.put(None)
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=30)

    @property
    def waiting(self) -> int:
        """Requests submitted, not prefilled yet (read by /metrics)."""
        return self._inbox.qsize()

    def submit(self, job: Job) -> None:
        self._inbox.put(job)

    def submit_async(
        self, prompt: list[int], params: SamplingParams, loop: asyncio.AbstractEventLoop
    ) -> tuple[Job, asyncio.Queue[Event]]:
        """Submit from the event loop; events arrive on the returned queue."""
        events: asyncio.Queue[Event] = asyncio.Queue()

        def emit(event: Event) -> None:
            loop.call_soon_threadsafe(events.put_nowait, event)

        job = Job(prompt, params, emit)
        self.submit(job)
        return job, events

    def run(self) -> None:
        """The worker loop, in the calling thread, until :meth:`stop`.

        ``kvern engine`` calls it on the main thread and serves HTTP from
        another: on these two-core machines the chat of ``bench/engine.py``
        took 310-600 ms to its first token (turns 2-8, two runs) with the
        model on a worker thread, 255-357 ms with it on the main thread,
        which loaded it (OpenMP keeps a thread team per calling thread).
        """
        running: list[_Running] = []
        while not self._stopping:
            try:
                wait_s = None if running else _IDLE_WAKE_S
                job = self._inbox.get(block=not running, timeout=wait_s)
            except queue.Empty:
                job = None
            else:
                if job is None:
                    continue
            if job is not None:
                started = self._start(job)
                if started is not None:
                    running.append(started)
            for r in list(running):
                if self._advance(r):
                    running.remove(r)
            self.running = len(running)
        for r in running:
            r.job.emit(Failed("the engine is shutting down"))

    def _start(self, job: Job) -> _Running | None:
        if job.cancelled.is_set():
            return None
        try:
            state, logits = self._runner.prefill(job.prompt, reuse=self._reuse)
        except Exception as exc:  # a request must never take the worker down
            log.exception("prefill failed")
            job.emit(Failed(f"prefill failed: {exc}"))
            return None
        job.emit(Started(state.prompt_tokens, state.reused_tokens, state.chunk_reused_tokens))
        return _Running(job, state, Sampler(job.params), logits)

    def _advance(self, r: _Running) -> bool:
        """One decode step of ``r``; True when it has finished."""
        params = r.job.params
        try:
            if r.job.cancelled.is_set():
                return self._finish(r, "cancelled")
            if len(r.generated) >= params.max_tokens:
                return self._finish(r, "length")
            token = r.sampler.next_token(r.logits)
            r.generated.append(token)
            if token in self._eos:
                return self._finish(r, "eos")
            text = self._decode(r.generated)
            cut = stop_at(text, params.stop)
            if cut is not None:
                self._send(r, text[:cut], final=True)
                return self._finish(r, "stop")
            self._send(r, text, final=False)
            if len(r.generated) >= params.max_tokens:
                return self._finish(r, "length")
            r.logits = self._runner.step(r.state, token)
        except Exception as exc:
            log.exception("decode failed")
            r.job.emit(Failed(f"decode failed: {exc}"))
            return True
        return False

    def _send(self, r: _Running, text: str, final: bool) -> None:
        end = len(text)
        if not final:
            end -= held_back(text, r.job.params.stop)
            if text.endswith("\ufffd"):
                end = min(end, len(text) - 1)  # a character still being spelled in bytes
        if end > r.sent_chars:
            r.job.emit(Text(text[r.sent_chars : end]))
            r.sent_chars = end

    def _finish(self, r: _Running, reason: str) -> bool:
        if reason in ("length", "eos"):
            # Nothing matched a stop string: what was held back for one goes out.
            shown = r.generated[:-1] if reason == "eos" else r.generated
            self._send(r, self._decode(shown), final=True)
            reason = "stop" if reason == "eos" else reason
        self._runner.finish(r.state)
        r.job.emit(
            Finished(
                reason,
                r.state.prompt_tokens,
                r.state.reused_tokens,
                len(r.generated),
                r.state.chunk_reused_tokens,
            )
        )
        return True
