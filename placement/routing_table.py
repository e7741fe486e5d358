"""RoutingTable: adapter_id → [(replica_rank, probability)], versioned, with a consistent-hash default."""

from __future__ import annotations

import hashlib
import json
import random
import time
from bisect import bisect_right
from collections.abc import Mapping
from dataclasses import InitVar, dataclass, field
from typing import Any, Protocol

import numpy as np

from lorafleet.infra.errors import InvalidPlacement

# Probabilities of one adapter must sum to 1 within this tolerance; they are renormalised on load.
PROB_TOLERANCE = 1e-6


class UniformSource(Protocol):
    def random(self) -> float: ...


def stable_hash64(key: str) -> int:
    """64-bit hash of `key`, equal in every process (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def jump_hash(key: int, num_buckets: int) -> int:
    """Jump consistent hash (Lamping & Veach 2014): growing N to N+1 moves only 1/(N+1) of the keys."""
    bucket, j = -1, 0
    while j < num_buckets:
        bucket = j
        key = (key * 2862933555777941757 + 1) & 0xFFFFFFFFFFFFFFFF
        j = int((bucket + 1) * (float(1 << 31) / float((key >> 33) + 1)))
    return bucket


def default_replica(adapter_id: str, num_replicas: int) -> int:
    """Replica for an adapter not in the table: consistent hash of its id."""
    return jump_hash(stable_hash64(adapter_id), num_replicas)


Entry = tuple[tuple[int, float], ...]


@dataclass(frozen=True, slots=True)
class TableColumns:
    """The entries as arrays (CSR): row k = adapter_ids[k], its pieces offsets[k]:offsets[k+1] of replicas /
    probabilities, replicas ascending within a row. What the solver reads of a previous table without a Python
    loop per adapter."""

    adapter_ids: list[str]  # [A]
    offsets: np.ndarray  # [A + 1] int64
    replicas: np.ndarray  # [P] int64
    probabilities: np.ndarray  # [P] float64
    row: dict[str, int] = field(default_factory=dict, repr=False)  # adapter_id -> k, built on first use

    def _rows(self) -> dict[str, int]:
        if not self.row and self.adapter_ids:
            self.row.update(zip(self.adapter_ids, range(len(self.adapter_ids)), strict=True))
        return self.row

    def rows_of(self, adapter_ids: list[str]) -> np.ndarray:
        """int64 [len(adapter_ids)]: each id's row, -1 where the table has no entry for it."""
        get = self._rows().get
        return np.fromiter((get(a, -1) for a in adapter_ids), dtype=np.int64, count=len(adapter_ids))

    def row_of(self, adapter_id: str) -> int:
        """adapter_id's row, -1 where the table has no entry for it."""
        return self._rows().get(adapter_id, -1)

    def entry(self, row: int) -> Entry:
        lo, hi = int(self.offsets[row]), int(self.offsets[row + 1])
        return tuple(zip(self.replicas[lo:hi].tolist(), self.probabilities[lo:hi].tolist(), strict=True))

    def entries(self) -> dict[str, Entry]:
        """Every row's entry: adapter_id -> ((replica, probability), ...)."""
        # Most adapters sit on one replica: their entry is ((r, p),) without a slice per row.
        offsets, counts = self.offsets, np.diff(self.offsets)
        reps, ps = self.replicas.tolist(), self.probabilities.tolist()
        values: list[Entry] = [((r, p),) for r, p in zip(self.replicas[offsets[:-1]].tolist(),
                                                          self.probabilities[offsets[:-1]].tolist(), strict=True)]
        for k in np.flatnonzero(counts > 1).tolist():
            a, b = int(offsets[k]), int(offsets[k + 1])
            values[k] = tuple(zip(reps[a:b], ps[a:b], strict=True))
        return dict(zip(self.adapter_ids, values, strict=True))

    def main_replica(self) -> np.ndarray:
        """int64 [A]: each row's replica of the largest probability (the first of them on ties)."""
        num_rows = len(self.adapter_ids)
        if num_rows == 0:
            return np.zeros(0, dtype=np.int64)
        row_of_piece = np.repeat(np.arange(num_rows), np.diff(self.offsets))
        order = np.lexsort((-self.probabilities, row_of_piece))  # by row, then probability descending
        return self.replicas[order[self.offsets[:-1]]]


