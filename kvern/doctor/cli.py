"""``kvern doctor [--config PATH]``: its arguments, and the run from configuration to exit status.

Why the loader and the exposure warning are handed in (:class:`CliHooks`):
they are ``kvern serve``'s own (``kvern.__main__``), and the doctor must judge
the set-up ``kvern serve`` would run -- same file lookup, same ``KVERN_*`` and
``--host``/``--port`` overrides, same warning -- but ``kvern.__main__``
imports this package to dispatch to it, so this package cannot import it back.

Exit status: 0 when every check is ✓ or ! (``--strict``: ✓ only), 1 on any ✗,
2 when the configuration does not load (as ``kvern serve``). The checks that
need no configuration beyond a valid one run in :mod:`kvern.doctor.diagnose`,
imported only once the configuration loaded, so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from dataclasses import dataclass
from typing import TextIO

from kvern.cli_logs import kvern_logs
from kvern.doctor.config_checks import LoadConfig, check_config
from kvern.doctor.local_checks import ExposureWarning
from kvern.doctor.report import EXIT_BAD_CONFIG, Progress, Report

DEFAULT_TIMEOUT_S = 60.0


@dataclass(frozen=True, slots=True)
class CliHooks:
    """What ``kvern serve`` decides, as ``kvern.__main__`` passes it in."""

    load: LoadConfig  # the configuration kvern serve would run with, from the parsed arguments
    exposure_warning: ExposureWarning  # its start-up warning about open admin pages, or None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default=None, help="path to config.yaml (default: ./config.yaml if present)"
    )
    parser.add_argument("--host", default=None, help="check this listen address instead")
    parser.add_argument("--port", type=int, default=None, help="check this listen port instead")
    parser.add_argument(
        "--no-requests",
        action="store_true",
        help="send no inference requests (skips the cached-token check: two 1-token chats)",
    )
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 on warnings (!) too, not only failures"
    )
    parser.add_argument(
        "--timeout-s",
        type=float,
        default=DEFAULT_TIMEOUT_S,
        help=f"longest wait for one answer of an upstream (default {DEFAULT_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help="bearer key for upstreams that need one (kvern itself forwards clients' keys)",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show kvern's own log lines on stderr"
    )


def run(
    args: argparse.Namespace,
    hooks: CliHooks,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Check the set-up ``kvern serve`` would run with ``args``; print; return the exit status."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    report = Report(out)
    config, checks = check_config(args, hooks.load)
    report.extend(checks)
    if config is None:
        print(report.summary(), file=out)
        return EXIT_BAD_CONFIG
    from kvern.doctor.diagnose import Options, diagnose

    options = Options(
        send_requests=not args.no_requests, timeout_s=args.timeout_s, api_key=args.api_key
    )
    with kvern_logs(args.verbose, err):
        asyncio.run(diagnose(config, report, Progress(err), hooks.exposure_warning, options))
    print(report.summary(), file=out, flush=True)
    return report.exit_code(strict=args.strict)
