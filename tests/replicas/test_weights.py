"""Checkpoint loading: sharded safetensors, tied embeddings, rope_scaling variants (vs transformers), errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from lorafleet.infra.errors import InvalidModel
from lorafleet.replicas.weights import ModelConfig

PROMPT = [0] + [(7 * i) % 1000 + 5 for i in range(120)]   # long enough for RoPE scaling to matter


def _variant(src, dst, config_changes=None, drop=()):
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(config | (config_changes or {})))
    if drop:
        state = {k: v for k, v in load_file(dst / "model.safetensors").items() if k not in drop}
        save_file(state, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _hf_logits(model_dir, prompt=PROMPT):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([prompt])).logits[0]


def test_sharded_checkpoint_equals_single_file(make_engine, tiny_model_dir, tmp_path):
    sharded = tmp_path / "sharded"
    shutil.copytree(tiny_model_dir, sharded)
    state = load_file(sharded / "model.safetensors")
    (sharded / "model.safetensors").unlink()
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
              "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: state[k] for k in keys}, sharded / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(keys, file)
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    assert torch.equal(make_engine(sharded).score(PROMPT), make_engine().score(PROMPT))


def test_tied_embeddings(make_engine, tiny_model_dir, tmp_path):
    tied = _variant(tiny_model_dir, tmp_path / "tied", {"tie_word_embeddings": True}, drop=("lm_head.weight",))
    torch.testing.assert_close(make_engine(tied).score(PROMPT), _hf_logits(tied), atol=1e-4, rtol=0)


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
], ids=lambda s: s["rope_type"])
def test_rope_scaling_matches_transformers(make_engine, tiny_model_dir, tmp_path, scaling):
    scaled = _variant(tiny_model_dir, tmp_path / "scaled", {"rope_scaling": scaling, "rope_theta": 10000.0})
    ours = make_engine(scaled).score(PROMPT)
    torch.testing.assert_close(ours, _hf_logits(scaled), atol=1e-4, rtol=0)
    assert not torch.allclose(ours, make_engine().score(PROMPT), atol=1e-2)   # the scaling did change things


def test_config_errors_are_clear(tiny_model_dir, tmp_path):
    bad = _variant(tiny_model_dir, tmp_path / "bad", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    from lorafleet.replicas import Engine

    with pytest.raises(InvalidModel, match="'dynamic' is not supported"):
        Engine.from_pretrained(bad)
    with pytest.raises(InvalidModel, match="hidden_act"):
        ModelConfig.from_dict(json.loads((tiny_model_dir / "config.json").read_text()) | {"hidden_act": "gelu"})
    empty = tmp_path / "empty"
    empty.mkdir()
    for name in ("config.json", "tokenizer.json"):
        shutil.copy(tiny_model_dir / name, empty / name)
    with pytest.raises(InvalidModel, match="no model.safetensors"):
        Engine.from_pretrained(empty)
    with pytest.raises(TypeError, match="unknown engine option"):
        Engine.from_pretrained(tiny_model_dir, max_adaptors=3)


def test_model_config_from_tiny(tiny_model_dir):
    config = ModelConfig.from_model_dir(tiny_model_dir)
    assert (config.num_heads, config.num_kv_heads, config.head_dim, config.num_layers) == (4, 2, 32, 4)
    assert not config.tie_word_embeddings and config.eos_token_ids == (1,)
