"""``kvern engine --model PATH [--host --port ...]``: serve a model with KV reuse.

Why torch is imported only in :func:`run`: ``kvern --help`` and the proxy's
commands must work on the base install; the engine needs the ``engine``
extra and says so when it is missing.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

_SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """``512M``, ``2g``, ``1.5GiB`` or a byte count, as bytes."""
    value = text.strip().lower().removesuffix("ib").removesuffix("b")
    unit = value[-1:] if value[-1:] in _SIZE_UNITS and value[-1:] != "" else ""
    number = value[: len(value) - len(unit)] if unit else value
    try:
        size = int(float(number) * _SIZE_UNITS[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (say 512M or 2G)") from None
    if size < 0:
        raise argparse.ArgumentTypeError(f"a size must be >= 0, got {text!r}")
    return size


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", required=True, help="a .gguf file or a transformers model folder"
    )
    parser.add_argument("--served-model-name", default=None, help="the id clients send as model")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--block-size", type=int, default=16, help="tokens per stored KV block")
    parser.add_argument(
        "--kv-bits",
        type=int,
        default=16,
        choices=[32, 16, 8, 4],
        help="how stored blocks keep KV: 32 as computed, 16 float16, 8/4 quantized (KIVI)",
    )
    parser.add_argument(
        "--cache-bytes", type=parse_size, default=1 << 30, help="memory budget of the block store"
    )
    parser.add_argument(
        "--eviction", default="cost_aware", help="kvern's eviction policy: cost_aware, lru, lfu"
    )
    parser.add_argument("--disk-dir", type=Path, default=None, help="the disk tier's folder")
    parser.add_argument("--disk-bytes", type=parse_size, default=4 << 30, help="disk tier size")
    parser.add_argument(
        "--no-reuse", action="store_true", help="compute every prompt whole (a baseline)"
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16", "float16"],
        help="compute dtype. bfloat16 halves prefill time on CPUs with AVX-512 but rounds "
        "logits to 1/8 near 20, so reuse and 8-bit storage can flip a greedy near-tie",
    )
    parser.add_argument(
        "--chunk-reuse",
        action="store_true",
        help="also reuse stored blocks found after a different prefix (a document in another "
        "prompt): approximate, measured by bench/engine.py",
    )
    parser.add_argument(
        "--chunk-recompute-tokens", type=int, default=16, help="computed again after each seam"
    )
    parser.add_argument(
        "--device", default="cpu", help="where the model runs: cpu, or cuda (a GPU build of torch)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--cache-dir", type=Path, default=None, help="where GGUFs are converted")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )


def run(args: argparse.Namespace) -> int:
    try:
        import torch  # noqa: F401
        import uvicorn  # noqa: F401

        from kvern.engine.service import EngineService, EngineSettings, default_cache_dir
    except ImportError as exc:
        print(
            f"kvern engine: {exc.name or exc} is missing; install the engine extra: "
            "pip install 'kvern[engine]'",
            file=sys.stderr,
        )
        return 2
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        settings = EngineSettings(
            model=args.model,
            served_name=args.served_model_name,
            block_tokens=args.block_size,
            kv_bits=args.kv_bits,
            cache_bytes=args.cache_bytes,
            policy=args.eviction,
            disk_dir=args.disk_dir,
            disk_bytes=args.disk_bytes,
            reuse=not args.no_reuse,
            threads=args.threads,
            dtype=args.dtype,
            device=args.device,
            chunk_reuse=args.chunk_reuse,
            chunk_recompute_tokens=args.chunk_recompute_tokens,
            cache_dir=args.cache_dir or default_cache_dir(),
        )
        service = EngineService(settings)
    except (ValueError, OSError) as exc:
        print(f"kvern engine: {exc}", file=sys.stderr)
        return 2
    print(
        f"kvern engine: serving {service.name} on http://{args.host}:{args.port}/v1 "
        f"(blocks of {settings.block_tokens} tokens at {settings.kv_bits} bits, "
        f"{settings.cache_bytes >> 20} MiB budget, eviction {settings.policy})",
        file=sys.stderr,
    )
    serve_on_main_thread(service, args.host, args.port, args.log_level)
    return 0


def serve_on_main_thread(service: Any, host: str, port: int, log_level: str) -> None:
    """HTTP on a thread of its own, the model's work on this one, until SIGINT or SIGTERM."""
    import uvicorn

    from kvern.engine.app import create_engine_app

    app = create_engine_app(service, own_service=False)
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))
    http = threading.Thread(target=server.run, name="kvern-engine-http", daemon=True)

    def stop(signum: int, frame: object) -> None:
        server.should_exit = True
        service.scheduler.stop()

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    http.start()
    try:
        service.scheduler.run()
    finally:
        server.should_exit = True
        http.join(timeout=30)
        service.stop()
