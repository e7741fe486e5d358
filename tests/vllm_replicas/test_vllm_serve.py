"""The Serve app with vLLM replicas (engine: vllm, started by Ray with .venv-vllm/bin/python) end to end over HTTP on
SmolLM2: answers equal to LoRAFleet's engine, streaming, 404 / 400 (FLoRA, IA3) / tenant keys, routing stats
naming what vLLM holds, a replica killed mid-load, and a rank-class change restarting a replica at the new
max_lora_rank."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest
import redis
from lf_testing import (
    REDIS_URL,
    BusyReplicaKiller,
    assert_openai_error,
    delete_prefix,
    free_port,
    make_adapters,
    num_running_replicas,
    replica_actor_names,
    run_load,
    simulated_points_file,
    sse_events,
    vllm_python,
    wait_until,
)

from lorafleet.cluster.serving import serve_app
from lorafleet.infra.config import load_settings
from lorafleet.infra.store import AdapterStore
from lorafleet.placement.routing_table import RoutingTable
from lorafleet.placement.table_store import RoutingTableStore
from lorafleet.router.app import ADAPTER_STATE_HEADER, REPLICA_HEADER

pytestmark = pytest.mark.slow
BASE = "smollm2"
KEY_ALL, KEY_UPPER = "vllm-test-key-all", "vllm-test-key-upper"
ALL = {"Authorization": f"Bearer {KEY_ALL}"}
LORA = ("upper-lora-r8", "reverse-lora-r16")
PROMPTS = ("circle wagon violin", "apple river stone")
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def served(tmp_path_factory, smollm2_dir, trained_adapters):
    vllm_python()   # fail at once (not after starting Ray) when the vLLM venv is missing
    root = tmp_path_factory.mktemp("vllm-serve")
    prefix = f"lftest-{uuid.uuid4().hex[:10]}"
    settings = load_settings(
        engine="vllm", model_dir=str(smollm2_dir), store_url=str(root / "store"), redis_url=REDIS_URL,
        redis_prefix=prefix, num_replicas=2, http_port=free_port(), base_model_name=BASE, max_num_seqs=4,
        replica_max_queued_requests=8, max_batched_tokens=512, kv_cache_bytes=64 << 20, max_adapters=3, max_rank=64,
        rebalance_period_s=3600.0, operating_points=simulated_points_file(),
        api_keys={KEY_ALL: "*", KEY_UPPER: ["upper-lora-r8"]},
    )
    store = AdapterStore.from_settings(settings)
    adapters = {a: trained_adapters[a] for a in (*LORA, "sql-flora-r8", "persona-ia3")}
    adapters |= make_adapters(root, smollm2_dir, {"rand-lora-r32": ("lora", 32, ["q_proj", "v_proj"], 5)})
    for adapter_id, path in adapters.items():
        store.push(adapter_id, path)
    try:
        with serve_app(settings, num_cpus=2, wait_s=600.0) as url:
            _wait_for_ranks(url)
            yield url, settings
    finally:
        delete_prefix(redis.Redis.from_url(REDIS_URL), prefix)


def _chat(model: str, prompt: str, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS,
            "temperature": 0, **extra}


def _post(url: str, body: dict, headers: dict | None = ALL) -> httpx.Response:
    return httpx.post(f"{url}/v1/chat/completions", json=body, headers=headers, timeout=300)


def _ranks_answering(url: str, num: int = 8) -> set[str]:
    async def burst() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=300, headers=ALL) as client:
            body = _chat(BASE, "hi") | {"max_tokens": 2}
            return await asyncio.gather(*(client.post(f"{url}/v1/chat/completions", json=body) for _ in range(num)))

    responses = asyncio.run(burst())
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    return {r.headers[REPLICA_HEADER] for r in responses}


def _wait_for_ranks(url: str) -> None:
    wait_until(lambda: num_running_replicas() == 2 and _ranks_answering(url) == {"0", "1"}, 600.0,
               "both vLLM replicas answer", period_s=1.0)
    time.sleep(2.0)   # routing stats (every 1 s) name both ranks


@pytest.fixture(scope="module")
def expected(smollm2_dir, trained_adapters) -> dict:
    """LoRAFleet's own engine's greedy answers (the parity tests show vLLM's equal them) per (model, prompt)."""
    from lorafleet.replicas import Engine, SamplingParams

    with Engine.from_pretrained(smollm2_dir, kernel_backend="torch", max_adapters=4, max_rank=16,
                                max_model_len=512) as engine:
        for adapter_id in LORA:
            engine.load_adapter(adapter_id, trained_adapters[adapter_id])
        pairs = [(a, p) for a in (None, *LORA) for p in PROMPTS]
        chats = [engine.tokenizer.apply_chat_template([{"role": "user", "content": p}]) for _, p in pairs]
        outs = engine.generate(chats, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0), [a for a, _ in pairs])
    return {(a or BASE, p): o.text for (a, p), o in zip(pairs, outs, strict=True)}


