"""Command line: ``python -m kvern serve [--config PATH] [--host H] [--port P]``; ``doctor``.

``analyze LOG`` (:mod:`kvern.analyze`) explains a log of request bodies offline.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from kvern.analyze import cli as analyze_cli
from kvern.config import ConfigError, KvernConfig, load_config
from kvern.config.loading import with_overrides
from kvern.config.urls import redact_url
from kvern.config.watch import ConfigSource
from kvern.doctor import cli as doctor_cli
from kvern.engine import cli as engine_cli


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvern", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="run the proxy")
    add_serve_arguments(serve)
    doctor = sub.add_parser("doctor", help="check a set-up, one line per check (exit 1 on ✗)")
    doctor_cli.add_arguments(doctor)
    analyze = sub.add_parser(
        "analyze", help="why a log of requests missed the cache, offline (no proxy needed)"
    )
    analyze_cli.add_arguments(analyze)
    engine = sub.add_parser(
        "engine", help="serve a model itself, reusing KV across requests (the engine extra)"
    )
    engine_cli.add_arguments(engine)
    return parser


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default=None, help="path to config.yaml (default: ./config.yaml if present)"
    )
    parser.add_argument(
        "--host", default=None, help="listen address (overrides config and KVERN_HOST)"
    )
    parser.add_argument(
        "--port", type=int, default=None, help="listen port (overrides config and KVERN_PORT)"
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )


def config_path(args: argparse.Namespace) -> str | None:
    """``--config``, else ./config.yaml if there is one, else None (the defaults)."""
    if args.config is None and os.path.exists("config.yaml"):
        return "config.yaml"
    return str(args.config) if args.config is not None else None


def load_for_serve(args: argparse.Namespace) -> KvernConfig:
    """Config file, then KVERN_* environment, then command-line flags."""
    config = load_config(config_path(args))
    overrides = {}
    if args.host is not None:
        overrides["host"] = args.host
    if args.port is not None:
        overrides["port"] = args.port
    return with_overrides(
        config, [("proxy", key, value) for key, value in overrides.items()], source="flags"
    )


def is_loopback(host: str) -> bool:
    """Whether ``host`` is reachable from this machine only ("" and 0.0.0.0 are every address)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name that may resolve anywhere


def exposure_warning(config: KvernConfig) -> str | None:
    """The start-up warning for admin pages open to other machines, or None."""
    host = config.proxy.host
    if config.proxy.admin_api_key is not None or is_loopback(host):
        return None
    return (
        f"kvern: WARNING: listening on {host or 'every address'} with no admin key: "
        "/analytics, /trie/visualize (decoded prompt prefixes) and the detailed /health "
        "answer anyone who can reach this port; set proxy.admin_api_key or KVERN_ADMIN_KEY"
    )


def serve(args: argparse.Namespace) -> int:
    try:
        config = load_for_serve(args)
    except ConfigError as exc:
        print(f"kvern: {exc}", file=sys.stderr)
        return 2
    from kvern.app import create_app
    from kvern.serving import serve_app

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    path = config_path(args)
    # Edits of the file are watched for (and SIGHUP): loaded again exactly as now.
    source = ConfigSource(Path(path), lambda: load_for_serve(args)) if path is not None else None
    try:
        app = create_app(config, source=source)
    except ConfigError as exc:  # an optional dependency the config needs is missing
        print(f"kvern: {exc}", file=sys.stderr)
        return 2
    warning = exposure_warning(config)
    if warning is not None:
        logging.getLogger("kvern").warning(warning)
    entries = config.upstream_entries()
    targets = (
        redact_url(entries[0].url)
        if len(entries) == 1
        else f"{len(entries)} upstreams ({config.routing_policy()}): "
        + ", ".join(f"{e.name}={redact_url(e.url)}" for e in entries)
    )
    print(
        f"kvern: proxying http://{config.proxy.host}:{config.proxy.port}/v1 -> {targets}",
        file=sys.stderr,
    )
    serve_app(app, config, args.log_level)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "serve":
        return serve(args)
    if args.command == "doctor":
        return doctor_cli.run(args, doctor_cli.CliHooks(load_for_serve, exposure_warning))
    if args.command == "analyze":
        return analyze_cli.run(args, lambda a: load_config(config_path(a)))
    if args.command == "engine":
        return engine_cli.run(args)
    return 2  # pragma: no cover - argparse enforces the choices


if __name__ == "__main__":
    sys.exit(main())
