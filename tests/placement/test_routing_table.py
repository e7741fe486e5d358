"""RoutingTable: validation, JSON round trip, sampling, consistent-hash default, diff."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lorafleet.infra.errors import InvalidPlacement
from lorafleet.placement import RoutingTable, default_replica, diff
from lorafleet.placement.routing_table import jump_hash

pytestmark = pytest.mark.timeout(300)  # a hang fails fast instead of stalling CI


def _table(entries, num_replicas=4, version=1):
    return RoutingTable(num_replicas, entries, version=version)


entry_st = st.lists(st.floats(min_value=0.01, max_value=1.0), min_size=1, max_size=4).map(
    lambda ws: tuple((i, w / sum(ws)) for i, w in enumerate(ws))
)


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True), entry_st, max_size=20))
def test_json_round_trip_and_sampling_stay_in_the_table(entries):
    table = _table(entries, num_replicas=4, version=7)
    again = RoutingTable.from_json(table.to_json())
    assert again.version == 7 and again.num_replicas == 4
    assert set(again.entries) == set(entries)
    rng = random.Random(0)
    for adapter_id, entry in entries.items():
        assert sum(p for _, p in again.entries[adapter_id]) == pytest.approx(1.0)
        allowed = {r for r, _ in entry}
        assert all(again.sample(adapter_id, rng) in allowed for _ in range(20))


def test_sample_follows_probabilities():
    table = _table({"a": ((0, 0.2), (2, 0.8))})
    rng = random.Random(1)
    counts = Counter(table.sample("a", rng) for _ in range(20_000))
    assert set(counts) == {0, 2}
    assert counts[2] / 20_000 == pytest.approx(0.8, abs=0.015)


@settings(max_examples=100, deadline=None)
@given(st.text(min_size=1, max_size=20), st.integers(min_value=1, max_value=300))
def test_unknown_adapters_route_to_a_valid_consistent_replica(adapter_id, num_replicas):
    table = RoutingTable(num_replicas, {})
    replica = table.sample(adapter_id)
    assert 0 <= replica < num_replicas
    assert replica == default_replica(adapter_id, num_replicas) == table.replicas_for(adapter_id)[0]


def test_jump_hash_moves_few_keys_when_growing():
    keys = range(5000)
    before = [jump_hash(k * 7919, 10) for k in keys]
    after = [jump_hash(k * 7919, 11) for k in keys]
    moved = sum(b != a for b, a in zip(before, after, strict=True))
    assert moved / 5000 == pytest.approx(1 / 11, abs=0.02)
    assert all(a == 10 for b, a in zip(before, after, strict=True) if b != a)


@pytest.mark.parametrize(
    "entries, message",
    [
        ({"a": ((0, 0.5), (1, 0.4))}, "sum to"),
        ({"a": ((9, 1.0),)}, "outside"),
        ({"a": ((0, 0.5), (0, 0.5))}, "twice"),
        ({"a": ()}, "at least one"),
        ({"a": ((0, 0.0), (1, 1.0))}, "outside (0, 1]"),
    ],
)
def test_invalid_entries_are_rejected_with_the_adapter_named(entries, message):
    with pytest.raises(InvalidPlacement, match="adapter") as info:
        _table(entries)
    assert message in str(info.value)


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"num_replicas": 0, "entries": {}}',
                                  '{"num_replicas": 2, "entries": {"a": [[0, "x"]]}}'])
def test_from_json_rejects_bad_documents(text):
    with pytest.raises(InvalidPlacement, match="routing table"):
        RoutingTable.from_json(text)


def test_diff_reports_moves_churn_and_loads():
    old = _table({"a": ((0, 1.0),), "b": ((1, 0.5), (2, 0.5)), "gone": ((3, 1.0),)}, version=1)
    new = _table({"a": ((0, 1.0),), "b": ((1, 1.0),), "c": ((2, 1.0),)}, version=2)
    change = diff(old, new, demand={"a": 10.0, "b": 10.0, "c": 0.0, "gone": 0.0})
    assert change.old_version == 1 and change.new_version == 2
    assert change.added == ("c",) and change.removed == ("gone",)
    moved = {m.adapter_id: m.moved_fraction for m in change.moves}
    assert "a" not in moved and moved["b"] == pytest.approx(0.5)
    assert change.churn == pytest.approx(0.25)  # b: half its traffic, weight 10 of 20
    assert change.num_new_placements == 1  # c on replica 2
    assert change.num_dropped_placements == 2  # b off replica 2, gone off replica 3
    assert change.to_dict()["num_moved"] == change.num_moved


def test_diff_without_previous_table_moves_everything():
    new = _table({"a": ((0, 1.0),)})
    change = diff(None, new)
    assert change.old_version is None and change.churn == 1.0 and change.added == ("a",)


@settings(max_examples=50, deadline=None)
@given(st.dictionaries(st.from_regex(r"[a-z0-9]{1,8}", fullmatch=True), entry_st, max_size=20),
       st.sampled_from(["", "zz-missing", "a"]))
def test_a_table_from_columns_reads_as_its_dict(entries, probe):
    """RoutingTable.from_columns keeps its entries in its columns (ColumnEntries); every read (lookup, membership,
    iteration, items, ==, JSON, pickle, sample) sees what a table of the same dict sees, before and after a bulk
    read built the dict."""
    import pickle

    from lorafleet.placement.routing_table import ColumnEntries

    entries = dict(sorted(entries.items()))
    plain = _table(entries)
    for bulk_first in (False, True):
        table = RoutingTable.from_columns(4, plain.columns(), version=1, created_at=plain.created_at)
        assert isinstance(table.entries, ColumnEntries)
        if bulk_first:
            assert dict(table.entries.items()) == entries
        assert len(table) == len(entries) and list(table.entries) == list(entries)
        assert (probe in table) == (probe in entries)
        assert table.entries.get(probe, ()) == entries.get(probe, ())
        assert table.entries.get(3) is None and 3 not in table.entries
        for adapter_id, entry in entries.items():
            assert table.entries[adapter_id] == entry and table.probabilities(adapter_id) == dict(entry)
            assert table.sample(adapter_id, random.Random(0)) == plain.sample(adapter_id, random.Random(0))
        if probe not in entries:
            with pytest.raises(KeyError):
                table.entries[probe]
        assert table.entries == entries and entries == table.entries and table.entries == plain.entries
        assert table.to_json() == plain.to_json()
        assert pickle.loads(pickle.dumps(table)).entries == entries
        assert table.with_version(2).entries == entries
