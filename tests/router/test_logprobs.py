"""Logprobs through the OpenAI API: values against transformers, OpenAI's shapes, SSE chunks, the openai client."""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import cache

import pytest
import torch
import transformers
from lf_testing import assert_openai_error, sse_events
from peft import PeftModel

from lorafleet.replicas.sampling_params import SamplingParams

pytestmark = pytest.mark.timeout(300)

BASE = "tiny"   # the base model name of the shared replica (tests/router/conftest.py)
PROMPT = "The quick brown fox"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
MAX_TOKENS = 8
ATOL = 1e-4   # float32 engine vs float32 transformers, as in tests/replicas/test_engine_parity.py
COMPLETION_KEYS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


@pytest.fixture
def client(make_client):
    return make_client()


@pytest.fixture
def tokenizer(hardening_replica):
    return hardening_replica.engine.tokenizer


@pytest.fixture(scope="module")
def hf_logprobs(tiny_model_dir, hardening_adapter_dirs) -> Callable[[str, list[int], list[int]], torch.Tensor]:
    """hf_logprobs(model, prompt_ids, output_ids) -> [len(output_ids), V]: transformers' log_softmax of the next
    token at each output position (teacher-forced), for the base model or a PEFT adapter of the shared replica."""

    @cache
    def model(name: str) -> transformers.PreTrainedModel:
        base = transformers.AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
        return base if name == BASE else PeftModel.from_pretrained(base, hardening_adapter_dirs[name]).eval()

    def run(name: str, prompt_ids: list[int], output_ids: list[int]) -> torch.Tensor:
        ids = torch.tensor([prompt_ids + output_ids])
        with torch.no_grad():
            logits = model(name)(ids).logits[0, len(prompt_ids) - 1:-1].float()
        return torch.log_softmax(logits, dim=-1)

    return run


def greedy_ids(replica, prompt: str | list[int], model: str, **params: object) -> list[int]:
    """The shared replica's engine run offline (it is idle between HTTP requests): the output token ids."""
    sampling = SamplingParams(**{"max_tokens": MAX_TOKENS, "temperature": 0.0} | params)
    out = replica.engine.generate(prompt, sampling, adapters=None if model == BASE else model)[0]
    return out.token_ids


def assert_distribution(top: list[float], sampled: float) -> None:
    assert all(v <= 0 for v in [*top, sampled])
    assert sum(math.exp(v) for v in top) <= 1 + 1e-5
    assert sampled <= max(top) + 1e-6 or not top


# -- values: the sampled token's logprob and the top tokens' are transformers' log_softmax --------------------
@pytest.mark.parametrize("model", [BASE, "alpha-lora"])
def test_completion_logprobs_match_transformers(client, tokenizer, hardening_replica, hf_logprobs, model):
    prompt_ids = tokenizer.encode(PROMPT)
    body = {"model": model, "prompt": prompt_ids, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 5}
    data = client.post("/v1/completions", json=body).json()
    (choice,) = data["choices"]
    logprobs = choice["logprobs"]
    assert set(logprobs) == set(COMPLETION_KEYS)
    output_ids = greedy_ids(hardening_replica, prompt_ids, model)
    expected = hf_logprobs(model, prompt_ids, output_ids)

    tokens = logprobs["tokens"]
    assert len(tokens) == data["usage"]["completion_tokens"] == len(output_ids)
    assert "".join(tokens) == choice["text"] == tokenizer.decode(output_ids)
    assert logprobs["text_offset"] == [len("".join(tokens[:i])) for i in range(len(tokens))]
    for i, (token, value, top) in enumerate(zip(tokens, logprobs["token_logprobs"], logprobs["top_logprobs"],
                                                strict=True)):
        assert abs(value - float(expected[i, output_ids[i]])) < ATOL, i
        assert abs(value - float(expected[i].max())) < ATOL, i   # greedy: the sampled token is the argmax
        assert top[token] == value and max(top.values()) == value
        assert 1 <= len(top) <= 5   # the greedy token is among the top 5: no extra entry for it
        top5 = expected[i].topk(5).values.tolist()
        assert all(any(abs(v - e) < ATOL for e in top5) for v in top.values()), (top, top5)
        assert_distribution(list(top.values()), value)


