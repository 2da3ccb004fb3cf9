"""What llama.cpp decides about a GGUF vocabulary before it tokenizes, as data.

Why: a GGUF file carries the vocabulary (tokens, merges or scores, token
types) but not all the rules around it. llama.cpp supplies the rest itself,
in ``src/llama-vocab.cpp``: the pre-tokenizer by name
(:mod:`kvern.tokenize.gguf_pretokenizers`); whether BOS/EOS are added and
whether a space goes before the text, from the vocabulary type and a few
keys; which tokens are matched in the text as one piece, from the token types,
with some promoted or demoted by their text (ends of generation, Gemma 4's
``</s>``, Phi-3's whitespace-eating specials). :func:`vocab_spec` reads all of
that off a GGUF header; ``gguf`` turns it into a ``tokenizers`` object.

A vocabulary type or pre-tokenizer kvern has not checked against llama.cpp
raises :class:`GGUFTokenizerError` naming it: a tokenizer that is almost right
would skew every count without saying so.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from kvern.tokenize.gguf_file import GGUFTokenizerError
from kvern.tokenize.gguf_pretokenizers import PRE_TOKENIZERS, PreTokenizer

# Token types as llama.cpp writes them (gguf-py ``TokenType``).
TOKEN_NORMAL = 1
TOKEN_UNKNOWN = 2
TOKEN_CONTROL = 3
TOKEN_USER_DEFINED = 4

VocabKind = Literal["bpe", "spm", "wpm"]


@dataclass(frozen=True, slots=True)
class SpecialToken:
    """A token llama.cpp matches in the text before tokenizing the rest."""

    token_id: int
    text: str
    # CONTROL or UNKNOWN: matched only when special tokens are parsed (as
    # llama-server parses prompts); USER_DEFINED tokens are matched always.
    control: bool
    # Whitespace after it is dropped (Phi-3). llama.cpp drops ASCII
    # whitespace only; tokenizers' rstrip drops any (U+3000 too).
    rstrip: bool = False


@dataclass(frozen=True, slots=True)
class VocabSpec:
    """Everything llama.cpp decides about a vocabulary before tokenizing."""

    kind: VocabKind  # "bpe" (merges), "spm" (SentencePiece scores), "wpm" (WordPiece)
    pre: PreTokenizer | None  # BPE only
    add_bos: bool  # what add_special adds in front
    add_eos: bool  # ... and at the end (WordPiece always ends with SEP)
    add_space_prefix: bool  # SPM: a space before the text and after each special token
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    sep_id: int | None
    lowercase: bool  # WordPiece normalizer
    strip_accents: bool  # WordPiece normalizer
    special: tuple[SpecialToken, ...]


# Default special ids per vocabulary type, before the file's own keys.
_DEFAULT_IDS: dict[str, dict[str, int | None]] = {
    "llama": {"bos": 1, "eos": 2, "unk": 0, "sep": None},
    "bert": {"bos": 101, "eos": None, "unk": 100, "sep": 102},
    "gpt2": {"bos": 11, "eos": 11, "unk": None, "sep": None},
    "gemma4": {"bos": None, "eos": None, "unk": None, "sep": None},
}
_KIND: dict[str, VocabKind] = {"llama": "spm", "bert": "wpm", "gpt2": "bpe", "gemma4": "bpe"}
_ID_KEYS = {
    "bos": "tokenizer.ggml.bos_token_id",
    "eos": "tokenizer.ggml.eos_token_id",
    "unk": "tokenizer.ggml.unknown_token_id",
    "sep": "tokenizer.ggml.seperator_token_id",  # sic: the key's spelling
}

# Texts llama.cpp marks as control tokens whatever the file says: the ends of
# generation, and the fill-in-the-middle markers when the file names none.
_END_OF_GENERATION = frozenset(
    {
        "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>",
        "<|calls|>", "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>",
        "_<EOT>", "[EOT]", "[EOS]", "<|end_of_text|>", "<end_of_utterance>", "<eos>",
        "<turn|>", "<|tool_response>", "<｜end▁of▁sentence｜>", "[e~[",
    }
)  # fmt: skip
_FIM: dict[str, frozenset[str]] = {
    "tokenizer.ggml.fim_pre_token_id": frozenset(
        {"<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>", "▁<PRE>",
         "<|code_prefix|>", "<|prefix|>"}
    ),
    "tokenizer.ggml.fim_suf_token_id": frozenset(
        {"<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>", "▁<SUF>",
         "<|code_suffix|>", "<|suffix|>"}
    ),
    "tokenizer.ggml.fim_mid_token_id": frozenset(
        {"<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>", "▁<MID>",
         "<|code_middle|>", "<|middle|>"}
    ),
    "tokenizer.ggml.fim_pad_token_id": frozenset(
        {"<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"}
    ),
    "tokenizer.ggml.fim_rep_token_id": frozenset(
        {"<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"}
    ),
    "tokenizer.ggml.fim_sep_token_id": frozenset({"<|file_sep|>"}),
}  # fmt: skip
# gpt-oss: always rendered, so user-defined (matched even in raw text).
_ALWAYS_USER_DEFINED = frozenset({"<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"})


def vocab_spec(meta: dict[str, Any], source: str = "GGUF") -> VocabSpec:
    """llama.cpp's tokenizer rules for the vocabulary in ``meta`` (a GGUF header)."""
    model = meta.get("tokenizer.ggml.model")
    if model not in _KIND:
        raise GGUFTokenizerError(
            f"{source}: tokenizer.ggml.model {model!r} is not supported; supported: {sorted(_KIND)}"
        )
    kind = _KIND[model]
    tokens = token_texts(meta)
    if not tokens:
        raise GGUFTokenizerError(f"{source}: no tokenizer.ggml.tokens")
    pre: PreTokenizer | None = None
    if kind == "bpe":
        pre_name = "gemma4" if model == "gemma4" else meta.get("tokenizer.ggml.pre")
        if pre_name is None:
            raise GGUFTokenizerError(
                f"{source}: BPE vocabulary without tokenizer.ggml.pre "
                "(llama.cpp guesses 'default' and warns of degraded output); kvern does not guess"
            )
        pre = PRE_TOKENIZERS.get(pre_name)
        if pre is None:
            raise GGUFTokenizerError(
                f"{source}: pre-tokenizer {pre_name!r} is not supported; "
                f"supported: {sorted(PRE_TOKENIZERS)}"
            )
    add_bos = {"spm": True, "wpm": True, "bpe": pre is not None and pre.add_bos}[kind]
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos))
    if pre is not None and pre.force_bos:
        add_bos = True
    ids = _special_ids(meta, model, len(tokens))
    lowercase = bool(meta.get("tokenizer.ggml.normalizer.lowercase", True))
    return VocabSpec(
        kind=kind,
        pre=pre,
        add_bos=add_bos,
        add_eos=bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        add_space_prefix=bool(meta.get("tokenizer.ggml.add_space_prefix", kind == "spm")),
        bos_id=ids["bos"],
        eos_id=ids["eos"],
        unk_id=ids["unk"],
        sep_id=ids["sep"],
        lowercase=lowercase,
        strip_accents=bool(meta.get("tokenizer.ggml.normalizer.strip_accents", lowercase)),
        special=_special_tokens(meta, tokens),
    )


