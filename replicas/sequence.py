"""Sequence: one request's tokens, KV block table, adapter and progress through the scheduler (no torch)."""

from __future__ import annotations

import itertools
from enum import Enum

from lorafleet.replicas.sampling_params import SamplingParams

_arrival_counter = itertools.count()


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """Prompt + output tokens; KV holds the first `num_computed_tokens` of them in `block_table` blocks.

    A sequence that needs no more prompt work and whose last token is not yet in the KV cache decodes
    one token per step. Preemption by recompute sets num_computed_tokens back to 0 (outputs are kept,
    so the recompute prefill covers prompt + outputs).
    """

    __slots__ = ("request_id", "prompt_token_ids", "output_token_ids", "adapter_id", "params", "arrival_time",
                 "arrival_order", "status", "num_computed_tokens", "block_table", "adapter_slot",
                 "finish_reason", "error", "generator", "detok", "output_logprobs", "first_token_time",
                 "finish_time", "num_preemptions", "num_emitted_tokens", "num_emitted_chars")

    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 adapter_id: str | None, arrival_time: float) -> None:
        assert prompt_token_ids, "a sequence needs at least one prompt token"
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.adapter_id = adapter_id
        self.params = params
        self.arrival_time = arrival_time
        self.arrival_order = next(_arrival_counter)  # FCFS key: ties in arrival_time keep add order
        self.status = SequenceStatus.WAITING
        self.num_computed_tokens = 0
        self.block_table: list[int] = []
        self.adapter_slot: int | None = None         # device slot it pins while admitted (None = not pinned)
        self.finish_reason: str | None = None
        self.error: Exception | None = None
        self.generator: object | None = None         # per-request torch.Generator when params.seed is set
        self.detok: object | None = None             # incremental detokenizer state (tokenizer.py)
        self.output_logprobs: list[dict[int, float]] = []
        self.first_token_time: float | None = None
        self.finish_time: float | None = None
        self.num_preemptions = 0
        self.num_emitted_tokens = 0                  # what RequestOutput deltas have already carried
        self.num_emitted_chars = 0

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    def token_ids(self, start: int = 0, stop: int | None = None) -> list[int]:
        """Tokens [start:stop] of prompt + output without building the whole list when avoidable."""
        stop = self.num_tokens if stop is None else stop
        num_prompt = len(self.prompt_token_ids)
        if stop <= num_prompt:
            return self.prompt_token_ids[start:stop]
        if start >= num_prompt:
            return self.output_token_ids[start - num_prompt:stop - num_prompt]
        return self.prompt_token_ids[start:] + self.output_token_ids[:stop - num_prompt]

    def append_token(self, token_id: int) -> None:
        assert self.status is SequenceStatus.RUNNING, "only running sequences get new tokens"
        self.output_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, adapter={self.adapter_id!r}, {self.status.value}, "
                f"tokens={self.num_tokens}, computed={self.num_computed_tokens})")
