"""The brain tokenizes with transformers but never imports torch (kvern.tokenize.without_torch).

Real brain process, real Qwen2 and Llama 3 tokenizers and chat templates,
simulated replicas on 127.0.0.1 (tests/replica_sim.py) behind kvern.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.test_routing_e2e import MODEL, client_for, kvern, replicas, routed_config
from tests.test_tracking_brain import rows, wait_for

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None,
    reason="torch is not installed (the engine extra): there is nothing to hide",
)

MESSAGES: list[dict[str, Any]] = [
    {"role": "system", "content": "You answer in one word."},
    {"role": "user", "content": "Weather in Paris?"},
    {
        "role": "assistant",
        "content": "",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "weather", "arguments": {"city": "Paris"}},
            }
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "weather",
            "description": "Current weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]

_RENDER_WITHOUT_TORCH = """
import json, sys
from kvern.tokenize.without_torch import hide_torch
assert hide_torch()
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1])
messages, tools = json.loads(sys.argv[2]), json.loads(sys.argv[3])
text = tok.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
ids = tok.backend_tokenizer.encode(text, add_special_tokens=False).ids
print(json.dumps({"text": text, "ids": ids, "torch": sys.modules.get("torch") is not None}))
"""


@pytest.mark.parametrize("name", ["qwen2", "llama3"])
def test_a_chat_template_renders_and_tokenizes_the_same_without_torch(
    name: str, hf_tokenizers: dict[str, Any], tokenizer_fixtures: dict[str, Any]
) -> None:
    tok = hf_tokenizers[name]
    text = tok.apply_chat_template(
        MESSAGES, tools=TOOLS, tokenize=False, add_generation_prompt=True
    )
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            _RENDER_WITHOUT_TORCH,
            str(tokenizer_fixtures[name].directory),
            json.dumps(MESSAGES),
            json.dumps(TOOLS),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert not out["torch"]
    assert out["text"] == text and "weather" in text
    assert out["ids"] == tok.backend_tokenizer.encode(text, add_special_tokens=False).ids
    # transformers' advice that torch is missing is expected there, so not printed.
    assert "PyTorch was not found" not in done.stderr


def test_the_brain_tracks_exactly_and_never_maps_torch(
    tmp_path: Path, hf_tokenizers: dict[str, Any], tokenizer_fixtures: dict[str, Any]
) -> None:
    tok = hf_tokenizers["qwen2"]
    messages = [{"role": "user", "content": "Count the tokens of this prompt, please."}]
    with replicas(tok, n=1) as reps:
        config = routed_config(
            tmp_path, [u for u, _ in reps], str(tokenizer_fixtures["qwen2"].directory)
        )
        with kvern(config) as url:
            client_for(url).chat.completions.create(
                model=MODEL,
                messages=messages,  # type: ignore[arg-type]
                max_tokens=2,
            )
            table = wait_for(lambda: rows(tmp_path / "kvern.db"))
            brain = httpx.get(url + "/health", timeout=30).json()["tracking"]["brain"]
            maps = Path(f"/proc/{brain['pid']}/maps").read_text()
    text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    expected = tok.backend_tokenizer.encode(text, add_special_tokens=False).ids
    assert table[0]["tokenizer_kind"] == "exact"
    assert table[0]["prompt_tokens"] == len(expected)
    assert brain["isolation"] == "process" and brain["pid"]
    assert "libtorch" not in maps
