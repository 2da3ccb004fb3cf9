"""Doctor: does the configuration load, and where did each setting come from?

Why first and apart: every other check reads the configuration, and an
invalid one stops ``kvern serve`` with exit 2 -- so the doctor loads it the
way ``kvern serve`` does (the same loader, handed in by the CLI: the file,
then ``KVERN_*``, then ``--host``/``--port``) and, when it does not load,
names each offending key path on a line of its own and exits 2 too.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping

from pydantic import ValidationError

from kvern.config import ConfigError, KvernConfig
from kvern.config.loading import (
    ENV_ADMIN_KEY,
    ENV_HOST,
    ENV_PORT,
    ENV_TENANT_SECRET,
    ENV_UPSTREAM_URL,
)
from kvern.doctor.report import Check, fail, ok, warn

LoadConfig = Callable[[argparse.Namespace], KvernConfig]

# Which setting each KVERN_* variable replaces (the values of secrets are never shown).
_OVERRIDES = {
    ENV_UPSTREAM_URL: "upstream.base_url",
    ENV_HOST: "proxy.host",
    ENV_PORT: "proxy.port",
    ENV_ADMIN_KEY: "proxy.admin_api_key",
    ENV_TENANT_SECRET: "analytics.tenant_secret",
}


def config_path(args: argparse.Namespace) -> str | None:
    """The file ``kvern serve`` would read: ``--config``, else ./config.yaml if present."""
    if args.config is not None:
        return str(args.config)
    return "config.yaml" if os.path.exists("config.yaml") else None


def error_checks(subject: str, message: str, path: str | None) -> list[Check]:
    """A :class:`ConfigError`'s message as one ✗ line per offending key path.

    Its first line names the source ("config.yaml: invalid configuration");
    each indented line after it is ``key.path: got ...; expected ...``.
    """
    head, *details = message.splitlines()
    where = f"correct it in {path}" if path else "correct the setting"
    fix = f"{where}; kvern serve refuses to start until it is"
    if not details:
        return [fail(subject, head, fix)]
    return [fail(subject, line.strip(), fix) for line in details if line.strip()]


def _validation_message(exc: ValidationError) -> str:
    lines = ["command-line overrides: invalid configuration"]
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"])
        lines.append(f"  {key}: got {err['input']!r}; expected: {err['msg']}")
    return "\n".join(lines)


def check_config(
    args: argparse.Namespace, load: LoadConfig, env: Mapping[str, str] | None = None
) -> tuple[KvernConfig | None, list[Check]]:
    """The configuration ``kvern serve`` would run with (None: it does not load), and why."""
    environ = os.environ if env is None else env
    path = config_path(args)
    subject = f"config {path}" if path else "config"
    try:
        config = load(args)
    except ConfigError as exc:
        return None, error_checks(subject, str(exc), path)
    except ValidationError as exc:  # --host/--port applied after the file
        return None, error_checks(subject, _validation_message(exc), None)
    overridden = [f"{name} sets {key}" for name, key in _OVERRIDES.items() if environ.get(name)]
    flags = [
        f"--{flag} sets proxy.{flag}"
        for flag in ("host", "port")
        if getattr(args, flag, None) is not None
    ]
    said = "; ".join(overridden + flags)
    if path is None:
        check = warn(
            subject,
            "no --config given and no ./config.yaml: checking kvern's defaults"
            + (f" ({said})" if said else ""),
            "pass --config PATH (the file kvern serve will read)",
        )
        return config, [check]
    return config, [ok(subject, "valid" + (f"; {said}" if said else ""))]