def test_answers_match_lorafleet_streamed_or_not(served, expected):
    url, _ = served
    assert expected[("upper-lora-r8", PROMPTS[0])] == "CIRCLE WAGON VIOLIN"
    for (model, prompt), text in expected.items():
        response = _post(url, _chat(model, prompt))
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == text, (model, prompt)
    with httpx.Client(base_url=url, timeout=300, headers=ALL) as client:
        events = sse_events(client, "/v1/chat/completions", _chat("reverse-lora-r16", PROMPTS[0]))
    assert events[-1] == "[DONE]"
    text = "".join(e["choices"][0]["delta"]["content"] or "" for e in events[:-1])
    assert text == expected[("reverse-lora-r16", PROMPTS[0])]
    logprobs = _post(url, _chat("upper-lora-r8", PROMPTS[0], logprobs=True, top_logprobs=2)).json()
    content = logprobs["choices"][0]["logprobs"]["content"]
    assert "".join(c["token"] for c in content).startswith("CIRCLE WAGON")
    assert all(len(c["top_logprobs"]) == 2 and c["logprob"] <= 0 for c in content)


def test_unknown_adapter_404_flora_and_ia3_400(served):
    url, _ = served
    assert_openai_error(_post(url, _chat("no-such-adapter", "hi")), 404)
    for adapter_id in ("sql-flora-r8", "persona-ia3"):
        error = assert_openai_error(_post(url, _chat(adapter_id, "hi")), 400)
        assert error["code"] == "unsupported_adapter" and "LoRA adapters only" in error["message"], error


def test_tenant_keys(served):
    url, _ = served
    upper_only = {"Authorization": f"Bearer {KEY_UPPER}"}
    response = _post(url, _chat("upper-lora-r8", PROMPTS[0]), headers=upper_only)
    assert response.status_code == 200 and response.json()["choices"][0]["message"]["content"] == "CIRCLE WAGON VIOLIN"
    assert_openai_error(_post(url, _chat("reverse-lora-r16", PROMPTS[0]), headers=upper_only), 404)
    assert_openai_error(_post(url, _chat(BASE, "hi"), headers=None), 401)
    models = httpx.get(f"{url}/v1/models", headers=upper_only, timeout=30).json()
    assert {m["id"] for m in models["data"]} == {BASE, "upper-lora-r8"}


def test_routing_stats_name_the_adapters_vllm_holds(served):
    import ray

    url, _ = served
    first = _post(url, _chat("rand-lora-r32", PROMPTS[1]))
    assert first.status_code == 200, first.text
    rank = first.headers[REPLICA_HEADER]
    assert first.headers[ADAPTER_STATE_HEADER] == "cold"

    def holds() -> bool:
        for name in replica_actor_names():
            stats = ray.get(ray.get_actor(name, namespace="serve").record_routing_stats.remote(), timeout=30)
            # vLLM runs LoRA only, up to its max_lora_rank: what keeps IA3 and higher ranks off it
            assert list(stats["adapter_types"]) == ["LORA"] and stats["max_rank"] >= 32, stats
            if str(stats["rank"]) == rank:
                return "rand-lora-r32" in stats["resident_adapters"]
        return False

    wait_until(holds, 30.0, "the replica's routing stats name the adapter vLLM loaded", period_s=0.5)
    again = [_post(url, _chat("rand-lora-r32", PROMPTS[0])) for _ in range(3)]
    assert any(r.headers[REPLICA_HEADER] == rank and r.headers[ADAPTER_STATE_HEADER] == "device" for r in again)


