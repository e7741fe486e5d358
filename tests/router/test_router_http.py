"""The OpenAI HTTP API on a real in-process engine: parity with offline generate, SSE, errors, metrics, fuzzing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from lf_testing import ERROR_KEYS, assert_openai_error, make_adapters, sse_events, store_less_replica

from lorafleet.replicas.deployment import ReplicaServer
from lorafleet.replicas.engine import Engine
from lorafleet.replicas.sampling_params import SamplingParams
from lorafleet.router.app import create_app
from lorafleet.router.core import InProcessBackend, RouterConfig, RouterCore

pytestmark = pytest.mark.timeout(300)

BASE = "tiny"
ENGINE_KWARGS = {"max_num_seqs": 8, "kv_cache_bytes": 16 << 20, "kernel_backend": "torch", "max_model_len": 512}
ADAPTERS = {  # adapter id -> (type, rank, targets, seed)
    "lora-r8": ("lora", 8, ["q_proj", "v_proj"], 1),
    "ia3-k": ("ia3", 1, ["k_proj", "down_proj"], 2),
    "flora-r4": ("flora", 4, ["q_proj", "k_proj", "v_proj", "o_proj"], 3),
}
PROMPT = "The quick brown fox"
MAX_TOKENS = 8
# Endpoints that need the adapter store, the routing table in Redis or a placement controller: with store=None
# they answer 503 store_unavailable (in OpenAI's shape), which is the correct answer for this router.
STORE_ENDPOINTS = ("/v1/adapters", "/v1/placement")
FUZZ_MAX_TOKENS = 8


@pytest.fixture(scope="module")
def adapter_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_adapters(tmp_path_factory.mktemp("router-adapters"), tiny_model_dir, ADAPTERS)


@pytest.fixture(scope="module")
def replica(tiny_model_dir: Path, adapter_dirs: dict[str, Path]) -> Iterator[ReplicaServer]:
    server = store_less_replica(tiny_model_dir, adapter_dirs, ENGINE_KWARGS)
    yield server
    server.engine.close()


@pytest.fixture(scope="module")
def offline(tiny_model_dir: Path, adapter_dirs: dict[str, Path]) -> Iterator[Engine]:
    """A second engine, driven offline by generate(): the reference answers."""
    engine = Engine.from_pretrained(tiny_model_dir, **ENGINE_KWARGS)
    for name, path in adapter_dirs.items():
        engine.load_adapter(name, path)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def core(replica: ReplicaServer) -> RouterCore:
    return RouterCore(InProcessBackend(replica), RouterConfig(base_model_name=BASE), store=None)


@pytest.fixture(scope="module")
def client(core: RouterCore) -> Iterator[TestClient]:
    with TestClient(create_app(lambda: core), raise_server_exceptions=False) as test_client:
        yield test_client


def offline_text(engine: Engine, prompt: str, adapter_id: str | None, max_tokens: int = MAX_TOKENS) -> str:
    out = engine.generate(prompt, SamplingParams(max_tokens=max_tokens, temperature=0.0), adapters=adapter_id)[0]
    assert out.finish_reason in ("length", "stop")
    return out.text


# -- completions: non-streaming and streaming agree with the offline engine ---------------------------
@pytest.mark.parametrize("model", [BASE, *ADAPTERS])
def test_completion_matches_offline_generate_streaming_and_not(client, offline, model):
    adapter_id = None if model == BASE else model
    expected = offline_text(offline, PROMPT, adapter_id)
    body = {"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0}

    response = client.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["object"] == "text_completion" and data["model"] == model
    (choice,) = data["choices"]
    assert choice["text"] == expected
    assert choice["finish_reason"] in ("length", "stop")
    usage = data["usage"]
    assert usage["prompt_tokens"] == len(offline.tokenizer.encode(PROMPT))
    assert 1 <= usage["completion_tokens"] <= MAX_TOKENS
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    events = sse_events(client, "/v1/completions", body)
    assert events[-1] == "[DONE]" and all(isinstance(e, dict) for e in events[:-1])
    chunks = events[:-1]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}
    assert all(c["object"] == "text_completion" and c["model"] == model for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks) == expected
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]
    assert chunks[-1]["usage"] == usage and all("usage" not in c for c in chunks[:-1])


def test_adapters_change_the_answer(client):
    texts = {m: client.post("/v1/completions", json={"model": m, "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                                                      "temperature": 0}).json()["choices"][0]["text"]
             for m in [BASE, *ADAPTERS]}
    assert len(set(texts.values())) == len(texts), texts


def test_base_colon_adapter_form(client):
    plain = client.post("/v1/completions", json={"model": "lora-r8", "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                                                 "temperature": 0})
    colon = client.post("/v1/completions", json={"model": f"{BASE}:lora-r8", "prompt": PROMPT,
                                                 "max_tokens": MAX_TOKENS, "temperature": 0})
    assert colon.status_code == 200 and colon.json()["model"] == f"{BASE}:lora-r8"
    assert colon.json()["choices"][0]["text"] == plain.json()["choices"][0]["text"]


def test_token_id_prompt_and_echo(client, offline):
    ids = offline.tokenizer.encode(PROMPT)
    expected = offline_text(offline, PROMPT, "flora-r4")
    by_ids = client.post("/v1/completions", json={"model": "flora-r4", "prompt": ids, "max_tokens": MAX_TOKENS,
                                                  "temperature": 0})
    assert by_ids.json()["choices"][0]["text"] == expected
    echoed = client.post("/v1/completions", json={"model": "flora-r4", "prompt": PROMPT, "echo": True,
                                                  "max_tokens": MAX_TOKENS, "temperature": 0})
    assert echoed.json()["choices"][0]["text"] == PROMPT + expected


def test_stop_string_ends_the_answer(client, offline):
    full = offline_text(offline, PROMPT, "lora-r8", max_tokens=16)
    stop = full[len(full) // 2:][:2]
    assert stop, full
    response = client.post("/v1/completions", json={"model": "lora-r8", "prompt": PROMPT, "max_tokens": 16,
                                                    "temperature": 0, "stop": [stop]})
    choice = response.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert choice["text"] == full[:full.index(stop)]


# -- chat ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", [BASE, "ia3-k", f"{BASE}:lora-r8"])
def test_chat_completion_matches_offline_generate(client, offline, model):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]
    prompt = offline.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    adapter_id = None if model == BASE else model.removeprefix(f"{BASE}:")
    expected = offline_text(offline, prompt, adapter_id)
    body = {"model": model, "messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0}

    response = client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["object"] == "chat.completion" and data["model"] == model
    (choice,) = data["choices"]
    assert choice["message"] == {"role": "assistant", "content": expected}
    assert data["usage"]["total_tokens"] == data["usage"]["prompt_tokens"] + data["usage"]["completion_tokens"]

    events = sse_events(client, "/v1/chat/completions", body)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert "".join(c["choices"][0]["delta"]["content"] for c in chunks) == expected
    assert chunks[-1]["choices"][0]["finish_reason"] == choice["finish_reason"]
    assert chunks[-1]["usage"] == data["usage"]


def test_max_completion_tokens(client):
    body = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 3,
            "temperature": 0}
    assert client.post("/v1/chat/completions", json=body).json()["usage"]["completion_tokens"] <= 3


# -- models, health, metrics --------------------------------------------------------------------------
def test_models_lists_the_base(client):
    response = client.get("/v1/models")
    assert response.status_code == 200
    data = response.json()
    assert data["object"] == "list"
    assert [card["id"] for card in data["data"]] == [BASE]  # no store: no registry of adapters to list
    assert data["data"][0]["object"] == "model"


def test_healthz_without_a_store(client):
    assert client.get("/healthz").json() == {"status": "ok", "redis": "unavailable"}


def test_metrics_expose_lorafleet_series_with_adapter_state(client):
    client.post("/v1/completions", json={"model": BASE, "prompt": PROMPT, "max_tokens": 2})
    client.post("/v1/completions", json={"model": "lora-r8", "prompt": PROMPT, "max_tokens": 2})
    client.post("/v1/completions", json={"model": "no-such-adapter", "prompt": PROMPT})
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    text = response.text
    for name in ("lorafleet_requests_total", "lorafleet_ttft_seconds_bucket", "lorafleet_tpot_seconds",
                 "lorafleet_request_seconds", "lorafleet_adapter_tokens_total", "lorafleet_inflight_requests",
                 "lorafleet_adapter_cache_requests_total", "lorafleet_replica_adapters", "lorafleet_replica_queue"):
        assert name in text, name
    assert 'lorafleet_ttft_seconds_count{adapter_state="base"}' in text
    assert any(f'lorafleet_ttft_seconds_count{{adapter_state="{s}"}}' in text for s in ("device", "host", "cold"))
    assert 'lorafleet_requests_total{endpoint="completions",status="404"}' in text
    assert 'lorafleet_adapter_tokens_total{adapter="lora-r8",kind="completion"}' in text


# -- errors -------------------------------------------------------------------------------------------
COMPLETION = {"model": BASE, "prompt": PROMPT, "max_tokens": 2}
CHAT = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
BAD_REQUESTS = {  # id -> (path, JSON body or raw bytes)
    "malformed-json": ("/v1/completions", b'{"model": "tiny", "prompt": '),
    "invalid-utf8": ("/v1/completions", b'\xff\xfe{"model"'),
    "empty-body": ("/v1/completions", b""),
    "json-array": ("/v1/completions", b"[1, 2]"),
    "missing-model": ("/v1/completions", {"prompt": PROMPT}),
    "missing-prompt": ("/v1/completions", {"model": BASE}),
    "missing-messages": ("/v1/chat/completions", {"model": BASE}),
    "empty-messages": ("/v1/chat/completions", CHAT | {"messages": []}),
    "prompt-wrong-type": ("/v1/completions", COMPLETION | {"prompt": 5}),
    "prompt-empty": ("/v1/completions", COMPLETION | {"prompt": ""}),
    "max-tokens-wrong-type": ("/v1/completions", COMPLETION | {"max_tokens": "many"}),
    "max-tokens-zero": ("/v1/completions", COMPLETION | {"max_tokens": 0}),
    "max-tokens-over-limit": ("/v1/completions", COMPLETION | {"max_tokens": 10**6}),
    "temperature-wrong-type": ("/v1/completions", COMPLETION | {"temperature": "hot"}),
    "temperature-too-high": ("/v1/completions", COMPLETION | {"temperature": 2.5}),
    "temperature-negative": ("/v1/chat/completions", CHAT | {"temperature": -0.1}),
    "top-p-zero": ("/v1/completions", COMPLETION | {"top_p": 0}),
    "too-many-stops": ("/v1/completions", COMPLETION | {"stop": [f"s{i}" for i in range(9)]}),
    "empty-stop": ("/v1/completions", COMPLETION | {"stop": [""]}),
    "n-2": ("/v1/completions", COMPLETION | {"n": 2}),
    "chat-n-2": ("/v1/chat/completions", CHAT | {"n": 2}),
    "messages-wrong-type": ("/v1/chat/completions", CHAT | {"messages": "hi"}),
    "unknown-role": ("/v1/chat/completions", CHAT | {"messages": [{"role": "robot", "content": "hi"}]}),
    "stream-wrong-type": ("/v1/completions", COMPLETION | {"stream": [1]}),
    "token-id-out-of-range": ("/v1/completions", COMPLETION | {"prompt": [10**9]}),
    "prompt-too-long": ("/v1/completions", COMPLETION | {"prompt": list(range(5, 600))}),
    "lone-surrogate-prompt": ("/v1/completions", b'{"model": "tiny", "prompt": "\\ud800 hi", "max_tokens": 2}'),
    "lone-surrogate-chat": ("/v1/chat/completions",
                            b'{"model": "tiny", "messages": [{"role": "user", "content": "a\\udfff"}]}'),
}


@pytest.mark.parametrize(("case", "stream"), [(case, stream) for case, (_, body) in sorted(BAD_REQUESTS.items())
                                               for stream in (False, True) if not (stream and isinstance(body, bytes))])
def test_bad_input_is_a_400_in_openai_shape(client, case, stream):
    path, body = BAD_REQUESTS[case]
    if isinstance(body, bytes):
        response = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        response = client.post(path, json=body | {"stream": stream} if "stream" not in body else body)
    assert_openai_error(response, 400, "invalid_request_error")


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("model", ["no-such-adapter", f"{BASE}:no-such-adapter", "bad/id", f"{BASE}:", "x" * 300])
def test_unknown_adapter_is_a_404(client, model, stream):
    response = client.post("/v1/completions", json={"model": model, "prompt": PROMPT, "stream": stream})
    error = assert_openai_error(response, 404, "not_found_error")
    assert error["code"] == "adapter_not_found"


def test_unknown_paths_and_methods_keep_the_openai_shape(client):
    assert_openai_error(client.get("/v1/nothing-here"), 404, "not_found_error")
    assert_openai_error(client.get("/v1/completions"), 405, "invalid_request_error")


@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/adapters"), ("GET", "/v1/adapters/lora-r8"),
                                              ("DELETE", "/v1/adapters/lora-r8"), ("GET", "/v1/placement"),
                                              ("POST", "/v1/placement/rebalance")])
def test_store_endpoints_without_a_store_are_503_in_openai_shape(client, method, path):
    error = assert_openai_error(client.request(method, path), 503, "service_unavailable_error")
    assert error["code"] == "store_unavailable"


# -- schemathesis: every operation of the app's OpenAPI schema, valid and invalid inputs ----------------
# The schema is read at import (the app needs no core for that); the core arrives with the fixture below.
# (schemathesis.pytest.from_fixture would defer it, but 4.32 sets Function._nodeid, which pytest 9 lacks.)
_fuzz_cores: dict[str, RouterCore] = {}
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(lambda: _fuzz_cores["core"]))


@pytest.fixture(scope="module")
def fuzz_core(replica: ReplicaServer) -> Iterator[None]:
    # Generated requests stay cheap: larger max_tokens are answered 400, which is checked too.
    config = RouterConfig(BASE, default_max_tokens=2, max_tokens_limit=FUZZ_MAX_TOKENS)
    _fuzz_cores["core"] = RouterCore(InProcessBackend(replica), config)
    yield
    _fuzz_cores.clear()


@schema.parametrize()
@schema.given(data=st.data())
@settings(max_examples=30, deadline=None, derandomize=True, database=None,
          suppress_health_check=list(HealthCheck))
def test_api_fuzz_never_5xx_and_errors_in_openai_shape(case, data, fuzz_core):
    # Random `model` strings are all 404s; a served model in most bodies takes the fuzz through the engine.
    if isinstance(case.body, dict) and "model" in case.body:
        model = data.draw(st.sampled_from([None, BASE, "lora-r8", f"{BASE}:flora-r4", "ia3-k"]))
        if model is not None:
            case.body["model"] = model
    response = case.call()
    text = response.text
    assert "Traceback" not in text and 'File "' not in text, text[:500]
    path = case.operation.path
    if response.status_code == 503 and path.startswith(STORE_ENDPOINTS):
        assert response.json()["error"]["code"] == "store_unavailable"
        return
    assert response.status_code < 500, f"{case.method} {path}: {response.status_code} {text[:500]}"
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    elif path in ("/v1/completions", "/v1/chat/completions") and not text.startswith("data: "):
        assert response.json()["usage"]["completion_tokens"] <= FUZZ_MAX_TOKENS
