"""Capacity search: one load test per offered rate (like vLLM's benchmark_serving over --request-rate values),
then "capacity at SLO", the highest offered rate whose TTFT P95 met the SLO with at most 1 % errors."""

from __future__ import annotations

import json
import time
from contextlib import nullcontext
from dataclasses import replace

from lorafleet.loadtests.load_plan import LoadTestError
from lorafleet.loadtests.runner import DemoStarter, LoadTestConfig, fetch_adapter_ids, make_console, run_one

MAX_ERROR_RATE = 0.01
NUM_FAILS_TO_STOP = 2  # --stop-early: this many consecutive failing rates end the sweep
SETTLE_S = 2.0  # pause between rates: requests dropped at the end of one run are aborted on disconnect first
DEMO_POLICY = "rank-aware"


def parse_rates(text: str) -> tuple[float, ...]:
    """'2,4,8,16' -> (2.0, 4.0, 8.0, 16.0): ascending and distinct, each > 0."""
    try:
        rates = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise LoadTestError(f"bad --sweep {text!r}: use comma-separated requests/s, e.g. 2,4,8,16") from None
    if not rates or min(rates) <= 0:
        raise LoadTestError(f"--sweep rates must be > 0 requests/s, got {text!r}")
    return tuple(sorted(set(rates)))


def rate_dir_name(rate: float) -> str:
    return f"rate-{rate:g}"


def sweep_row(rate: float, summary: dict, slo_ttft_p95_s: float, max_error_rate: float = MAX_ERROR_RATE) -> dict:
    """One rate's line of the sweep, from its run summary (report.summarize).

    Requests still in flight when the run's drain time ran out never reach the summary; they count as errors
    here (`num_dropped`), so an overloaded rate cannot pass by losing its slow requests. sent_rps is the seeded
    Poisson plan's own rate (planned requests / duration): short runs stray from the offered rate.
    achieved_rps counts successful requests only, over the run's span (first request start to last request end).
    """
    num_planned = summary["params"].get("num_planned", summary["num_requests"])
    num_dropped = max(num_planned - summary["num_requests"], 0)
    num_failed = summary["num_errors"] + num_dropped
    error_rate = num_failed / max(num_planned, 1)
    ttft, tpot = summary["ttft_s"], summary["tpot_s"]
    is_ttft_pass = ttft["p95"] is not None and ttft["p95"] <= slo_ttft_p95_s
    is_error_pass = error_rate <= max_error_rate
    duration_s = summary["params"].get("duration_s", summary["wall_s"])
    return {
        "offered_rps": rate, "sent_rps": round(num_planned / max(duration_s, 1e-9), 3),
        "num_planned": num_planned, "num_requests": summary["num_requests"],
        "achieved_rps": round((summary["num_requests"] - summary["num_errors"]) / max(summary["wall_s"], 1e-9), 3),
        "num_errors": summary["num_errors"], "num_dropped": num_dropped,
        "num_429": sum(n for kind, n in summary["errors"].items() if kind.startswith("HTTP 429")),
        "error_rate": round(error_rate, 4),
        "ttft_p50_s": ttft["p50"], "ttft_p95_s": ttft["p95"], "ttft_p99_s": ttft["p99"],
        "tpot_p50_s": tpot["p50"], "tpot_p95_s": tpot["p95"],
        "output_tokens_per_s": summary["output_tokens_per_s"],
        "is_ttft_pass": is_ttft_pass, "is_error_pass": is_error_pass, "is_pass": is_ttft_pass and is_error_pass,
    }