def test_replica_killed_mid_load_fails_only_its_requests(served, expected):

    url, _ = served
    before = replica_actor_names()
    assert len(before) == 2, before
    pairs = [((None, *LORA)[i % 3], PROMPTS[i % 2]) for i in range(24)]
    bodies = [_chat(model or BASE, prompt) for model, prompt in pairs]
    killer = BusyReplicaKiller(before, start_at=6, force_at=18)
    kill_at, victim = killer.kill_at, killer.victim

    records = run_load(url, bodies, concurrency=4, on_progress=killer, headers=ALL,
                       path="/v1/chat/completions", timeout_s=300)
    assert kill_at, "the kill never ran"
    ok = [r for r in records if r["response"] is not None and r["response"].status_code == 200]
    failed = [r for r in records if r not in ok]
    for r in ok:
        key = (r["body"]["model"], r["body"]["messages"][0]["content"])
        assert r["response"].json()["choices"][0]["message"]["content"] == expected[key], key
    for r in failed:   # only what ran on the victim: 503 replica_unavailable, around the kill
        assert r["response"] is not None, r.get("exc")
        assert assert_openai_error(r["response"], 503)["code"] == "replica_unavailable"
        assert r["end"] >= kill_at[0] and r["start"] <= kill_at[0] + 10.0, r
    assert len(failed) <= victim["num_inflight"] + 4, (len(failed), victim)
    wait_until(lambda: replica_actor_names() - before and num_running_replicas() == 2, 600.0,
               "Serve restarts the killed vLLM replica", period_s=1.0)
    _wait_for_ranks(url)


def test_a_new_rank_class_restarts_the_replica_at_that_max_lora_rank(served, expected):
    """The table moves rank 0 to class 8: its health check fails, Serve replaces it, and the new one runs vLLM with
    max_lora_rank 8 while rank-8 adapters serve; a rank-16 adapter a table pins there goes to the replica that can
    run it (the request carries the registry's rank, the replicas report their max_rank), never to a 503."""
    url, settings = served
    tables = RoutingTableStore(redis.Redis.from_url(REDIS_URL), settings.redis_prefix)
    meta = {"replica_max_rank": [8, 64]}
    before = replica_actor_names()
    tables.publish(RoutingTable(2, {"upper-lora-r8": ((0, 1.0),), "reverse-lora-r16": ((1, 1.0),)}, meta=meta))
    wait_until(lambda: len(replica_actor_names() - before) == 1 and num_running_replicas() == 2, 600.0,
               "rank 0 replaced after its class changed", period_s=1.0)
    _wait_for_ranks(url)
    upper = _post(url, _chat("upper-lora-r8", PROMPTS[0]))
    assert upper.status_code == 200 and upper.headers[REPLICA_HEADER] == "0"
    assert upper.json()["choices"][0]["message"]["content"] == expected[("upper-lora-r8", PROMPTS[0])]
    tables.publish(RoutingTable(2, {"reverse-lora-r16": ((0, 1.0),)}, meta=meta))   # same classes: no restart
    time.sleep(2.5)   # routers re-read the table within 1 s
    for _ in range(3):
        off_class = _post(url, _chat("reverse-lora-r16", PROMPTS[0]))
        assert off_class.status_code == 200 and off_class.headers[REPLICA_HEADER] == "1", off_class.text
        assert off_class.json()["choices"][0]["message"]["content"] == expected[("reverse-lora-r16", PROMPTS[0])]
