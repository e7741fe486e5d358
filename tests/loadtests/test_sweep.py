"""Capacity search logic on synthetic per-rate summaries: rows, capacity at SLO, none met, all met, early stop."""

from __future__ import annotations

import pytest

from lorafleet.loadtests.load_plan import LoadTestError
from lorafleet.loadtests.report import summarize
from lorafleet.loadtests.runner import LoadTestConfig, run_loadtest
from lorafleet.loadtests.sweep import (
    _should_stop,
    capacity_at_slo,
    parse_rates,
    run_sweep,
    sweep_markdown,
    sweep_summary,
)

SLO_S = 0.5


def fake_summary(rate: float, ttft_p95_s: float, *, num_errors: int = 0, num_429: int = 0,
                 num_dropped: int = 0, duration_s: float = 10.0) -> dict:
    """A real `summarize` output for rate * duration requests; the last 10 % have TTFT ttft_p95_s and the rest
    10 ms, so TTFT P95 and P99 are ttft_p95_s. The first num_errors requests fail (num_429 of them with 429)."""
    num = int(rate * duration_s)
    records = []
    for i in range(num):
        is_slow = i >= num - max(num // 10, 1)
        error = "HTTP 429: busy" if i < num_429 else ("HTTP 500: boom" if i < num_errors else None)
        records.append({"t": i / rate, "ok": error is None, "error": error, "rank_class": "r1-4",
                        "ttft_s": None if error else (ttft_p95_s if is_slow else 0.01), "tpot_s": 0.02,
                        "latency_s": 0.3, "prompt_tokens": 40, "completion_tokens": 16})
    return summarize(records, wall_s=duration_s, params={"num_planned": num + num_dropped}, slo_ttft_p95_s=SLO_S)


def sweep_of(spec: dict[float, dict]) -> dict:
    return sweep_summary({rate: fake_summary(rate, **kw) for rate, kw in spec.items()}, slo_ttft_p95_s=SLO_S)


def test_capacity_is_the_highest_rate_meeting_ttft_and_errors():
    sweep = sweep_of({2: {"ttft_p95_s": 0.1}, 4: {"ttft_p95_s": 0.2}, 8: {"ttft_p95_s": 0.4},
                      16: {"ttft_p95_s": 2.0}})
    assert [row["offered_rps"] for row in sweep["rows"]] == [2, 4, 8, 16]
    assert [row["is_pass"] for row in sweep["rows"]] == [True, True, True, False]
    assert sweep["capacity"]["capacity_rps"] == 8 and sweep["capacity"]["verdict"] == "met"
    assert sweep["rows"][3]["is_ttft_pass"] is False and sweep["rows"][3]["is_error_pass"] is True
    row = sweep["rows"][1]
    assert row["num_planned"] == row["num_requests"] == 40 and row["achieved_rps"] == pytest.approx(4.0)
    assert row["ttft_p50_s"] == pytest.approx(0.01) and row["ttft_p95_s"] == row["ttft_p99_s"] == pytest.approx(0.2)
    assert "**Capacity at SLO: 8 req/s**" in sweep_markdown(sweep)


def test_errors_above_one_percent_fail_a_rate_whose_ttft_meets_the_slo():
    # 8 req/s: 2 of 80 requests are 429s (2.5 %); 4 req/s: 1 dropped of 41 planned (2.4 %); 2 req/s: fine.
    sweep = sweep_of({2: {"ttft_p95_s": 0.1}, 4: {"ttft_p95_s": 0.1, "num_dropped": 1},
                      8: {"ttft_p95_s": 0.1, "num_errors": 2, "num_429": 2}})
    rows = {row["offered_rps"]: row for row in sweep["rows"]}
    assert rows[8]["num_429"] == 2 and rows[8]["error_rate"] == 0.025 and not rows[8]["is_error_pass"]
    assert rows[8]["achieved_rps"] == pytest.approx(7.8)  # successful requests only
    assert rows[4]["num_dropped"] == 1 and not rows[4]["is_pass"] and rows[4]["is_ttft_pass"]
    assert sweep["capacity"]["capacity_rps"] == 2
    assert "FAIL errors" in sweep_markdown(sweep) and "0+1 dropped (2.4%)" in sweep_markdown(sweep)


def test_none_met():
    sweep = sweep_of({2: {"ttft_p95_s": 0.9}, 4: {"ttft_p95_s": 1.5}})
    assert sweep["capacity"]["capacity_rps"] is None and sweep["capacity"]["verdict"] == "none met"
    assert "lower the bottom rate" in sweep["capacity"]["text"]


def test_all_met_asks_for_a_higher_top_rate():
    sweep = sweep_of({2: {"ttft_p95_s": 0.1}, 4: {"ttft_p95_s": 0.3}})
    assert sweep["capacity"] == {"capacity_rps": 4, "verdict": "all met",
                                 "text": "all met, raise the top rate: capacity >= 4 req/s"}


def test_a_failure_below_the_capacity_is_called_out():
    sweep = sweep_of({2: {"ttft_p95_s": 0.1}, 4: {"ttft_p95_s": 0.7}, 8: {"ttft_p95_s": 0.4},
                      16: {"ttft_p95_s": 3.0}})
    assert sweep["capacity"]["capacity_rps"] == 8 and "4 req/s failed" in sweep["capacity"]["text"]


def test_stop_early_after_two_consecutive_failures():
    rows = sweep_of({2: {"ttft_p95_s": 0.1}, 4: {"ttft_p95_s": 0.7}, 8: {"ttft_p95_s": 0.9}})["rows"]
    assert not _should_stop(rows[:1]) and not _should_stop(rows[:2]) and _should_stop(rows)
    # Stopped early, everything run passed but one rate was skipped: not "all met".
    assert capacity_at_slo(rows[:1], skipped_rates=(4.0,))["verdict"] == "met"


@pytest.mark.parametrize("text,rates", [("2,4,8,16", (2, 4, 8, 16)), ("8, 2,2,0.5", (0.5, 2, 8))])
def test_parse_rates(text, rates):
    assert parse_rates(text) == rates


@pytest.mark.parametrize("text", ["", "a,2", "0,2", "-1"])
def test_parse_rates_rejects_bad_input(text):
    with pytest.raises(LoadTestError):
        parse_rates(text)


@pytest.mark.parametrize("changes,fragment", [
    ({"sweep_rates": (2.0, 4.0), "slo_ttft_p95_s": None}, "requires --slo-ttft-p95"),
    ({"sweep_rates": (2.0, 4.0), "is_policy_compare": True}, "cannot be combined"),
    ({"sweep_rates": (4.0, 2.0)}, "ascending"),
    ({"is_stop_early": True}, "only applies to --sweep"),
])
def test_config_rejects_bad_sweeps(tmp_path, changes, fragment):
    base = dict(host=None, rate=4.0, duration_s=5.0, num_adapters=5, zipf=1.1, out_dir=tmp_path,
                slo_ttft_p95_s=SLO_S)
    if "sweep_rates" not in changes:
        base["host"] = "http://127.0.0.1:1"
    with pytest.raises(LoadTestError, match=fragment):
        LoadTestConfig(**{**base, **changes})


def test_a_local_demo_needs_a_starter(tmp_path):
    """loadtests imports nothing from the cluster: without --host the caller hands over the demo to start."""
    base = dict(host=None, rate=4.0, duration_s=5.0, num_adapters=5, zipf=1.1, out_dir=tmp_path / "out",
                slo_ttft_p95_s=SLO_S)
    with pytest.raises(LoadTestError, match="start_demo"):
        run_sweep(LoadTestConfig(**base, sweep_rates=(2.0,)))
    with pytest.raises(LoadTestError, match="start_demo"):
        run_loadtest(LoadTestConfig(**base, is_policy_compare=True))
    assert not (tmp_path / "out" / "summary.json").exists()
