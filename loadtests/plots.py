"""PNG plots (matplotlib Agg) of a load test: TTFT CDF, TTFT/throughput/errors over time; of a rate sweep."""

from __future__ import annotations

from pathlib import Path

import numpy as np

PLOT_FILES = ("ttft_cdf.png", "ttft_over_time.png", "throughput.png", "error_rate.png")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def _bins(records: list[dict], duration_s: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Start times relative to the first request, bin index per record, bin width (about 20 bins, >= 1 s)."""
    t = np.asarray([r["t"] for r in records], dtype=np.float64)
    t = t - t.min() if t.size else t
    width = max(1.0, round(max(duration_s, float(t.max()) if t.size else 1.0) / 20.0))
    return t, (t // width).astype(np.int64), width


def _cdf(ax, values: list[float], label: str) -> None:
    if values:
        x = np.sort(np.asarray(values)) * 1000.0
        ax.step(x, np.arange(1, x.size + 1) / x.size, where="post", label=f"{label} (n={x.size})")


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    _pyplot().close(fig)
    return path


def plot_ttft_cdf(series: dict[str, list[dict]], path: Path, title: str) -> Path:
    """One CDF line per (series, rank class); `series` maps a run name ('' for one run) to its records."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for run, records in series.items():
        ok = [r for r in records if r["ok"] and r["ttft_s"] is not None]
        for klass in sorted({r["rank_class"] for r in ok}):
            _cdf(ax, [r["ttft_s"] for r in ok if r["rank_class"] == klass], f"{run} {klass}".strip())
    ax.set(xlabel="TTFT (ms)", ylabel="fraction of requests", title=title, ylim=(0, 1.02))
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    return _save(fig, path)


def plot_over_time(records: list[dict], duration_s: float, out_dir: Path) -> list[Path]:
    """ttft_over_time.png (P50/P95 per bin), throughput.png (req/s, output tok/s), error_rate.png."""
    plt = _pyplot()
    t, index, width = _bins(records, duration_s)
    num_bins = int(index.max()) + 1 if index.size else 1
    x = (np.arange(num_bins) + 0.5) * width
    ok = np.asarray([r["ok"] for r in records], dtype=bool)
    ttft = np.asarray([r["ttft_s"] if r["ttft_s"] is not None else np.nan for r in records], dtype=np.float64)
    tokens = np.asarray([r["completion_tokens"] if r["ok"] else 0 for r in records], dtype=np.float64)
    p50, p95 = np.full(num_bins, np.nan), np.full(num_bins, np.nan)
    for b in range(num_bins):
        values = ttft[(index == b) & ok & ~np.isnan(ttft)]
        if values.size:
            p50[b], p95[b] = np.percentile(values, [50, 95]) * 1000.0
    counts = np.bincount(index, minlength=num_bins).astype(np.float64)
    errors = np.bincount(index, weights=(~ok).astype(np.float64), minlength=num_bins)

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(x, p50, marker="o", label="P50")
    ax.plot(x, p95, marker="o", label="P95")
    ax.set(xlabel="request start (s)", ylabel="TTFT (ms)", title=f"TTFT over time ({width:.0f} s bins)")
    ax.grid(alpha=0.3)
    ax.legend()
    paths = [_save(fig, out_dir / "ttft_over_time.png")]

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(x, counts / width, marker="o", color="tab:blue", label="requests/s (by start)")
    ax.set(xlabel="request start (s)", ylabel="requests/s", title="Throughput over time")
    ax2 = ax.twinx()
    ax2.plot(x, np.bincount(index, weights=tokens, minlength=num_bins) / width, marker="s", color="tab:orange",
             label="output tokens/s")
    ax2.set_ylabel("output tokens/s")
    ax.grid(alpha=0.3)
    fig.legend(loc="lower left", bbox_to_anchor=(0.1, 0.15), fontsize=8)
    paths.append(_save(fig, out_dir / "throughput.png"))

    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    rate = np.divide(errors, counts, out=np.zeros(num_bins), where=counts > 0) * 100.0
    ax.bar(x, rate, width=width * 0.8, color="tab:red")
    ax.set(xlabel="request start (s)", ylabel="errors (% of requests)", ylim=(0, max(5.0, rate.max() * 1.2)),
           title=f"Error rate ({int(errors.sum())} of {int(counts.sum())} requests)")
    ax.grid(alpha=0.3)
    paths.append(_save(fig, out_dir / "error_rate.png"))
    return paths


def plot_run(records: list[dict], duration_s: float, out_dir: Path, title: str) -> list[Path]:
    """Every plot of one run into out_dir (names in PLOT_FILES)."""
    return [plot_ttft_cdf({"": records}, out_dir / "ttft_cdf.png", title),
            *plot_over_time(records, duration_s, out_dir)]


def plot_sweep(rows: list[dict], slo_ttft_p95_s: float, path: Path, title: str) -> Path:
    """sweep.png: TTFT P50/P95 vs offered rate with the SLO line (failing rates marked) | achieved vs offered."""
    plt = _pyplot()
    offered = np.asarray([row["offered_rps"] for row in rows], dtype=np.float64)
    p95 = np.asarray([np.nan if row["ttft_p95_s"] is None else row["ttft_p95_s"] * 1000.0 for row in rows])
    p50 = np.asarray([np.nan if row["ttft_p50_s"] is None else row["ttft_p50_s"] * 1000.0 for row in rows])
    failed = np.asarray([not row["is_pass"] for row in rows], dtype=bool)
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10.0, 4.0))
    ax.plot(offered, p50, marker="o", label="TTFT P50")
    ax.plot(offered, p95, marker="o", label="TTFT P95")
    if failed.any():
        ax.scatter(offered[failed], p95[failed], s=120, facecolors="none", edgecolors="tab:red", label="SLO failed")
    ax.axhline(slo_ttft_p95_s * 1000.0, color="tab:red", linestyle="--", label=f"SLO {slo_ttft_p95_s:g} s")
    ax.set(xlabel="offered rate (requests/s)", ylabel="TTFT (ms)", title="TTFT vs offered rate")
    if np.nanmax(np.append(p95, 0.0)) > 20 * slo_ttft_p95_s * 1000.0:
        ax.set_yscale("log")  # overload tails dwarf the SLO line on a linear axis
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    achieved = [row["achieved_rps"] for row in rows]
    top = max([*offered.tolist(), *achieved, *(row["sent_rps"] for row in rows), 1.0]) * 1.1
    ax2.plot([0, top], [0, top], color="grey", linestyle=":", label="achieved = offered")
    ax2.plot(offered, [row["sent_rps"] for row in rows], marker="x", linestyle="--", label="sent (Poisson plan)")
    ax2.plot(offered, achieved, marker="o", label="achieved (successful req/s)")
    ax2.set(xlabel="offered rate (requests/s)", ylabel="requests/s", title="Achieved vs offered throughput",
            xlim=(0, top), ylim=(0, top))
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)
