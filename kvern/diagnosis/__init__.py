"""Why it missed: miss reasons, divergence sites, suggested rules, the capacity curve.

Why a package of its own: these read what the tries and the tokenizers
already produce (token ids, prefixes, rendered text) and explain it -- which
reason each lost token has, where prompts part, which normalization rule
would have joined them, how much KV cache the traffic needs -- without
changing how a request is tracked. It stands beside :mod:`kvern.tokenize`
and :mod:`kvern.cache_models`: it may import the trie, prompts and
tokenizers; tracking and the CLI import it.
"""
