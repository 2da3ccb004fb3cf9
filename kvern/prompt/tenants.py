"""Tenant ids: who sent a request, as a keyed hash nobody can reverse or guess.

Why keyed: analytics group requests by tenant, and a plain (even truncated)
sha256 of a ``user`` field such as an e-mail address is guessable by hashing
candidates. An HMAC with a secret only this deployment holds is not; the
same key or user still maps to the same id across requests and restarts, as
long as the secret stays (see :mod:`kvern.analytics.tenant_secret`).
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Any

# Hex digits kept: 64 bits, ample to tell a deployment's tenants apart.
_ID_HEX = 16


class TenantIds:
    """Maps an API key or ``user`` field to a stable, keyed, non-reversible id."""

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("the tenant secret must be at least 16 bytes")
        self._secret = secret

    def _digest(self, kind: str, value: str) -> str:
        # surrogatepass: a lone surrogate hashes too, and distinct values stay distinct.
        message = kind.encode() + b"\0" + value.encode("utf-8", "surrogatepass")
        return hmac.new(self._secret, message, hashlib.sha256).hexdigest()[:_ID_HEX]

    def of(self, authorization: str | None, body: dict[str, Any] | None) -> str | None:
        """The ``user`` field if the body has one, else the bearer key; None when neither."""
        user = body.get("user") if isinstance(body, dict) else None
        if isinstance(user, str) and user:
            return "user:" + self._digest("user", user)
        if authorization:
            key = authorization.removeprefix("Bearer ").strip()
            if key:
                return "key:" + self._digest("key", key)
        return None
