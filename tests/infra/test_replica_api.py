"""The router <-> replica contract: errors by code, routing stats from Serve's dict, request validation, pickling."""

from __future__ import annotations

import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from lorafleet.infra import errors
from lorafleet.infra.errors import AdapterNotFound, LoRAFleetError, Overloaded, error_for_code
from lorafleet.infra.replica_api import (
    ChatTurn,
    GenerateRequest,
    RoutingStats,
    ServedBy,
    StreamChunk,
    StreamError,
    TokenLogprob,
)


def all_error_types() -> list[type[LoRAFleetError]]:
    import lorafleet.router.auth  # noqa: F401  (router errors register as subclasses too)
    import lorafleet.router.key_store  # noqa: F401
    import lorafleet.router.limits  # noqa: F401

    found, todo = [], [LoRAFleetError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo += cls.__subclasses__()
    return found


def test_every_error_code_names_one_type_and_comes_back_as_it():
    types = all_error_types()
    codes = [cls.code for cls in types]
    assert len(codes) == len(set(codes)), f"duplicate codes: {sorted(c for c in codes if codes.count(c) > 1)}"
    for cls in types:
        if cls is LoRAFleetError:
            continue
        exc = StreamError.of(cls("what went wrong")).to_exception()
        assert type(exc) is cls and str(exc) == "what went wrong" and exc.http_status == cls.http_status


def test_unknown_code_is_a_plain_internal_error():
    exc = error_for_code("no_such_code", "odd")
    assert type(exc) is LoRAFleetError and exc.http_status == 500 and str(exc) == "odd"


def test_overloaded_and_not_found_keep_their_status():
    assert StreamError.of(Overloaded("full")).to_exception().http_status == 429
    assert isinstance(errors.error_for_code(AdapterNotFound.code, "x"), AdapterNotFound)


def test_routing_stats_round_trip_and_tolerate_what_serve_hands_over():
    stats = RoutingStats(rank=3, queue_len=5, num_inflight=2, resident_adapters=("a", "b"), tokens_per_s=1.5,
                         kv_used=0.25, max_rank=8, adapter_types=("LORA",))
    assert RoutingStats.from_dict(stats.to_dict()) == stats
    assert RoutingStats.from_dict({}) == RoutingStats(rank=None)   # a replica that has not reported yet
    assert RoutingStats.from_dict(None) == RoutingStats(rank=None)
    odd = RoutingStats.from_dict({"rank": True, "queue_len": -3, "resident_adapters": "ab", "kv_used": float("nan"),
                                  "max_rank": 0, "adapter_types": [1]})
    assert odd == RoutingStats(rank=None)


@given(st.dictionaries(st.sampled_from(["rank", "queue_len", "num_inflight", "resident_adapters", "tokens_per_s",
                                        "kv_used", "max_rank", "adapter_types", "other"]),
                       st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=3),
                                 st.lists(st.one_of(st.text(max_size=3), st.integers()), max_size=3))))
def test_routing_stats_from_any_dict_never_raise(data):
    stats = RoutingStats.from_dict(data)
    assert stats.queue_len >= 0 and all(isinstance(a, str) for a in stats.resident_adapters)
    assert stats.max_rank is None or stats.max_rank > 0
    assert all(isinstance(t, str) for t in stats.adapter_types)


def test_generate_request_needs_one_prompt_kind_and_a_token():
    with pytest.raises(ValueError, match="exactly one of prompt and messages"):
        GenerateRequest("r", None)
    with pytest.raises(ValueError, match="exactly one"):
        GenerateRequest("r", None, prompt="x", messages=(ChatTurn("user", "hi"),))
    with pytest.raises(ValueError, match="max_tokens"):
        GenerateRequest("r", None, prompt="x", max_tokens=0)
    chat = GenerateRequest("r", "a", messages=(ChatTurn("user", "hi"),))
    assert chat.chat == [{"role": "user", "content": "hi"}]


def test_items_cross_a_process_boundary_unchanged():
    chunk = StreamChunk("hi", (1, 2), 3, 2, True, "stop", (TokenLogprob("hi", 1, -0.1, (("hi", -0.1),)),),
                        ServedBy(0, "device", 0.01, 1, 2, 3))
    request = GenerateRequest("r", "a", prompt=(1, 2, 3), stop=("\n",), logprobs=2)
    for item in (chunk, StreamError("overloaded", "full"), request, RoutingStats(1)):
        assert pickle.loads(pickle.dumps(item)) == item
    with pytest.raises(ValueError, match="adapter_state"):
        ServedBy(0, "somewhere", 0.0)
