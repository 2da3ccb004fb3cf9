"""Doctor: this machine -- the analytics db, the disk under it, the port, the admin key.

Why real attempts rather than ``os.access``: kvern usually runs as root in a
container, and ``os.access`` (like a mode of 0500) says yes to root about a
read-only file system or a path through a regular file, where the store
fails at start-up all the same. So the db check creates (and removes) a file
in the db's folder and takes SQLite's write lock on an existing db
(``BEGIN IMMEDIATE``, rolled back): what the store's writer will need. The
port check binds the address as uvicorn will (``SO_REUSEADDR``), then lets
it go. Nothing is left behind, and an existing db is never changed.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import sqlite3
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

from kvern.analytics.schema import SCHEMA_VERSION
from kvern.analytics.tenant_secret import secret_path
from kvern.config import AnalyticsConfig, KvernConfig
from kvern.doctor.report import Check, fail, ok, warn

# Free space below which the store will soon fail (✗), or should be watched (!).
MIN_FREE_BYTES = 64 * 2**20
LOW_FREE_BYTES = 2**30

ExposureWarning = Callable[[KvernConfig], str | None]

_DB = "analytics db"


def _gib(num_bytes: int) -> str:
    return f"{num_bytes / 2**30:.1f} GiB"


def _why(exc: OSError) -> str:
    return f"{type(exc).__name__}: {exc.strerror or exc}"


def _probe_folder(folder: Path) -> OSError | None:
    """Create and remove a file in ``folder`` (what SQLite's -wal/-shm files need)."""
    try:
        fd, name = tempfile.mkstemp(prefix=".kvern-doctor-", dir=folder)
    except OSError as exc:
        return exc
    os.close(fd)
    os.unlink(name)
    return None


def _probe_db(path: Path) -> tuple[str | None, int | None]:
    """(why it cannot be written, or None; its schema version) of an existing SQLite file."""
    uri = f"file:{quote(str(path))}?mode=rw"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=2.0, isolation_level=None)
    except sqlite3.Error as exc:
        return f"cannot open it: {exc}", None
    try:
        version = int(conn.execute("PRAGMA user_version").fetchone()[0])
        conn.execute("BEGIN IMMEDIATE")  # the writer's lock: fails on a read-only file
        conn.execute("ROLLBACK")
    except sqlite3.Error as exc:
        return f"{type(exc).__name__}: {exc}", None
    finally:
        conn.close()
    return None, version


def check_analytics(config: AnalyticsConfig) -> list[Check]:
    """Can the store open, write and grow its db, and is the tenant secret beside it sound?"""
    if not config.enabled:
        return [ok(_DB, "analytics disabled (analytics.enabled: false); nothing is recorded")]
    if config.db_path == ":memory:":
        return [ok(_DB, ":memory: (rows are lost when kvern stops)")]
    path = Path(config.db_path).expanduser().absolute()
    folder = path.parent
    fix_path = "point analytics.db_path at a writable folder"
    if not folder.exists():
        return [fail(_DB, f"{path}: its folder {folder} does not exist", f"mkdir -p {folder}")]
    if not folder.is_dir():
        return [fail(_DB, f"{path}: {folder} is not a folder", fix_path)]
    refused = _probe_folder(folder)
    if refused is not None:
        return [
            fail(
                _DB,
                f"{path}: cannot create files in {folder} ({_why(refused)}); the store, its "
                "-wal and -shm files and the tenant secret all live there",
                fix_path,
            )
        ]
    checks: list[Check] = []
    if path.exists():
        why, version = _probe_db(path)
        if why is not None:
            return [fail(_DB, f"{path}: not writable ({why})", f"make it writable, or {fix_path}")]
        assert version is not None
        if version > SCHEMA_VERSION:
            return [
                fail(
                    _DB,
                    f"{path}: schema version {version}, newer than this kvern's {SCHEMA_VERSION}",
                    "upgrade kvern, or point analytics.db_path at another file",
                )
            ]
        state = (
            f"writable, schema v{version}"
            if version == SCHEMA_VERSION
            else f"writable, schema v{version} (kvern migrates it to v{SCHEMA_VERSION} at start)"
        )
        checks.append(ok(_DB, f"{path}: {state}"))
    else:
        checks.append(ok(_DB, f"{path}: does not exist yet; kvern creates it ({folder} writable)"))
    checks.append(check_disk(folder))
    checks.extend(check_tenant_secret(config, path))
    return checks