def capacity_at_slo(rows: list[dict], skipped_rates: tuple[float, ...] = ()) -> dict:
    """{'capacity_rps', 'verdict' ('met' | 'none met' | 'all met'), 'text'}: the highest passing offered rate.

    'all met' means the top rate passed too, so the capacity is at least that rate: raise it. Rates that failed
    below the capacity are named in the text (noise or a warm-up effect; rerun before trusting the number).
    """
    passed = [row["offered_rps"] for row in rows if row["is_pass"]]
    if not passed:
        low = rows[0]["offered_rps"] if rows else None
        return {"capacity_rps": None, "verdict": "none met",
                "text": f"none met: even {low:g} req/s missed the SLO; lower the bottom rate" if rows else "none met"}
    capacity = max(passed)
    if len(passed) == len(rows) and not skipped_rates:
        return {"capacity_rps": capacity, "verdict": "all met",
                "text": f"all met, raise the top rate: capacity >= {capacity:g} req/s"}
    text = f"{capacity:g} req/s"
    failed_below = [row["offered_rps"] for row in rows if not row["is_pass"] and row["offered_rps"] < capacity]
    if failed_below:
        text += f" (but {', '.join(f'{r:g}' for r in failed_below)} req/s failed: not monotone, rerun)"
    return {"capacity_rps": capacity, "verdict": "met", "text": text}


def sweep_summary(summaries: dict[float, dict], *, slo_ttft_p95_s: float, max_error_rate: float = MAX_ERROR_RATE,
                  params: dict | None = None, skipped_rates: tuple[float, ...] = ()) -> dict:
    """The top-level summary.json of a sweep: one row per rate run (ascending) and the capacity answer."""
    rows = [sweep_row(rate, summaries[rate], slo_ttft_p95_s, max_error_rate) for rate in sorted(summaries)]
    return {"params": params or {}, "slo": {"ttft_p95_s": slo_ttft_p95_s, "max_error_rate": max_error_rate},
            "rows": rows, "skipped_rates": list(skipped_rates), "capacity": capacity_at_slo(rows, skipped_rates)}


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value * 1000:.0f}"


def _cells(row: dict) -> list[str]:
    errors = str(row["num_errors"]) + (f"+{row['num_dropped']} dropped" if row["num_dropped"] else "")
    missed = [name for name, ok in (("TTFT", row["is_ttft_pass"]), ("errors", row["is_error_pass"])) if not ok]
    return [f"{row['offered_rps']:g}", f"{row['sent_rps']:.2f}", f"{row['achieved_rps']:.2f}",
            str(row["num_planned"]), f"{errors} ({row['error_rate']:.1%})", str(row["num_429"]),
            "/".join(_ms(row[f"ttft_p{q}_s"]) for q in (50, 95, 99)),
            "/".join(_ms(row[f"tpot_p{q}_s"]) for q in (50, 95)), f"{row['output_tokens_per_s']:.1f}",
            "FAIL " + "+".join(missed) if missed else "PASS"]


HEADERS = ("offered req/s", "sent req/s", "achieved req/s", "requests", "errors", "429s",
           "TTFT p50/p95/p99 ms", "TPOT p50/p95 ms", "out tok/s", "SLO")


def sweep_markdown(sweep: dict) -> str:
    """report.md of a sweep: the SLO, the table, the capacity answer."""
    slo = sweep["slo"]
    lines = [f"SLO: TTFT P95 ≤ {slo['ttft_p95_s']:g} s and errors ≤ {slo['max_error_rate']:.0%} "
             "(errors include requests dropped at the drain limit). Sent req/s is the rate of the seeded Poisson plan; "
             "achieved req/s counts successful requests over the run's span.",
             "", "| " + " | ".join(HEADERS) + " |", "|" + "---:|" * (len(HEADERS) - 1) + "---|"]
    lines += ["| " + " | ".join(_cells(row)) + " |" for row in sweep["rows"]]
    if sweep["skipped_rates"]:
        lines += ["", f"Stopped early; not run: {', '.join(f'{r:g}' for r in sweep['skipped_rates'])} req/s."]
    lines += ["", f"**Capacity at SLO: {sweep['capacity']['text']}**"]
    return "\n".join(lines)