class ColumnEntries(Mapping[str, Entry]):
    """RoutingTable.entries read from the table's columns: one adapter's tuple is made when it is looked up, every
    adapter's (a dict, kept) on the first bulk read (items, values, ==). A solved table of 1M adapters would
    otherwise spend ~0.5 s on 1M tuples that mostly only its JSON reads."""

    __slots__ = ("columns", "_dict")

    def __init__(self, columns: TableColumns) -> None:
        self.columns = columns
        self._dict: dict[str, Entry] | None = None

    def materialize(self) -> dict[str, Entry]:
        if self._dict is None:
            self._dict = self.columns.entries()
        return self._dict

    def __len__(self) -> int:
        return len(self.columns.adapter_ids)

    def __iter__(self):
        return iter(self.columns.adapter_ids)

    def __contains__(self, adapter_id: object) -> bool:
        if self._dict is not None:
            return adapter_id in self._dict
        return isinstance(adapter_id, str) and self.columns.row_of(adapter_id) >= 0

    def __getitem__(self, adapter_id: str) -> Entry:
        if self._dict is not None:
            return self._dict[adapter_id]
        row = self.columns.row_of(adapter_id) if isinstance(adapter_id, str) else -1
        if row < 0:
            raise KeyError(adapter_id)
        return self.columns.entry(row)

    def get(self, adapter_id, default=None):
        if self._dict is not None:
            return self._dict.get(adapter_id, default)
        row = self.columns.row_of(adapter_id) if isinstance(adapter_id, str) else -1
        return self.columns.entry(row) if row >= 0 else default

    def items(self):
        return self.materialize().items()

    def values(self):
        return self.materialize().values()

    def __eq__(self, other: object) -> bool:
        return self.materialize() == other

    __hash__ = None  # type: ignore[assignment]   # a mapping, like dict

    def __repr__(self) -> str:
        return f"ColumnEntries({self.materialize()!r})"

    def __reduce__(self):
        return ColumnEntries, (self.columns,)


