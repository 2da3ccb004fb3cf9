"""Prometheus metrics: instruments fed by each request's row, and what the other parts report.

The relay process exposes ``GET /metrics``; the brain (tracking's own process)
sends its families on request and the relay serves them beside its own.
"""
