"""Routing over seeds and cache pressures, one table: ``python bench/routing_grid.py``.

Runs ``bench/routing.py --seed S --pressure X --json ...`` for every cell of
``--seeds`` (7, 11, 23) x ``--pressures`` (0.5, 1.0, 1.5), one cell at a time
(each cell starts its own replicas and routers; running two at once on a
small machine would measure the machine), and prints one row per cell:

- hit rates: kvern's ``cache_aware``, SGLang router's best configuration, and
  the bound (one unlimited cache);
- p99 time to first token: ``cache_aware``, ``least_load``, SGLang, the
  floor no router can go under (each request's own prefill with one
  unlimited cache and nothing queued, see ``routing_trace.ttft_floor_ms``), and the
  ratios the issue's bars are about (cache_aware / least_load <= 0.9,
  cache_aware / SGLang <= 1.0);
- ``checks``: which bars the cell meets (``hit`` >= SGLang's, ``ll`` p99 <=
  0.9 x least_load's, ``sg`` p99 <= SGLang's); a failed one is printed in
  capitals.

The last line, machine-readable, gives the worst cell of each figure:
``routing_grid cells=N min_hit_margin_over_sglang=.. max_p99_ratio_over_least_load=..
max_p99_ratio_over_sglang=.. hit_ratio_over_sglang_at_max_pressure=..
p99_ratio_over_sglang_at_max_pressure=.. all_bars_met=0|1``.

``--repeats R`` runs every cell R times and reports each figure's median
over the runs (a ratio: the median of the runs' own ratios, each measured
side by side in one run), since one run's p99 -- its 12th slowest request
-- moves by tens of milliseconds on a busy two-core machine.
``--routing KEY=VALUE`` passes a routing.* setting to every kvern contender.

Every cell's full output stays in ``--logs`` (default: a temporary folder,
printed) for the per-contender tables and kvern's routing reasons.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CONTENDERS = "kvern_round_robin,kvern_least_load,kvern_cache_aware,sglang_sglang"


@dataclass(frozen=True, slots=True)
class Cell:
    seed: int
    pressure: float
    hit_ca: float
    hit_sg: float
    hit_bound: float
    p99_ca: float
    p99_ll: float
    p99_sg: float
    prefill_ratio_rr: float
    failed: int
    p99_over_ll: float
    p99_over_sg: float
    p99_floor: float = math.nan  # no router's p99 can be lower (bench/routing.py)
    runs: int = 1

    def checks(self) -> dict[str, bool]:
        return {
            "hit": self.hit_ca >= self.hit_sg,
            "ll": self.p99_over_ll <= 0.9,
            "sg": self.p99_over_sg <= 1.0,
        }


def cell_of(seed: int, pressure: float, payload: dict[str, Any]) -> Cell:
    rows = {r["name"]: r for r in payload["rows"] if not r.get("error")}
    best = payload.get("sglang_row", "none")

    def get(name: str, attr: str) -> float:
        row = rows.get(name)
        return float(row[attr]) if row is not None else math.nan

    bound = payload["bound"]
    p99_ca, p99_ll, p99_sg = (
        get(n, "ttft_p99_ms") for n in ("kvern_cache_aware", "kvern_least_load", best)
    )
    return Cell(
        seed=seed,
        pressure=pressure,
        hit_ca=get("kvern_cache_aware", "hit_rate"),
        hit_sg=get(best, "hit_rate"),
        hit_bound=1 - bound["prefill_tokens"] / bound["prompt_tokens"],
        p99_ca=p99_ca,
        p99_ll=p99_ll,
        p99_sg=p99_sg,
        prefill_ratio_rr=payload["summary"]["prefill_ratio_rr_over_cache_aware"],
        failed=sum(int(r.get("failed", 0)) for r in rows.values()),
        p99_over_ll=p99_ca / p99_ll if p99_ll else math.nan,
        p99_over_sg=p99_ca / p99_sg if p99_sg else math.nan,
        p99_floor=float(payload.get("ttft_floor_p99_ms", math.nan)),
    )


def median_cell(runs: list[Cell]) -> Cell:
    """One cell from several runs of it: every figure's median, failures summed."""

    def mid(attr: str) -> float:
        values = [getattr(c, attr) for c in runs]
        return statistics.median(values) if not any(math.isnan(v) for v in values) else math.nan

    first = runs[0]
    figures = {
        f.name: mid(f.name)
        for f in fields(Cell)
        if f.name not in ("seed", "pressure", "failed", "runs")
    }
    return Cell(
        seed=first.seed,
        pressure=first.pressure,
        failed=sum(c.failed for c in runs),
        runs=len(runs),
        **figures,
    )


