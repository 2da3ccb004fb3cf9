"""llama.cpp's own ``llama-server`` as a real upstream, built from PyPI and cached.

Why: kvern's product is a number -- how many prompt tokens the backend could
serve from its KV cache -- and llama-server reports what it really reused
(``usage.prompt_tokens_details.cached_tokens``, ``timings.cache_n``). Its
tokenizer and template engine are C++ implementations independent of
kvern's HF tokenizer + Jinja, so agreement between the two means something.

The source comes from the ``llama-cpp-python`` sdist (package registry only).
The binary is built once per machine into the user's cache, keyed by the
sdist version and the build flags; later runs reuse it. The served model is a
tiny GGUF written here with random weights in a small Qwen2 or Llama shape and
the *real* tokenizer metadata and chat template of the vendored vocab files.

Nothing from the sdist is committed to the project.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests import assets
from tests.servers import free_port, serving_process

_BUILD_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DGGML_NATIVE=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DBUILD_SHARED_LIBS=OFF",
    # Kernels at -O3, the rest at -O1: see the file.
    f"-DCMAKE_PROJECT_INCLUDE={Path(__file__).with_name('llama_server_build.cmake')}",
)
_BUILD_KEY = "2"


def _source_dir() -> Path:
    """The full vendored llama.cpp tree, extracted once."""
    target = assets.cache_root() / f"llama.cpp-src-{assets.LLAMA_CPP_PYTHON_VERSION}"
    if (target / ".complete").exists():
        return target
    tarball = assets.sdist_path()
    tmp = Path(tempfile.mkdtemp(dir=assets.cache_root()))
    try:
        with tarfile.open(tarball) as tar:
            prefix = tar.getmembers()[0].name.split("/")[0] + "/vendor/llama.cpp/"
            members = [m for m in tar.getmembers() if m.name.startswith(prefix)]
            for m in members:
                m.name = m.name[len(prefix) :]
            tar.extractall(tmp, members=[m for m in members if m.name], filter="data")
        (tmp / ".complete").write_text("ok")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def binary_path() -> Path:
    """Where the cached binary lives (it may not exist yet)."""
    return (
        assets.cache_root()
        / f"llama-server-{assets.LLAMA_CPP_PYTHON_VERSION}-{_BUILD_KEY}"
        / "llama-server"
    )


def build_llama_server(jobs: int | None = None) -> Path:
    """Build ``llama-server`` once per machine (about 4 minutes on 2 cores); return its path.

    A file lock makes concurrent callers (tests, benchmarks) wait for one build.
    """
    final = binary_path()
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.exists():
            return final
        src = _source_dir()
        build = Path(tempfile.mkdtemp(prefix="build-", dir=final.parent))
        try:
            subprocess.run(
                ["cmake", "-S", str(src), "-B", str(build), *_BUILD_FLAGS],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            subprocess.run(
                [
                    "cmake",
                    "--build",
                    str(build),
                    "--target",
                    "llama-server",
                    "-j",
                    str(jobs or os.cpu_count() or 2),
                ],
                check=True,
                stdout=subprocess.DEVNULL,
            )
            built = next(build.rglob("llama-server"))
            tmp_bin = final.with_suffix(".tmp")
            shutil.copy2(built, tmp_bin)
            os.replace(tmp_bin, final)
        finally:
            shutil.rmtree(build, ignore_errors=True)
    return final


def tiny_model(name: str = "qwen2") -> Path:
    """A tiny random-weight GGUF with the real tokenizer and template of ``name`` (cached)."""
    from tests.tiny_gguf import write_tiny_model

    gguf_name, template_name = assets.FIXTURES[name]
    target = assets.cache_root() / "models" / f"tiny-{name}-{assets.LLAMA_CPP_PYTHON_VERSION}.gguf"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        models = assets.models_dir()
        write_tiny_model(
            models / gguf_name,
            (models / "templates" / template_name).read_text(encoding="utf-8"),
            target,
            arch="qwen2" if name == "qwen2" else "llama",
        )
    return target


@contextmanager
def llama_server(
    model: Path,
    *,
    slots: int = 1,
    cache_ram_mib: int | None = None,
    ctx_size: int = 8192,
    extra: tuple[str, ...] = (),
) -> Iterator[str]:
    """Run llama-server on 127.0.0.1 (a free port); yields its base URL (without /v1)."""
    binary = build_llama_server()
    port = free_port()
    args = [
        str(binary),
        "-m",
        str(model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-np",
        str(slots),
        "-c",
        str(ctx_size * slots),
        "--jinja",
        "-t",
        "2",
        "--no-webui",
    ]
    if cache_ram_mib is not None:
        args += ["--cache-ram", str(cache_ram_mib)]
    args += list(extra)
    # llama-server's /health answers 503 while it loads the model, 200 once ready.
    with serving_process(args, port=port, name="llama-server", start_timeout_s=120) as (_, url):
        yield url


if __name__ == "__main__":
    start = time.monotonic()
    print(build_llama_server(), f"{time.monotonic() - start:.0f}s")