def _special_ids(meta: dict[str, Any], model: str, num_tokens: int) -> dict[str, int | None]:
    """BOS/EOS/UNK/SEP ids: the type's defaults, replaced by the file's keys when in range."""
    out: dict[str, int | None] = {}
    for name, default in _DEFAULT_IDS[model].items():
        value = default if default is not None and default < num_tokens else None
        given = meta.get(_ID_KEYS[name])
        if given is not None and 0 <= int(given) < num_tokens:
            value = int(given)
        out[name] = value
    return out


def token_texts(meta: dict[str, Any]) -> list[str]:
    """The vocabulary's token texts; an empty one is renamed ``[EMPTY_<id>]``, as llama.cpp does."""
    tokens: list[str] = list(meta.get("tokenizer.ggml.tokens") or [])
    return [text or f"[EMPTY_{i}]" for i, text in enumerate(tokens)]


def _special_tokens(meta: dict[str, Any], tokens: list[str]) -> tuple[SpecialToken, ...]:
    """The tokens matched before tokenizing, with llama.cpp's promotions and demotions."""
    types: list[int] = [int(t) for t in meta.get("tokenizer.ggml.token_type") or []]
    types += [TOKEN_NORMAL] * (len(tokens) - len(types))
    by_text = {text: i for i, text in enumerate(tokens)}  # a later duplicate wins, as there
    control = {i for i, t in enumerate(types) if t in (TOKEN_CONTROL, TOKEN_UNKNOWN)}
    user = {i for i, t in enumerate(types) if t == TOKEN_USER_DEFINED}
    ends = {by_text[text] for text in _END_OF_GENERATION if text in by_text}
    promoted = set(ends)
    for key, names in _FIM.items():
        present = [by_text[text] for text in names if text in by_text]
        # llama.cpp takes the first it meets in a hash map; one candidate is unambiguous.
        if meta.get(key) is None and len(present) == 1:
            promoted.add(present[0])
    # A promoted user-defined token gains the control flag, and with it is
    # matched only when special tokens are parsed.
    control |= promoted
    user -= promoted
    for text in _ALWAYS_USER_DEFINED & by_text.keys():  # gpt-oss: always rendered
        control.discard(by_text[text])
        user.add(by_text[text])
    end_texts = {tokens[i] for i in ends}
    calls = bool(end_texts & {"<|call|>", "<|calls|>"})
    if "<|end|>" in end_texts and calls and end_texts & {"<|return|>", "<|flush|>"}:
        control.discard(by_text["<|end|>"])  # o200k harmony, solar-open: not an end there
        user.add(by_text["<|end|>"])
    if "</s>" in end_texts and end_texts & {"<|tool_response>", "<|plamo:eos|>"}:
        control.discard(by_text["</s>"])  # Gemma 4 and PLaMo: a normal token there
        user.discard(by_text["</s>"])
    name = str(meta.get("general.name") or "").lower()
    rstrip: set[int] = set()
    if "phi-3" in name or "phi3" in name:
        rstrip = control | user | ({by_text["</s>"]} if "</s>" in by_text else set())
        rstrip -= {by_text[t] for t in ("<unk>", "<s>", "<|endoftext|>") if t in by_text}
    return tuple(
        SpecialToken(i, tokens[i], i in control, i in rstrip) for i in sorted(control | user)
    )
