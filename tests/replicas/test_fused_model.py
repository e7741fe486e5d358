"""The CPU model (q/k/v and gate/up fused, prepacked oneDNN weights, one RoPE pass, batched fresh prompts) = the
GPU model's layout (one GEMM per module) run on the same CPU, for mixed batches of every adapter kind."""

from __future__ import annotations

import pytest
import torch

from lorafleet.replicas import SamplingParams
from lorafleet.replicas.model import LlamaModel
from lorafleet.replicas.scheduler import ScheduledSeq
from lorafleet.replicas.sequence import Sequence, SequenceStatus
from lorafleet.replicas.weights import load_state_dict

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = ATTN + ["gate_proj", "up_proj", "down_proj"]
PROMPTS = [[0, 5, 9, 300, 41], [0, 17, 18, 19, 20], [0, 600, 7], [0, 55, 57, 66, 41, 43, 120, 250, 17], [0, 8]]


def _engines(make_engine, tiny_model_dir, peft_adapter, flora_adapter, dtype: str):
    adapters = {
        "lora-r8-attn": peft_adapter("lora", r=8, targets=ATTN, seed=8),
        "lora-r16-all": peft_adapter("lora", r=16, targets=ALL_LINEAR, rslora=True, seed=16),
        "ia3-all": peft_adapter("ia3", targets=ALL_LINEAR, feedforward=["gate_proj", "up_proj", "down_proj"], seed=6),
        "flora-r4-all": flora_adapter(r=4, targets=ALL_LINEAR, seed=4),
    }
    engines = []
    for is_fused in (True, False):
        engine = make_engine(dtype=dtype, max_adapters=4, max_rank=16)
        assert engine.runner.model.is_fused     # the CPU default
        if not is_fused:
            state = load_state_dict(tiny_model_dir, engine.model_config, engine.runner.model.dtype)
            engine.runner.model = LlamaModel(engine.model_config, state, engine.runner.pools,
                                             max_positions=engine.max_model_len, backend="torch", is_fused=False)
        for adapter_id, path in adapters.items():
            engine.load_adapter(adapter_id, path)
        engines.append(engine)
    return engines, [None, *adapters]


def test_fused_equals_per_module_in_float32(make_engine, tiny_model_dir, peft_adapter, flora_adapter):
    (fused, per_module), adapter_ids = _engines(make_engine, tiny_model_dir, peft_adapter, flora_adapter, "float32")
    requests = [(p, a) for a in adapter_ids for p in PROMPTS]
    params = SamplingParams(max_tokens=10, temperature=0.0, logprobs=5)
    outs = [e.generate([p for p, _ in requests], params, adapters=[a for _, a in requests])
            for e in (fused, per_module)]
    for ours, theirs in zip(*outs, strict=True):
        assert ours.token_ids == theirs.token_ids, ours.adapter_id
        for a, b in zip(ours.logprobs, theirs.logprobs, strict=True):
            assert a.keys() == b.keys() and all(abs(a[t] - b[t]) < 1e-4 for t in a)
    for adapter_id in adapter_ids:
        torch.testing.assert_close(fused.score(PROMPTS[3], adapter_id), per_module.score(PROMPTS[3], adapter_id),
                                   atol=1e-4, rtol=0)


def test_fused_equals_per_module_in_bfloat16(make_engine, tiny_model_dir, peft_adapter, flora_adapter):
    """Logits of every adapter kind within bf16's kernel tolerance (3e-2 of the largest logit)."""
    (fused, per_module), adapter_ids = _engines(make_engine, tiny_model_dir, peft_adapter, flora_adapter, "bfloat16")
    for adapter_id in adapter_ids:
        ours, theirs = fused.score(PROMPTS[3], adapter_id), per_module.score(PROMPTS[3], adapter_id)
        assert float((ours - theirs).abs().max() / theirs.abs().max()) < 3e-2, adapter_id


def test_fresh_prompts_of_one_length_share_a_prefill_span(make_engine):
    engine = make_engine()
    seqs = []
    for i, prompt in enumerate([PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0]]):   # lengths 5, 5, 3, 5
        seq = Sequence(f"r{i}", prompt, SamplingParams(max_tokens=1), None, 0.0)
        seq.status = SequenceStatus.RUNNING
        engine.scheduler.blocks.allocate(seq, seq.num_tokens)
        seqs.append(seq)
    spans = engine.runner.prepare([ScheduledSeq(s, s.num_tokens) for s in seqs]).attn.prefills
    assert [(s.lo, s.hi, s.num_seqs) for s in spans] == [(0, 10, 2), (10, 13, 1), (13, 18, 1)]
    alone = [engine.generate([p], SamplingParams(max_tokens=6, temperature=0.0))[0].token_ids
             for p in (PROMPTS[0], PROMPTS[1], PROMPTS[2])]
    together = engine.generate([PROMPTS[0], PROMPTS[1], PROMPTS[2]], SamplingParams(max_tokens=6, temperature=0.0))
    assert [o.token_ids for o in together] == alone
    for seq in seqs:
        engine.scheduler.blocks.free(seq)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cuda_layout_is_kept_off_the_cpu_fast_path(make_engine, tiny_model_dir, dtype):
    """is_fused=False builds one unpacked GEMM per module: the layout the GPU runs."""
    engine = make_engine(dtype=dtype)
    state = load_state_dict(tiny_model_dir, engine.model_config, engine.runner.model.dtype)
    model = LlamaModel(engine.model_config, state, engine.runner.pools, max_positions=64, is_fused=False)
    layer = model.layers[0]
    assert len(layer.qkv) == 3 and len(layer.gate_up) == 2
    assert not any(lin.base.is_prepacked for lin in (*layer.qkv, *layer.gate_up, layer.o, layer.down))
    assert not model.lm_head.is_prepacked and model.lm_head.weight is state["lm_head.weight"]
