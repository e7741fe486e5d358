"""Backpressure and limits on the in-process app: the in-flight cap (429), timeouts, disconnects, 400/413 limits."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Iterator

import httpx
import pytest
from starlette.requests import ClientDisconnect

from lorafleet.infra.config import load_settings
from lorafleet.router.app import create_app, router_config
from lorafleet.router.auth import ApiKeys
from lorafleet.router.core import RouterConfig

pytestmark = pytest.mark.timeout(120)

BASE = "tiny"  # the shared fixtures' base name (tests/router/conftest.py)
ERROR_KEYS = {"message", "type", "param", "code"}
MAX_STEPS_AFTER_ABORT = 240  # the long requests below ask for 480 tokens: half of that means they were cut short


def assert_error_shape(response, status: int, error_type: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    if error_type is not None:
        assert body["error"]["type"] == error_type, body
    return body["error"]


def wait_idle(engine, timeout_s: float = 5.0) -> bool:
    """True once the engine has no unfinished request (an abort is drained by the engine's next step)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not engine.has_unfinished():
            return True
        time.sleep(0.01)
    return not engine.has_unfinished()


async def await_idle(engine, timeout_s: float = 5.0) -> bool:
    """wait_idle inside a running loop: the engine's driver task lives on the loop that streamed, so an abort is
    drained only while that loop runs (asyncio.run's end would cancel the driver first)."""
    deadline = time.monotonic() + timeout_s
    while engine.has_unfinished() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    return not engine.has_unfinished()


# -- backpressure: the global in-flight cap ----------------------------------------------------------------
def test_overload_answers_429_with_retry_after_never_5xx_then_recovers(make_core, hardening_replica):
    core = make_core(RouterConfig(BASE, max_inflight_requests=2))
    app = create_app(lambda: core)
    body = {"model": "alpha-lora", "prompt": "Once upon a time", "max_tokens": 24}

    async def fire() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            requests = [client.post("/v1/completions", json=body | {"stream": i % 2 == 1}) for i in range(20)]
            return list(await asyncio.gather(*requests))

    responses = asyncio.run(fire())
    statuses = [r.status_code for r in responses]
    assert all(s in (200, 429) for s in statuses), statuses
    assert statuses.count(429) >= 10 and statuses.count(200) >= 2, statuses
    for response in responses:
        if response.status_code == 429:
            error = assert_error_shape(response, 429, "rate_limit_error")
            assert error["code"] == "overloaded" and "max_inflight_requests" in error["message"]
            assert response.headers["retry-after"].isdigit()
    assert core.limiter.num_inflight == 0

    async def after() -> list[int]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            statuses = [(await client.post("/v1/completions", json=body)).status_code for _ in range(3)]
        assert await await_idle(hardening_replica.engine)
        return statuses

    assert asyncio.run(after()) == [200, 200, 200]


def test_full_replica_queue_answers_429_then_recovers(make_core, hardening_replica, monkeypatch):
    """The replica's own bound (max_num_seqs running + replica_max_queued_requests queued): past it, 429 with
    Retry-After naming the setting, no 5xx; the router-wide cap is far away here."""
    monkeypatch.setattr(hardening_replica, "max_inflight", hardening_replica.engine.config.max_num_seqs + 2)
    core = make_core(RouterConfig(BASE, max_inflight_requests=1000))
    app = create_app(lambda: core)
    body = {"model": "beta-lora", "prompt": "Once upon a time", "max_tokens": 24}

    async def fire(num: int) -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=60) as client:
            requests = [client.post("/v1/completions", json=body | {"stream": i % 3 == 0}) for i in range(num)]
            responses = list(await asyncio.gather(*requests))
            assert await await_idle(hardening_replica.engine)
            return responses

    responses = asyncio.run(fire(30))
    statuses = [r.status_code for r in responses]
    assert all(s in (200, 429) for s in statuses), statuses
    assert statuses.count(200) >= hardening_replica.max_inflight and statuses.count(429) >= 10, statuses
    for response in responses:
        if response.status_code == 429:
            error = assert_error_shape(response, 429, "rate_limit_error")
            assert error["code"] == "overloaded" and "replica_max_queued_requests" in error["message"]
            assert response.headers["retry-after"].isdigit()
    assert hardening_replica._num_inflight == 0 and core.limiter.num_inflight == 0
    assert [r.status_code for r in asyncio.run(fire(3))] == [200, 200, 200]


