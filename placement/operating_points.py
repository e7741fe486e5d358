"""Operating points: max sustainable tokens/s of one replica per rank class under an SLO, plus adapter memory.

File format (JSON; the packaged default is placement/operating_points.json):
  {"slo": {"p95_ttft_s": 1.0, "p95_tpot_s": 0.1},
   "points": [{"rank": 8, "max_tokens_per_s": 9000.0}, ...],
   "memory": {"max_adapter_bytes": ..., "adapter_bytes_per_rank": ...},
   "crowding": [{"rank": 8, "num_adapters": 64, "distinct_per_step": 35.8, "mean_batch": 54.0,
                 "max_tokens_per_s": 7546.0}, ...],
   "source": "...", ...any other keys are kept as metadata}
`crowding` (optional): the same capacity measured with other numbers of equally popular adapters, keyed by the
mean number of distinct adapters per step; every step reads each distinct adapter's weights, so a replica serving
many adapters at once sustains less than `points` (measured with 16), one serving a single hot adapter more.
The curve scales `points`: capacity(D) = points[r] x tokens(D) / tokens(the 16-adapter entry).
Tokens = prompt + generated tokens. An adapter of rank r belongs to the smallest class >= r (the largest
class if r is above all of them): a replica whose batch holds rank r pays at least class-r cost.
"""

from __future__ import annotations

import json
from bisect import bisect_left
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from lorafleet.infra.errors import InvalidPlacement

DEFAULT_FILE = "operating_points.json"
REFERENCE_ADAPTERS = 16  # equally popular adapters of the `points` measurement (placement/sim_profile.py)


