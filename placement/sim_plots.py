"""PNG plots of a simulator comparison (matplotlib, Agg backend, imported only when plotting)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from lorafleet.placement.simulator import SimResult


def write_plots(results: dict[str, SimResult], out_dir: str | Path, slo_ttft_s: float) -> list[Path]:
    """ttft_cdf.png (TTFT CDF per policy), latency_bars.png (P50/P95/P99 TTFT), p95_ttft_by_rank.png."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, result in results.items():
        values = np.sort(result.ttft_s)
        if values.size:
            ax.plot(values, np.arange(1, values.size + 1) / values.size, label=name)
    ax.axvline(slo_ttft_s, color="grey", linestyle="--", label=f"SLO {slo_ttft_s:g} s")
    ax.set_xscale("log")
    ax.set_xlabel("TTFT (s)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("TTFT CDF per policy")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    paths.append(_save(fig, out / "ttft_cdf.png", plt))

    fig, ax = plt.subplots(figsize=(8, 4.5))
    names = list(results)
    x = np.arange(len(names))
    for offset, key in ((-0.25, "p50_ttft_s"), (0.0, "p95_ttft_s"), (0.25, "p99_ttft_s")):
        ax.bar(x + offset, [results[n].metrics[key] or 0.0 for n in names], width=0.25, label=key.split("_")[0].upper())
    ax.axhline(slo_ttft_s, color="grey", linestyle="--", label="P95 SLO")
    ax.set_xticks(x, names, rotation=20)
    ax.set_yscale("log")
    ax.set_ylabel("TTFT (s)")
    ax.set_title("TTFT percentiles per policy")
    ax.legend()
    paths.append(_save(fig, out / "latency_bars.png", plt))

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, result in results.items():
        by_rank = result.metrics["p95_ttft_s_by_rank"]
        ranks = sorted(by_rank)
        ax.plot(ranks, [by_rank[r] for r in ranks], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("adapter rank")
    ax.set_ylabel("P95 TTFT (s)")
    ax.set_title("P95 TTFT by adapter rank")
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    paths.append(_save(fig, out / "p95_ttft_by_rank.png", plt))
    return paths


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
