"""``kvern engine``: an OpenAI-compatible server that runs a model itself and reuses KV.

Why an engine inside a proxy project: kvern predicts what a backend serves
from its KV cache, and the one backend whose cache it can know exactly is
one that keys its cache the way kvern's trie does. The engine keeps KV
tensors of finished requests in a block store keyed by chained block hashes
(:mod:`kvern.routing.block_chains`, the hashes kvern instances share), so a
request reuses the longest stored prefix of full blocks and computes only
the rest, and reports exactly how many tokens it reused.

The modules, in the order a request passes them::

    weights   the model: a GGUF converted once into a cached folder, its fingerprint
    kv_codec  one block's KV tensors stored at 32, 16, 8 or 4 bits (KIVI)
    disk_tier evicted blocks in one preallocated file with an index
    store     the block store: hashes -> blocks, a byte budget, kvern's eviction policies
    runner    prefill with reuse, one decode step, storing a sequence's blocks
    sampling  temperature, top_p, seed, stop strings
    scheduler the worker thread that runs requests, interleaving their steps
    api       the HTTP routes (OpenAI chat and completions, /tokenize, /health, /metrics)
    app       the app factory; cli: ``kvern engine --model PATH``

Everything here needs the ``engine`` extra (torch, transformers' model code,
gguf); the proxy never imports this package.
"""
