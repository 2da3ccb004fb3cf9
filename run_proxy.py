"""Run kvern: ``python run_proxy.py [--config PATH] [--host H] [--port P]``."""

from __future__ import annotations

import argparse
import sys

from kvern.__main__ import add_serve_arguments, serve

if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description="kvern: a transparent caching proxy for LLM servers"
    )
    add_serve_arguments(parser)
    sys.exit(serve(parser.parse_args()))