def test_every_status_is_counted_in_the_requests_metric(make_client):
    """Auth 401s, validation 400s, size 413s and unknown-model 404s count in lorafleet_requests_total, by
    endpoint and status, as well as the 200s."""
    client = make_client(RouterConfig(BASE, max_request_bytes=4096), api_keys={"k-1": "*"})
    auth = {"Authorization": "Bearer k-1"}
    assert client.post("/v1/completions", json={"model": BASE, "prompt": "hi", "max_tokens": 2}).status_code == 401
    assert client.post("/v1/completions", json={"model": BASE, "prompt": "hi", "max_tokens": 2},
                       headers=auth).status_code == 200
    assert client.post("/v1/chat/completions", json={"model": BASE}, headers=auth).status_code == 400
    assert client.post("/v1/completions", json={"model": "nope", "prompt": "x"}, headers=auth).status_code == 404
    assert client.post("/v1/completions", content=b"x" * 5000, headers=auth).status_code == 413
    assert client.get("/v1/models", headers=auth).status_code == 200
    text = client.get("/metrics").text
    for endpoint, status in [("completions", 401), ("completions", 200), ("chat", 400), ("completions", 404),
                             ("completions", 413), ("models", 200)]:
        assert f'lorafleet_requests_total{{endpoint="{endpoint}",status="{status}"}} 1.0' in text, (endpoint, status)


# -- timeouts and disconnects abort the generation ------------------------------------------------------------
@pytest.mark.parametrize("stream", [False, True])
def test_timeout_aborts_the_generation_and_answers_503(make_client, hardening_replica, stream):
    client = make_client(RouterConfig(BASE, request_timeout_s=0.05, max_tokens_limit=480))
    body = {"model": BASE, "prompt": "tell me a long story", "max_tokens": 480, "stream": stream}
    num_steps = hardening_replica.engine.num_steps
    response = client.post("/v1/completions", json=body)
    if stream:  # the 200 was sent with the first token: the timeout arrives in-band, then [DONE]
        assert response.status_code == 200
        events = [b for b in response.text.split("\n\n") if b]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][len("data: "):])["error"]["code"] == "request_timeout"
    else:
        error = assert_error_shape(response, 503, "service_unavailable_error")
        assert error["code"] == "request_timeout" and "request_timeout_s" in error["message"]
    assert wait_idle(hardening_replica.engine)
    assert hardening_replica.engine.num_steps - num_steps < MAX_STEPS_AFTER_ABORT
    assert client.core.limiter.num_inflight == 0
    assert client.post("/v1/completions", json=body | {"max_tokens": 1, "stream": False}).status_code == 200


def test_closing_a_stream_early_aborts_the_generation(make_core, hardening_replica):
    from lorafleet.router.schemas import CompletionRequest

    core = make_core(RouterConfig(BASE, max_tokens_limit=480))
    req = CompletionRequest(model="beta-lora", prompt="tell me a long story", max_tokens=480, stream=True)

    num_steps = hardening_replica.engine.num_steps

    async def read_two_then_close() -> tuple[list[str], bool]:
        lines = await core.prepare_stream(req)
        got = [await lines.__anext__(), await lines.__anext__()]
        await lines.aclose()
        return got, await await_idle(hardening_replica.engine)

    got, is_idle = asyncio.run(read_two_then_close())
    assert all(json.loads(line[len("data: "):])["choices"][0]["finish_reason"] is None for line in got)
    assert is_idle
    assert hardening_replica.engine.num_steps - num_steps < MAX_STEPS_AFTER_ABORT
    assert core.limiter.num_inflight == 0


@pytest.mark.parametrize("spec_version", ["2.3", "2.4"])
def test_client_disconnect_mid_stream_aborts_the_generation(make_core, hardening_replica, spec_version):
    # The ASGI app driven by hand. ASGI 2.3: the client sends http.disconnect after the first body chunk and
    # Starlette cancels the sender. 2.4: the server raises OSError from send() and nothing cancels the body
    # iterator: only the router's ClosingStreamingResponse closes it.
    core = make_core(RouterConfig(BASE, max_tokens_limit=480))
    app = create_app(lambda: core)
    payload = json.dumps({"model": "gamma-ia3", "prompt": "tell me a long story", "max_tokens": 480,
                          "stream": True}).encode()
    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": spec_version}, "http_version": "1.1",
             "method": "POST", "scheme": "http", "path": "/v1/completions", "raw_path": b"/v1/completions",
             "query_string": b"", "root_path": "", "server": ("test", 80), "client": ("test", 1),
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]}
    chunks: list[bytes] = []
    num_steps = hardening_replica.engine.num_steps

    async def run() -> bool:
        got_chunk = asyncio.Event()
        sent_body = False

        async def receive() -> dict:
            nonlocal sent_body
            if not sent_body:
                sent_body = True
                return {"type": "http.request", "body": payload, "more_body": False}
            await got_chunk.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict) -> None:
            if message["type"] == "http.response.body" and message.get("body"):
                if chunks and spec_version == "2.4":
                    raise OSError("connection reset by peer")
                chunks.append(message["body"])
                got_chunk.set()

        with contextlib.suppress(ClientDisconnect):
            await asyncio.wait_for(app(scope, receive, send), 30)
        return await await_idle(hardening_replica.engine)

    assert asyncio.run(run())
    assert chunks and b"[DONE]" not in b"".join(chunks)
    assert hardening_replica.engine.num_steps - num_steps < MAX_STEPS_AFTER_ABORT  # aborted, not run to the end
    assert core.limiter.num_inflight == 0


