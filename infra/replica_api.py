"""The router <-> replica contract: requests, stream items, routing stats and errors, defined once for both sides.

Everything that crosses the Ray Serve boundary between the ingress (router/) and a replica (replicas/) is one of
these types; errors travel as a code (`LoRAFleetError.code`) and a message and become the same error type again
on the router (`StreamError.to_exception`). Torch-free and Ray-free: both sides import it.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from lorafleet.infra.errors import LoRAFleetError, error_for_code

ADAPTER_STATES = ("base", "device", "host", "cold")   # where the adapter was when the request reached its replica


@dataclass(frozen=True, slots=True)
class ChatTurn:
    role: str
    content: str


@dataclass(frozen=True, slots=True)
class GenerateRequest:
    """One generation: a text prompt or chat turns (exactly one), sampling values, and the adapter (None = base)."""

    request_id: str
    adapter_id: str | None
    prompt: str | tuple[int, ...] | None = None
    messages: tuple[ChatTurn, ...] | None = None
    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    logprobs: int | None = None   # top-k logprobs per generated token; None = none
    # What the registry says of the adapter (None = not known: registry down, or the base model). The request
    # router sends the request only to replicas that can run it (RoutingStats.max_rank and adapter_types).
    adapter_rank: int | None = None
    adapter_type: str | None = None

    def __post_init__(self) -> None:
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("GenerateRequest needs exactly one of prompt and messages")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")

    @property
    def chat(self) -> list[dict[str, str]] | None:
        """The chat turns as the dicts a chat template takes."""
        return None if self.messages is None else [{"role": m.role, "content": m.content} for m in self.messages]


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """One generated token: its text, id and logprob, and the top-k alternatives (text, logprob), likeliest first."""

    token: str
    token_id: int
    logprob: float
    top: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True, slots=True)
class ServedBy:
    """Attached to a stream's first chunk: which replica served it, where the adapter was, that replica's load."""

    replica_rank: int | None
    adapter_state: str
    ttft_s: float
    queue_len: int = 0
    num_device_adapters: int = 0
    num_host_adapters: int = 0

    def __post_init__(self) -> None:
        if self.adapter_state not in ADAPTER_STATES:
            raise ValueError(f"adapter_state must be one of {ADAPTER_STATES}, got {self.adapter_state!r}")


@dataclass(frozen=True, slots=True)
class StreamChunk:
    """The tokens and text one engine step added to a request; the last chunk has `finished` and its reason."""

    text: str
    token_ids: tuple[int, ...]
    prompt_tokens: int
    completion_tokens: int   # so far, this chunk's included
    finished: bool = False
    finish_reason: str | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None   # of this chunk's tokens; None unless asked for
    served_by: ServedBy | None = None   # first chunk only


@dataclass(frozen=True, slots=True)
class StreamError:
    """A request that failed on the replica: the error's code and message (no traceback crosses the boundary)."""

    code: str
    message: str

    @classmethod
    def of(cls, exc: LoRAFleetError) -> StreamError:
        return cls(exc.code, str(exc))

    def to_exception(self) -> LoRAFleetError:
        return error_for_code(self.code, self.message)


StreamItem = StreamChunk | StreamError


@dataclass(slots=True)   # not frozen: built per replica per report on the routing path, and frozen init costs 4x
class RoutingStats:
    """What a replica reports to the RequestRouter about once a second (Serve carries it as a dict)."""

    rank: int | None
    queue_len: int = 0            # waiting + running sequences in its engine
    num_inflight: int = 0         # requests inside ReplicaServer.generate
    resident_adapters: tuple[str, ...] = ()   # in the device row pools
    tokens_per_s: float = 0.0
    kv_used: float = 0.0          # fraction of KV blocks in use
    max_rank: int | None = None   # the largest adapter rank it runs (a vLLM replica: its max_lora_rank)
    adapter_types: tuple[str, ...] = ()   # the PEFT types it runs; () = every type

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> RoutingStats:
        """Stats from Serve's dict; empty (a replica that has not reported yet) or malformed fields read as unknown.
        On the routing path once per replica per report: kept to a few type checks."""
        if not data:
            return _UNKNOWN
        rank = data.get("rank")
        resident = data.get("resident_adapters", ())
        if type(resident) not in (list, tuple) or not all(type(a) is str for a in resident):
            resident = () if type(resident) not in (list, tuple) else [a for a in resident if type(a) is str]
        max_rank, types = data.get("max_rank"), data.get("adapter_types", ())
        types = tuple(types) if type(types) in (list, tuple) and all(type(t) is str for t in types) else ()
        return cls(rank if type(rank) is int else None, _count(data.get("queue_len")),
                   _count(data.get("num_inflight")), tuple(resident), _number(data.get("tokens_per_s")),
                   _number(data.get("kv_used")), max_rank if type(max_rank) is int and max_rank > 0 else None,
                   types)


_UNKNOWN = RoutingStats(rank=None)


def _count(value: object) -> int:
    return value if type(value) is int and value >= 0 else 0


def _number(value: object) -> float:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else 0.0   # bools are ints
