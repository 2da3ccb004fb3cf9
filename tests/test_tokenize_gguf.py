"""kvern's GGUF -> HF tokenizer tokenizes as llama.cpp does.

Two references: the test vectors llama.cpp ships beside its vocab files
(every one of them, discovered from the extracted sdist), and a real
llama-server's ``/tokenize`` serving SmolLM2-135M-Instruct, a real chat model
whose GGUF declares the ``smollm`` pre-tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kvern.tokenize.gguf import (
    GGUFTokenizerError,
    build_backend_tokenizer,
    build_tokenizer_from_gguf,
    read_gguf_metadata,
)
from kvern.tokenize.gguf_vocab import vocab_spec
from kvern.tokenize.model_tokenizer import ModelTokenizer
from tests import assets

# The vocab files issue 13 names; the vendored sdist must still ship them all.
REQUIRED_VOCABS = {
    "command-r",
    "deepseek-coder",
    "deepseek-llm",
    "falcon",
    "gemma-4",
    "gpt-2",
    "llama-bpe",
    "llama-spm",
    "mpt",
    "phi-3",
    "qwen2",
    "qwen35",
    "refact",
    "starcoder",
}
VOCAB_FILES = {
    path.name[len("ggml-vocab-") : -len(".gguf")]: path
    for path in assets.vocab_files_with_vectors()
}


def vocab_path(name: str) -> Path:
    return assets.models_dir() / f"ggml-vocab-{name}.gguf"


def backend(name: str, *, parse_special: bool = True) -> Any:
    return build_backend_tokenizer(
        read_gguf_metadata(vocab_path(name)), parse_special=parse_special
    )


def test_every_vocab_file_the_issue_names_has_vectors() -> None:
    assert REQUIRED_VOCABS <= VOCAB_FILES.keys()


@pytest.mark.parametrize("name", sorted(VOCAB_FILES))
def test_vocab_file_matches_all_its_llama_cpp_vectors(name: str) -> None:
    # As llama.cpp's test-tokenizer-0 runs them: add_special and parse_special off.
    tok = backend(name, parse_special=False)
    vectors = assets.read_vectors(VOCAB_FILES[name])
    assert len(vectors) >= 40
    mismatches = [
        (text, ids)
        for text, ids in vectors
        if tok.encode(text, add_special_tokens=False).ids != ids
    ]
    assert mismatches == [], f"{len(vectors) - len(mismatches)}/{len(vectors)} vectors match"


def test_derived_tokenizers_match_llama_cpp_test_vectors(
    real_tokenizer: Any, real_tokenizer_name: str, tokenizer_fixtures: dict[str, Any]
) -> None:
    vectors = tokenizer_fixtures[real_tokenizer_name].vectors
    assert len(vectors) >= 40
    mismatches = [
        text
        for text, ids in vectors
        if real_tokenizer.encode(text, add_special_tokens=False) != ids
    ]
    assert mismatches == []


@pytest.mark.parametrize(
    ("name", "first", "last"),
    [
        ("llama-spm", [1], None),  # SPM: BOS by default
        ("llama-bpe", [128000], None),  # Llama 3: BOS by llama.cpp's rule for the name
        ("gemma-4", [2], None),  # add_bos_token
        ("qwen2", None, None),  # no BOS
        ("gpt-2", None, None),
        ("bert-bge", [101], [102]),  # WordPiece: CLS ... SEP
    ],
)
def test_bos_and_eos_are_added_as_llama_cpp_adds_them(
    name: str, first: list[int] | None, last: list[int] | None
) -> None:
    tok = backend(name)
    plain = tok.encode("Hello world", add_special_tokens=False).ids
    assert tok.encode("Hello world", add_special_tokens=True).ids == [
        *(first or []),
        *plain,
        *(last or []),
    ]


def test_control_tokens_are_parsed_and_user_defined_ones_always() -> None:
    parsed, raw = backend("qwen2"), backend("qwen2", parse_special=False)
    assert parsed.encode("a<|im_end|>b").ids == [64, 151645, 65]
    assert 151645 not in raw.encode("a<|im_end|>b").ids
    # DeepSeek's single-byte tokens are user-defined: matched even unparsed.
    deepseek = backend("deepseek-llm", parse_special=False)
    assert deepseek.encode("ø", add_special_tokens=False).ids == [100002]


def test_spm_puts_a_space_before_the_text_and_after_special_tokens() -> None:
    tok = backend("llama-spm")

    def ids(text: str) -> list[int]:
        return list(tok.encode(text, add_special_tokens=False).ids)

    assert ids(" Hello") == [29871, *ids("Hello")]  # '▁' + '▁Hello'
    assert ids("<s>Hello") == [1, *ids("Hello")]
    assert ids("Hi<s>Hello") == [*ids("Hi"), 1, *ids("Hello")]


def test_phi3_special_tokens_eat_the_whitespace_after_them() -> None:
    tok = backend("phi-3")

    def ids(text: str) -> list[int]:
        return list(tok.encode(text, add_special_tokens=False).ids)

    assert ids("<|end|>\n  Hi") == ids("<|end|>Hi")
    assert ids("<s>\nHi") != ids("<s>Hi")  # but not <s>


def test_unknown_pre_tokenizer_is_refused_naming_it() -> None:
    meta = read_gguf_metadata(vocab_path("gpt-2"))
    with pytest.raises(GGUFTokenizerError, match="pre-tokenizer 'no-such-pre' is not supported"):
        vocab_spec({**meta, "tokenizer.ggml.pre": "no-such-pre"})


def test_bpe_without_a_pre_tokenizer_is_refused() -> None:
    with pytest.raises(GGUFTokenizerError, match="without tokenizer.ggml.pre"):
        build_tokenizer_from_gguf(assets.models_dir() / "ggml-vocab-gpt-neox.gguf")


def test_unsupported_vocabulary_type_is_refused_naming_it() -> None:
    with pytest.raises(GGUFTokenizerError, match="tokenizer.ggml.model 't5' is not supported"):
        build_tokenizer_from_gguf(assets.models_dir() / "ggml-vocab-nomic-bert-moe.gguf")


def test_metadata_reader_reads_header_fields() -> None:
    meta = read_gguf_metadata(vocab_path("qwen2"))
    assert meta["general.architecture"] == "qwen2"
    assert meta["tokenizer.ggml.pre"] == "qwen2"
    assert len(meta["tokenizer.ggml.tokens"]) == len(meta["tokenizer.ggml.token_type"])


def test_non_gguf_file_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(b"NOPE" + b"\0" * 32)
    with pytest.raises(GGUFTokenizerError, match="not a GGUF file"):
        read_gguf_metadata(path)


def test_truncated_gguf_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "x.gguf"
    path.write_bytes(vocab_path("gpt-2").read_bytes()[:5000])
    with pytest.raises(GGUFTokenizerError, match="truncated"):
        read_gguf_metadata(path)


def test_special_tokens_are_atomic(real_tokenizer: Any, real_tokenizer_name: str) -> None:
    special = "<|eot_id|>" if real_tokenizer_name == "llama3" else "<|im_end|>"
    ids = real_tokenizer.encode(f"hi{special}there", add_special_tokens=False)
    assert real_tokenizer.convert_tokens_to_ids(special) in ids


# SmolLM2 through a real llama-server: raw text and chats, as /tokenize sees them.
RAW_PROMPTS = [
    "Hello world",
    "The year 2024 had 366 days; 3.14159 and 1,000,000 and 0x1F.",
    "  two leading spaces, trailing   ",
    "tabs\tand\nnewlines\n\n\n\nand \r\n crlf",
    "Ünïcödé — ñ 🦙 日本語 한국어 Привет Ελληνικά مرحبا नमस्ते",
    "don't won't they'll I'M WE'VE",
    "def f(x):\n    return x ** 2  # comment\n\n\nclass A:\n\tpass\n",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>a<repo_name>b<file_sep>c",
    " " * 17 + "x" + "\n" * 9 + "y" + "\t" * 5,
    "١٢٣ ²³ ½ Ⅻ ①",
    "\u00a0nbsp\u3000ideographic\u2003em\u200bzero-width",
    "",
]
CHATS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse.  Answer in 12 words or fewer."},
        {"role": "user", "content": "Count: 1 22 333 4444 55555\n\n\nthen stop."},
        {"role": "assistant", "content": "1 22 333 4444 55555"},
        {"role": "user", "content": "Now in 日本語, with   spaces\tand tabs 🦙."},
    ],
]


@pytest.fixture(scope="module")
def smollm2_server() -> Iterator[httpx.Client]:
    from tests.llama_server import llama_server

    with (
        llama_server(assets.smollm2_gguf(), ctx_size=2048) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        yield client


@pytest.fixture(scope="module")
def smollm2_tokenizer() -> Any:
    return build_tokenizer_from_gguf(assets.smollm2_gguf())


def server_ids(client: httpx.Client, text: str, *, add_special: bool, parse_special: bool) -> Any:
    body = {"content": text, "add_special": add_special, "parse_special": parse_special}
    answer = client.post("/tokenize", json=body)
    answer.raise_for_status()
    return answer.json()["tokens"]


def test_smollm2_declares_the_smollm_pre_tokenizer() -> None:
    assert read_gguf_metadata(assets.smollm2_gguf())["tokenizer.ggml.pre"] == "smollm"


@pytest.mark.slow
@pytest.mark.parametrize("add_special", [False, True])
def test_smollm2_raw_text_ids_equal_llama_servers(
    smollm2_server: httpx.Client, smollm2_tokenizer: Any, add_special: bool
) -> None:
    parsed = smollm2_tokenizer.backend_tokenizer
    raw = build_backend_tokenizer(read_gguf_metadata(assets.smollm2_gguf()), parse_special=False)
    for text in RAW_PROMPTS:
        for parse_special, tok in ((True, parsed), (False, raw)):
            expected = server_ids(
                smollm2_server, text, add_special=add_special, parse_special=parse_special
            )
            got = tok.encode(text, add_special_tokens=add_special).ids
            assert got == expected, (text, parse_special)


@pytest.mark.slow
def test_smollm2_chat_prompts_equal_llama_servers(
    smollm2_server: httpx.Client, smollm2_tokenizer: Any
) -> None:
    kvern = ModelTokenizer(smollm2_tokenizer, source="smollm2")
    for messages in CHATS:
        answer = smollm2_server.post("/apply-template", json={"messages": messages})
        answer.raise_for_status()
        prompt = answer.json()["prompt"]
        expected = server_ids(smollm2_server, prompt, add_special=True, parse_special=True)
        tokens = kvern.chat(messages)
        assert tokens.used_model_template
        assert tokens.text == prompt
        assert list(tokens.ids) == expected
