"""Models of backends' own KV caches: what each backend will really reuse.

kvern's trie knows every prompt it has seen; a backend knows only what it
still holds, in its own granularity. A model here turns "the longest prefix
kvern has seen" into "the cached tokens this backend will report", so
predictions can be checked against the backend's figures (see
``/analytics`` calibration).
"""
