"""The real model served by the Ray app: SmolLM2-135M-Instruct with the LoRA, IA3 and FLoRA adapters trained by
`lorafleet train`, asked together in one concurrent burst over HTTP, each does its task; the base model does not."""

from __future__ import annotations

import asyncio
import collections
import uuid

import httpx
import pytest
import redis
from lf_testing import REDIS_URL, delete_prefix, free_port, simulated_points_file

from lorafleet.cluster.demo import TRAINED_ADAPTERS
from lorafleet.cluster.serving import serve_app
from lorafleet.infra.config import load_settings
from lorafleet.infra.store import AdapterStore
from lorafleet.training.tasks import TASKS, exact_match

pytestmark = pytest.mark.slow
BASE = "smollm2-135m"
KINDS = {"upper-lora-r8": "LORA", "persona-ia3": "IA3", "sql-flora-r8": "FLORA"}   # one adapter of each type
NUM_PROMPTS = 20


@pytest.fixture(scope="module")
def served(smollm2_dir, trained_adapters, tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    prefix = f"lftest-{uuid.uuid4().hex[:10]}"
    settings = load_settings(
        model_dir=str(smollm2_dir.resolve()), store_url=str(root / "store"), redis_url=REDIS_URL, redis_prefix=prefix,
        num_replicas=2, http_port=free_port(), base_model_name=BASE, max_num_seqs=32, max_batched_tokens=1024,
        kv_cache_bytes=64 << 20, max_adapters=4, max_rank=16, rebalance_period_s=3600.0,
        operating_points=simulated_points_file(),   # not about placement: skip the first-start profile
    )
    store = AdapterStore.from_settings(settings)
    for adapter_id in KINDS:
        record = store.push(adapter_id, trained_adapters[adapter_id])
        assert record.peft_type == KINDS[adapter_id]
    try:
        with serve_app(settings, num_cpus=2) as url:
            yield url
    finally:
        delete_prefix(redis.Redis.from_url(REDIS_URL), prefix)


def test_trained_lora_ia3_and_flora_do_their_tasks_in_one_concurrent_burst(served):
    url = served
    cases = []   # (adapter id, model asked, prompt, answer): its held-out prompts, to the adapter and to the base
    for adapter_id in KINDS:
        _, heldout = TASKS[TRAINED_ADAPTERS[adapter_id]].split(0, 512, 40)
        cases += [(adapter_id, model, e.prompt, e.answer) for e in heldout[:NUM_PROMPTS]
                  for model in (adapter_id, BASE)]

    async def ask(client: httpx.AsyncClient, model: str, prompt: str) -> str:
        body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 32,
                "temperature": 0}
        response = await client.post(f"{url}/v1/chat/completions", json=body)
        assert response.status_code == 200, response.text
        return response.json()["choices"][0]["message"]["content"]

    async def burst() -> list[str]:
        async with httpx.AsyncClient(timeout=300) as client:
            return await asyncio.gather(*(ask(client, model, prompt) for _, model, prompt, _ in cases))

    outputs = asyncio.run(burst())
    hits = collections.Counter()
    for (adapter_id, model, _, answer), out in zip(cases, outputs, strict=True):
        hits[adapter_id, model] += exact_match(out, answer)
    for adapter_id in KINDS:
        assert hits[adapter_id, adapter_id] >= 0.9 * NUM_PROMPTS, (adapter_id, hits)
        assert hits[adapter_id, BASE] <= 0.1 * NUM_PROMPTS, (adapter_id, hits)
