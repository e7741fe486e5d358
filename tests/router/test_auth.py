"""API keys and tenant isolation on the in-process app: keys × adapters × endpoints, 401/403 shapes, fuzzing."""

from __future__ import annotations

import contextlib
import hmac
import logging
from collections.abc import Iterator

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from lorafleet.router import auth as auth_module
from lorafleet.router.app import create_app
from lorafleet.router.auth import ApiKeys, Unauthorized
from lorafleet.router.core import RouterConfig, RouterCore

HARDENING_BASE = "tiny"  # the shared fixtures' base name and adapters (tests/router/conftest.py)
HARDENING_ADAPTERS = ("alpha-lora", "beta-lora", "gamma-ia3")

pytestmark = pytest.mark.timeout(120)

ADMIN = "admin-secret-0123456789"
KEYS: dict[str, str | list[str]] = {
    "key-all-0123456789": "*",
    "key-alpha-0123456789": ["alpha-lora"],
    "key-beta-gamma-0123456789": ["beta-lora", "gamma-ia3"],
    "key-none-0123456789": [],
}
ALL_ADAPTERS = sorted(HARDENING_ADAPTERS)


def visible(key: str) -> set[str]:
    """Adapter ids `key` may see."""
    scope = ADMIN if key == ADMIN else KEYS[key]
    return set(ALL_ADAPTERS) if scope in ("*", ADMIN) else set(scope)


def assert_error_shape(response, status: int, error_type: str | None = None) -> dict:
    """OpenAI's error shape with `status`; returns the error object."""
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"]
    if error_type is not None:
        assert body["error"]["type"] == error_type, body
    return body["error"]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def client(make_client, hardening_store):
    return make_client(RouterConfig(HARDENING_BASE, default_max_tokens=1), store=hardening_store, api_keys=KEYS,
                       admin_key=ADMIN)


# -- the isolation matrix -----------------------------------------------------------------------------------
def _call(client, endpoint: str, model: str, key: str):
    if endpoint == "completions":
        body = {"model": model, "prompt": "hello", "max_tokens": 1}
        return client.post("/v1/completions", json=body, headers=bearer(key))
    if endpoint == "chat-stream":
        body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1, "stream": True}
        return client.post("/v1/chat/completions", json=body, headers=bearer(key))
    if endpoint == "adapter":
        return client.get(f"/v1/adapters/{model}", headers=bearer(key))
    raise AssertionError(endpoint)


@pytest.mark.parametrize("key", [*KEYS, ADMIN])
def test_isolation_matrix_keys_x_adapters_x_endpoints(client, key):
    for endpoint in ("completions", "chat-stream", "adapter"):
        for model in ALL_ADAPTERS:
            response = _call(client, endpoint, model, key)
            if model in visible(key):
                assert response.status_code == 200, (endpoint, model, response.text)
            else:  # 404, not 403: the id of another tenant's adapter does not leak
                error = assert_error_shape(response, 404, "not_found_error")
                assert error["code"] == "adapter_not_found"
        if endpoint != "adapter":  # the base model is everyone's
            assert _call(client, endpoint, HARDENING_BASE, key).status_code == 200


@pytest.mark.parametrize("key", [*KEYS, ADMIN])
def test_models_and_adapter_list_show_only_the_tenants_adapters(client, key):
    models = client.get("/v1/models", headers=bearer(key))
    assert models.status_code == 200
    assert [c["id"] for c in models.json()["data"]][0] == HARDENING_BASE
    assert {c["id"] for c in models.json()["data"][1:]} & set(ALL_ADAPTERS) == visible(key)
    adapters = client.get("/v1/adapters", headers=bearer(key))
    assert adapters.status_code == 200
    assert {a["id"] for a in adapters.json()["data"]} & set(ALL_ADAPTERS) == visible(key)


