"""Parity with Hugging Face transformers + peft: greedy tokens identical, logits within 1e-4 (float32)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
import transformers
from peft import PeftModel

from lorafleet.infra.adapters import load_adapter_dir
from lorafleet.infra.base_spec import TARGET_MODULES, BaseModelSpec
from lorafleet.replicas import Engine, SamplingParams

NUM_NEW_TOKENS = 10
ATOL = 1e-4
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = list(TARGET_MODULES)
TARGETS = {"attn": ATTN, "all": ALL_LINEAR}
PROMPTS = [
    [0, 437, 322, 16, 572, 5],                 # "<s>Hello, world!"
    [0, 55, 57, 66, 41, 43, 120, 250, 17],
    [0, 300, 301, 302],
]


def hf_base(model_dir) -> transformers.PreTrainedModel:
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def engine(tiny_model_dir) -> Iterator[Engine]:
    engine = Engine.from_pretrained(tiny_model_dir, max_adapters=4, max_rank=64, kv_cache_bytes=8 << 20,
                                    kernel_backend="torch")
    yield engine
    engine.close()


def _hf_greedy(model, prompt: list[int]) -> tuple[list[int], torch.Tensor]:
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NUM_NEW_TOKENS,
                             do_sample=False, output_logits=True, return_dict_in_generate=True, pad_token_id=2)
    return out.sequences[0, len(prompt):].tolist(), torch.log_softmax(torch.stack(out.logits)[:, 0].float(), -1)


def assert_parity(engine: Engine, hf_model, adapter_id: str | None) -> list[list[int]]:
    """Prompt logits (prefill path) and per-step logprobs of greedy decoding (decode path) vs the HF model."""
    params = SamplingParams(max_tokens=NUM_NEW_TOKENS, temperature=0.0, logprobs=20)
    all_tokens = []
    for prompt in PROMPTS:
        with torch.no_grad():
            expected = hf_model(torch.tensor([prompt])).logits[0].float()
        torch.testing.assert_close(engine.score(prompt, adapter_id), expected, atol=ATOL, rtol=0)
        out = engine.generate([prompt], params, adapters=[adapter_id])[0]
        assert out.error is None, out.error
        tokens, logprobs = _hf_greedy(hf_model, prompt)
        assert out.token_ids == tokens
        for step, entry in enumerate(out.logprobs):
            for token, value in entry.items():
                assert abs(value - float(logprobs[step, token])) < ATOL, (step, token)
        all_tokens.append(tokens)
    return all_tokens


def test_base_model(engine, tiny_model_dir):
    assert_parity(engine, hf_base(tiny_model_dir), None)


@pytest.mark.parametrize("rslora", [False, True], ids=["std", "rslora"])
@pytest.mark.parametrize("targets", ["attn", "all"])
@pytest.mark.parametrize("rank", [1, 8, 64])
def test_peft_lora(engine, tiny_model_dir, peft_adapter, rank, targets, rslora):
    path = peft_adapter("lora", r=rank, targets=TARGETS[targets], rslora=rslora, seed=rank)
    adapter_id = f"lora-r{rank}-{targets}-{rslora}"
    summary = engine.load_adapter(adapter_id, path)
    assert summary["max_rank"] == rank and summary["target_modules"] == sorted(TARGETS[targets])
    hf_model = PeftModel.from_pretrained(hf_base(tiny_model_dir), path).eval()
    with_adapter = assert_parity(engine, hf_model, adapter_id)
    base = [engine.generate([p], SamplingParams(max_tokens=NUM_NEW_TOKENS, temperature=0))[0].token_ids
            for p in PROMPTS]
    assert with_adapter != base, "the adapter should change the greedy tokens (else the test proves little)"


@pytest.mark.parametrize("targets,feedforward", [
    (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    (ALL_LINEAR, ["gate_proj", "up_proj", "down_proj"]),
], ids=["kv-down", "all"])
def test_peft_ia3(engine, tiny_model_dir, peft_adapter, targets, feedforward):
    path = peft_adapter("ia3", targets=targets, feedforward=feedforward, seed=3)
    engine.load_adapter(f"ia3-{len(targets)}", path)
    hf_model = PeftModel.from_pretrained(hf_base(tiny_model_dir), path).eval()
    assert_parity(engine, hf_model, f"ia3-{len(targets)}")


def merged_flora_model(model_dir, adapter_dir):
    """Dense reference: HF model whose target weights are W0 o (B A) (FLoRA eq. 5), merged in float64."""
    model = hf_base(model_dir)
    weights = load_adapter_dir(adapter_dir, BaseModelSpec.from_model_dir(model_dir))
    with torch.no_grad():
        for (layer, name), module in weights.modules.items():
            linear = model.model.layers[layer].get_submodule(f"{TARGET_MODULES[name]}.{name}")
            linear.weight.copy_((linear.weight.double() * module.delta_weight()).float())
    return model


@pytest.mark.parametrize("rank,targets", [(1, "attn"), (4, "all"), (16, "all")])
def test_flora_against_merged_weights(engine, tiny_model_dir, flora_adapter, rank, targets):
    path = flora_adapter(r=rank, targets=TARGETS[targets], seed=rank)
    engine.load_adapter(f"flora-{rank}", path)
    assert_parity(engine, merged_flora_model(tiny_model_dir, path), f"flora-{rank}")
