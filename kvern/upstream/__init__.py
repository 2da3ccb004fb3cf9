"""Where a request goes and what comes back.

``client`` is the HTTP side: the upstream's origin, the headers forwarded both
ways, and the one place httpx errors become kvern's. ``usage`` reads usage,
finish reason and cache figures from a response.
"""
