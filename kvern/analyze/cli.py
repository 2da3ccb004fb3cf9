"""``kvern analyze LOG``: its arguments, and the run from the log to the report and exit status.

Why the config loader is handed in: it is ``kvern serve``'s own lookup
(``--config``, else ./config.yaml when there is one), which lives in
``kvern.__main__``; that module imports this one to dispatch, so this one
cannot import it back.

Exit status: 0 with a report; 1 when no line of the log was a request; 2
when the configuration, the rules file, the tokenizer or the log cannot be
used (the message says which and why, as ``kvern serve`` words it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from kvern.cli_logs import kvern_logs
from kvern.config import ConfigError, KvernConfig

LoadConfig = Callable[[argparse.Namespace], KvernConfig]

EXIT_OK = 0
EXIT_NO_REQUESTS = 1
EXIT_BAD_INPUT = 2


def _positive(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {number}")
    return number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "log",
        type=Path,
        help="JSONL of request bodies: OpenAI Batch input lines, kvern's capture, or bare bodies",
    )
    parser.add_argument(
        "--config", default=None, help="path to config.yaml (default: ./config.yaml if present)"
    )
    parser.add_argument(
        "--model",
        default=None,
        help="analyse every line as this model (its tokenizer, block size and rules from the "
        "config); default: each line's body.model",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="every model's tokenizer: a directory with tokenizer.json, a .gguf file, or a hub id",
    )
    parser.add_argument(
        "--block-size", type=_positive, default=None, help="the backend's KV block (tokens)"
    )
    parser.add_argument(
        "--rules",
        type=Path,
        default=None,
        help="normalization rules to analyse with instead of the config's: config.yaml's "
        "normalization mapping, or a list of rules for every model",
    )
    parser.add_argument(
        "--tenant-key",
        default=None,
        help="where a line's tenant is in its body when kvern did not capture it (e.g. user, "
        "metadata.tenant); default: '-'",
    )
    parser.add_argument("--top", type=_positive, default=10, help="divergence sites shown (10)")
    parser.add_argument(
        "--capacity-tokens",
        type=_positive,
        default=None,
        help="model the backend's cache as an LRU of this many tokens per model: what it "
        "dropped is 'evicted' (default: it keeps everything)",
    )
    kv = parser.add_mutually_exclusive_group()
    kv.add_argument(
        "--kv-bytes-per-token",
        type=_positive,
        default=None,
        help="KV cache bytes per token, for the capacity curve's GiB",
    )
    kv.add_argument(
        "--model-config",
        type=Path,
        default=None,
        help="the model's HuggingFace config.json (or its folder): the KV bytes per token from it",
    )
    parser.add_argument("--plot", type=Path, default=None, help="draw the capacity curve (PNG)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument(
        "--no-what-if",
        action="store_true",
        help="skip replaying the log with each suggested rule (one pass instead of several)",
    )
    parser.add_argument(
        "--progress",
        action="store_true",
        help="a progress bar on stderr even when it is not a terminal",
    )
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="show kvern's own log lines on stderr"
    )


def run(
    args: argparse.Namespace,
    load: LoadConfig,
    *,
    out: TextIO | None = None,
    err: TextIO | None = None,
) -> int:
    """Analyse ``args.log``; print the report; return the exit status."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        config = load(args)
    except ConfigError as exc:
        print(f"kvern: {exc}", file=err)
        return EXIT_BAD_INPUT
    # Imported once the config loaded: --help and config errors stay fast.
    from kvern.analyze.analysis import analyze
    from kvern.analyze.log import LogFile
    from kvern.analyze.plot import PlotUnavailable, plot_curves, require_matplotlib
    from kvern.analyze.progress import Progress
    from kvern.analyze.report import build
    from kvern.analyze.setup import Options, Setup, TokenizerFailed, load_rules
    from kvern.analyze.text import render
    from kvern.diagnosis.kv_size import kv_bytes_per_token

    try:
        rules = load_rules(args.rules) if args.rules is not None else None
        kv = args.kv_bytes_per_token
        if args.model_config is not None:
            kv = kv_bytes_per_token(args.model_config)
        log = LogFile(args.log, tenant_key=args.tenant_key)
        if args.plot is not None:
            require_matplotlib()
    except ConfigError as exc:
        print(f"kvern: {exc}", file=err)
        return EXIT_BAD_INPUT
    except (OSError, ValueError, KeyError, PlotUnavailable) as exc:
        print(f"kvern analyze: {exc}", file=err)
        return EXIT_BAD_INPUT
    options = Options(
        model=args.model,
        tokenizer=args.tokenizer,
        block_size=args.block_size,
        rules=rules,
        capacity_tokens=args.capacity_tokens,
        kv_bytes_per_token=kv,
        top=args.top,
    )
    progress = Progress(err, log.size_bytes, enabled=args.progress or err.isatty())
    with kvern_logs(args.verbose, err):
        try:
            analysis = analyze(
                log, Setup(config, options), on_pass=progress.phase, what_if=not args.no_what_if
            )
        except TokenizerFailed as exc:
            progress.finish()
            print(f"kvern analyze: {exc}", file=err)
            return EXIT_BAD_INPUT
        finally:
            progress.finish()
    report = build(analysis)
    for model in report["models"]:
        if model["tokenizer"]["kind"] != "exact":
            print(
                f"kvern analyze: WARNING: {model['model']} was tokenized approximately "
                f"({model['tokenizer']['error']}): its figures are estimates; give --tokenizer "
                "or a tokenizers.models entry",
                file=err,
            )
    if args.json:
        json.dump(report, out, indent=1, ensure_ascii=False)
        out.write("\n")
    else:
        out.write(render(report))
    if args.plot is not None:
        plot_curves(report, args.plot)
    out.flush()
    return EXIT_OK if report["requests"] else EXIT_NO_REQUESTS
