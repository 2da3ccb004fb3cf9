"""kvern: a transparent OpenAI-compatible caching proxy that measures KV-cache prefix reuse."""

__version__ = "0.1.0"