def run_cell(
    seed: int, pressure: float, args: argparse.Namespace, logs: Path, run: int = 0
) -> Cell | None:
    # No dot in the stem: with_suffix would eat "0.5"'s ".5".
    stem = f"seed{seed}-pressure{pressure:g}" + (f"-run{run}" if run else "")
    out = logs / stem.replace(".", "_")
    cmd = [
        sys.executable, str(ROOT / "bench" / "routing.py"),
        "--seed", str(seed), "--pressure", str(pressure),
        "--contenders", args.contenders, "--json", str(out.with_suffix(".json")),
    ] + (["--quick"] if args.quick else [])  # fmt: skip
    for setting in args.routing:
        cmd += ["--routing", setting]
    t = time.perf_counter()
    with out.with_suffix(".log").open("w", encoding="utf-8") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)
    took = time.perf_counter() - t
    if proc.returncode != 0:
        print(f"  seed {seed} pressure {pressure:g}: exit {proc.returncode}, see {out}.log")
        return None
    cell = cell_of(seed, pressure, json.loads(out.with_suffix(".json").read_text("utf-8")))
    print(
        f"  seed {seed} pressure {pressure:g}{f' run {run}' if run else ''}: {took:.0f} s, "
        f"hit {cell.hit_ca:.1%}, p99 {cell.p99_ca:.0f} ms",
        flush=True,
    )
    return cell


def print_grid(cells: list[Cell]) -> None:
    head = (
        f"{'runs':>4}{'seed':>5}{'press':>6}{'hit ca':>8}{'hit sg':>8}{'bound':>8}{'p99 ca':>8}"
        f"{'p99 ll':>8}{'p99 sg':>8}{'floor':>7}{'ca/ll':>7}{'ca/sg':>7}{'rr/ca pf':>9}"
        f"{'fail':>5}  checks"
    )
    print(head)
    print("-" * len(head))
    for c in cells:
        marks = " ".join(k if ok else k.upper() + "!" for k, ok in c.checks().items())
        print(
            f"{c.runs:>4}{c.seed:>5}{c.pressure:>6g}"
            f"{c.hit_ca:>8.1%}{c.hit_sg:>8.1%}{c.hit_bound:>8.1%}"
            f"{c.p99_ca:>8.0f}{c.p99_ll:>8.0f}{c.p99_sg:>8.0f}{c.p99_floor:>7.0f}"
            f"{c.p99_over_ll:>7.2f}{c.p99_over_sg:>7.2f}{c.prefill_ratio_rr:>9.2f}"
            f"{c.failed:>5}  {marks}"
        )


def summary(cells: list[Cell], expected: int) -> str:
    top = max((c.pressure for c in cells), default=math.nan)
    at_top = [c for c in cells if c.pressure == top]
    figures = {
        "cells": float(len(cells)),
        "min_hit_margin_over_sglang": min((c.hit_ca - c.hit_sg for c in cells), default=math.nan),
        "max_p99_ratio_over_least_load": max((c.p99_over_ll for c in cells), default=math.nan),
        "max_p99_ratio_over_sglang": max((c.p99_over_sg for c in cells), default=math.nan),
        "hit_ratio_over_sglang_at_max_pressure": min(
            (c.hit_ca / c.hit_sg for c in at_top), default=math.nan
        ),
        "p99_ratio_over_sglang_at_max_pressure": max(
            (c.p99_over_sg for c in at_top), default=math.nan
        ),
    }
    met = len(cells) == expected and all(all(c.checks().values()) for c in cells)
    parts = [f"cells={len(cells)}"] + [f"{k}={v:.4f}" for k, v in figures.items() if k != "cells"]
    return "routing_grid " + " ".join(parts) + f" all_bars_met={int(met)}"


def parse_floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seeds", default="7,11,23")
    parser.add_argument("--pressures", default="0.5,1.0,1.5")
    parser.add_argument("--contenders", default=CONTENDERS)
    parser.add_argument("--quick", action="store_true", help="each cell on the short trace")
    parser.add_argument("--logs", type=Path, help="keep every cell's output and JSON here")
    parser.add_argument("--json", type=Path, help="write every cell's figures here")
    parser.add_argument("--repeats", type=int, default=1, help="runs per cell (medians)")
    parser.add_argument(
        "--routing", action="append", default=[], metavar="KEY=VALUE", help="see bench/routing.py"
    )
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",") if s]
    pressures = parse_floats(args.pressures)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kvern-grid-") as tmp:
        logs = args.logs or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        print(f"cells: seeds {seeds} x pressures {pressures}; logs in {logs}", flush=True)
        cells = []
        for pressure in pressures:
            for seed in seeds:
                runs = [
                    cell
                    for k in range(max(1, args.repeats))
                    if (cell := run_cell(seed, pressure, args, logs, k)) is not None
                ]
                if runs:
                    cells.append(median_cell(runs))
    print()
    print_grid(cells)
    if args.json:
        args.json.write_text(json.dumps([asdict(c) for c in cells], indent=2), "utf-8")
    print(f"total {time.perf_counter() - started:.0f} s")
    print(summary(cells, len(seeds) * len(pressures)))


if __name__ == "__main__":
    main()