def test_chat_logprobs_match_transformers(client, tokenizer, hardening_replica, hf_logprobs):
    prompt_ids = tokenizer.encode(tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True))
    body = {"model": BASE, "messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": True,
            "top_logprobs": 3}
    data = client.post("/v1/chat/completions", json=body).json()
    (choice,) = data["choices"]
    content = choice["logprobs"]["content"]
    output_ids = greedy_ids(hardening_replica, prompt_ids, BASE)
    expected = hf_logprobs(BASE, prompt_ids, output_ids)

    assert len(content) == data["usage"]["completion_tokens"] == len(output_ids)
    assert "".join(e["token"] for e in content) == choice["message"]["content"]
    for i, entry in enumerate(content):
        assert set(entry) == {"token", "logprob", "bytes", "top_logprobs"}
        assert entry["bytes"] == list(entry["token"].encode())
        assert abs(entry["logprob"] - float(expected[i, output_ids[i]])) < ATOL, i
        top = entry["top_logprobs"]
        assert len(top) == 3 and all(set(t) == {"token", "logprob", "bytes"} for t in top)
        assert all(t["bytes"] == list(t["token"].encode()) for t in top)
        values = [t["logprob"] for t in top]
        assert values == sorted(values, reverse=True)
        assert max(abs(v - e) for v, e in zip(values, expected[i].topk(3).values.tolist(), strict=True)) < ATOL
        assert top[0] == {"token": entry["token"], "logprob": entry["logprob"], "bytes": entry["bytes"]}  # greedy
        assert_distribution(values, entry["logprob"])


def test_sampled_tokens_get_the_models_logprobs_not_the_tempered_ones(client, tokenizer, hardening_replica,
                                                                      hf_logprobs):
    """temperature 0.7, seeded: each sampled token's logprob is log_softmax of the raw logits (as vLLM reports),
    present in its position's top_logprobs, though not always the top one."""
    prompt_ids = tokenizer.encode(PROMPT)
    body = {"model": BASE, "prompt": prompt_ids, "max_tokens": MAX_TOKENS, "temperature": 0.7, "seed": 7,
            "logprobs": 3}
    logprobs = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    output_ids = greedy_ids(hardening_replica, prompt_ids, BASE, temperature=0.7, seed=7)
    expected = hf_logprobs(BASE, prompt_ids, output_ids)
    assert len(logprobs["tokens"]) == len(output_ids)
    for i, (token, value, top) in enumerate(zip(logprobs["tokens"], logprobs["token_logprobs"],
                                                logprobs["top_logprobs"], strict=True)):
        assert abs(value - float(expected[i, output_ids[i]])) < ATOL, i
        assert top[token] == value and len(top) <= 4   # the top 3, and the sampled token when not among them
        assert_distribution(list(top.values()), value)


# -- shapes: what is asked for, and nothing when nothing is -------------------------------------------------
def test_logprobs_zero_gives_the_sampled_token_only(client):
    body = {"model": BASE, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 0}
    logprobs = client.post("/v1/completions", json=body).json()["choices"][0]["logprobs"]
    assert logprobs["top_logprobs"] == [{t: v} for t, v in zip(logprobs["tokens"], logprobs["token_logprobs"],
                                                                strict=True)]
    for extra in ({}, {"top_logprobs": 0}):
        chat = {"model": BASE, "messages": MESSAGES, "max_tokens": 4, "temperature": 0, "logprobs": True} | extra
        content = client.post("/v1/chat/completions", json=chat).json()["choices"][0]["logprobs"]["content"]
        assert content and all(entry["top_logprobs"] == [] for entry in content)


@pytest.mark.parametrize("stream", [False, True])
def test_no_logprobs_unless_asked(client, stream):
    requests = [("/v1/completions", {"model": BASE, "prompt": PROMPT, "max_tokens": 3}),
                ("/v1/chat/completions", {"model": BASE, "messages": MESSAGES, "max_tokens": 3}),
                ("/v1/chat/completions", {"model": BASE, "messages": MESSAGES, "max_tokens": 3, "logprobs": False})]
    for path, body in requests:
        if stream:
            choices = [event["choices"][0] for event in sse_events(client, path, body)[:-1]]
        else:
            choices = client.post(path, json=body).json()["choices"]
        assert choices and all(c["logprobs"] is None for c in choices), (path, body)


def test_echo_returns_the_completions_logprobs_with_offsets_after_the_prompt(client):
    body = {"model": BASE, "prompt": PROMPT, "max_tokens": 4, "temperature": 0, "echo": True, "logprobs": 1}
    data = client.post("/v1/completions", json=body).json()
    choice = data["choices"][0]
    tokens, offsets = choice["logprobs"]["tokens"], choice["logprobs"]["text_offset"]
    assert len(tokens) == data["usage"]["completion_tokens"]   # no prompt logprobs (vLLM would add them)
    assert offsets[0] == len(PROMPT) and choice["text"] == PROMPT + "".join(tokens)
    assert all(choice["text"][o:o + len(t)] == t for o, t in zip(offsets, tokens, strict=True))