def test_another_tenants_adapter_looks_exactly_like_a_missing_one(client):
    key = "key-alpha-0123456789"
    theirs = _call(client, "completions", "beta-lora", key).json()["error"]
    missing = _call(client, "completions", "no-such-lora", key).json()["error"]
    assert theirs["message"].replace("beta-lora", "X") == missing["message"].replace("no-such-lora", "X")
    assert theirs["code"] == missing["code"] and theirs["type"] == missing["type"]
    colon = _call(client, "completions", f"{HARDENING_BASE}:beta-lora", key)
    assert_error_shape(colon, 404, "not_found_error")


def test_bound_key_with_no_store_still_404s_other_adapters_before_touching_the_store(make_client):
    client = make_client(store=None, api_keys=KEYS)
    key = "key-alpha-0123456789"
    assert_error_shape(client.get("/v1/adapters/beta-lora", headers=bearer(key)), 404, "not_found_error")
    assert_error_shape(client.get("/v1/adapters/alpha-lora", headers=bearer(key)), 503)  # no store to ask
    assert client.get("/v1/adapters", headers=bearer("key-none-0123456789")).json() == {"object": "list",
                                                                                       "data": []}


# -- 401 and 403 ---------------------------------------------------------------------------------------------
BAD_AUTH = {
    "missing": None, "unknown": "Bearer nope", "basic-scheme": "Basic a2V5LWFsbA==", "empty-token": "Bearer ",
    "valid-key-plus-one": "Bearer key-all-0123456789x", "prefix-of-valid-key": "Bearer key-all-",
    "no-scheme": "key-all-0123456789", "non-ascii": "Bearer kéy",
}
PATHS = [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/models"),
         ("GET", "/v1/adapters"), ("GET", "/v1/adapters/alpha-lora"), ("DELETE", "/v1/adapters/alpha-lora"),
         ("POST", "/v1/adapters"), ("GET", "/v1/placement"), ("POST", "/v1/placement/rebalance"),
         ("GET", "/v1/no-such-path")]


@pytest.mark.parametrize("case", sorted(BAD_AUTH))
def test_missing_or_unknown_key_is_a_401_in_openai_shape(client, case, caplog):
    caplog.set_level(logging.DEBUG)
    header = BAD_AUTH[case]
    headers = {"Authorization": header.encode()} if header is not None else {}  # type: ignore[dict-item]
    for method, path in PATHS:
        body = {"model": "alpha-lora", "prompt": "hi"} if method == "POST" else None
        response = client.request(method, path, json=body, headers=headers)
        error = assert_error_shape(response, 401, "authentication_error")
        assert error["code"] == "invalid_api_key"
        assert response.headers["www-authenticate"] == "Bearer"
        assert "0123456789" not in response.text
    assert not any("0123456789" in r.getMessage() for r in caplog.records)  # keys are never logged


def test_health_metrics_and_schema_need_no_key(client):
    assert client.get("/healthz").status_code == 200
    assert client.get("/metrics").status_code == 200
    assert client.get("/openapi.json").status_code == 200


@pytest.mark.parametrize("key", list(KEYS))
@pytest.mark.parametrize(("method", "path"), [("POST", "/v1/adapters"), ("DELETE", "/v1/adapters/alpha-lora"),
                                              ("DELETE", "/v1/adapters/no-such"),
                                              ("POST", "/v1/placement/rebalance")])
def test_writes_and_rebalance_need_the_admin_key(client, key, method, path):
    error = assert_error_shape(client.request(method, path, headers=bearer(key)), 403, "permission_error")
    assert error["code"] == "permission_denied"


def test_admin_key_uploads_and_deletes(client, hardening_adapter_dirs):
    src = hardening_adapter_dirs["alpha-lora"]
    files = {"adapter_config": ("adapter_config.json", (src / "adapter_config.json").read_bytes()),
             "adapter_model": ("adapter_model.safetensors", (src / "adapter_model.safetensors").read_bytes())}
    created = client.post("/v1/adapters", data={"id": "delta-admin"}, files=files, headers=bearer(ADMIN))
    assert created.status_code == 201, created.text
    assert client.get("/v1/adapters/delta-admin", headers=bearer("key-all-0123456789")).status_code == 200
    assert client.get("/v1/adapters/delta-admin", headers=bearer("key-alpha-0123456789")).status_code == 404
    assert client.delete("/v1/adapters/delta-admin?purge=true", headers=bearer(ADMIN)).status_code == 200
    # Rebalance passes the gate with the admin key; no controller runs here: 503, in OpenAI's shape.
    assert_error_shape(client.post("/v1/placement/rebalance", headers=bearer(ADMIN)), 503)


