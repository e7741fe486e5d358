"""API keys from the Redis hash: made by `lorafleet keys`, served by the in-process app, revoked, Redis down."""

from __future__ import annotations

import contextlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Iterator

import pytest
from lf_testing import REDIS_URL, free_port, in_process_cli

from lorafleet.infra.config import load_settings
from lorafleet.infra.redis_conn import connect
from lorafleet.router import auth as auth_module
from lorafleet.router.auth import ApiKeys, RedisKeys, Unauthorized, api_keys_from_settings
from lorafleet.router.core import RouterConfig
from lorafleet.router.key_store import ApiKeyStore, key_digest

pytestmark = pytest.mark.timeout(120)

BASE = "tiny"   # tests/router/conftest.py: base name and adapters of the shared replica and store
ADMIN = "admin-secret-0123456789"


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def complete(client, key: str, model: str):
    return client.post("/v1/completions", json={"model": model, "prompt": "hi", "max_tokens": 1}, headers=bearer(key))


@pytest.fixture
def keys_cli(monkeypatch, capsys, redis_prefix) -> Callable[..., tuple[int, str, str]]:
    """keys_cli(*args) -> (exit code, stdout, stderr) of `lorafleet keys ...`, in-process, on this test's prefix."""
    monkeypatch.setenv("LORAFLEET_REDIS_PREFIX", redis_prefix[1])
    monkeypatch.setenv("LORAFLEET_REDIS_URL", REDIS_URL)

    return in_process_cli(capsys, "keys")


@pytest.fixture
def redis_keys(redis_prefix) -> Iterator[Callable[..., ApiKeys]]:
    """redis_keys(refresh_s=60, admin_key=None, start=True) -> ApiKeys over this test's hash; closed afterwards."""
    made: list[ApiKeys] = []

    def make(refresh_s: float = 60.0, admin_key: str | None = None, start: bool = True) -> ApiKeys:
        source = RedisKeys(ApiKeyStore(connect(REDIS_URL, timeout_s=1.0), redis_prefix[1]), refresh_s)
        keys = ApiKeys(None, admin_key, source.start() if start else source)
        made.append(keys)
        return keys

    yield make
    for keys in made:
        keys.close()


def add_key(keys_cli, *args: str) -> str:
    code, out, err = keys_cli("add", *args)
    assert code == 0, err
    return out.strip()


def test_cli_keys_authenticate_in_the_app_and_bind_tenants(keys_cli, redis_keys, make_client, hardening_store,
                                                            caplog):
    caplog.set_level(logging.DEBUG)
    every = add_key(keys_cli, "--all", "--name", "ops")
    alpha = add_key(keys_cli, "--adapters", "alpha-lora", "--name", "team-a")
    base_only = add_key(keys_cli, "--adapters", "")
    client = make_client(RouterConfig(BASE, default_max_tokens=1), store=hardening_store)
    client.core.auth = redis_keys(admin_key=ADMIN)
    assert not client.core.auth.is_open and not client.core.auth.is_inference_open

    for model in ("alpha-lora", "beta-lora", "gamma-ia3", BASE):
        assert complete(client, every, model).status_code == 200
    assert complete(client, alpha, "alpha-lora").status_code == 200
    assert complete(client, alpha, BASE).status_code == 200
    for key, model in ((alpha, "beta-lora"), (alpha, "gamma-ia3"), (base_only, "alpha-lora")):
        theirs = complete(client, key, model)   # another tenant's adapter: 404, as if missing
        assert theirs.status_code == 404 and theirs.json()["error"]["code"] == "adapter_not_found"
        assert client.get(f"/v1/adapters/{model}", headers=bearer(key)).status_code == 404
    assert complete(client, base_only, BASE).status_code == 200
    listed = client.get("/v1/models", headers=bearer(alpha)).json()["data"]
    assert [m["id"] for m in listed] == [BASE, "alpha-lora"]

    assert client.delete("/v1/adapters/alpha-lora", headers=bearer(every)).status_code == 403   # admin only
    assert client.post("/v1/placement/rebalance", headers=bearer(ADMIN)).status_code == 503   # past the gate
    missing = client.post("/v1/completions", json={"model": BASE, "prompt": "hi"})
    assert missing.status_code == 401 and missing.headers["www-authenticate"] == "Bearer"
    wrong = complete(client, every[:-1], BASE)
    assert wrong.status_code == 401 and every[:-1] not in wrong.text
    assert not any(k in r.getMessage() for r in caplog.records for k in (every, alpha, base_only, ADMIN))


