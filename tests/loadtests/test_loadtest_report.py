"""A 10-second headless Locust run against the local demo app produces the whole report folder; so does a
two-rate capacity sweep (about 5 s per rate) against the same app."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from matplotlib.image import imread
from rich.console import Console

from lorafleet.cluster.demo_target import local_demo
from lorafleet.loadtests.plots import PLOT_FILES
from lorafleet.loadtests.report import load_records, locust_counts
from lorafleet.loadtests.runner import LoadTestConfig, run_loadtest
from lorafleet.loadtests.sweep import rate_dir_name, run_sweep

pytestmark = pytest.mark.slow
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def demo_url(tmp_path_factory):
    # local_demo serves in-process on a free port under its own Redis prefix, deleted on exit.
    with local_demo(tmp_path_factory.mktemp("loadtest-demo"), "rank-aware", warmup_requests=4) as url:
        yield url


@pytest.fixture(scope="module")
def report(demo_url, tmp_path_factory):
    out = tmp_path_factory.mktemp("loadtest-report")
    # A relative report folder, as the CLI's default is (Locust runs inside it: a relative path once broke it).
    cwd = os.getcwd()
    os.chdir(out.parent)
    try:
        config = LoadTestConfig(host=demo_url, rate=3.0, duration_s=10.0, num_adapters=12, zipf=1.1,
                                out_dir=Path(out.name), slo_ttft_p95_s=30.0, prompt_tokens=8, output_tokens=8,
                                drain_s=20.0)
        summaries = run_loadtest(config, console=Console(record=True, width=120))
    finally:
        os.chdir(cwd)
    return out, summaries["loadtest"]


def test_report_folder_has_every_file_non_empty(report):
    out, _ = report
    expected = {"locust_stats.csv", "locust_stats_history.csv", "locust_failures.csv", "locust.html",
                "summary.json", "report.md", "records.jsonl", "plan.json", *PLOT_FILES}
    names = {p.name for p in out.iterdir()}
    assert expected <= names, expected - names
    assert all(p.stat().st_size > 0 for p in out.iterdir() if p.is_file()), sorted(names)


def test_plots_are_valid_pngs(report):
    out, _ = report
    for name in PLOT_FILES:
        path = out / name
        assert path.read_bytes()[:8] == PNG_SIGNATURE, name
        image = imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, (name, image.shape)


def test_summary_counts_match_locust(report):
    out, summary = report
    assert json.loads((out / "summary.json").read_text())["num_requests"] == summary["num_requests"]
    locust = locust_counts(out / "locust_stats.csv")
    assert summary["num_requests"] == locust["num_requests"] == len(load_records(out / "records.jsonl"))
    # Where each request found its adapter, read from the router's metrics around the run: one per request.
    num_ok = sum(r["ok"] for r in load_records(out / "records.jsonl"))
    assert sum(summary["adapter_states"].values()) == num_ok and summary["adapter_states"].get("base", 0) == 0
    assert summary["num_errors"] == locust["num_failures"]
    # Poisson(30) requests planned; every one of them answered within the drain time.
    assert summary["num_requests"] == summary["params"]["num_planned"] and 12 <= summary["num_requests"] <= 55


def test_summary_has_latency_and_slo(report):
    _, summary = report
    assert summary["num_errors"] == 0, summary["errors"]
    assert 0 < summary["ttft_s"]["p50"] <= summary["ttft_s"]["p95"] <= summary["ttft_s"]["p99"]
    assert summary["tpot_s"]["p50"] > 0 and summary["output_tokens_per_s"] > 0
    assert summary["slo"] == {"ttft_p95_s": 30.0, "is_pass": True}
    assert set(summary["by_rank_class"]) <= {"r1-4", "r8-16", "r32+"}
    assert sum(c["num_requests"] for c in summary["by_rank_class"].values()) == summary["num_requests"]


@pytest.fixture(scope="module")
def sweep(demo_url, tmp_path_factory):
    out = tmp_path_factory.mktemp("loadtest-sweep")
    config = LoadTestConfig(host=demo_url, rate=1.0, duration_s=5.0, num_adapters=12, zipf=1.1, out_dir=out,
                            slo_ttft_p95_s=30.0, prompt_tokens=8, output_tokens=8, drain_s=20.0,
                            sweep_rates=(2.0, 4.0))
    summaries = run_sweep(config, console=Console(record=True, width=160))
    return out, summaries


def test_sweep_writes_one_report_per_rate_and_a_summary(sweep):
    out, summaries = sweep
    assert list(summaries) == ["rate-2", "rate-4"]
    for rate in (2.0, 4.0):
        run = out / rate_dir_name(rate)
        assert {"summary.json", "report.md", "records.jsonl", "locust_stats.csv", *PLOT_FILES} <= {
            p.name for p in run.iterdir()}
        assert json.loads((run / "summary.json").read_text())["params"]["rate"] == rate
    for name in ("summary.json", "report.md", "sweep.png"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "sweep.png").read_bytes()[:8] == PNG_SIGNATURE
    image = imread(out / "sweep.png")
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100, image.shape


def test_sweep_rows_equal_the_rates_and_all_meet_a_loose_slo(sweep):
    out, summaries = sweep
    top = json.loads((out / "summary.json").read_text())
    assert [row["offered_rps"] for row in top["rows"]] == [2.0, 4.0]
    for row, summary in zip(top["rows"], summaries.values(), strict=True):
        assert row["num_requests"] == summary["num_requests"] == row["num_planned"] > 0
        assert row["num_errors"] == 0 and row["is_pass"] and row["ttft_p95_s"] <= 30.0
    assert top["capacity"]["verdict"] == "all met" and top["capacity"]["capacity_rps"] == 4.0
    assert "Capacity at SLO: all met" in (out / "report.md").read_text()


def test_adapter_states_are_read_from_the_routers_metrics():
    """What the replicas found (cold = fetched from the store) per request, summed over replicas."""
    from prometheus_client import generate_latest

    from lorafleet.infra.replica_api import ServedBy
    from lorafleet.loadtests.runner import adapter_states_from_metrics
    from lorafleet.router.metrics import RouterMetrics

    metrics = RouterMetrics()
    for rank, state in ((0, "cold"), (1, "cold"), (0, "device"), (1, "host"), (1, "device"), (0, "device")):
        metrics.observe_first(ServedBy(rank, state, 0.01), 0.01)
    text = generate_latest(metrics.registry).decode()
    assert adapter_states_from_metrics(text) == {"cold": 2, "device": 3, "host": 1}
    assert adapter_states_from_metrics("") == {}