@dataclass(frozen=True, slots=True)
class OperatingPoints:
    """Capacity per rank class (`points[rank] = max tokens/s`) for one replica under the SLO."""

    points: dict[int, float]
    slo_p95_ttft_s: float
    slo_p95_tpot_s: float
    max_adapter_bytes: int
    adapter_bytes_per_rank: int
    source: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    # rank class -> ((num adapters, mean distinct adapters per step, mean batch, max tokens/s), ...); may be empty
    crowding: dict[int, tuple[tuple[int, float, float, float], ...]] = field(default_factory=dict)
    rank_classes: tuple[int, ...] = field(init=False)

    def __post_init__(self) -> None:
        if not self.points:
            raise InvalidPlacement("operating points: 'points' must list at least one rank class")
        for rank, tokens_per_s in self.points.items():
            if not isinstance(rank, int) or rank < 1 or not tokens_per_s > 0:
                raise InvalidPlacement(
                    f"operating points: rank {rank!r} needs an integer rank >= 1 and max_tokens_per_s > 0"
                )
        if not (self.slo_p95_ttft_s > 0 and self.slo_p95_tpot_s > 0):
            raise InvalidPlacement("operating points: slo p95_ttft_s and p95_tpot_s must be > 0")
        if self.max_adapter_bytes < 1 or self.adapter_bytes_per_rank < 1:
            raise InvalidPlacement("operating points: memory max_adapter_bytes and adapter_bytes_per_rank must be >= 1")
        for rank, curve in self.crowding.items():
            if not curve or any(not (n >= 1 and d >= 1 and b > 0 and t > 0) for n, d, b, t in curve):
                raise InvalidPlacement(f"operating points: crowding of rank {rank!r} needs num_adapters >= 1, "
                                       "distinct_per_step >= 1, mean_batch > 0 and max_tokens_per_s > 0")
        # a curve without its class in `points` (an edited file) has nothing to scale: dropped
        object.__setattr__(self, "crowding", {r: tuple(sorted(c)) for r, c in sorted(self.crowding.items())
                                              if r in self.points})
        object.__setattr__(self, "rank_classes", tuple(sorted(self.points)))

    def rank_class(self, rank: int) -> int:
        """Smallest class >= rank; the largest class for ranks above every class."""
        index = bisect_left(self.rank_classes, rank)
        return self.rank_classes[min(index, len(self.rank_classes) - 1)]

    def capacity(self, rank: int) -> float:
        """Max tokens/s of a replica whose largest adapter rank is `rank`."""
        return self.points[self.rank_class(rank)]

    def adapter_bytes(self, rank: int) -> int:
        """Default adapter size when the registry does not say: rank x bytes per rank unit."""
        return int(rank) * self.adapter_bytes_per_rank

    def crowding_curve(self, rank_class: int) -> tuple[tuple[float, ...], tuple[float, ...], float] | None:
        """(distinct adapters per step, capacity / points[rank_class], mean batch at the operating point) of the
        class, ascending in distinct adapters; None when not profiled."""
        curve = self.crowding.get(rank_class)
        if not curve:
            return None
        reference = next((t for n, _, _, t in curve if n == REFERENCE_ADAPTERS), self.points[rank_class])
        batch = sum(b for _, _, b, _ in curve) / len(curve)
        return tuple(d for _, d, _, _ in curve), tuple(t / reference for _, _, _, t in curve), batch

    def to_dict(self) -> dict[str, Any]:
        out = dict(self.meta)
        out.update(
            {
                "source": self.source,
                "slo": {"p95_ttft_s": self.slo_p95_ttft_s, "p95_tpot_s": self.slo_p95_tpot_s},
                "points": [{"rank": r, "max_tokens_per_s": round(self.points[r], 3)} for r in self.rank_classes],
                "memory": {
                    "max_adapter_bytes": self.max_adapter_bytes,
                    "adapter_bytes_per_rank": self.adapter_bytes_per_rank,
                },
            }
        )
        if self.crowding:
            out["crowding"] = [{"rank": r, "num_adapters": n, "distinct_per_step": round(d, 3),
                                "mean_batch": round(b, 3), "max_tokens_per_s": round(t, 3)}
                               for r, curve in self.crowding.items() for n, d, b, t in curve]
        return out

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        tmp.replace(path)  # atomic: readers never see half a file
        return path

    @classmethod
    def from_dict(cls, data: Any, where: str = "operating points") -> OperatingPoints:
        if not isinstance(data, dict):
            raise InvalidPlacement(f"{where}: top level must be a JSON object")
        try:
            slo, memory = data["slo"], data["memory"]
            points = {int(p["rank"]): float(p["max_tokens_per_s"]) for p in data["points"]}
            meta = {k: v for k, v in data.items() if k not in ("slo", "memory", "points", "source", "crowding")}
            crowding: dict[int, list[tuple[int, float, float, float]]] = {}
            for c in data.get("crowding") or ():
                crowding.setdefault(int(c["rank"]), []).append((int(c["num_adapters"]), float(c["distinct_per_step"]),
                                                                float(c["mean_batch"]), float(c["max_tokens_per_s"])))
            return cls(
                points=points,
                slo_p95_ttft_s=float(slo["p95_ttft_s"]),
                slo_p95_tpot_s=float(slo["p95_tpot_s"]),
                max_adapter_bytes=int(memory["max_adapter_bytes"]),
                adapter_bytes_per_rank=int(memory["adapter_bytes_per_rank"]),
                source=str(data.get("source", "")),
                meta=meta,
                crowding={r: tuple(c) for r, c in crowding.items()},
            )
        except KeyError as exc:
            raise InvalidPlacement(f"{where}: missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise InvalidPlacement(f"{where}: bad value ({exc})") from None
        except InvalidPlacement as exc:
            raise InvalidPlacement(str(exc).replace("operating points", where, 1)) from None

    @classmethod
    def load(cls, path: str | Path) -> OperatingPoints:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise InvalidPlacement(f"{path}: operating points file not found") from None
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise InvalidPlacement(f"{path}: not a readable JSON file ({exc.__class__.__name__})") from None
        return cls.from_dict(data, where=str(path))

    @classmethod
    def default(cls) -> OperatingPoints:
        """The packaged default (placement/operating_points.json; see its 'source' and placement/README.md)."""
        text = resources.files("lorafleet.placement").joinpath(DEFAULT_FILE).read_text()
        return cls.from_dict(json.loads(text), where=f"lorafleet.placement/{DEFAULT_FILE}")