def test_revoked_key_is_refused_within_the_refresh_period(keys_cli, redis_keys, make_client):
    key = add_key(keys_cli, "--all")
    keep = add_key(keys_cli, "--all")
    client = make_client(RouterConfig(BASE, default_max_tokens=1))
    refresh_s = 0.2
    client.core.auth = redis_keys(refresh_s=refresh_s)
    assert complete(client, key, BASE).status_code == 200
    code, out, err = keys_cli("rm", key_digest(key)[:8])
    assert code == 0 and out.startswith(f"removed API key {key_digest(key)[:12]}"), err
    revoked_at = time.monotonic()
    while complete(client, key, BASE).status_code != 401:
        assert time.monotonic() - revoked_at < refresh_s + 2.0, "revoked key still accepted"
        time.sleep(0.02)
    assert time.monotonic() - revoked_at < refresh_s + 2.0
    assert complete(client, keep, BASE).status_code == 200
    fresh = add_key(keys_cli, "--all")   # and a new key starts working within the period
    while complete(client, fresh, BASE).status_code != 200:
        assert time.monotonic() - revoked_at < 2 * refresh_s + 4.0, "new key never accepted"
        time.sleep(0.02)


def test_redis_unreachable_from_the_start_is_never_open(make_client, caplog):
    caplog.set_level(logging.DEBUG)
    dead = RedisKeys(ApiKeyStore(connect(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5), "lf"), 60.0)
    keys = ApiKeys({"static-0123456789": ["alpha-lora"]}, ADMIN, dead.start())
    try:
        assert dead.entries is None and not keys.is_open and not keys.is_inference_open
        client = make_client(RouterConfig(BASE, default_max_tokens=1))
        client.core.auth = keys
        unknown = complete(client, "maybe-valid-0123456789", BASE)   # cannot tell: 503, not 401, never 200
        assert unknown.status_code == 503 and unknown.json()["error"]["code"] == "api_keys_unavailable"
        assert unknown.headers["retry-after"] == "1" and "0123456789" not in unknown.text
        assert client.post("/v1/completions", json={"model": BASE, "prompt": "hi"}).status_code == 401
        assert complete(client, "static-0123456789", BASE).status_code == 200   # settings keys still work
        assert complete(client, "static-0123456789", "beta-lora").status_code == 404
        assert client.post("/v1/placement/rebalance", headers=bearer(ADMIN)).status_code == 503   # no controller
        assert client.post("/v1/placement/rebalance", headers=bearer("static-0123456789")).status_code == 403
    finally:
        keys.close()
    warnings = [r.getMessage() for r in caplog.records if "API keys not refreshed" in r.getMessage()]
    assert len(warnings) == 1 and "none loaded yet" in warnings[0] and "is unreachable" in warnings[0]
    assert not any("0123456789" in r.getMessage() for r in caplog.records)


def test_redis_down_after_a_load_keeps_the_last_good_keys(keys_cli, redis_keys, make_client, caplog):
    caplog.set_level(logging.DEBUG)
    key = add_key(keys_cli, "--adapters", "alpha-lora")
    client = make_client(RouterConfig(BASE, default_max_tokens=1))
    client.core.auth = keys = redis_keys(start=False)
    source = keys.redis_keys
    assert source.start().entries is not None and len(source.entries) == 1
    source.store.redis = connect(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.5)   # Redis goes away
    for _ in range(3):
        assert source.refresh() is False
    assert complete(client, key, BASE).status_code == 200
    assert complete(client, key, "beta-lora").status_code == 404   # still bound, not opened
    assert complete(client, "unknown-0123456789", BASE).status_code == 401   # loaded once: a plain 401
    assert client.post("/v1/completions", json={"model": BASE, "prompt": "hi"}).status_code == 401
    warnings = [r.getMessage() for r in caplog.records if "API keys not refreshed" in r.getMessage()]
    assert len(warnings) == 1 and "keeping the 1 last loaded" in warnings[0]   # once per outage, not per try
    source.store.redis = connect(REDIS_URL, timeout_s=1.0)   # back: a read that succeeds replaces the keys
    assert source.refresh() is True and complete(client, key, BASE).status_code == 200
    assert not any(key in r.getMessage() for r in caplog.records)


