"""llama.cpp's BPE pre-tokenizers, keyed by the names GGUF files give them.

Why a table of our own: llama.cpp does not split text the way the model's
``tokenizer.json`` does. It picks regexes by the name in
``tokenizer.ggml.pre`` (``src/llama-vocab.cpp``) and runs them in turn, each
splitting every piece the previous ones left; some differ from the model's
own (contractions spelled '[sS]' instead of case-folded, NFC skipped).
kvern must split as the backend does, so the rules are restated here from
llama.cpp's source, in ``tokenizers``' (Oniguruma) syntax.

Only rule sets checked against llama.cpp's own test vectors are listed
(``tests/test_tokenize_gguf.py``), each with the other names llama.cpp maps
to the very same rules; any other name is refused by ``gguf_vocab``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class PreTokenizer:
    """One of llama.cpp's BPE pre-tokenizers."""

    # Regexes applied in turn: each splits every piece so far, isolating its
    # matches (the text between matches stays a piece of its own).
    splits: tuple[str, ...]
    # GPT-2 byte-to-unicode mapping of every piece; False: raw UTF-8 with
    # <0xXX> byte tokens for what the vocabulary lacks (SentencePiece-style BPE).
    byte_level: bool = True
    # A whole piece found in the vocabulary is one token, merges unused.
    ignore_merges: bool = False
    # ' ' -> '▁' before anything else (SentencePiece-style BPE).
    escape_spaces: bool = False
    # llama.cpp's add_bos when the file has no tokenizer.ggml.add_bos_token.
    add_bos: bool = False
    # BOS even when the file says not to (llama.cpp's Gemma 4 workaround).
    force_bos: bool = False


# The pieces the regexes are built from. llama.cpp spells contractions out
# ('[sS]') rather than (?i:'s): case folding would also match 'ſ' and 'K'.
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LINE_TAIL = r"|\s*[\r\n]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*" + _LINE_TAIL
)
_QWEN2 = _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*" + _LINE_TAIL
_QWEN35 = (
    _CONTRACTIONS
    + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    + _LINE_TAIL
)
# llama.cpp runs regexes without \p{..} classes on the text with every
# non-ASCII whitespace replaced by \v, so a literal range never matches a
# space inside it (U+3000 and U+2000-U+202F lie in these ranges): hence the
# (?!\s) in front.
_CJK = "(?:(?!\\s)[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff])+"
# DeepSeek's cased-letter class, as its tokenizer.json (and llama.cpp) list it;
# escaped, since several of its characters change under NFC.
_DEEPSEEK_LETTERS = (
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293"
    "\u0295-\u02af\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a"
    "\u038c\u038e-\u03a1\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556"
    "\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b"
    "\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45\u1f48-\u1f4d"
    "\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"
    "\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4"
    "\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128"
    "\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184"
    "\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b"
    "\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17"
    "\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
    "\U0001e900-\U0001e943"
)
# Its punctuation class, with U+3000 (a space, see above) left out.
_DEEPSEEK_PUNCT = "!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3001-\u3002"

_LLAMA3_RULES = PreTokenizer((_LLAMA3,), ignore_merges=True, add_bos=True)
_LLAMA3_REGEX = PreTokenizer((_LLAMA3,))
_QWEN2_RULES = PreTokenizer((_QWEN2,))
_QWEN35_RULES = PreTokenizer((_QWEN35,))
_GPT2_RULES = PreTokenizer((_GPT2,))
_DIGITS_THEN_GPT2 = PreTokenizer((r"\p{N}", _GPT2))
_FALCON_RULES = PreTokenizer((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]"))
_DEEPSEEK_CODER_RULES = PreTokenizer(
    (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK, r"\p{N}"),
)
_DEEPSEEK_LLM_RULES = PreTokenizer(
    (
        r"[\r\n]",
        rf"\s?[{_DEEPSEEK_LETTERS}]+",
        rf"\s?[{_DEEPSEEK_PUNCT}]+",
        r"\s+\z",
        _CJK,
        r"\p{N}+",
    ),
)
# Gemma 4: no word splitting, only at newlines. llama.cpp also takes a run of
# newlines that is a token whole; plain merges give the same (runs of 1-100
# checked against llama-server), so nothing here marks it.
_GEMMA4_RULES = PreTokenizer(
    (r"[^\n]+|\n+",), byte_level=False, escape_spaces=True, add_bos=True, force_bos=True
)

# tokenizer.ggml.pre -> rules, grouped as llama.cpp groups them. The first
# name of each group is the one a vocab file with test vectors declares.
PRE_TOKENIZERS: dict[str, PreTokenizer] = {
    **dict.fromkeys(
        (
            "llama-bpe",
            "llama3",
            "llama-v3",
            "falcon3",
            "falcon-h1",
            "pixtral",
            "midm-2.0",
            "lfm2",
            "jina-v5-nano",
        ),
        _LLAMA3_RULES,
    ),
    **dict.fromkeys(("smaug-bpe", "dbrx"), _LLAMA3_REGEX),
    **dict.fromkeys(
        (
            "qwen2",
            "deepseek-r1-qwen",
            "kormo",
            "f2llmv2",
            "megrez",
            "stablelm2",
            "hunyuan",
            "solar-open",
            "grok-2",
        ),
        _QWEN2_RULES,
    ),
    "qwen35": _QWEN35_RULES,
    **dict.fromkeys(
        (
            "gpt-2",
            "mpt",
            "phi-2",
            "jina-es",
            "jina-de",
            "gigachat",
            "jina-v2-es",
            "jina-v2-de",
            "a.x-4.0",
            "mellum",
            "modern-bert",
            "olmo",
            "jais",
            "trillion",
            "granite-docling",
            "exaone4",
        ),
        _GPT2_RULES,
    ),
    **dict.fromkeys(
        (
            "starcoder",
            "refact",
            "command-r",
            "smollm",
            "codeshell",
            "exaone",
            "minerva-7b",
            "mellum2",
        ),
        _DIGITS_THEN_GPT2,
    ),
    "falcon": _FALCON_RULES,
    "deepseek-coder": _DEEPSEEK_CODER_RULES,
    "deepseek-llm": _DEEPSEEK_LLM_RULES,
    **dict.fromkeys(("gemma4", "granite-embed-multi-311m"), _GEMMA4_RULES),
}
