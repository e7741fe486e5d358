"""One batch mixing the base model and 8 adapters of different kinds and ranks = each request run alone."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from lorafleet.replicas import SamplingParams

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = ATTN + ["gate_proj", "up_proj", "down_proj"]
PROMPTS = [
    [0, 437, 322, 16, 572, 5],
    [0, 55, 57, 66, 41, 43, 120, 250, 17, 99, 98, 97],
    [0, 300],
]
PARAMS = SamplingParams(max_tokens=12, temperature=0.0, logprobs=5)


@pytest.fixture
def mixed_engine(make_engine, peft_adapter, flora_adapter):
    engine = make_engine(max_adapters=8, max_rank=64)
    adapters = {
        "lora-r1-attn": peft_adapter("lora", r=1, targets=ATTN, seed=1),
        "lora-r8-attn-rs": peft_adapter("lora", r=8, targets=ATTN, rslora=True, seed=8),
        "lora-r64-all": peft_adapter("lora", r=64, targets=ALL_LINEAR, seed=64),
        "lora-r16-qv": peft_adapter("lora", r=16, targets=["q_proj", "v_proj"], seed=16),
        "ia3-kv-down": peft_adapter("ia3", targets=["k_proj", "v_proj", "down_proj"], seed=5),
        "ia3-all": peft_adapter("ia3", targets=ALL_LINEAR, feedforward=["gate_proj", "up_proj", "down_proj"], seed=6),
        "flora-r2-attn": flora_adapter(r=2, targets=ATTN, seed=2),
        "flora-r8-all": flora_adapter(r=8, targets=ALL_LINEAR, seed=9),
    }
    for adapter_id, path in adapters.items():
        engine.load_adapter(adapter_id, path)
    return engine, [None, *adapters]


def _assert_same(alone, together):
    assert together.token_ids == alone.token_ids
    for a, b in zip(alone.logprobs, together.logprobs, strict=True):
        assert a.keys() == b.keys()
        assert all(abs(a[t] - b[t]) < 1e-4 for t in a)


def test_mixed_batch_equals_each_request_alone(mixed_engine):
    engine, adapter_ids = mixed_engine
    requests = [(prompt, adapter_id) for adapter_id in adapter_ids for prompt in PROMPTS]
    alone = [engine.generate([p], PARAMS, adapters=[a])[0] for p, a in requests]
    together = engine.generate([p for p, _ in requests], PARAMS, adapters=[a for _, a in requests])
    for single, batched in zip(alone, together, strict=True):
        assert batched.error is None
        _assert_same(single, batched)
    # Different adapters give different continuations of the same prompt: the batch really mixes them.
    first_prompt = [out.token_ids for out, (p, _) in zip(together, requests, strict=True) if p == PROMPTS[0]]
    assert len({tuple(t) for t in first_prompt}) == len(adapter_ids)
    assert engine.stats()["adapters"]["num_resident"] == 8


def test_mixed_batch_with_staggered_arrivals(mixed_engine):
    """Requests joining mid-generation (continuous batching) still match their solo runs."""
    engine, adapter_ids = mixed_engine
    requests = [(PROMPTS[i % len(PROMPTS)], a) for i, a in enumerate(adapter_ids)]
    alone = [engine.generate([p], PARAMS, adapters=[a])[0] for p, a in requests]
    final = {}
    ids = []
    for prompt, adapter_id in requests:   # one new request per step while the earlier ones decode
        ids.append(engine.add_request(prompt, PARAMS, adapter_id))
        final |= {o.request_id: o for o in engine.step() if o.finished}
    while engine.has_unfinished():
        final |= {o.request_id: o for o in engine.step() if o.finished}
    for request_id, single in zip(ids, alone, strict=True):
        _assert_same(single, final[request_id])


TRITON_CHECK = """
import sys, torch
torch.set_num_threads(1)
from lorafleet.replicas import Engine, SamplingParams
model, lora, flora = sys.argv[1:4]
prompts = [[0, 437, 322, 16, 572, 5], [0, 55, 57, 66, 41, 43, 120, 250, 17], [0, 300]]
params = SamplingParams(max_tokens=3, temperature=0.0, logprobs=3)
outs = []
for backend in ("torch", "triton"):
    engine = Engine.from_pretrained(model, kernel_backend=backend, max_adapters=2, max_rank=8,
                                    kv_cache_bytes=1 << 20, target_modules=("q_proj", "k_proj", "v_proj", "down_proj"))
    engine.load_adapter("lora", lora)
    engine.load_adapter("flora", flora)
    outs.append(engine.generate(prompts, params, adapters=[None, "lora", "flora"]))
for a, b in zip(*outs):
    assert a.token_ids == b.token_ids, (a, b)
    for x, y in zip(a.logprobs, b.logprobs):
        assert x.keys() == y.keys() and all(abs(x[t] - y[t]) < 1e-4 for t in x), (x, y)
print("ok")
"""


@pytest.mark.slow
def test_triton_kernels_inside_the_engine_match_torch(tiny_model_dir, peft_adapter, flora_adapter):
    """The engine on the Triton kernels (numpy interpreter here, compiled on a GPU) = the torch path.
    A fresh process: TRITON_INTERPRET must be set before anything (peft) imports triton."""
    lora = peft_adapter("lora", r=8, targets=["q_proj", "v_proj"], seed=8)
    flora = flora_adapter(r=2, targets=["k_proj", "down_proj"], seed=2)
    result = subprocess.run([sys.executable, "-c", TRITON_CHECK, str(tiny_model_dir), str(lora), str(flora)],
                            capture_output=True, text=True, timeout=600, env=os.environ | {"TRITON_INTERPRET": "1"})
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
