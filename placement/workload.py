"""Synthetic multi-adapter workloads: Zipf popularity, rank mix, Poisson arrivals, length distributions.

One module serves the tests, the benchmarks, the placement simulator and the load tests, so every number
they report is about the same workload. Pure numpy; deterministic for a seed.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

import numpy as np


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


@dataclass(frozen=True, slots=True)
class LengthDist:
    """Token counts ~ round(lognormal(median, sigma)) clipped to [min_tokens, max_tokens]; sigma 0 = constant."""

    median: float
    sigma: float = 0.0
    min_tokens: int = 1
    max_tokens: int = 4096

    def __post_init__(self) -> None:
        _check(self.median > 0 and self.sigma >= 0, "length median must be > 0 and sigma >= 0")
        _check(1 <= self.min_tokens <= self.max_tokens, "lengths need 1 <= min_tokens <= max_tokens")

    def sample(self, num: int, rng: np.random.Generator) -> np.ndarray:
        """int64 [num] token counts."""
        if self.sigma == 0:
            values = np.full(num, self.median)
        else:
            values = rng.lognormal(np.log(self.median), self.sigma, size=num)
        return np.clip(np.rint(values), self.min_tokens, self.max_tokens).astype(np.int64)

    def mean(self, num_samples: int = 200_000, seed: int = 12345) -> float:
        """Mean of the clipped distribution (Monte Carlo, fixed seed: deterministic)."""
        return float(self.sample(num_samples, np.random.default_rng(seed)).mean())


@dataclass(frozen=True, slots=True)
class WorkloadSpec:
    """Everything that defines a workload. `request_rate` is requests/s over all adapters.

    Popularity: adapter k (0-based, `adapter-00000` ...) has probability ∝ 1/(k+1)^zipf_alpha at time 0.
    Drift: every `drift_period_s` a fraction `drift_fraction` of popularity positions swap adapters.
    Ranks are drawn per adapter from `ranks` with `rank_weights` (uniform if empty), independent of popularity.
    """

    num_adapters: int = 1000
    zipf_alpha: float = 1.1
    ranks: tuple[int, ...] = (8, 16, 32, 64, 128)
    rank_weights: tuple[float, ...] = ()
    request_rate: float = 100.0
    num_requests: int = 100_000
    prompt_tokens: LengthDist = field(default_factory=lambda: LengthDist(256, 0.8, 8, 2048))
    output_tokens: LengthDist = field(default_factory=lambda: LengthDist(128, 0.8, 4, 1024))
    drift_fraction: float = 0.0
    drift_period_s: float = 300.0
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.num_adapters >= 1, "num_adapters must be >= 1")
        _check(self.zipf_alpha >= 0, "zipf_alpha must be >= 0")
        _check(bool(self.ranks) and all(1 <= r <= 4096 for r in self.ranks), "ranks must be in 1..4096")
        _check(not self.rank_weights or len(self.rank_weights) == len(self.ranks), "give one weight per rank")
        _check(
            all(w >= 0 for w in self.rank_weights) and (not self.rank_weights or sum(self.rank_weights) > 0),
            "rank weights must be >= 0 with a positive sum",
        )
        _check(self.request_rate > 0 and self.num_requests >= 1, "need request_rate > 0 and num_requests >= 1")
        _check(0 <= self.drift_fraction <= 1 and self.drift_period_s > 0, "need drift_fraction in [0, 1]")

    def with_(self, **changes) -> WorkloadSpec:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["ranks"], out["rank_weights"] = list(self.ranks), list(self.rank_weights)
        return out

    @property
    def mean_tokens_per_request(self) -> float:
        """Prompt + output tokens per request (the unit of demand and of operating points)."""
        return self.prompt_tokens.mean() + self.output_tokens.mean()


# Named presets; `loraserve` is the LoRAServe-like setting of placement/README.md (rate set by --load).
PRESETS: dict[str, WorkloadSpec] = {
    "loraserve": WorkloadSpec(),
    "small": WorkloadSpec(num_adapters=100, num_requests=5_000, request_rate=20.0),
    "uniform-rank": WorkloadSpec(ranks=(16,)),
    "wide-rank": WorkloadSpec(ranks=(1, 2, 4, 8, 16, 32, 64, 128)),
}


@dataclass(frozen=True, slots=True)
class Workload:
    """A generated request trace (arrays of length N = num_requests, sorted by arrival) and its adapters (A)."""

    spec: WorkloadSpec
    adapter_ids: tuple[str, ...]  # [A]
    adapter_ranks: np.ndarray  # [A] int64
    popularity: np.ndarray  # [A] float64, time-0 request share, sums to 1
    arrival_s: np.ndarray  # [N] float64, non-decreasing
    adapter_index: np.ndarray  # [N] int64 into adapter_ids
    prompt_tokens: np.ndarray  # [N] int64
    output_tokens: np.ndarray  # [N] int64

    @property
    def num_requests(self) -> int:
        return int(self.arrival_s.shape[0])

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1]) if self.num_requests else 0.0

    def expected_tokens_per_s(self) -> dict[str, float]:
        """Time-0 demand per adapter in tokens/s: popularity x rate x mean tokens per request."""
        scale = self.spec.request_rate * self.spec.mean_tokens_per_request
        return {a: float(p * scale) for a, p in zip(self.adapter_ids, self.popularity, strict=True) if p > 0}

    def summary(self) -> dict:
        """Statistics of the generated trace (checked against the spec in tests)."""
        tokens = self.prompt_tokens + self.output_tokens
        ranks = self.adapter_ranks[self.adapter_index]
        return {
            "num_requests": self.num_requests,
            "duration_s": round(self.duration_s, 3),
            "observed_rate": round(self.num_requests / max(self.duration_s, 1e-9), 3),
            "mean_prompt_tokens": round(float(self.prompt_tokens.mean()), 2),
            "mean_output_tokens": round(float(self.output_tokens.mean()), 2),
            "tokens_per_s": round(float(tokens.sum()) / max(self.duration_s, 1e-9), 1),
            "num_adapters_seen": int(np.unique(self.adapter_index).shape[0]),
            "request_share_by_rank": {
                int(r): round(float((ranks == r).mean()), 4) for r in sorted(set(self.spec.ranks))
            },
        }


def adapter_ids(num: int) -> tuple[str, ...]:
    width = max(5, len(str(num - 1)))
    return tuple(f"adapter-{i:0{width}d}" for i in range(num))


def zipf_popularity(num: int, alpha: float) -> np.ndarray:
    """p_k ∝ 1/(k+1)^alpha for k = 0..num-1, float64 [num], sums to 1."""
    weights = 1.0 / np.arange(1, num + 1, dtype=np.float64) ** alpha
    return weights / weights.sum()


def assign_ranks(num: int, ranks: tuple[int, ...], weights: tuple[float, ...], rng) -> np.ndarray:
    """int64 [num] ranks drawn from `ranks` with `weights` (uniform when empty)."""
    probs = np.asarray(weights if weights else [1.0] * len(ranks), dtype=np.float64)
    return np.asarray(ranks, dtype=np.int64)[rng.choice(len(ranks), size=num, p=probs / probs.sum())]


def poisson_arrivals(rate: float, num: int, rng: np.random.Generator) -> np.ndarray:
    """float64 [num] arrival times of a Poisson process of `rate` per second starting at 0."""
    return np.cumsum(rng.exponential(1.0 / rate, size=num))


def _drifted_choices(spec: WorkloadSpec, arrival_s: np.ndarray, positions: np.ndarray, rng) -> np.ndarray:
    # positions = popularity position per request; each drift epoch swaps a fraction of positions' adapters.
    perm = np.arange(spec.num_adapters)
    if spec.drift_fraction == 0 or spec.num_adapters < 2:
        return perm[positions]
    epochs = (arrival_s // spec.drift_period_s).astype(np.int64)
    out = np.empty_like(positions)
    num_swaps = max(1, int(spec.drift_fraction * spec.num_adapters) // 2)
    for epoch in range(int(epochs[-1]) + 1):
        if epoch > 0:
            pairs = rng.choice(spec.num_adapters, size=(num_swaps, 2), replace=True)
            for a, b in pairs:
                perm[a], perm[b] = perm[b], perm[a]
        mask = epochs == epoch
        out[mask] = perm[positions[mask]]
    return out


def generate(spec: WorkloadSpec) -> Workload:
    """Generate the trace of `spec`; independent streams, so ranks do not change with num_requests."""
    rank_rng, arrival_rng, choice_rng, length_rng, drift_rng = (
        np.random.default_rng(s) for s in np.random.SeedSequence(spec.seed).spawn(5)
    )
    ranks = assign_ranks(spec.num_adapters, spec.ranks, spec.rank_weights, rank_rng)
    popularity = zipf_popularity(spec.num_adapters, spec.zipf_alpha)
    arrivals = poisson_arrivals(spec.request_rate, spec.num_requests, arrival_rng)
    positions = choice_rng.choice(spec.num_adapters, size=spec.num_requests, p=popularity)
    return Workload(
        spec=spec,
        adapter_ids=adapter_ids(spec.num_adapters),
        adapter_ranks=ranks,
        popularity=popularity,
        arrival_s=arrivals,
        adapter_index=_drifted_choices(spec, arrivals, positions, drift_rng),
        prompt_tokens=spec.prompt_tokens.sample(spec.num_requests, length_rng),
        output_tokens=spec.output_tokens.sample(spec.num_requests, length_rng),
    )