@dataclass(frozen=True, slots=True)
class RoutingTable:
    """Where each adapter's requests go. `entries[a]` = ((replica_rank, probability), ...), sum 1.

    Adapters not in `entries` route to `default_replica(a, num_replicas)`. `meta` carries solver
    facts (e.g. predicted load per replica) for display; it never affects routing. `check=False` skips the
    per-entry validation (entries that were validated already: `from_columns`, `with_version`).
    """

    num_replicas: int
    entries: Mapping[str, Entry]
    version: int = 0
    created_at: float = field(default_factory=time.time)
    meta: Mapping[str, Any] = field(default_factory=dict)
    _cumulative: dict = field(default_factory=dict, repr=False, compare=False)
    _columns: TableColumns | None = field(default=None, init=False, repr=False, compare=False)
    check: InitVar[bool] = True

    def __post_init__(self, check: bool = True) -> None:
        if not isinstance(self.num_replicas, int) or self.num_replicas < 1:
            raise InvalidPlacement(f"routing table: num_replicas must be an integer >= 1, got {self.num_replicas!r}")
        if not isinstance(self.version, int) or self.version < 0:
            raise InvalidPlacement(f"routing table: version must be an integer >= 0, got {self.version!r}")
        if check:
            _check_entries(self.entries, self.num_replicas)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, adapter_id: object) -> bool:
        return adapter_id in self.entries

    def replicas_for(self, adapter_id: str) -> tuple[int, ...]:
        """Replica ranks that serve `adapter_id` (its consistent-hash default if not in the table)."""
        entry = self.entries.get(adapter_id)
        if entry is None:
            return (default_replica(adapter_id, self.num_replicas),)
        return tuple(replica for replica, _ in entry)

    def probabilities(self, adapter_id: str) -> dict[int, float]:
        entry = self.entries.get(adapter_id)
        if entry is None:
            return {default_replica(adapter_id, self.num_replicas): 1.0}
        return dict(entry)

    def sample(self, adapter_id: str, rng: UniformSource | None = None) -> int:
        """Replica rank for one request of `adapter_id`, drawn with the table's probabilities.

        `rng` is anything with `.random() -> [0, 1)` (random.Random, numpy Generator); None → random module.
        """
        entry = self.entries.get(adapter_id)
        if entry is None:
            return default_replica(adapter_id, self.num_replicas)
        if len(entry) == 1:
            return entry[0][0]
        cumulative = self._cumulative.get(adapter_id)
        if cumulative is None:
            total, cumulative = 0.0, []
            for _, probability in entry:
                total += probability
                cumulative.append(total)
            self._cumulative[adapter_id] = cumulative
        u = random.random() if rng is None else rng.random()
        index = bisect_right(cumulative, u * cumulative[-1])
        return entry[min(index, len(entry) - 1)][0]

    def with_version(self, version: int) -> RoutingTable:
        table = RoutingTable(self.num_replicas, self.entries, version, self.created_at, self.meta, check=False)
        object.__setattr__(table, "_columns", self._columns)
        return table

    def columns(self) -> TableColumns:
        """The entries as arrays (built once per table; a solved table has them from the solver)."""
        if self._columns is None:
            offsets, replicas, probabilities = [0], [], []
            for entry in self.entries.values():
                for replica, p in sorted(entry):
                    replicas.append(replica)
                    probabilities.append(p)
                offsets.append(len(replicas))
            object.__setattr__(self, "_columns", TableColumns(
                list(self.entries), np.asarray(offsets, dtype=np.int64), np.asarray(replicas, dtype=np.int64),
                np.asarray(probabilities, dtype=np.float64)))
        return self._columns  # type: ignore[return-value]

    @classmethod
    def from_columns(cls, num_replicas: int, columns: TableColumns, version: int = 0,
                     created_at: float | None = None, meta: Mapping[str, Any] | None = None) -> RoutingTable:
        """A table from arrays (the solver's output), validated with array operations instead of per entry."""
        offsets, replicas, probs = columns.offsets, columns.replicas, columns.probabilities
        num_rows = len(columns.adapter_ids)
        counts = np.diff(offsets)
        if offsets.shape != (num_rows + 1,) or offsets[0] != 0 or offsets[-1] != len(replicas) or (
                counts < 1).any() or len(probs) != len(replicas):
            raise InvalidPlacement("routing table: every adapter needs at least one (replica, probability)")
        if len(replicas) and (replicas.min() < 0 or replicas.max() >= num_replicas):
            raise InvalidPlacement(f"routing table: a replica outside 0..{num_replicas - 1}")
        row_of_piece = np.repeat(np.arange(num_rows), counts)
        if (np.diff(replicas)[np.diff(row_of_piece) == 0] <= 0).any():
            raise InvalidPlacement("routing table: an adapter lists a replica twice (or not in ascending order)")
        if not ((probs > 0) & (probs <= 1 + PROB_TOLERANCE)).all():
            raise InvalidPlacement("routing table: a probability outside (0, 1]")
        sums = np.add.reduceat(probs, offsets[:-1]) if num_rows else probs
        if (np.abs(sums - 1.0) > PROB_TOLERANCE).any():
            raise InvalidPlacement("routing table: the probabilities of an adapter do not sum to 1")
        table = cls(num_replicas, ColumnEntries(columns), version, time.time() if created_at is None else created_at,
                    dict(meta or {}), check=False)
        object.__setattr__(table, "_columns", columns)
        return table

    # JSON form: {"version", "num_replicas", "created_at", "entries": {id: [[rank, p], ...]}, "meta"}
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "num_replicas": self.num_replicas,
            "created_at": self.created_at,
            "entries": {a: [[r, p] for r, p in entry] for a, entry in self.entries.items()},
            "meta": dict(self.meta),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_dict(cls, data: Any) -> RoutingTable:
        if not isinstance(data, dict):
            raise InvalidPlacement("routing table: top level must be a JSON object")
        raw = data.get("entries", {})
        if not isinstance(raw, dict):
            raise InvalidPlacement("routing table: 'entries' must map adapter ids to [[replica, probability], ...]")
        entries: dict[str, Entry] = {}
        for adapter_id, pairs in raw.items():
            try:
                entry = tuple((int(r), float(p)) for r, p in pairs)
            except (TypeError, ValueError):
                raise InvalidPlacement(
                    f"routing table: entry of adapter '{adapter_id}' must be [[replica, probability], ...]"
                ) from None
            total = sum(p for _, p in entry)
            entries[adapter_id] = tuple((r, p / total) for r, p in entry) if total > 0 else entry
        meta = data.get("meta") or {}
        return cls(
            num_replicas=data.get("num_replicas"),  # type: ignore[arg-type]
            entries=entries,
            version=data.get("version", 0),
            created_at=float(data.get("created_at", 0.0)),
            meta=meta if isinstance(meta, dict) else {},
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> RoutingTable:
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidPlacement(f"routing table: not valid JSON ({exc.__class__.__name__})") from None
        return cls.from_dict(data)


def _check_entries(entries: Mapping[str, Entry], num_replicas: int) -> None:
    """Every entry valid (see _check_entry); one-replica entries, most of a large table, on a fast path."""
    for adapter_id, entry in entries.items():
        if len(entry) == 1 and type(adapter_id) is str:
            replica, probability = entry[0]
            if type(replica) is int and 0 <= replica < num_replicas and abs(probability - 1.0) <= PROB_TOLERANCE:
                continue
        _check_entry(adapter_id, entry, num_replicas)


def _check_entry(adapter_id: str, entry: Entry, num_replicas: int) -> None:
    if not isinstance(adapter_id, str) or not entry:
        raise InvalidPlacement(f"routing table: adapter {adapter_id!r} needs at least one (replica, probability)")
    seen = set()
    for replica, probability in entry:
        if not (isinstance(replica, int) and 0 <= replica < num_replicas):
            raise InvalidPlacement(
                f"routing table: adapter '{adapter_id}' names replica {replica!r}, outside 0..{num_replicas - 1}"
            )
        if replica in seen:
            raise InvalidPlacement(f"routing table: adapter '{adapter_id}' lists replica {replica} twice")
        seen.add(replica)
        if not (probability > 0 and probability <= 1 + PROB_TOLERANCE):
            raise InvalidPlacement(
                f"routing table: adapter '{adapter_id}' has probability {probability!r} outside (0, 1]"
            )
    total = sum(p for _, p in entry)
    if abs(total - 1.0) > PROB_TOLERANCE:
        raise InvalidPlacement(f"routing table: probabilities of adapter '{adapter_id}' sum to {total:.6g}, not 1")
