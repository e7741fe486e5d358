"""Load-test report: per-request records + Locust's stats CSV -> summary.json and a rich SLO table."""

from __future__ import annotations

import csv
import json
import os
import platform
from pathlib import Path

import numpy as np

QUANTILES = (50, 95, 99)


def load_records(path: Path) -> list[dict]:
    """The locustfile's JSON lines (one per request, in completion order); a torn last line is skipped."""
    records = []
    if not path.is_file():
        return records
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def locust_counts(stats_csv: Path) -> dict[str, int]:
    """Request and failure counts of the POST rows (the requests) in Locust's `<prefix>_stats.csv`."""
    num_requests = num_failures = 0
    with stats_csv.open(newline="") as f:
        for row in csv.DictReader(f):
            if row["Type"] == "POST":
                num_requests += int(row["Request Count"])
                num_failures += int(row["Failure Count"])
    return {"num_requests": num_requests, "num_failures": num_failures}


def _quantiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {f"p{q}": None for q in QUANTILES}
    points = np.percentile(np.asarray(values, dtype=np.float64), QUANTILES)
    return {f"p{q}": round(float(v), 5) for q, v in zip(QUANTILES, points, strict=True)}


def summarize(records: list[dict], *, wall_s: float, params: dict, locust: dict[str, int] | None = None,
              slo_ttft_p95_s: float | None = None) -> dict:
    """Latency quantiles (seconds), throughput over the wall time of the run, errors, per rank class, SLO."""
    ok = [r for r in records if r["ok"]]
    ttft = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    tpot = [r["tpot_s"] for r in ok if r["tpot_s"] is not None]
    num_errors = len(records) - len(ok)
    by_class = {}
    for klass in sorted({r["rank_class"] for r in records}):
        rows = [r for r in records if r["rank_class"] == klass]
        good = [r for r in rows if r["ok"]]
        by_class[klass] = {
            "num_requests": len(rows), "num_errors": len(rows) - len(good),
            "ttft_s": _quantiles([r["ttft_s"] for r in good if r["ttft_s"] is not None]),
            "tpot_s": _quantiles([r["tpot_s"] for r in good if r["tpot_s"] is not None]),
        }
    ttft_q = _quantiles(ttft)
    is_pass = None
    if slo_ttft_p95_s is not None:
        is_pass = ttft_q["p95"] is not None and ttft_q["p95"] <= slo_ttft_p95_s
    errors: dict[str, int] = {}
    for r in records:
        if not r["ok"]:
            key = (r["error"] or "unknown").split(":")[0]
            errors[key] = errors.get(key, 0) + 1
    return {
        "params": params,
        "num_requests": len(records),
        "num_errors": num_errors,
        "error_rate": round(num_errors / max(len(records), 1), 4),
        "wall_s": round(wall_s, 2),
        "requests_per_s": round(len(records) / max(wall_s, 1e-9), 3),
        "mean_prompt_tokens": round(float(np.mean([r["prompt_tokens"] for r in ok])) if ok else 0.0, 1),
        "mean_output_tokens": round(float(np.mean([r["completion_tokens"] for r in ok])) if ok else 0.0, 1),
        "output_tokens_per_s": round(sum(r["completion_tokens"] for r in ok) / max(wall_s, 1e-9), 2),
        "ttft_s": ttft_q,
        "tpot_s": _quantiles(tpot),
        "latency_s": _quantiles([r["latency_s"] for r in ok]),
        "by_rank_class": by_class,
        "errors": errors,
        "slo": {"ttft_p95_s": slo_ttft_p95_s, "is_pass": is_pass},
        "locust": locust,
        "machine": {"platform": platform.platform(), "num_cpus": os.cpu_count()},
    }


def write_summary(summary: dict, path: Path) -> Path:
    path.write_text(json.dumps(summary, indent=2) + "\n")
    return path


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value * 1000:.0f}"


def slo_table(summaries: dict[str, dict], title: str = "LoRAFleet load test"):
    """A rich Table: one row per run (policy) and one per rank class under it."""
    from rich.table import Table

    table = Table(title=title, caption="TTFT/TPOT from streamed chunks; tok/s = output tokens/s; SLO on TTFT P95")
    has_states = any("adapter_states" in s for s in summaries.values())
    columns = ("run", "reqs", "errors", "TTFT p50/95/99 ms", "TPOT p50/95/99 ms", "tok/s", "req/s", "SLO",
               *(("adapter at replica: cold/host/device",) if has_states else ()))
    for name in columns:
        table.add_column(name, justify="left" if name == "run" else "right", no_wrap=True)
    for run, s in summaries.items():
        slo = s["slo"]
        verdict = "—" if slo["is_pass"] is None else (
            f"[green]PASS[/] ≤{slo['ttft_p95_s']:g}s" if slo["is_pass"] else f"[red]FAIL[/] >{slo['ttft_p95_s']:g}s")
        table.add_row(f"[bold]{run}[/]", str(s["num_requests"]), f"{s['num_errors']} ({s['error_rate']:.1%})",
                      "/".join(_ms(s["ttft_s"][f"p{q}"]) for q in QUANTILES),
                      "/".join(_ms(s["tpot_s"][f"p{q}"]) for q in QUANTILES),
                      f"{s['output_tokens_per_s']:.1f}", f"{s['requests_per_s']:.2f}", verdict,
                      *((_states(s),) if has_states else ()))
        for klass, c in s["by_rank_class"].items():
            table.add_row(f"  {klass}", str(c["num_requests"]), str(c["num_errors"]),
                          "/".join(_ms(c["ttft_s"][f"p{q}"]) for q in QUANTILES),
                          "/".join(_ms(c["tpot_s"][f"p{q}"]) for q in QUANTILES), "", "", "",
                          *(("",) if has_states else ()))
    return table


def _states(summary: dict) -> str:
    states = summary.get("adapter_states") or {}
    return "/".join(str(states.get(k, 0)) for k in ("cold", "host", "device")) if states else "—"


def markdown_table(summaries: dict[str, dict]) -> str:
    """The SLO table as markdown (for READMEs)."""
    lines = ["| run | requests | errors | TTFT p50/p95/p99 ms | TPOT p50/p95/p99 ms | out tok/s | req/s | "
             "adapter cold/host/device |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for run, s in summaries.items():
        lines.append(f"| {run} | {s['num_requests']} | {s['num_errors']} | "
                     + "/".join(_ms(s["ttft_s"][f"p{q}"]) for q in QUANTILES) + " | "
                     + "/".join(_ms(s["tpot_s"][f"p{q}"]) for q in QUANTILES)
                     + f" | {s['output_tokens_per_s']:.1f} | {s['requests_per_s']:.2f} | {_states(s)} |")
    return "\n".join(lines)