def check_disk(folder: Path) -> Check:
    subject = "disk"
    usage = shutil.disk_usage(folder)
    said = f"{_gib(usage.free)} free of {_gib(usage.total)} under {folder}"
    if usage.free < MIN_FREE_BYTES:
        return fail(subject, said, "free space there, or move analytics.db_path")
    if usage.free < LOW_FREE_BYTES:
        return warn(
            subject, said, "free space there, or lower analytics.retention_days (rows per day)"
        )
    return ok(subject, said)


def check_tenant_secret(config: AnalyticsConfig, db: Path) -> list[Check]:
    """The key of tenant ids: set, or a file beside the db that must outlive it."""
    subject = "tenant secret"
    if config.tenant_secret:
        return [ok(subject, "set in the configuration (analytics.tenant_secret)")]
    path = secret_path(str(db))
    if not path.exists():
        if db.exists():
            return [
                warn(
                    subject,
                    f"{path} is missing beside an existing db: kvern makes a new one, and "
                    "tenant ids in the db stop matching new ones",
                    "restore the file from the db's backup, or set analytics.tenant_secret",
                )
            ]
        return [ok(subject, f"{path}: kvern creates it at first start (back it up with the db)")]
    try:
        text = path.read_text(encoding="utf-8").strip()
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError as exc:
        return [fail(subject, f"{path}: cannot read it ({_why(exc)})", "make it readable")]
    if len(text) < 16:
        return [
            fail(
                subject,
                f"{path}: shorter than 16 characters",
                "restore it from the db's backup",
            )
        ]
    if mode & 0o077:
        return [warn(subject, f"{path}: readable by others (mode {mode:04o})", f"chmod 600 {path}")]
    return [ok(subject, f"{path}: present, mode {mode:04o}")]


def check_port(host: str, port: int) -> Check:
    """Can kvern bind ``host:port``? (as uvicorn does: SO_REUSEADDR, then listen)."""
    shown = f"{host or '0.0.0.0'}:{port}"
    subject = f"port {shown}"
    try:
        infos = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        return fail(
            subject,
            f"cannot resolve {host!r} ({exc})",
            "set proxy.host (or --host) to an address of this machine",
        )
    family, kind, proto, _, address = infos[0]
    try:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(address)
            sock.listen(1)
    except OSError as exc:
        if exc.errno == errno.EADDRINUSE:
            return fail(
                subject,
                "in use: something already listens there (another kvern?)",
                f"stop it (ss -ltnp 'sport = :{port}' names it) or set proxy.port / --port",
            )
        if exc.errno == errno.EADDRNOTAVAIL:
            return fail(
                subject,
                f"{host} is not an address of this machine",
                "set proxy.host to one of its addresses (127.0.0.1; 0.0.0.0 for all)",
            )
        if exc.errno == errno.EACCES:
            return fail(subject, f"not allowed to bind it ({_why(exc)})", "use a port above 1023")
        return fail(subject, f"cannot bind it ({_why(exc)})", "set proxy.host / proxy.port")
    return ok(subject, "free")


def check_exposure(config: KvernConfig, exposure_warning: ExposureWarning) -> Check:
    """Admin pages (decoded prompt prefixes) open to other machines without a key?"""
    subject = "admin key"
    if config.proxy.admin_api_key is not None:
        return ok(subject, "set: /analytics, /trie/visualize and the detailed /health need it")
    warning = exposure_warning(config)
    if warning is None:
        return ok(subject, f"not set, and not needed: kvern listens on {config.proxy.host} only")
    text = warning.removeprefix("kvern: ").removeprefix("WARNING: ")
    found, sep, advice = text.partition("; set ")
    fix = f"set {advice}" if sep else "set proxy.admin_api_key or KVERN_ADMIN_KEY"
    return warn(subject, found, fix)


def check_local(config: KvernConfig, exposure_warning: ExposureWarning) -> list[Check]:
    """Every check of this machine, in the order the report shows them."""
    return [
        *check_analytics(config.analytics),
        check_port(config.proxy.host, config.proxy.port),
        check_exposure(config, exposure_warning),
    ]
