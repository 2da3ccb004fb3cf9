"""``kvern analyze LOG``: why a log of requests missed the cache, offline, with no proxy.

Why a package beside the doctor: it is a command, not part of the request
path. It reads a JSONL log of request bodies (an OpenAI Batch input file, or
kvern's own capture) and runs each prompt through kvern's real pieces -- the
model's tokenizer and template, the normalization rules, a radix trie per
model, the divergence finder and the miss reasons of :mod:`kvern.diagnosis`
-- so its figures are the ones ``kvern serve`` would have shown for the
same traffic. Then it replays the log with each suggested rule to say what
the rule would have saved, and draws the capacity curve.

Modules, in the order a run reads them: ``log`` (the lines), ``setup``
(tokenizers, rules, block sizes), ``tally`` and ``sitebook`` (what a pass
counts), ``lru`` (a backend cache of a given size), ``passes`` (one pass over
the log), ``whatif`` (the passes with rules added), ``report`` (the JSON
object), ``text`` (the tables), ``plot``, ``progress`` and ``cli``.
"""
