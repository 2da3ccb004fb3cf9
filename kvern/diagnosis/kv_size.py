"""Bytes of KV cache one token takes, from a model's config: the capacity curve's GiB.

Why from the config: the curve says tokens; what an operator buys is GPU
memory. The KV cache of a token is its keys and values in every layer, so
its size follows from the model's shape alone (layers, KV heads, head
width, dtype), all in the HuggingFace ``config.json`` beside the weights.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# Bytes per element of torch dtype names a model config gives (serving precision).
_DTYPE_BYTES = {
    "float16": 2,
    "half": 2,
    "bfloat16": 2,
    "float32": 4,
    "float": 4,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "fp8": 1,
    "int8": 1,
}


def kv_bytes_per_token(
    config: Mapping[str, Any] | str | Path, *, dtype_bytes: int | None = None
) -> int:
    """Bytes of KV cache one token takes, from a HuggingFace ``config.json`` (or its directory).

    Standard attention: ``2 (K and V) * num_hidden_layers * num_key_value_heads
    * head_dim * dtype bytes``, with ``num_key_value_heads`` defaulting to
    ``num_attention_heads`` (no grouped-query attention), ``head_dim`` to
    ``hidden_size / num_attention_heads``, and the dtype bytes to the config's
    ``torch_dtype``/``dtype`` (2 for float16/bfloat16; 2 when it names none,
    what servers run by default); ``dtype_bytes`` overrides it (an fp8 KV
    cache: 1). Llama-3.1-8B: 2 * 32 * 8 * 128 * 2 = 131,072. Multi-head latent
    attention (DeepSeek-V2/V3: ``kv_lora_rank``) keeps one compressed latent
    per layer instead: ``num_hidden_layers * (kv_lora_rank +
    qk_rope_head_dim) * dtype bytes``. A multimodal config's ``text_config``
    is read for the language model. Every layer is assumed to attend to the
    whole context (sliding-window layers would need less).
    """
    data = _read_config(config) if isinstance(config, (str, Path)) else dict(config)
    text = data.get("text_config")
    if isinstance(text, Mapping):
        data = {**data, **text}
    width = dtype_bytes if dtype_bytes is not None else _dtype_bytes(data)
    layers = _int_field(data, "num_hidden_layers", "n_layer", "num_layers")
    if data.get("kv_lora_rank"):
        rope = int(data.get("qk_rope_head_dim") or 0)
        return layers * (int(data["kv_lora_rank"]) + rope) * width
    heads = _int_field(data, "num_attention_heads", "n_head")
    kv_heads = int(data.get("num_key_value_heads") or heads)
    head_dim = data.get("head_dim")
    if not head_dim:
        hidden = _int_field(data, "hidden_size", "n_embd")
        if hidden % heads:
            raise ValueError(f"hidden_size {hidden} is not a multiple of {heads} heads")
        head_dim = hidden // heads
    return 2 * layers * kv_heads * int(head_dim) * width


def _read_config(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    found = json.loads(p.read_text(encoding="utf-8"))
    if not isinstance(found, dict):
        raise ValueError(f"{p}: a model config is a JSON object")
    return found


def _int_field(data: Mapping[str, Any], *names: str) -> int:
    for name in names:
        value = data.get(name)
        if value:
            return int(value)
    raise ValueError(f"model config has no {names[0]}")


def _dtype_bytes(data: Mapping[str, Any]) -> int:
    name = data.get("torch_dtype") or data.get("dtype")
    if not name:
        return 2
    key = str(name).removeprefix("torch.")
    if key not in _DTYPE_BYTES:
        raise ValueError(f"model config dtype {name!r} is not one of {sorted(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[key]
