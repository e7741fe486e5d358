"""The load-test workload against its parameters: Zipf exponent, Poisson rate, lengths, the plan built on it."""

from __future__ import annotations

import numpy as np
import pytest

from lorafleet.loadtests.load_plan import LoadPlan, LoadTestError, build_plan, rank_class, rank_of
from lorafleet.loadtests.runner import LoadTestConfig, parse_duration
from lorafleet.placement.workload import LengthDist, WorkloadSpec, generate

DEMO_LIKE = [f"tenant{i:02d}-lora-r{r}" for i, r in enumerate((1, 2, 4, 8, 16, 32, 64, 16, 8, 4), start=1)]


@pytest.mark.parametrize("alpha", [0.6, 1.1, 1.5])
def test_zipf_exponent_recovered_from_request_counts(alpha):
    spec = WorkloadSpec(num_adapters=50, zipf_alpha=alpha, num_requests=60_000, seed=3)
    counts = np.bincount(generate(spec).adapter_index, minlength=50).astype(np.float64)
    # log count_k = c - alpha log(k+1): least-squares slope over the 20 most popular adapters.
    k = np.arange(1, 21)
    slope = np.polyfit(np.log(k), np.log(counts[:20]), 1)[0]
    assert -slope == pytest.approx(alpha, abs=0.08)


@pytest.mark.parametrize("rate", [0.5, 4.0, 50.0])
def test_poisson_rate_and_exponential_gaps(rate):
    trace = generate(WorkloadSpec(num_adapters=5, request_rate=rate, num_requests=20_000, seed=1))
    gaps = np.diff(np.concatenate([[0.0], trace.arrival_s]))
    # Mean gap 1/rate (sd of the mean = 1/(rate sqrt(n)) ~ 0.7 %); exponential: sd = mean, P(gap > mean) = e^-1.
    assert trace.num_requests / trace.duration_s == pytest.approx(rate, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.04)
    assert (gaps > 1 / rate).mean() == pytest.approx(np.exp(-1), abs=0.02)


def test_counts_per_window_are_poisson():
    trace = generate(WorkloadSpec(num_adapters=5, request_rate=4.0, num_requests=40_000, seed=2))
    counts = np.bincount(trace.arrival_s.astype(np.int64))[:-1]  # requests per 1 s window, last one partial
    assert counts.mean() == pytest.approx(4.0, rel=0.03)
    assert counts.var() / counts.mean() == pytest.approx(1.0, abs=0.08)  # Poisson: variance = mean


def test_plan_follows_rate_duration_zipf_and_lengths():
    plan = build_plan(DEMO_LIKE, {}, rate=20.0, duration_s=200.0, zipf=1.2, num_adapters=10,
                      prompt_tokens=LengthDist(32, 0.5, 1, 256), output_tokens=LengthDist(16, 0.0), seed=5)
    arrivals = np.asarray([r.arrival_s for r in plan.requests])
    assert np.all(np.diff(arrivals) >= 0) and arrivals.max() < 200.0
    assert len(plan.requests) == pytest.approx(4000, rel=0.06)  # Poisson(4000): sd 63
    shares = np.asarray([sum(r.adapter_id == a for r in plan.requests) for a in plan.adapter_ids]) / 4000
    expected = 1 / np.arange(1, 11) ** 1.2
    np.testing.assert_allclose(shares * (4000 / len(plan.requests)), expected / expected.sum(), atol=0.02)
    assert {r.max_tokens for r in plan.requests} == {16}
    assert np.median([r.prompt_tokens for r in plan.requests]) == pytest.approx(32, rel=0.1)
    assert 0.2 < np.mean([r.is_chat for r in plan.requests]) < 0.3
    assert {r.rank for r in plan.requests} <= {1, 2, 4, 8, 16, 32, 64}


def test_plan_roundtrips_and_is_deterministic(tmp_path):
    kwargs = dict(rate=3.0, duration_s=30.0, zipf=1.1, num_adapters=6, prompt_tokens=LengthDist(8, 0.3),
                  output_tokens=LengthDist(4, 0.3), seed=9)
    plan = build_plan(DEMO_LIKE, {}, **kwargs)
    assert build_plan(DEMO_LIKE, {}, **kwargs) == plan
    assert LoadPlan.from_json(plan.to_json(tmp_path / "plan.json")) == plan


def test_demo_adapters_carry_their_rank_in_the_id():
    """The plan reads ranks from ids (plan_for_host passes no rank table): every demo adapter must parse."""
    from lorafleet.cluster.demo import DEMO_ADAPTERS

    assert {adapter_id: rank_of(adapter_id, {}) for adapter_id, _, _, _ in DEMO_ADAPTERS} == {
        adapter_id: rank for adapter_id, _, rank, _ in DEMO_ADAPTERS}


def test_rank_classes():
    assert rank_of("chat-lora-r64", {}) == 64 and rank_of("style-ia3", {}) == 1 and rank_of("x", {"x": 8}) == 8
    assert rank_of("mystery", {}) is None
    assert [rank_class(r) for r in (1, 4, 8, 16, 32, 64, None)] == ["r1-4", "r1-4", "r8-16", "r8-16", "r32+",
                                                                     "r32+", "r?"]


@pytest.mark.parametrize("text,seconds", [("60s", 60), ("90", 90), ("2m", 120), ("1m30s", 90), ("0.5s", 0.5),
                                          ("1h", 3600)])
def test_parse_duration(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "5x", "-3s", "0s", "s"])
def test_parse_duration_rejects_bad_strings(text):
    with pytest.raises(LoadTestError):
        parse_duration(text)


@pytest.mark.parametrize("changes", [{"rate": -1.0}, {"rate": 0.0}, {"duration_s": 0.0}, {"num_adapters": 0},
                                     {"slo_ttft_p95_s": 0.0}, {"host": None}])
def test_config_rejects_bad_input(tmp_path, changes):
    base = dict(host="http://127.0.0.1:1", rate=4.0, duration_s=10.0, num_adapters=5, zipf=1.1, out_dir=tmp_path)
    with pytest.raises(LoadTestError):
        LoadTestConfig(**{**base, **changes})


def test_plan_rejects_more_adapters_than_the_server_has():
    with pytest.raises(LoadTestError, match="adapters must be in 1..10"):
        build_plan(DEMO_LIKE, {}, rate=1.0, duration_s=5.0, zipf=1.0, num_adapters=11,
                   prompt_tokens=LengthDist(8), output_tokens=LengthDist(4))
