"""RequestOutput: what the engine reports about one request after a step (plain data)."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(slots=True)
class RequestMetrics:
    """Wall-clock times (time.monotonic seconds) of one request."""

    arrival_time: float
    first_token_time: float | None = None
    finish_time: float | None = None
    num_preemptions: int = 0

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time


@dataclass(slots=True)
class RequestOutput:
    """Cumulative token_ids / text so far, plus what is new since this request's previous output.

    finish_reason: "stop" (EOS, stop token or stop string), "length" (max_tokens or max_model_len),
    "abort" (cancelled), "error" (see `error`: e.g. AdapterNotFound, InvalidAdapter); None while running.
    """

    request_id: str
    adapter_id: str | None
    prompt_token_ids: list[int]
    token_ids: list[int]
    text: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None
    error: Exception | None = None
    logprobs: list[dict[int, float]] | None = None
    metrics: RequestMetrics | None = field(default=None, repr=False)
