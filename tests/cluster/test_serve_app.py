"""The Serve app end to end on a local Ray: 2 CPU replicas, 20 adapters, OpenAI API, table-driven routing."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest
import redis
import schemathesis
from hypothesis import HealthCheck
from hypothesis import settings as hyp_settings
from hypothesis import strategies as st
from lf_testing import REDIS_URL, delete_prefix, free_port, wait_until

from lorafleet.cluster.demo import DEMO_ADAPTERS, prepare_assets
from lorafleet.cluster.serving import serve_app
from lorafleet.infra.config import load_settings
from lorafleet.infra.demand import DemandCounters
from lorafleet.infra.store import AdapterStore
from lorafleet.placement.routing_table import RoutingTable, default_replica
from lorafleet.placement.table_store import RoutingTableStore
from lorafleet.router.app import ADAPTER_STATE_HEADER, REPLICA_HEADER, create_app

pytestmark = pytest.mark.slow
PROMPTS = ["SELECT name FROM", "def fibonacci(n):", "The weather today", "Hello, world!", "Question: What is"]



@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    model_dir, adapters = prepare_assets(root)
    prefix = f"lftest-{uuid.uuid4().hex[:10]}"
    settings = load_settings(
        model_dir=str(model_dir), store_url=str(root / "store"), redis_url=REDIS_URL, redis_prefix=prefix,
        num_replicas=2, http_port=free_port(), base_model_name="tiny", max_num_seqs=16, max_batched_tokens=512,
        kv_cache_bytes=32 << 20, max_adapters=8, max_rank=64, rebalance_period_s=3600.0,
    )
    store = AdapterStore.from_settings(settings)
    for adapter_id, path in adapters.items():
        store.push(adapter_id, path)
    try:
        with serve_app(settings, num_cpus=2) as url:
            _wait_for_ranks(url)
            yield url, settings, adapters, model_dir
    finally:
        delete_prefix(redis.Redis.from_url(REDIS_URL), prefix)


def _wait_for_ranks(url: str, timeout_s: float = 120.0) -> None:
    """Until both replicas answer (their first routing stats name their ranks); bursts spread the load."""
    seen: set[str] = set()
    deadline = time.monotonic() + timeout_s

    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=60) as client:
            body = {"model": "tiny", "prompt": "hi", "max_tokens": 4}
            return await asyncio.gather(*(client.post(f"{url}/v1/completions", json=body) for _ in range(8)))

    while len(seen) < 2 and time.monotonic() < deadline:
        for response in asyncio.run(burst()):
            assert response.status_code == 200, response.text
            seen.add(response.headers[REPLICA_HEADER])
        time.sleep(1.0)
    assert seen == {"0", "1"}


@pytest.fixture(scope="module")
def offline_answers(served):
    """Greedy answers of the offline Engine (no Ray) for every (adapter, prompt) pair."""
    from lorafleet.replicas import Engine, SamplingParams

    _, _, adapters, model_dir = served
    engine = Engine.from_pretrained(model_dir, max_adapters=24, max_rank=64, kernel_backend="torch")
    for adapter_id, path in adapters.items():
        engine.load_adapter(adapter_id, path)
    pairs = [(a, p) for a in [None, *adapters] for p in PROMPTS]
    outs = engine.generate([p for _, p in pairs], SamplingParams(max_tokens=8, temperature=0.0),
                           adapters=[a for a, _ in pairs])
    engine.close()
    return {pair: out.text for pair, out in zip(pairs, outs, strict=True)}


def test_50_concurrent_requests_match_offline_engine(served, offline_answers):
    url = served[0]
    rng = random.Random(0)
    ids = [None, *[a[0] for a in DEMO_ADAPTERS]]
    pairs = [(rng.choice(ids), rng.choice(PROMPTS)) for _ in range(50)]

    async def one(client, adapter_id, prompt):
        body = {"model": adapter_id or "tiny", "prompt": prompt, "max_tokens": 8, "temperature": 0}
        return await client.post(f"{url}/v1/completions", json=body)

    async def run_all():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(*(one(client, a, p) for a, p in pairs))

    responses = asyncio.run(run_all())
    for (adapter_id, prompt), response in zip(pairs, responses, strict=True):
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["choices"][0]["text"] == offline_answers[(adapter_id, prompt)], (adapter_id, prompt)
        assert body["usage"]["completion_tokens"] <= 8 and body["usage"]["prompt_tokens"] > 0
    assert {r.headers[REPLICA_HEADER] for r in responses} == {"0", "1"}


def test_streaming_and_openai_client_agree(served, offline_answers):
    from openai import OpenAI

    url = served[0]
    client = OpenAI(base_url=f"{url}/v1", api_key="unused", timeout=120)
    for adapter_id in ("sql-lora-r8", "style-ia3", "tone-flora-r4", "chat-lora-r64"):
        expected = offline_answers[(adapter_id, PROMPTS[0])]
        plain = client.completions.create(model=adapter_id, prompt=PROMPTS[0], max_tokens=8, temperature=0)
        assert plain.choices[0].text == expected
        chunks = client.completions.create(model=adapter_id, prompt=PROMPTS[0], max_tokens=8, temperature=0,
                                           stream=True)
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
    via_base = client.completions.create(model="tiny:sql-lora-r8", prompt=PROMPTS[1], max_tokens=8, temperature=0)
    assert via_base.choices[0].text == offline_answers[("sql-lora-r8", PROMPTS[1])]
    chat = client.chat.completions.create(model="chat-lora-r64", messages=[{"role": "user", "content": "hi"}],
                                          max_tokens=6, temperature=0)
    streamed = client.chat.completions.create(model="chat-lora-r64", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == chat.choices[0].message.content
    models = {m.id for m in client.models.list()}
    assert models == {"tiny", *(a[0] for a in DEMO_ADAPTERS)}


def _replica_counts(url: str, adapter_id: str, num: int) -> collections.Counter:
    async def run_all():
        async with httpx.AsyncClient(timeout=120) as client:
            body = {"model": adapter_id, "prompt": "hi", "max_tokens": 1}
            sem = asyncio.Semaphore(4)

            async def one():
                async with sem:
                    return await client.post(f"{url}/v1/completions", json=body)

            return await asyncio.gather(*(one() for _ in range(num)))

    responses = asyncio.run(run_all())
    assert all(r.status_code == 200 for r in responses)
    return collections.Counter(int(r.headers[REPLICA_HEADER]) for r in responses)


def _assert_follows(counts: collections.Counter, probabilities: dict[int, float]) -> None:
    """Every request on a replica of the adapter's entry, all of them where it is pinned (p = 1), and each replica
    of a split entry used. Not the entry's proportions: among an adapter's replicas routing is load-aware (the
    shorter queue of two weighted draws), so the split follows the replicas' queues as much as the table."""
    assert set(counts) <= {rank for rank, p in probabilities.items() if p > 0}, (counts, probabilities)
    for rank, p in probabilities.items():
        assert counts[rank] >= 1 if p < 1 else counts[rank] == sum(counts.values()), (counts, probabilities)


