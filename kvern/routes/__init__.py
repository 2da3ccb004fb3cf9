"""HTTP: the proxied API (``proxy``, with ``sending`` for failover) and kvern's own endpoints."""
