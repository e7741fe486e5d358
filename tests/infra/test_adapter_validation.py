"""Bad adapter directories give one clear InvalidAdapter naming the file and field; never a crash."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file, save_file

from lorafleet.infra.adapter_maker import make_adapter
from lorafleet.infra.adapters import load_adapter_dir, load_adapter_files, validate_adapter_id
from lorafleet.infra.base_spec import BaseModelSpec
from lorafleet.infra.errors import AdapterTooLarge, InvalidAdapter, InvalidAdapterId

CFG, WTS = "adapter_config.json", "adapter_model.safetensors"
KEY = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def spec(tiny_model_dir):
    return BaseModelSpec.from_model_dir(tiny_model_dir)


@pytest.fixture(scope="module")
def good_lora(tmp_path_factory, tiny_model_dir):
    return make_adapter(tmp_path_factory.mktemp("good"), tiny_model_dir, "lora", 8, ["q_proj", "down_proj"], seed=1)


@pytest.fixture
def lora(tmp_path, good_lora):
    """A fresh writable copy of a valid LoRA adapter."""
    return shutil.copytree(good_lora, tmp_path / "adapter")


def _edit_config(path, **changes):
    config = json.loads((path / CFG).read_text())
    config.update(changes)
    (path / CFG).write_text(json.dumps(config))


def _edit_tensors(path, fn):
    tensors = load_file(path / WTS)
    fn(tensors)
    save_file(tensors, path / WTS)


def test_valid_adapter_summary(lora, spec):
    summary = load_adapter_dir(lora, spec).summary()
    assert summary["peft_type"] == "LORA" and summary["ranks"] == [8]
    assert summary["target_modules"] == ["down_proj", "q_proj"] and summary["num_modules"] == 8


@pytest.mark.parametrize("mutate,message", [
    (lambda p: (p / CFG).unlink(), f"{CFG}: missing"),
    (lambda p: (p / WTS).unlink(), f"{WTS}: missing"),
    (lambda p: (p / "notes.txt").write_text("x"), "notes.txt: unexpected file"),
    (lambda p: (p / "adapter_model.bin").write_bytes(b"\x80\x04"), "adapter_model.bin: pickle files are refused"),
    (lambda p: (p / CFG).write_text("{not json"), f"{CFG}: not valid JSON"),
    (lambda p: (p / CFG).write_text("[1, 2]"), f"{CFG}: top level must be a JSON object"),
    (lambda p: _edit_config(p, peft_type="PREFIX_TUNING"), "field 'peft_type' must be one of"),
    (lambda p: _edit_config(p, r=4),
     "lora_A (rank 4 from r/rank_pattern): shape [8, 352] does not match the base (expected [4, 352])"),
    (lambda p: _edit_config(p, r=0), "field 'r' must be a positive integer"),
    (lambda p: _edit_config(p, lora_alpha="big"), "field 'lora_alpha' must be a positive number"),
    (lambda p: _edit_config(p, use_dora=True), "field 'use_dora'=True is not supported"),
    (lambda p: _edit_config(p, target_modules=["q_proj"]), "module 'down_proj' is not in target_modules"),
    (lambda p: (p / WTS).write_bytes((p / WTS).read_bytes()[:1000]), "truncated"),
    (lambda p: (p / WTS).write_bytes(b"\x00" * 4), "truncated safetensors file"),
    (lambda p: _edit_tensors(p, lambda t: t.update({f"{KEY}.lora_A.weight": torch.ones(8, 64)})),
     "lora_A (rank 8 from r/rank_pattern): shape [8, 64] does not match the base (expected [8, 128])"),
    (lambda p: _edit_tensors(p, lambda t: t.pop(f"{KEY}.lora_B.weight")), "tensor 'lora_B' is missing"),
    (lambda p: _edit_tensors(p, lambda t: t.update({"base_model.model.lm_head.lora_A.weight": torch.ones(8, 128)})),
     "tensor 'base_model.model.lm_head.lora_A.weight': unknown module"),
    (lambda p: _edit_tensors(p, lambda t: t.update({
        "base_model.model.model.layers.0.mlp.q_proj.lora_A.weight": torch.ones(8, 128)})), "unknown target module"),
    (lambda p: _edit_tensors(p, lambda t: t.update({
        "base_model.model.model.layers.9.self_attn.q_proj.lora_A.weight": torch.ones(8, 128)})),
     "layer 9 but the base has 4 layers"),
    (lambda p: _edit_tensors(p, lambda t: t[f"{KEY}.lora_A.weight"].__setitem__((0, 0), float("nan"))),
     f"tensor '{KEY}.lora_A.weight': contains NaN or Inf"),
    (lambda p: _edit_tensors(p, lambda t: t.update({f"{KEY}.lora_A.weight": torch.ones(8, 128, dtype=torch.int32)})),
     "unsupported dtype 'I32'"),
])
def test_bad_adapter_names_file_and_field(lora, spec, mutate, message):
    mutate(lora)
    with pytest.raises(InvalidAdapter) as info:
        load_adapter_dir(lora, spec)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_rank_above_limit(lora, spec):
    with pytest.raises(InvalidAdapter, match="rank 8 is above the limit max_rank=4"):
        load_adapter_dir(lora, spec, max_rank=4)


def test_oversized_file(lora, spec):
    with pytest.raises(AdapterTooLarge, match=f"{WTS}: .* over the limit of 1000 bytes"):
        load_adapter_dir(lora, spec, max_bytes=1000)


def test_ia3_wrong_orientation(tmp_path, tiny_model_dir, spec):
    path = make_adapter(tmp_path, tiny_model_dir, "ia3", 1, ["k_proj", "down_proj"], seed=2)
    _edit_config(path, feedforward_modules=[])  # down_proj vectors are now the wrong shape
    with pytest.raises(InvalidAdapter, match=r"down_proj' ia3_l: shape \[1, 352\] does not match"):
        load_adapter_dir(path, spec)


@pytest.mark.parametrize("adapter_id", [
    "", "a" * 129, "../etc", "a/b", "a\\b", ".", "..", "sql lora", "naïve", "ﬁ-ligature", "a\x00b", "tab\t",
    "nl\n", "ａ", "x" * 1000, None, 42,
])
def test_invalid_adapter_ids(adapter_id):
    with pytest.raises(InvalidAdapterId, match="invalid adapter id"):
        validate_adapter_id(adapter_id)


@pytest.mark.parametrize("adapter_id", ["sql-r8", "a", "A.b_c-9", "x" * 128, "v1.2.3"])
def test_valid_adapter_ids(adapter_id):
    assert validate_adapter_id(adapter_id) == adapter_id


@given(st.text(max_size=200))
def test_adapter_id_fuzz(adapter_id):
    try:
        assert validate_adapter_id(adapter_id) == adapter_id
        assert adapter_id.isascii() and "/" not in adapter_id and adapter_id not in (".", "..")
    except InvalidAdapterId:
        pass


# Corruptions of a valid adapter's bytes: each must end in InvalidAdapter (or success), nothing else.
_json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 300) | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
_config_fields = st.sampled_from(
    ["peft_type", "r", "lora_alpha", "use_rslora", "target_modules", "rank_pattern", "alpha_pattern",
     "feedforward_modules", "bias", "use_dora", "fan_in_fan_out", "modules_to_save"]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    field=_config_fields,
    value=_json_values,
    cut=st.integers(0, 5000),
    flips=st.lists(st.tuples(st.integers(0, 100_000), st.integers(0, 255)), max_size=4),
    header_len=st.none() | st.integers(0, 2**64 - 1),
    which=st.sampled_from(["config", "truncate", "flip", "header", "peft_ia3"]),
)
def test_corrupt_adapters_never_crash(good_lora, spec, field, value, cut, flips, header_len, which):
    config = json.loads((good_lora / CFG).read_text())
    weights = bytearray((good_lora / WTS).read_bytes())
    if which == "config":
        config[field] = value
    elif which == "peft_ia3":
        config["peft_type"] = "IA3"
        config[field] = value
    elif which == "truncate":
        weights = weights[:cut]
    elif which == "flip":
        for pos, byte in flips:
            weights[pos % len(weights)] = byte
    elif header_len is not None:
        weights[:8] = struct.pack("<Q", header_len)
    files = {CFG: json.dumps(config).encode(), WTS: bytes(weights)}
    try:
        result = load_adapter_files(files, spec, source="fuzz")
    except InvalidAdapter as exc:
        assert str(exc).startswith("fuzz/") and "\n" not in str(exc)
    else:  # a harmless change: the result is complete and consistent
        assert set(result.modules) == {(layer, n) for layer in range(4) for n in ("q_proj", "down_proj")}