def sweep_table(sweep: dict):
    """The sweep as a rich Table, captioned with the capacity answer."""
    from rich.table import Table

    table = Table(title=f"LoRAFleet capacity search (SLO: TTFT P95 ≤ {sweep['slo']['ttft_p95_s']:g} s, "
                        f"errors ≤ {sweep['slo']['max_error_rate']:.0%})",
                  caption=f"rates in req/s, latencies in ms · capacity at SLO: {sweep['capacity']['text']}")
    for name in ("offered", "sent", "achieved", "reqs", "errors", "429", "TTFT p50/95/99", "TPOT p50/95",
                 "tok/s", "SLO"):  # HEADERS, shortened to fit 120 columns
        table.add_column(name, justify="right", no_wrap=True)
    for row in sweep["rows"]:
        cells = _cells(row)
        cells[-1] = f"[green]{cells[-1]}[/]" if row["is_pass"] else f"[red]{cells[-1]}[/]"
        table.add_row(*cells)
    return table


def _should_stop(rows: list[dict]) -> bool:
    return len(rows) >= NUM_FAILS_TO_STOP and not any(row["is_pass"] for row in rows[-NUM_FAILS_TO_STOP:])


def run_sweep(config: LoadTestConfig, console=None, *, start_demo: DemoStarter | None = None) -> dict[str, dict]:
    """One run per config.sweep_rates (same seed: the workload generator draws the same arrival gaps, scaled by
    1/rate) against config.host, or a local demo `start_demo` serves, started once; out_dir/rate-<r>/ per rate,
    then summary.json, report.md and sweep.png at the top. Returns {'rate-<r>': run summary}."""
    from lorafleet.loadtests.plots import plot_sweep

    slo = config.slo_ttft_p95_s
    assert slo is not None  # LoadTestConfig requires the SLO with sweep_rates
    console = console or make_console()
    if config.host:
        fetch_adapter_ids(config.host)  # fail fast, before anything is written
        target, target_name = nullcontext(config.host), config.host
    elif start_demo is None:
        raise LoadTestError("--sweep without --host needs a local demo app to start (start_demo)")
    else:
        console.print(f"starting the local demo app with routing policy [bold]{DEMO_POLICY}[/] ...")
        target, target_name = (start_demo(config.demo_root, DEMO_POLICY, config.num_adapters),
                               f"local demo ({DEMO_POLICY})")
    config.out_dir.mkdir(parents=True, exist_ok=True)
    summaries: dict[float, dict] = {}
    rows: list[dict] = []
    skipped: tuple[float, ...] = ()
    with target as url:
        for i, rate in enumerate(config.sweep_rates):
            if config.is_stop_early and _should_stop(rows):
                skipped = config.sweep_rates[i:]
                console.print(f"{NUM_FAILS_TO_STOP} rates in a row failed the SLO: skipping "
                              f"{', '.join(f'{r:g}' for r in skipped)} req/s")
                break
            if i:
                time.sleep(SETTLE_S)
            name = rate_dir_name(rate)
            summaries[rate], _ = run_one(replace(config, rate=rate), url, config.out_dir / name, name, console,
                                         extra={"sweep_rate": rate, "target": target_name})
            rows.append(sweep_row(rate, summaries[rate], slo))
    sweep = sweep_summary(summaries, slo_ttft_p95_s=slo, skipped_rates=skipped,
                          params={**config.params(), "rate": None, "target": target_name})
    (config.out_dir / "summary.json").write_text(json.dumps(sweep, indent=2) + "\n")
    title = (f"Capacity search: {config.duration_s:g} s per rate, {config.num_adapters} adapters, "
             f"zipf {config.zipf:g}, {target_name}")
    (config.out_dir / "report.md").write_text(f"# {title}\n\n{sweep_markdown(sweep)}\n")
    plot_sweep(sweep["rows"], slo, config.out_dir / "sweep.png", title)
    console.print(sweep_table(sweep))
    console.print(f"report: {config.out_dir}")
    return {rate_dir_name(rate): summary for rate, summary in summaries.items()}
