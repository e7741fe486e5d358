"""LoadPlan: the request schedule of one load test (arrival, adapter, rank, lengths), from the workload generator.

The runner writes the plan to JSON and the locustfile replays it, so the trace Locust sends is exactly the
Zipf / Poisson / lognormal workload of `placement/workload.py`, mapped onto the adapters a server really has.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lorafleet.infra.errors import LoRAFleetError
from lorafleet.placement.workload import LengthDist, WorkloadSpec, generate

# Rank classes of the report: rank-aware placement groups adapters by rank, so latency is read per class.
RANK_CLASSES: dict[str, tuple[int, int]] = {"r1-4": (1, 4), "r8-16": (8, 16), "r32+": (32, 1 << 20)}
UNKNOWN_RANK_CLASS = "r?"
_WORDS = ("the", "query", "select", "name", "from", "table", "where", "value", "hello", "world", "model",
          "adapter", "rank", "data", "user", "order", "count", "time", "list", "text")


class LoadTestError(LoRAFleetError):
    """Bad load-test input (rate, duration, adapters) or a host that cannot be reached."""

    code = "load_test_error"


def rank_class(rank: int | None) -> str:
    for name, (low, high) in RANK_CLASSES.items():
        if rank is not None and low <= rank <= high:
            return name
    return UNKNOWN_RANK_CLASS


def rank_of(adapter_id: str, known: dict[str, int]) -> int | None:
    """Rank from `known` (e.g. the demo table), else from an id like `x-lora-r16` / `x-ia3` (rank 1), else None."""
    if adapter_id in known:
        return known[adapter_id]
    if "ia3" in adapter_id.lower():
        return 1
    match = re.search(r"(?:^|[-_.])r(\d{1,4})(?:$|[-_.])", adapter_id)
    return int(match.group(1)) if match else None


@dataclass(frozen=True, slots=True)
class PlannedRequest:
    arrival_s: float
    adapter_id: str
    rank: int | None
    prompt_tokens: int
    max_tokens: int
    is_chat: bool
    seed: int


@dataclass(frozen=True, slots=True)
class LoadPlan:
    """The requests to send in [0, duration_s), sorted by arrival, and the parameters that made them."""

    rate: float
    duration_s: float
    zipf: float
    seed: int
    adapter_ids: tuple[str, ...]  # popularity order: adapter_ids[0] is the most popular
    requests: tuple[PlannedRequest, ...]

    def to_json(self, path: Path) -> Path:
        data = asdict(self)
        data["adapter_ids"] = list(self.adapter_ids)
        data["requests"] = [asdict(r) for r in self.requests]
        path.write_text(json.dumps(data))
        return path

    @classmethod
    def from_json(cls, path: Path) -> LoadPlan:
        data = json.loads(Path(path).read_text())
        requests = tuple(PlannedRequest(**r) for r in data.pop("requests"))
        return cls(**{**data, "adapter_ids": tuple(data["adapter_ids"]), "requests": requests})

    def request_share_by_rank_class(self) -> dict[str, float]:
        classes = [rank_class(r.rank) for r in self.requests]
        return {c: round(classes.count(c) / max(len(classes), 1), 4) for c in sorted(set(classes))}


def build_plan(adapter_ids: list[str], known_ranks: dict[str, int], *, rate: float, duration_s: float,
               zipf: float, num_adapters: int, prompt_tokens: LengthDist, output_tokens: LengthDist,
               chat_fraction: float = 0.25, seed: int = 0) -> LoadPlan:
    """Zipf(zipf) popularity over `num_adapters` of `adapter_ids` (a seeded shuffle picks which adapter gets
    which popularity position, so popularity is independent of rank), Poisson(rate) arrivals for duration_s."""
    if rate <= 0 or duration_s <= 0:
        raise LoadTestError(f"rate and duration must be > 0 (got rate {rate}, duration {duration_s}s)")
    if zipf < 0:
        raise LoadTestError(f"--zipf must be >= 0, got {zipf}")
    if not 1 <= num_adapters <= len(adapter_ids):
        raise LoadTestError(f"--adapters must be in 1..{len(adapter_ids)} (adapters on the server), "
                            f"got {num_adapters}")
    if not 0 <= chat_fraction <= 1:
        raise LoadTestError(f"chat fraction must be in [0, 1], got {chat_fraction}")
    rng = np.random.default_rng(seed)
    chosen = [adapter_ids[i] for i in rng.permutation(len(adapter_ids))[:num_adapters]]
    # Enough Poisson arrivals to cover duration_s with overwhelming probability (mean + 6 sd + slack).
    expected = rate * duration_s
    spec = WorkloadSpec(num_adapters=num_adapters, zipf_alpha=zipf, request_rate=rate,
                        num_requests=int(expected + 6 * expected**0.5 + 20), prompt_tokens=prompt_tokens,
                        output_tokens=output_tokens, seed=seed)
    trace = generate(spec)
    is_chat = rng.random(trace.num_requests) < chat_fraction
    requests = tuple(
        PlannedRequest(arrival_s=float(trace.arrival_s[i]), adapter_id=chosen[a],
                       rank=rank_of(chosen[a], known_ranks), prompt_tokens=int(trace.prompt_tokens[i]),
                       max_tokens=int(trace.output_tokens[i]), is_chat=bool(is_chat[i]), seed=i)
        for i, a in enumerate(trace.adapter_index.tolist()) if trace.arrival_s[i] < duration_s
    )
    return LoadPlan(rate=rate, duration_s=duration_s, zipf=zipf, seed=seed, adapter_ids=tuple(chosen),
                    requests=requests)


def prompt_text(num_words: int, seed: int) -> str:
    """A deterministic prompt of `num_words` words (the server's tokenizer decides the token count: the
    demo's 1024-token vocabulary makes about 2.3 tokens per word; summary.json reports the real counts)."""
    rng = np.random.default_rng(seed)
    return " ".join(_WORDS[i] for i in rng.integers(0, len(_WORDS), size=num_words))