# -- SSE: each chunk carries its tokens' logprobs; together they are the non-streaming answer's --------------
def test_streamed_completion_logprobs_concatenate_to_the_whole_answer(client):
    body = {"model": "beta-lora", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "logprobs": 2}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]
    chunks = [event["choices"][0] for event in sse_events(client, "/v1/completions", body)[:-1]]
    assert all(c["logprobs"] is not None and set(c["logprobs"]) == set(COMPLETION_KEYS) for c in chunks)
    for c in chunks:   # the chunk's tokens are its text, while no stop string holds text back
        assert "".join(c["logprobs"]["tokens"]) == c["text"]
    for key in COMPLETION_KEYS:
        assert [v for c in chunks for v in c["logprobs"][key]] == whole["logprobs"][key], key
    assert "".join(c["text"] for c in chunks) == whole["text"]


def test_streamed_chat_logprobs_concatenate_to_the_whole_answer(client):
    body = {"model": "gamma-ia3", "messages": MESSAGES, "max_tokens": MAX_TOKENS, "temperature": 0,
            "logprobs": True, "top_logprobs": 2}
    whole = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    chunks = [event["choices"][0] for event in sse_events(client, "/v1/chat/completions", body)[:-1]]
    assert all(set(c["logprobs"]) == {"content"} for c in chunks)
    assert [e for c in chunks for e in c["logprobs"]["content"]] == whole["logprobs"]["content"]
    assert "".join(c["delta"]["content"] for c in chunks) == whole["message"]["content"]


# -- bad values: 400 in OpenAI's shape, naming the field ----------------------------------------------------
BAD_LOGPROBS = {  # id -> (path, extra body fields, the `param` named)
    "logprobs-21": ("/v1/completions", {"logprobs": 21}, "logprobs"),
    "logprobs-negative": ("/v1/completions", {"logprobs": -1}, "logprobs"),
    "logprobs-wrong-type": ("/v1/completions", {"logprobs": "some"}, "logprobs"),
    "top-logprobs-21": ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    "top-logprobs-negative": ("/v1/chat/completions", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    "top-logprobs-alone": ("/v1/chat/completions", {"top_logprobs": 2}, "top_logprobs"),
    "top-logprobs-logprobs-false": ("/v1/chat/completions", {"logprobs": False, "top_logprobs": 0}, "top_logprobs"),
    "chat-logprobs-wrong-type": ("/v1/chat/completions", {"logprobs": "yes please"}, "logprobs"),
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("case", sorted(BAD_LOGPROBS))
def test_bad_logprobs_values_are_a_400_naming_the_field(client, case, stream):
    path, extra, param = BAD_LOGPROBS[case]
    body = {"model": BASE, "max_tokens": 2, "stream": stream} | extra
    body |= {"messages": MESSAGES} if "chat" in path else {"prompt": PROMPT}
    error = assert_openai_error(client.post(path, json=body), 400, "invalid_request_error")
    assert error["param"] == param and param in error["message"], error


# -- the openai client reads them -----------------------------------------------------------------------------
def test_openai_client_parses_logprobs(client):
    from openai import OpenAI

    openai = OpenAI(base_url=f"{client.base_url}/v1", api_key="unused", http_client=client, max_retries=0)
    completion = openai.completions.create(model=BASE, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2)
    raw = client.post("/v1/completions", json={"model": BASE, "prompt": PROMPT, "max_tokens": 4, "temperature": 0,
                                               "logprobs": 2}).json()["choices"][0]["logprobs"]
    logprobs = completion.choices[0].logprobs
    assert logprobs is not None
    assert (logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, logprobs.text_offset) == tuple(
        raw[key] for key in COMPLETION_KEYS)

    streamed = openai.completions.create(model=BASE, prompt=PROMPT, max_tokens=4, temperature=0, logprobs=2,
                                         stream=True)
    assert [t for chunk in streamed for t in chunk.choices[0].logprobs.tokens] == raw["tokens"]

    chat = openai.chat.completions.create(model=BASE, messages=MESSAGES, max_tokens=4, temperature=0, logprobs=True,
                                          top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens
    assert "".join(t.token for t in content) == chat.choices[0].message.content
    assert all(len(t.top_logprobs) == 2 and t.top_logprobs[0].logprob == t.logprob for t in content)
    assert all(t.bytes == list(t.token.encode()) for t in content)
