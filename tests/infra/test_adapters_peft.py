"""Adapters made by `peft` itself load into rows that reproduce PEFT's delta weights exactly (float64)."""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model

from lorafleet.infra.adapter_maker import make_adapter
from lorafleet.infra.adapters import load_adapter_dir
from lorafleet.infra.base_spec import TARGET_MODULES, BaseModelSpec

ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = list(TARGET_MODULES)


def _base(model_dir):
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()


def _randomize(peft_model, seed):
    """PEFT initialises lora_B (and IA3 vectors) to zeros/ones: randomise so the deltas are non-trivial."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name or "ia3_" in name:
                param.copy_(1.0 + 0.3 * torch.randn(param.shape, generator=gen, dtype=param.dtype))


def _peft_module(peft_model, layer, name):
    return peft_model.base_model.model.model.layers[layer].get_submodule(f"{TARGET_MODULES[name]}.{name}")


LORA_CASES = [
    dict(r=1, lora_alpha=4, target_modules=["q_proj", "v_proj"]),
    dict(r=8, lora_alpha=16, target_modules=ATTN, use_rslora=True),
    dict(r=64, lora_alpha=32, target_modules=ALL_LINEAR),
    dict(r=8, lora_alpha=8, target_modules=ALL_LINEAR, use_rslora=True,
         rank_pattern={"down_proj": 2, "layers.1.self_attn.q_proj": 16}, alpha_pattern={"up_proj": 3}),
]


@pytest.mark.parametrize("case", LORA_CASES, ids=lambda c: f"r{c['r']}-{len(c['target_modules'])}mods")
def test_peft_lora_rows_reproduce_delta_weight(tmp_path, tiny_model_dir, case):
    peft_model = get_peft_model(_base(tiny_model_dir), LoraConfig(task_type="CAUSAL_LM", **case))
    _randomize(peft_model, seed=case["r"])
    peft_model.save_pretrained(tmp_path)
    weights = load_adapter_dir(tmp_path, BaseModelSpec.from_model_dir(tiny_model_dir))
    assert weights.peft_type == "LORA"
    expected_modules = {(layer, n) for layer in range(4) for n in case["target_modules"]}
    assert set(weights.modules) == expected_modules
    for (layer, name), module in weights.modules.items():
        peft_module = _peft_module(peft_model, layer, name)
        expected = peft_module.get_delta_weight("default")
        assert module.kind == "lora" and module.rank == peft_module.r["default"]
        assert module.scale == peft_module.scaling["default"]
        torch.testing.assert_close(module.delta_weight(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("targets,feedforward", [
    (["k_proj", "v_proj", "down_proj"], ["down_proj"]),
    (ALL_LINEAR, ["gate_proj", "up_proj", "down_proj"]),
])
def test_peft_ia3_rows_reproduce_merged_weight(tmp_path, tiny_model_dir, targets, feedforward):
    config = IA3Config(task_type="CAUSAL_LM", target_modules=targets, feedforward_modules=feedforward)
    peft_model = get_peft_model(_base(tiny_model_dir), config)
    _randomize(peft_model, seed=7)
    peft_model.save_pretrained(tmp_path)
    weights = load_adapter_dir(tmp_path, BaseModelSpec.from_model_dir(tiny_model_dir))
    assert weights.peft_type == "IA3" and weights.max_rank == 1
    base = _base(tiny_model_dir)
    merged = peft_model.merge_and_unload()
    for (layer, name), module in weights.modules.items():
        assert module.kind == "flora"
        block = f"{TARGET_MODULES[name]}.{name}"
        w0 = base.model.layers[layer].get_submodule(block).weight
        expected = merged.model.layers[layer].get_submodule(block).weight
        torch.testing.assert_close(w0 * module.delta_weight(), expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("adapter_type,rank", [("lora", 4), ("ia3", 1)])
def test_made_adapters_load_in_peft_and_match_forward(tmp_path, tiny_model_dir, adapter_type, rank):
    targets = ["q_proj", "v_proj", "down_proj"]
    make_adapter(tmp_path, tiny_model_dir, adapter_type, rank, targets, seed=3)
    peft_model = PeftModel.from_pretrained(_base(tiny_model_dir), tmp_path).eval()
    weights = load_adapter_dir(tmp_path, BaseModelSpec.from_model_dir(tiny_model_dir))
    # Dense reference built from our rows: W + ΔW (lora) or W ∘ M (flora/ia3).
    dense = _base(tiny_model_dir)
    with torch.no_grad():
        for (layer, name), module in weights.modules.items():
            linear = dense.model.layers[layer].get_submodule(f"{TARGET_MODULES[name]}.{name}")
            delta = module.delta_weight()
            linear.weight.copy_(linear.weight + delta if module.kind == "lora" else linear.weight * delta)
        ids = torch.tensor([[0, 5, 17, 99, 250, 3]])
        expected, got = peft_model(ids).logits, dense(ids).logits
        base_logits = _base(tiny_model_dir)(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    # "Well scaled": the adapter moves the logits visibly.
    assert (expected - base_logits).abs().max() > 0.1


def test_flora_adapter_round_trip(tmp_path, tiny_model_dir):
    make_adapter(tmp_path, tiny_model_dir, "flora", 4, ["q_proj", "up_proj"], seed=5)
    weights = load_adapter_dir(tmp_path, BaseModelSpec.from_model_dir(tiny_model_dir))
    assert weights.peft_type == "FLORA" and weights.max_rank == 4
    module = weights.modules[(0, "up_proj")]
    assert module.kind == "flora" and module.in_rows.shape == (4, 128) and module.out_rows.shape == (4, 352)
    mask = module.delta_weight()
    assert 0.5 < mask.mean().item() < 1.5  # around 1: a multiplicative adapter close to the base
