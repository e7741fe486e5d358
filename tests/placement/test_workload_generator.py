"""The shared workload generator: statistics match the parameters, deterministic for a seed."""

from __future__ import annotations

import numpy as np
import pytest

from lorafleet.placement.workload import LengthDist, WorkloadSpec, generate, zipf_popularity

pytestmark = pytest.mark.timeout(300)  # a hang fails fast instead of stalling CI


def test_poisson_rate_and_exponential_gaps():
    w = generate(WorkloadSpec(num_adapters=50, request_rate=40.0, num_requests=40_000, seed=3))
    gaps = np.diff(w.arrival_s)
    assert w.num_requests / w.duration_s == pytest.approx(40.0, rel=0.03)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.03)  # exponential: CV = 1


def test_zipf_exponent_recovered_from_counts():
    w = generate(WorkloadSpec(num_adapters=200, zipf_alpha=1.1, num_requests=200_000, seed=1))
    counts = np.bincount(w.adapter_index, minlength=200)[:50].astype(float)
    slope = np.polyfit(np.log(np.arange(1, 51)), np.log(counts), 1)[0]
    assert -slope == pytest.approx(1.1, abs=0.05)
    assert zipf_popularity(10, 0.0) == pytest.approx(np.full(10, 0.1))


def test_rank_mix_and_lengths():
    spec = WorkloadSpec(num_adapters=4000, ranks=(8, 128), rank_weights=(3.0, 1.0), num_requests=20_000,
                        prompt_tokens=LengthDist(100, 0.0, 1, 500), output_tokens=LengthDist(50, 0.5, 4, 64))
    w = generate(spec)
    assert set(w.adapter_ranks.tolist()) == {8, 128}
    assert (w.adapter_ranks == 8).mean() == pytest.approx(0.75, abs=0.03)
    assert (w.prompt_tokens == 100).all()
    assert w.output_tokens.min() >= 4 and w.output_tokens.max() <= 64


def test_deterministic_and_ranks_independent_of_request_count():
    a, b = generate(WorkloadSpec(seed=5, num_requests=1000)), generate(WorkloadSpec(seed=5, num_requests=1000))
    assert np.array_equal(a.arrival_s, b.arrival_s) and np.array_equal(a.adapter_index, b.adapter_index)
    c = generate(WorkloadSpec(seed=5, num_requests=10))
    assert np.array_equal(a.adapter_ranks, c.adapter_ranks)


def test_drift_changes_popularity_over_time():
    spec = WorkloadSpec(num_adapters=100, num_requests=20_000, request_rate=100.0, drift_fraction=0.5,
                        drift_period_s=50.0, seed=2)
    w = generate(spec)
    early = np.bincount(w.adapter_index[w.arrival_s < 50], minlength=100)
    late = np.bincount(w.adapter_index[w.arrival_s > 150], minlength=100)
    assert np.argmax(early) == 0 and not np.array_equal(np.argsort(early)[-5:], np.argsort(late)[-5:])


@pytest.mark.parametrize("bad", [{"num_adapters": 0}, {"ranks": ()}, {"rank_weights": (1.0,)},
                                 {"request_rate": 0.0}, {"drift_fraction": 2.0}])
def test_invalid_specs_raise_value_error(bad):
    with pytest.raises(ValueError):
        WorkloadSpec(**bad)