def test_routing_follows_the_table_and_rebalance_changes_it(served):
    url, settings, _, _ = served
    client = redis.Redis.from_url(REDIS_URL)
    tables = RoutingTableStore(client, settings.redis_prefix)
    # Each adapter is pinned where the consistent-hash default would NOT send it (tenant01 hashes to 0, tenant02
    # to 1), so ignoring the table, hashing, random or least-loaded routing all fail these counts.
    table = RoutingTable(2, {"tenant01-lora-r1": ((1, 1.0),), "tenant02-lora-r2": ((0, 1.0),),
                             "tenant07-lora-r64": ((0, 0.8), (1, 0.2))})
    assert [default_replica(a, 2) for a in ("tenant01-lora-r1", "tenant02-lora-r2")] == [0, 1]
    tables.publish(table)
    # the request router re-reads the table within refresh_s (1 s): until then tenant01 goes to its hash home 0
    wait_until(lambda: _replica_counts(url, "tenant01-lora-r1", 1) == {1: 1}, 60, "routing by the new table",
               period_s=0.2)
    assert _replica_counts(url, "tenant01-lora-r1", 20) == {1: 20}
    assert _replica_counts(url, "tenant02-lora-r2", 20) == {0: 20}
    _assert_follows(_replica_counts(url, "tenant07-lora-r64", 60), {0: 0.8, 1: 0.2})

    # New demand: tenant07 dominates; `lorafleet rebalance` publishes a new table that the routers follow.
    counters = DemandCounters(client, settings.redis_prefix)
    counters.record("tenant07-lora-r64", 200_000, 1000)
    counters.record("tenant01-lora-r1", 1_000, 10)
    env = {**os.environ, "LORAFLEET_REDIS_PREFIX": settings.redis_prefix, "LORAFLEET_REDIS_URL": REDIS_URL,
           "LORAFLEET_NUM_REPLICAS": "2", "LORAFLEET_STORE_URL": settings.store_url,
           "LORAFLEET_MODEL_DIR": settings.model_dir}
    result = subprocess.run([str(Path(sys.executable).parent / "lorafleet"), "rebalance", "--json"],
                            capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["published"] and report["version"] > table.version and report["num_unknown_rank"] == 0
    new = tables.load()
    assert new.version == report["version"] and "tenant07-lora-r64" in new.entries
    assert httpx.get(f"{url}/v1/placement", timeout=30).json()["version"] == new.version
    time.sleep(3.0)   # the request router polls its own copy of the table every 1 s
    for adapter_id in ("tenant07-lora-r64", "tenant01-lora-r1"):
        _assert_follows(_replica_counts(url, adapter_id, 40), new.probabilities(adapter_id))


def test_a_replica_prefetches_what_the_table_assigns_it_before_the_first_request(served, tmp_path):
    """A new adapter is pinned to the replica hashing would not pick: its first request lands there and finds it
    already on the device (the replica acted on the published table), where without prefetch it would be cold."""
    from lorafleet.infra.adapter_maker import make_adapter

    url, settings, _, model_dir = served
    adapter_id = next(f"pinned-{i}" for i in range(100) if default_replica(f"pinned-{i}", 2) == 0)
    store = AdapterStore.from_settings(settings)
    store.push(adapter_id, make_adapter(tmp_path / adapter_id, model_dir, "lora", 8, ["q_proj", "v_proj"], seed=7))
    tables = RoutingTableStore(redis.Redis.from_url(REDIS_URL), settings.redis_prefix)
    tables.publish(RoutingTable(2, {adapter_id: ((1, 1.0),)}))
    time.sleep(4.0)   # replicas poll their assignment every 1 s, then fetch + install
    landed: list[httpx.Response] = []

    def lands_on_1() -> bool:   # until the request router's own copy of the table (1 s poll) sends it to 1
        response = httpx.post(f"{url}/v1/completions", timeout=60,
                              json={"model": adapter_id, "prompt": "hi", "max_tokens": 2, "temperature": 0})
        assert response.status_code == 200, response.text
        landed.append(response)
        return response.headers[REPLICA_HEADER] == "1"

    wait_until(lands_on_1, 60, "routing by the new table", period_s=0.2)
    assert len(landed) <= 20   # a few early ones may take the hash home 0 while the router's poll catches up
    assert landed[-1].headers[ADAPTER_STATE_HEADER] == "device"   # its first request on replica 1


@pytest.mark.parametrize("body,status,fragment", [
    (b"{not json", 400, ""),
    (json.dumps({"model": "tiny", "prompt": 5}).encode(), 400, "prompt"),
    (json.dumps({"model": "tiny", "prompt": "x", "max_tokens": "many"}).encode(), 400, "max_tokens"),
    (json.dumps({"model": "tiny", "prompt": "x", "temperature": 9}).encode(), 400, "temperature"),
    (json.dumps({"prompt": "x"}).encode(), 400, "model"),
    (json.dumps({"model": "no-such-adapter", "prompt": "x"}).encode(), 404, "does not exist"),
    (json.dumps({"model": "../../etc/passwd", "prompt": "x"}).encode(), 404, "does not exist"),
])
def test_bad_input_answers_in_openai_error_shape(served, body, status, fragment):
    url = served[0]
    response = httpx.post(f"{url}/v1/completions", content=body, headers={"Content-Type": "application/json"},
                          timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and fragment in error["message"]
    assert "Traceback" not in response.text


def test_placement_models_health_metrics(served):
    url = served[0]
    assert httpx.get(f"{url}/healthz").json() == {"status": "ok", "redis": "ok"}
    placement = httpx.get(f"{url}/v1/placement").json()
    assert placement["num_replicas"] == 2 and "entries" in placement
    metrics = httpx.get(f"{url}/metrics").text
    assert 'lorafleet_requests_total{endpoint="completions",status="200"}' in metrics
    assert "lorafleet_ttft_seconds_bucket{adapter_state=" in metrics
    assert "lorafleet_replica_adapters{" in metrics


# -- schemathesis against the served app (real Ray, real Redis, real store): every operation of its schema --------
# The schema comes from the same FastAPI app object the router deployment serves (read at import, no Ray needed);
# the generated requests go over HTTP to the live app. Last in the module: it may upload, delete and rebalance.
_live_schema = schemathesis.openapi.from_dict(create_app(lambda: None).openapi())  # schema only, sent over HTTP
LIVE_FUZZ_COUNTS: collections.Counter = collections.Counter()


@_live_schema.parametrize()
@_live_schema.given(data=st.data())
@hyp_settings(max_examples=8, deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))
def test_live_app_fuzz_never_5xx_and_errors_in_openai_shape(case, data, served):
    url = served[0]
    if isinstance(case.body, dict) and "model" in case.body:  # a served model in most bodies reaches the engine
        model = data.draw(st.sampled_from([None, "tiny", DEMO_ADAPTERS[0][0], DEMO_ADAPTERS[5][0]]))
        if model is not None:
            case.body["model"] = model
        if isinstance(case.body.get("max_tokens"), int) and case.body["max_tokens"] > 8:
            case.body["max_tokens"] = 8  # keep the engine's share small; the limits have their own tests
    response = case.call(base_url=url, timeout=60)
    text = response.text
    LIVE_FUZZ_COUNTS[response.status_code] += 1
    assert "Traceback" not in text and 'File "' not in text, text[:500]
    assert response.status_code < 500, f"{case.method} {case.operation.path}: {response.status_code} {text[:500]}"
    if response.status_code >= 400:
        body = response.json()
        assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