def test_bad_entries_are_skipped_with_a_warning_naming_only_the_digest(redis_prefix, redis_keys, caplog):
    client, prefix = redis_prefix
    caplog.set_level(logging.DEBUG)
    hand_all, hand_list, bad_json, bad_scope, raw_key = (f"hand-{i}-0123456789" for i in range(5))
    client.hset(f"{prefix}:api_keys", mapping={
        key_digest(hand_all): json.dumps("*"),   # the bare forms a hand-written HSET may use
        key_digest(hand_list): json.dumps(["alpha-lora"]),
        key_digest(bad_json): b"{not json",
        key_digest(bad_scope): json.dumps({"adapters": "alpha-lora"}),
        raw_key: json.dumps("*"),   # a key stored instead of its digest: skipped, never named
    })
    keys = redis_keys()
    assert keys.authenticate(f"Bearer {hand_all}").adapter_ids is None
    assert keys.authenticate(f"Bearer {hand_list}").adapter_ids == frozenset({"alpha-lora"})
    for key in (bad_json, bad_scope, raw_key):
        with pytest.raises(Unauthorized):
            keys.authenticate(f"Bearer {key}")
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(key_digest(bad_json)[:12] in m and "JSONDecodeError" in m for m in messages), messages
    assert any(key_digest(bad_scope)[:12] in m and "list of adapter ids" in m for m in messages), messages
    assert any("1 field(s)" in m and "not a sha256 hex digest" in m for m in messages), messages
    assert not any("0123456789" in m for m in messages)
    caplog.clear()
    keys.redis_keys.refresh()   # unchanged hash: not parsed again, no repeated warnings
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_every_known_digest_is_compared_settings_and_redis(keys_cli, redis_keys, monkeypatch):
    calls: list[bytes] = []
    compare_digest = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append(a)
        return compare_digest(a, b)

    redis_key = add_key(keys_cli, "--all")
    add_key(keys_cli, "--adapters", "alpha-lora")
    keys = redis_keys(admin_key=ADMIN)
    monkeypatch.setattr(auth_module.hmac, "compare_digest", spy)
    for presented in (ADMIN, redis_key, "nope"):
        calls.clear()
        with contextlib.suppress(Unauthorized):
            keys.authenticate(f"Bearer {presented}")
        assert len(calls) == 3 and all(len(c) == 32 for c in calls), presented   # digests, never the keys


def test_api_keys_from_settings(monkeypatch, redis_prefix, keys_cli):
    key = add_key(keys_cli, "--all")
    assert api_keys_from_settings(load_settings()).is_open   # the default: Redis not read, no keys: open
    monkeypatch.setenv("LORAFLEET_API_KEYS_FROM_REDIS", "1")
    monkeypatch.setenv("LORAFLEET_API_KEYS_REFRESH_S", "0.5")
    cfg = load_settings()
    assert cfg.api_keys_from_redis and cfg.api_keys_refresh_s == 0.5
    keys = api_keys_from_settings(cfg)
    try:
        assert not keys.is_open and keys.redis_keys.refresh_s == 0.5
        assert keys.authenticate(f"Bearer {key}").adapter_ids is None   # loaded before the first request
        with pytest.raises(Unauthorized):
            keys.authenticate(None)
    finally:
        keys.close()


def test_authenticate_with_many_redis_keys_stays_cheap(redis_prefix, redis_keys):
    client, prefix = redis_prefix
    store = ApiKeyStore(client, prefix)
    for i in range(200):
        store.add(["alpha-lora"], name=f"t{i}")
    key, _ = store.add(None)
    keys = redis_keys()
    assert len(keys.redis_keys.entries) == 201
    start = time.perf_counter()
    for _ in range(200):
        keys.authenticate(f"Bearer {key}")
    per_call_ms = (time.perf_counter() - start) / 200 * 1e3
    assert per_call_ms < 2.0, per_call_ms   # ~0.02 ms here (0.5 ms at 10,000 keys): one compare_digest each
