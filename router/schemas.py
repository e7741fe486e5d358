"""OpenAI-compatible request/response schemas (the subset LoRAFleet serves), as pydantic models."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from lorafleet.infra.replica_api import TokenLogprob

MAX_STOP_STRINGS = 64  # hard ceiling at parse time; the configured limit (max_stop_strings) is checked later
MAX_LOGPROBS = 20  # top tokens per position, as vLLM's default max_logprobs and OpenAI's top_logprobs cap


class _Request(BaseModel):
    # Unknown OpenAI fields (user, logit_bias, ...) are accepted and ignored, as OpenAI-compatible servers do.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1, max_length=300)
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1)
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: str | list[str] | None) -> list[str]:
        stops = [value] if isinstance(value, str) else list(value or [])
        if len(stops) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops


def _unicode_text(value: str) -> str:
    # JSON may escape lone UTF-16 surrogates ("\ud800"): not text a tokenizer can encode, so a 400, not a 500.
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode text (no lone surrogates)") from None
    return value


class CompletionRequest(_Request):
    prompt: str | list[int] = Field(min_length=1)
    echo: bool = False
    # k: the sampled token's logprob and the k most likely tokens' at each generated position. With echo, vLLM
    # also returns the prompt's logprobs; LoRAFleet returns those of the completion only.
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @property
    def num_logprobs(self) -> int | None:
        """Top tokens per position the replica reports (None = no logprobs)."""
        return self.logprobs

    @field_validator("prompt")
    @classmethod
    def _prompt_text(cls, value: str | list[int]) -> str | list[int]:
        return _unicode_text(value) if isinstance(value, str) else value


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str

    @field_validator("content")
    @classmethod
    def _content_text(cls, value: str) -> str:
        return _unicode_text(value)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)

    @field_validator("top_logprobs")
    @classmethod
    def _top_needs_logprobs(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and not info.data.get("logprobs"):
            raise ValueError("top_logprobs needs logprobs: true")
        return value

    @property
    def num_logprobs(self) -> int | None:
        """Top tokens per position the replica reports (None = no logprobs)."""
        return (self.top_logprobs or 0) if self.logprobs else None


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


class CompletionLogprobs(BaseModel):
    """Legacy completions logprobs: per generated token its text, logprob, top tokens and offset in the text."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]   # the k most likely tokens and the sampled one (vLLM: up to k + 1)
    text_offset: list[int]

    @classmethod
    def from_entries(cls, entries: Sequence[TokenLogprob], offset: int = 0) -> CompletionLogprobs:
        """From the replica's TokenLogprob entries; `offset`: where the first token starts in the text."""
        tokens = [e.token for e in entries]
        offsets = []
        for token in tokens:
            offsets.append(offset)
            offset += len(token)
        top = []
        for e in entries:
            # Two ids may decode alike: the sampled token keeps its own entry, else the likelier one stays.
            pairs = [(e.token, e.logprob), *((t, lp) for t, lp in e.top if t != e.token)]
            ranked: dict[str, float] = {}
            for token, logprob in sorted(pairs, key=lambda pair: pair[1], reverse=True):
                ranked.setdefault(token, logprob)
            top.append(ranked)
        return cls(tokens=tokens, token_logprobs=[e.logprob for e in entries], top_logprobs=top,
                   text_offset=offsets)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None = None
    logprobs: CompletionLogprobs | None = None


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("cmpl"))
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None   # the token's UTF-8 bytes (vLLM: of its decoded text)


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]   # the k most likely tokens, most likely first


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None

    @classmethod
    def from_entries(cls, entries: Sequence[TokenLogprob]) -> ChatLogprobs:
        """From the replica's TokenLogprob entries."""
        def top(token: str, logprob: float) -> TopLogprob:
            return TopLogprob(token=token, logprob=logprob, bytes=list(token.encode()))

        return cls(content=[ChatTokenLogprob(**top(e.token, e.logprob).model_dump(),
                                             top_logprobs=[top(t, lp) for t, lp in e.top]) for e in entries])


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatChoiceMessage
    finish_reason: str | None = None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(BaseModel):
    id: str = Field(default_factory=lambda: new_id("chatcmpl"))
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = 0
    owned_by: str = "lorafleet"
    parent: str | None = None
    root: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
