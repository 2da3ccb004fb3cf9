"""Where the tenant-id secret comes from: the configuration, or a file beside the db.

Why beside the db: the ids in the db are only useful while the secret that
made them stays the same, so the secret lives and is backed up with the db.
It is generated once (32 random bytes, written with mode 0600 and renamed
into place so two starting processes cannot both win with different
secrets), then read on every start. With analytics off nothing persists, and
a per-process secret is enough.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
from pathlib import Path

from kvern.config import AnalyticsConfig

logger = logging.getLogger(__name__)

SUFFIX = ".tenant-secret"


def secret_path(db_path: str) -> Path:
    """The file holding the secret of the db at ``db_path``."""
    return Path(db_path + SUFFIX)


def tenant_secret(config: AnalyticsConfig) -> bytes:
    """The configured secret, else the one kept beside the db (created on first use)."""
    if config.tenant_secret:
        return config.tenant_secret.encode("utf-8")
    if not config.enabled or config.db_path == ":memory:":
        return secrets.token_bytes(32)
    path = secret_path(config.db_path)
    try:
        return _read(path)
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
        try:
            os.link(tmp, path)  # fails if another process created it first: theirs wins
            logger.info("created the tenant-id secret %s", path)
        except FileExistsError:
            pass
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return _read(path)


def _read(path: Path) -> bytes:
    text = path.read_text(encoding="utf-8").strip()
    if len(text) < 16:
        raise ValueError(f"{path}: the tenant secret is shorter than 16 characters")
    return text.encode("utf-8")