# -- limits: each a setting, each a 400/413 naming it -----------------------------------------------------------
@pytest.fixture
def limited(make_client):
    config = RouterConfig(BASE, default_max_tokens=1, max_tokens_limit=8, max_prompt_chars=100, max_stop_strings=2,
                          max_request_bytes=4000)
    return make_client(config)


CHAT = {"model": BASE, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
LIMIT_CASES = {  # id -> (path, body, setting named in the message)
    "prompt-chars": ("/v1/completions", {"model": BASE, "prompt": "x" * 101}, "max_prompt_chars"),
    "chat-chars": ("/v1/chat/completions", CHAT | {"messages": [{"role": "user", "content": "y" * 60}] * 2},
                   "max_prompt_chars"),
    "max-tokens": ("/v1/completions", {"model": BASE, "prompt": "hi", "max_tokens": 9}, "max_tokens_limit"),
    "chat-max-completion-tokens": ("/v1/chat/completions", CHAT | {"max_tokens": None, "max_completion_tokens": 9},
                                   "max_tokens_limit"),
    "stop-strings": ("/v1/completions", {"model": BASE, "prompt": "hi", "stop": ["a", "b", "c"]},
                     "max_stop_strings"),
    "over-max-model-len": ("/v1/completions", {"model": BASE, "prompt": list(range(5, 600))}, "max_model_len"),
}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("case", sorted(LIMIT_CASES))
def test_limits_are_400_naming_the_limit(limited, case, stream):
    path, body, setting = LIMIT_CASES[case]
    error = assert_error_shape(limited.post(path, json=body | {"stream": stream}), 400, "invalid_request_error")
    assert setting in error["message"], error


def test_limits_allow_what_is_at_the_limit(limited):
    ok = {"model": BASE, "prompt": "x" * 100, "max_tokens": 8, "stop": ["a", "b"]}
    assert limited.post("/v1/completions", json=ok).status_code == 200


def test_body_over_max_request_bytes_is_413_by_content_length_and_by_counting(limited):
    body = json.dumps({"model": BASE, "prompt": "z" * 5000}).encode()
    error = assert_error_shape(limited.post("/v1/completions", content=body,
                                            headers={"content-type": "application/json"}), 413)
    assert "max_request_bytes" in error["message"]

    def chunked() -> Iterator[bytes]:  # no Content-Length: the streamed body is counted
        for start in range(0, len(body), 1000):
            yield body[start:start + 1000]

    error = assert_error_shape(limited.post("/v1/completions", content=chunked(),
                                            headers={"content-type": "application/json"}), 413)
    assert "max_request_bytes" in error["message"]
    assert limited.post("/v1/completions", json={"model": BASE, "prompt": "hi"}).status_code == 200


def test_adapter_upload_over_the_store_limit_is_413(make_client, hardening_store, hardening_adapter_dirs,
                                                    monkeypatch):
    client = make_client(store=hardening_store, admin_key="admin-0123456789")
    monkeypatch.setattr(hardening_store, "max_bytes", 1000)
    src = hardening_adapter_dirs["alpha-lora"]
    files = {"adapter_config": ("adapter_config.json", (src / "adapter_config.json").read_bytes()),
             "adapter_model": ("adapter_model.safetensors", (src / "adapter_model.safetensors").read_bytes())}
    response = client.post("/v1/adapters", data={"id": "too-big"}, files=files,
                           headers={"Authorization": "Bearer admin-0123456789"})
    error = assert_error_shape(response, 413)
    assert error["code"] in ("adapter_too_large", None) and "1000" in error["message"]


# -- settings → RouterConfig and ApiKeys --------------------------------------------------------------------
def test_settings_carry_keys_and_limits(monkeypatch):
    monkeypatch.setenv("LORAFLEET_API_KEYS", '{"k1": "*", "k2": ["alpha-lora"]}')
    monkeypatch.setenv("LORAFLEET_ADMIN_KEY", "adm")
    monkeypatch.setenv("LORAFLEET_MAX_INFLIGHT_REQUESTS", "7")
    monkeypatch.setenv("LORAFLEET_MAX_STOP_STRINGS", "3")
    cfg = load_settings(request_timeout_s=9.5, max_prompt_chars=123)
    assert cfg.api_keys == {"k1": "*", "k2": ["alpha-lora"]} and cfg.admin_key == "adm"
    config = router_config(cfg)
    assert (config.max_inflight_requests, config.max_stop_strings, config.request_timeout_s,
            config.max_prompt_chars) == (7, 3, 9.5, 123)
    keys = ApiKeys(cfg.api_keys, cfg.admin_key)
    assert keys.authenticate("Bearer k2").adapter_ids == frozenset({"alpha-lora"})
    assert keys.authenticate("Bearer adm").is_admin