def test_no_keys_configured_is_open(make_client):
    client = make_client(RouterConfig(HARDENING_BASE, default_max_tokens=1))
    assert client.post("/v1/completions", json={"model": "alpha-lora", "prompt": "hi"}).status_code == 200
    assert_error_shape(client.post("/v1/placement/rebalance"), 503)  # open: past the gate, no controller


def test_only_an_admin_key_leaves_inference_open_and_guards_writes(make_client):
    client = make_client(RouterConfig(HARDENING_BASE, default_max_tokens=1), admin_key=ADMIN)
    assert client.post("/v1/completions", json={"model": HARDENING_BASE, "prompt": "hi"}).status_code == 200
    assert_error_shape(client.delete("/v1/adapters/alpha-lora"), 401, "authentication_error")
    assert_error_shape(client.delete("/v1/adapters/alpha-lora", headers=bearer("wrong")), 401)
    assert_error_shape(client.delete("/v1/adapters/alpha-lora", headers=bearer(ADMIN)), 503)  # no store


def test_every_configured_key_is_compared_with_compare_digest(monkeypatch):
    # A spy that delegates: proves the comparison is hmac.compare_digest and never stops at the first match.
    calls: list[bytes] = []
    compare_digest = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append(a)
        return compare_digest(a, b)

    keys = ApiKeys(KEYS, ADMIN)
    monkeypatch.setattr(auth_module.hmac, "compare_digest", spy)
    for presented in ("key-all-0123456789", ADMIN, "nope"):
        calls.clear()
        with contextlib.suppress(Unauthorized):
            keys.authenticate(f"Bearer {presented}")
        assert len(calls) == len(KEYS) + 1, presented


def test_bad_key_settings_are_rejected():
    with pytest.raises(ValueError, match="adapter ids"):
        ApiKeys({"k": "alpha-lora"})
    with pytest.raises(ValueError, match="non-empty"):
        ApiKeys({"": "*"})


# -- schemathesis with keys configured: no 5xx, errors in OpenAI's shape -----------------------------------
_fuzz_cores: dict[str, RouterCore] = {}
schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(lambda: _fuzz_cores["core"]))
STORE_PATHS = ("/v1/adapters", "/v1/placement")


@pytest.fixture(scope="module")
def fuzz_core(make_core) -> Iterator[None]:
    config = RouterConfig(HARDENING_BASE, default_max_tokens=2, max_tokens_limit=4)
    _fuzz_cores["core"] = make_core(config, api_keys=KEYS, admin_key=ADMIN)
    yield
    _fuzz_cores.clear()


@schema.parametrize()
@schema.given(data=st.data())
@settings(max_examples=15, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
def test_api_fuzz_with_keys_never_5xx(case, data, fuzz_core):
    key = data.draw(st.sampled_from([None, "wrong", ADMIN, *KEYS]))
    case.headers = (case.headers or {}) | ({"Authorization": f"Bearer {key}"} if key else {})
    if isinstance(case.body, dict) and "model" in case.body:
        model = data.draw(st.sampled_from([None, HARDENING_BASE, *ALL_ADAPTERS]))
        if model is not None:
            case.body["model"] = model
    response = case.call()
    path = case.operation.path
    assert "Traceback" not in response.text
    if response.status_code == 503 and path.startswith(STORE_PATHS):
        return  # no store in this core: the right answer
    assert response.status_code < 500, f"{case.method} {path}: {response.status_code} {response.text[:300]}"
    if response.status_code >= 400:
        assert_error_shape(response, response.status_code)
    if key in (None, "wrong") and path.startswith("/v1/"):  # /healthz and /metrics are open
        assert response.status_code == 401
