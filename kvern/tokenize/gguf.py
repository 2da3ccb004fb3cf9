"""Build a HuggingFace fast tokenizer from a GGUF file that tokenizes as llama.cpp does.

Why: Ollama and llama.cpp users already hold their model as a GGUF file, and
the GGUF carries the whole vocabulary (tokens, merges or scores, token types,
the pre-tokenizer's name, often the chat template). Building a ``tokenizers``
object from those fields gives kvern the backend's exact token ids with no
hub and no torch (transformers' own GGUF loader needs torch, and follows the
model's tokenizer.json rather than llama.cpp).

The rules come from :mod:`kvern.tokenize.gguf_vocab`; this module maps each
vocabulary type onto ``tokenizers`` parts:

- BPE (``gpt2``): llama.cpp's split regexes in turn, GPT-2 byte mapping,
  merges by rank; Gemma 4 (``gemma4``) instead escapes spaces to '▁', splits
  only at newlines and falls back to <0xXX> byte tokens.
- SPM (``llama``): llama.cpp merges the adjacent pair whose joined text is the
  highest-scoring token. That is BPE with one merge per way of splitting a
  token into two tokens, ranked by the joined token's score; a '▁' goes before
  the text and after each special token.
- WPM (``bert``): greedy longest-match WordPiece after BERT's normalizer;
  llama.cpp marks word starts with '▁' where WordPiece marks the rest '##'.

Special tokens are matched on the raw text first, as llama-server does for a
prompt; :func:`build_backend_tokenizer` with ``parse_special=False`` keeps
only the user-defined ones, which is how llama.cpp's test vectors were made.

Checked: every vocab file llama.cpp ships test vectors for passes all of them,
and kvern's ids equal a real llama-server's ``/tokenize`` (tests). One known
difference is left: after a Phi-3 special token llama.cpp drops ASCII
whitespace, ``tokenizers`` any Unicode whitespace (U+00A0, U+3000, ...).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kvern.tokenize.gguf_file import GGUFTokenizerError, read_gguf_metadata
from kvern.tokenize.gguf_vocab import VocabSpec, token_texts, vocab_spec

__all__ = [
    "GGUFTokenizerError",  # re-exported: callers catch it from here
    "build_backend_tokenizer",
    "build_tokenizer_from_gguf",
    "read_gguf_metadata",  # re-exported: tests and tools read headers from here
]

_SPACE = "▁"  # U+2581, SentencePiece's escaped space


def build_tokenizer_from_gguf(path: str | Path) -> Any:
    """A transformers fast tokenizer (with the file's chat template) for a GGUF file.

    It parses special tokens in the text, as llama-server does for prompts.
    Raises :class:`GGUFTokenizerError` naming what is not supported rather
    than building a tokenizer that is only nearly right.
    """
    from transformers import PreTrainedTokenizerFast

    meta = read_gguf_metadata(path)
    spec = vocab_spec(meta, str(path))
    tokens = token_texts(meta)

    def name(token_id: int | None) -> str | None:
        return None if token_id is None else tokens[token_id]

    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=build_backend_tokenizer(meta, spec),
        bos_token=name(spec.bos_id),
        eos_token=name(spec.eos_id),
        unk_token=name(spec.unk_id),
    )
    template = meta.get("tokenizer.chat_template")
    if template:
        fast.chat_template = template
    return fast


def build_backend_tokenizer(
    meta: dict[str, Any], spec: VocabSpec | None = None, *, parse_special: bool = True
) -> Any:
    """The ``tokenizers.Tokenizer`` for a GGUF header (and the rules read off it).

    ``parse_special=False`` matches only user-defined tokens in the text, as
    llama.cpp does with parse_special off (its test vectors were made so).
    """
    from tokenizers import AddedToken, Tokenizer

    spec = spec or vocab_spec(meta)
    tokens = token_texts(meta)
    if spec.kind == "wpm":
        tok = _wordpiece(tokens, spec)
    elif spec.kind == "spm":
        tok = _sentencepiece(tokens, meta, spec)
    else:
        tok = _bpe(tokens, meta, spec)
    tok.add_tokens(
        [
            AddedToken(
                special.text,
                special=special.control,
                normalized=False,
                lstrip=False,
                rstrip=special.rstrip,
                single_word=False,
            )
            for special in spec.special
            if parse_special or not special.control
        ]
    )
    _add_post_processor(tok, tokens, spec)
    assert isinstance(tok, Tokenizer)
    return tok


def _bpe(tokens: list[str], meta: dict[str, Any], spec: VocabSpec) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers as pre

    rules = spec.pre
    assert rules is not None, "a BPE spec carries its pre-tokenizer"
    vocab = {text: i for i, text in enumerate(tokens)}
    merges = _listed_merges(meta.get("tokenizer.ggml.merges") or [], vocab)
    tok = Tokenizer(
        models.BPE(
            vocab=vocab,
            merges=merges,
            ignore_merges=rules.ignore_merges,
            byte_fallback=not rules.byte_level,
            fuse_unk=False,
        )
    )
    if rules.escape_spaces:
        tok.normalizer = normalizers.Replace(" ", _SPACE)
    splits: list[Any] = [pre.Split(Regex(regex), behavior="isolated") for regex in rules.splits]
    if rules.byte_level:
        splits.append(pre.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False))
        tok.decoder = decoders.ByteLevel()
    else:
        tok.decoder = decoders.Sequence(
            [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        )
    tok.pre_tokenizer = pre.Sequence(splits)
    return tok


def _listed_merges(listed: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """The file's merges in rank order, as llama.cpp reads them.

    llama.cpp splits each at the first space after its first character (a
    token may be a lone space) and keeps the first rank of a repeated pair;
    ``tokenizers`` also needs both halves and the result in the vocabulary.
    """
    seen: set[tuple[str, str]] = set()
    out: list[tuple[str, str]] = []
    for merge in listed:
        cut = merge.find(" ", 1)
        if cut < 0:
            continue
        pair = (merge[:cut], merge[cut + 1 :])
        if pair in seen or pair[0] not in vocab or pair[1] not in vocab:
            continue
        if pair[0] + pair[1] in vocab:
            seen.add(pair)
            out.append(pair)
    return out


def _sentencepiece(tokens: list[str], meta: dict[str, Any], spec: VocabSpec) -> Any:
    from tokenizers import Tokenizer, decoders, models, normalizers

    scores: list[float] = [float(s) for s in meta.get("tokenizer.ggml.scores") or []]
    if len(scores) < len(tokens):
        raise GGUFTokenizerError("SPM vocabulary without a score per token")
    vocab = {text: i for i, text in enumerate(tokens)}
    tok = Tokenizer(
        models.BPE(
            vocab=vocab, merges=_score_merges(vocab, scores), byte_fallback=True, fuse_unk=False
        )
    )
    steps: list[Any] = [normalizers.Replace(" ", _SPACE)]
    if spec.add_space_prefix:
        steps.append(normalizers.Prepend(_SPACE))
    tok.normalizer = normalizers.Sequence(steps)
    parts = [decoders.Replace(_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec.add_space_prefix:
        parts.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(parts)
    return tok


def _score_merges(vocab: dict[str, int], scores: list[float]) -> list[tuple[str, str]]:
    """Every (left, right) whose joined text is a token, best joined score first.

    llama.cpp's SPM merges whichever adjacent pair of pieces joins into the
    highest-scoring token (the leftmost on a tie); listing each such pair at
    the rank of its joined token's score makes BPE do the same.
    """
    ranked: list[tuple[float, int, int, str, str]] = []
    for text, token_id in vocab.items():
        for cut in range(1, len(text)):
            left, right = text[:cut], text[cut:]
            if left in vocab and right in vocab:
                ranked.append((-scores[token_id], token_id, cut, left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def _wordpiece(tokens: list[str], spec: VocabSpec) -> Any:
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers
    from tokenizers import pre_tokenizers as pre

    if spec.unk_id is None:
        raise GGUFTokenizerError("WPM vocabulary without an unknown token")
    control = {special.token_id for special in spec.special if special.control}
    # llama.cpp marks a word's first piece with '▁'; WordPiece marks the others '##'.
    vocab: dict[str, int] = {}
    for i, text in enumerate(tokens):
        if i not in control and text.startswith(_SPACE):
            vocab[text[1:]] = i
    for i, text in enumerate(tokens):
        if i in control:
            vocab[text] = i
        elif not text.startswith(_SPACE):
            vocab["##" + text] = i
    tok = Tokenizer(
        models.WordPiece(
            vocab=vocab,
            unk_token=tokens[spec.unk_id],
            continuing_subword_prefix="##",
            max_input_chars_per_word=1 << 30,  # llama.cpp has no limit
        )
    )
    steps: list[Any] = [
        # BERT's cleaning drops these as control characters; llama.cpp splits words there.
        normalizers.Replace(Regex("[\x0b\x0c\x85]"), " "),
        normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=False, lowercase=False
        ),
    ]
    if spec.strip_accents:
        # llama.cpp keeps only the first code point of each character's NFD
        # and drops every mark (\p{M}, not only the nonspacing ones). A Hangul
        # syllable thus becomes its leading consonant: syllables come in 19
        # runs of 588, one per leading consonant (U+1100 on).
        steps += [
            normalizers.Replace(Regex(f"[{chr(first)}-{chr(first + 587)}]"), chr(0x1100 + i))
            for i, first in enumerate(range(0xAC00, 0xAC00 + 19 * 588, 588))
        ]
        steps += [normalizers.NFD(), normalizers.Replace(Regex(r"\p{M}"), "")]
    if spec.lowercase:
        steps.append(normalizers.Lowercase())
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = pre.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


def _add_post_processor(tok: Any, tokens: list[str], spec: VocabSpec) -> None:
    """What llama.cpp adds to a raw prompt with add_special: BOS, EOS (WPM: CLS ... SEP)."""
    from tokenizers import processors

    front = spec.bos_id if spec.add_bos or spec.kind == "wpm" else None
    back = spec.sep_id if spec.kind == "wpm" else spec.eos_id if spec.add_eos else None
    if (spec.add_bos or spec.kind == "wpm") and front is None:
        raise GGUFTokenizerError("the vocabulary adds a BOS token but names none")
    if spec.kind == "wpm" and back is None:
        raise GGUFTokenizerError("WPM vocabulary without a separator token")
    if spec.add_eos and back is None:
        raise GGUFTokenizerError("the vocabulary adds an EOS token but names none")
    if front is None and back is None:
        return
    ends = [token_id for token_id in (front, back) if token_id is not None]
    head = [tokens[front]] if front is not None else []
    tail = [tokens[back]] if back is not None else []
    tok.post_processor = processors.TemplateProcessing(
        single=[*head, "$A", *tail],
        pair=[*head, "$A", *tail, *head, "$B", *tail],
        special_tokens=[(tokens[i], i) for i in dict.fromkeys(ends)],
    )
