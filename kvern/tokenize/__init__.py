"""Prompt text -> the token ids the backend keys its KV cache by.

``model_tokenizer`` renders, normalizes and tokenizes for one model;
``registry`` picks and loads each model's tokenizer once; ``incremental``
caches a chat's earlier turns by segment; ``gguf`` builds a tokenizer from a
GGUF file; ``upstream`` asks the backend instead; ``fallback`` approximates
when nothing exact can be had.
"""
