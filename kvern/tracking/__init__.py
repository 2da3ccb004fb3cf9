"""Tracking beside each request: predict, insert, record, on one thread of its own.

``tracker`` runs a request's two moments (first byte, end) against its
model's trie; ``queue`` and ``jobs`` are the thread and its backlog;
``forest`` holds each model's trie with its cache model; ``records`` are the
request in flight, its prediction and the analytics row made of them.
"""
