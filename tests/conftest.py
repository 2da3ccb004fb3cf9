"""Shared fixtures (real tokenizers derived offline, see tests/assets.py) and the run's order.

Tests that need a real llama-server or vLLM run after the others, while ``tests/prepare.py``
builds those servers in the background at the lowest priority (see there why), and tests that
use torch run last, once nothing is built beside them. ``KVERN_TESTS_PREPARE=0`` turns the
background build off; the order stays.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

from tests import assets

ROOT = Path(__file__).resolve().parent.parent


def _imports(module: str) -> re.Pattern[str]:
    name = module.rsplit(".", 1)[1]
    return re.compile(
        rf"^\s*(from {re.escape(module)} import|import {re.escape(module)}\b"
        rf"|from tests import .*\b{name}\b)",
        re.M,
    )


# Where a test module runs, by what its source uses; a larger rank runs later.
# llama-server's tests (built first), then vLLM's (installed after it), then
# torch's, when nothing is built beside them any more: their OpenMP threads
# stall beside the background steps, however low those run (in a fresh run,
# 205 s of torch tests during the build's last minute and vLLM's install
# against about 70 s alone). _PREPARED: what tests/prepare.py builds for the
# ranks that need it.
_RANKS = (
    (1, _imports("tests.llama_server")),
    (2, _imports("tests.vllm_server")),
    (3, re.compile(r"^\s*(import torch\b|.*pytest\.importorskip\(\s*\"torch\")", re.M)),
)
_PREPARED = {1: "llama-server", 2: "vllm"}
_PREPARE = pytest.StashKey[subprocess.Popen[bytes]]()

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REAL_TOKENIZERS = ("llama3", "qwen2")


@pytest.fixture(scope="session")
def tokenizer_fixtures() -> dict[str, assets.TokenizerFixture]:
    return {name: assets.tokenizer_fixture(name) for name in REAL_TOKENIZERS}


@pytest.fixture(scope="session")
def hf_tokenizers(tokenizer_fixtures: dict[str, assets.TokenizerFixture]) -> dict[str, Any]:
    from transformers import AutoTokenizer

    return {
        name: AutoTokenizer.from_pretrained(str(fx.directory))
        for name, fx in tokenizer_fixtures.items()
    }


@pytest.fixture(params=REAL_TOKENIZERS)
def real_tokenizer_name(request: pytest.FixtureRequest) -> str:
    """Parametrizes a test over the Llama 3.2 and Qwen2.5 pair."""
    return str(request.param)


@pytest.fixture
def real_tokenizer(hf_tokenizers: dict[str, Any], real_tokenizer_name: str) -> Any:
    return hf_tokenizers[real_tokenizer_name]


@pytest.fixture(scope="session")
def small_bpe_dir() -> str:
    return str(assets.small_bpe_fixture())


def _uses(module: ModuleType | None) -> set[int]:
    """The ranks of what a test module uses: none for one that needs neither torch nor a server.

    Read from its source, since some import the server helpers inside a test.
    """
    path = getattr(module, "__file__", None)
    if not path:
        return set()
    source = Path(path).read_text(encoding="utf-8")
    return {rank for rank, uses in _RANKS if uses.search(source)}


def _server_rank(module: ModuleType | None) -> int:
    return max(_uses(module), default=0)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Real-server tests after the rest, torch's last; each group in collected order (stable)."""
    by_module: dict[int, int] = {}
    for item in items:
        module = getattr(item, "module", None)
        if id(module) not in by_module:
            by_module[id(module)] = _server_rank(module)
    items.sort(key=lambda item: by_module[id(getattr(item, "module", None))])


def _lowest_priority() -> list[str]:
    """``nice``/``ionice`` where present: the build takes only what the tests leave idle."""
    prefix = ["nice", "-n", "19"] if shutil.which("nice") else []
    return prefix + (["ionice", "-c", "3"] if shutil.which("ionice") else [])


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start building the real servers now if some collected test needs one not built yet."""
    if os.environ.get("KVERN_TESTS_PREPARE", "1") == "0" or session.config.option.collectonly:
        return
    modules = {id(m): m for i in session.items if (m := getattr(i, "module", None))}
    ranks = set().union(*(_uses(m) for m in modules.values()))
    needed = [name for rank, name in _PREPARED.items() if rank in ranks]
    from tests import prepare

    if not needed or not prepare.missing(needed):
        return
    log = assets.cache_root() / "prepare.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [*_lowest_priority(), sys.executable, "-m", "tests.prepare", *needed],
            cwd=ROOT,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # its own group: stopped whole, builds included
        )
    session.config.stash[_PREPARE] = proc


def pytest_unconfigure(config: pytest.Config) -> None:
    """A run that ends first stops the build (the caches tell a half-done step, redone later)."""
    proc = config.stash.get(_PREPARE, None)
    if proc is None or proc.poll() is not None:
        return
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
