"""``--plot out.png``: the capacity curve drawn, one line per model (matplotlib, optional).

Why optional: matplotlib is a large dependency a proxy never needs; it comes
with the ``plot`` extra (``pip install 'kvern[plot]'``), and without it the
command says so and how to get it instead of failing with an ImportError.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


class PlotUnavailable(RuntimeError):
    """matplotlib is not installed."""


def require_matplotlib() -> None:
    """Raise :class:`PlotUnavailable`, saying how to get it, when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailable(
            "--plot needs matplotlib: pip install 'kvern[plot]' (or pip install matplotlib)"
        ) from None


def plot_curves(report: dict[str, Any], path: Path) -> None:
    """Draw the report's capacity curves into ``path`` (PNG): reuse share against capacity."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")  # no display needed
    import matplotlib.pyplot as plt

    curves = report["capacity"]["models"]
    in_gib = bool(curves) and all(p["gib"] is not None for c in curves for p in c["points"])
    fig, ax = plt.subplots(figsize=(8, 4.5))
    try:
        for c in curves:
            xs = [p["gib"] if in_gib else p["capacity_tokens"] for p in c["points"]]
            ys = [100 * p["reuse_share"] for p in c["points"]]
            ax.plot(xs, ys, marker="o", label=f"{c['model']} (block {c['block_size']})")
        ax.set_xscale("log")
        ax.set_xlabel("KV cache capacity (GiB)" if in_gib else "KV cache capacity (tokens)")
        ax.set_ylabel("prompt tokens reused (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"kvern analyze {Path(report['log']).name}: LRU prefix cache reuse")
        ax.grid(True, which="both", alpha=0.3)
        if curves:
            ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    finally:
        plt.close(fig)
