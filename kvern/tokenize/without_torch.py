"""transformers' tokenizers in a process that never runs a model, without torch.

Why: transformers imports torch whenever torch is installed (kvern's engine
extra installs it), though a tokenizer and its chat template need none of it.
In the brain, which only tokenizes, that import was most of the wait before
the first request could be tracked, on every start: first tokenizer ready
5.4 s -> 2.7 s, peak memory 438 -> 256 MB (Qwen2's tokenizer, 2 cores). Hiding
torch is safe only in a process of its own that never loads a model, so this
is called from the brain's entry point and nowhere a test or the engine runs.
"""

from __future__ import annotations

import logging
import sys

_TORCH_ABSENT_ADVICE = "PyTorch was not found"


class _DropTorchAdvice(logging.Filter):
    """transformers' import-time advice that torch is missing: expected here, not news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _TORCH_ABSENT_ADVICE not in record.getMessage()


def hide_torch() -> bool:
    """Make torch look not installed to this process; False if something imported it already.

    ``sys.modules["torch"] = None`` makes ``importlib.util.find_spec("torch")``
    answer None (how transformers decides torch is absent) and any later
    ``import torch`` raise ImportError, so nothing half-loads it.
    """
    if "torch" in sys.modules:
        return False
    sys.modules["torch"] = None  # type: ignore[assignment]
    logging.getLogger("transformers").addFilter(_DropTorchAdvice())
    return True
