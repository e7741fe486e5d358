"""make-model: HF-loadable seeded Llama checkpoints (tiny for tests, small for benchmarks)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from lorafleet.replicas.checkpoint import PRESETS, make_model


def _logits(model_dir, text="SELECT name FROM users"):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        return model(**ids).logits, model, tokenizer


def test_tiny_loads_in_transformers(tiny_model_dir):
    logits, model, tokenizer = _logits(tiny_model_dir)
    config = model.config
    assert config.model_type == "llama"
    assert config.num_key_value_heads < config.num_attention_heads  # GQA
    assert 0.8e6 < sum(p.numel() for p in model.parameters()) < 1.5e6
    assert logits.shape[-1] == config.vocab_size
    assert torch.isfinite(logits).all()
    ids = tokenizer("Hello, world!")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == "Hello, world!"
    assert max(ids) < config.vocab_size
    messages = [{"role": "user", "content": "hi"}]
    chat = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert chat.endswith("<|im_start|>assistant\n")


def test_logits_deterministic_for_a_seed(tmp_path, tiny_model_dir):
    again = make_model(tmp_path / "again", "tiny", seed=0)
    other = make_model(tmp_path / "other", "tiny", seed=1)
    base, _, _ = _logits(tiny_model_dir)
    assert torch.equal(base, _logits(again)[0])
    assert not torch.allclose(base, _logits(other)[0])
    assert (again / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()


def test_files_in_hf_layout(tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "generation_config.json"} <= names
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]


def test_small_preset_size_and_tied_embeddings(tmp_path):
    spec = PRESETS["small"]
    assert spec.hidden_size >= 768 and spec.tie_word_embeddings
    model = transformers.AutoModelForCausalLM.from_pretrained(make_model(tmp_path / "small", "small", seed=0))
    assert 80e6 < sum(p.numel() for p in model.parameters()) < 120e6
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_unknown_preset_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        make_model(tmp_path, "huge")
