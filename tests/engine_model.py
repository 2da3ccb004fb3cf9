"""The real model the engine tests serve: SmolLM2-135M-Instruct from PyPI, loaded once.

Why one loader: converting the GGUF takes about 25 s on two cores the first
time (kept under the test cache, keyed by the file's fingerprint), loading
the converted folder about a second; every engine test module shares the
one ``LoadedModel``.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

from tests import assets

if TYPE_CHECKING:
    from kvern.engine.weights import LoadedModel

NAME = "smollm2-135m"


@functools.cache
def smollm2(dtype: str = "float32") -> LoadedModel:
    """The model in ``dtype`` (the engine's default compute dtype unless told)."""
    import torch

    from kvern.engine.service import DTYPES
    from kvern.engine.weights import load_model

    torch.set_num_threads(2)
    gguf = str(assets.smollm2_gguf())
    return load_model(gguf, assets.cache_root() / "engine", dtype=DTYPES[dtype], name=NAME)
