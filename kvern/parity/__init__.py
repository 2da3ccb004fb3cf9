"""Parity: does kvern render and tokenize exactly as the backend does?

``checker`` runs the check once per model in the background and reports it;
``probes`` asks each kind of backend (llama.cpp, vLLM) for its own rendering
and token ids.
"""
