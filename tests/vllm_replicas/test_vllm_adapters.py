"""What a vLLM replica hands vLLM, without vLLM: a directory and a stable int id per adapter version, refusals of
FLoRA / IA3 / off-class ranks / unwrapped modules, staleness from store events, the all-zero base LoRA."""

from __future__ import annotations

import json

import pytest
from lf_testing import make_adapters
from safetensors.torch import load_file

from lorafleet.infra.adapter_source import LocalDirSource
from lorafleet.infra.errors import AdapterNotFound, ReplicaUnavailable, UnsupportedAdapter
from lorafleet.infra.events import AdapterEvent
from lorafleet.replicas.vllm_adapters import BASE_LORA_ID, VllmAdapters, vllm_target_modules

QV = ["q_proj", "v_proj"]
ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture
def store(tmp_path, tiny_model_dir):
    root = tmp_path / "adapters"
    make_adapters(root, tiny_model_dir, {"a-r8": ("lora", 8, QV, 1), "b-r32": ("lora", 32, QV, 2),
                                         "c-flora": ("flora", 4, QV, 3), "d-ia3": ("ia3", 1, ["k_proj"], 4),
                                         "e-mlp": ("lora", 8, ["down_proj"], 5)})
    return root


def _adapters(tmp_path, model_dir, source, **kwargs) -> VllmAdapters:
    options = {"max_lora_rank": 16, "target_modules": ALL} | kwargs
    return VllmAdapters(model_dir, tmp_path / "work", source=source, **options)


def test_each_version_gets_its_own_directory_and_int_id(tmp_path, tiny_model_dir, store):
    adapters = _adapters(tmp_path, tiny_model_dir, LocalDirSource(store), resync_s=0)
    held = adapters.prepare("a-r8")
    assert held.lora_int_id > BASE_LORA_ID and held.rank == 8 and held.num_bytes > 0
    assert json.loads((held.path / "adapter_config.json").read_text())["r"] == 8
    assert adapters.prepare("a-r8") is held and adapters.residency("a-r8") == "host"
    adapters.note_in_engine({held.lora_int_id})
    assert adapters.residency("a-r8") == "device" and adapters.info()["resident"] == ["a-r8"]
    assert adapters.facts("a-r8") == (8, held.num_bytes)
    # a new version (an 'updated' event drops the held one): new bytes, new directory, new id
    make_adapters(store, tiny_model_dir, {"a-r8": ("lora", 8, QV, 99)})
    adapters._on_event(AdapterEvent("updated", "a-r8", 2))
    assert adapters.residency("a-r8") == "cold"
    newer = adapters.prepare("a-r8")
    assert newer.lora_int_id != held.lora_int_id and newer.path != held.path and held.path.is_dir()
    assert adapters.residency("a-r8") == "host"   # vLLM holds the old id only
    adapters.close()
    assert not (tmp_path / "work").exists()


def test_what_vllm_cannot_run_is_refused_with_the_reason(tmp_path, tiny_model_dir, store):
    adapters = _adapters(tmp_path, tiny_model_dir, LocalDirSource(store), target_modules=("q_proj", "v_proj"))
    for adapter_id, kind in (("c-flora", "FLORA"), ("d-ia3", "IA3")):
        with pytest.raises(UnsupportedAdapter, match=f"is {kind}: vLLM replicas"):
            adapters.prepare(adapter_id)
    with pytest.raises(UnsupportedAdapter, match="down_proj.*vllm_lora_target_modules"):
        adapters.prepare("e-mlp")
    with pytest.raises(ReplicaUnavailable, match="rank 32, above this replica's max_lora_rank 16"):
        adapters.prepare("b-r32")
    with pytest.raises(AdapterNotFound):
        adapters.prepare("no-such")
    assert adapters.info()["num_host"] == 0


def test_base_requests_run_an_all_zero_lora(tmp_path, tiny_model_dir):
    adapters = _adapters(tmp_path, tiny_model_dir, None)
    base = adapters.base
    assert base.lora_int_id == BASE_LORA_ID and base.rank == 1
    tensors = load_file(str(base.path / "adapter_model.safetensors"))
    assert tensors and all(not t.any() for t in tensors.values())
    with pytest.raises(AdapterNotFound):
        adapters.prepare("anything")   # no source: only what load() put there
    assert vllm_target_modules(ALL) == ["down_proj", "gate_up_proj", "o_proj", "qkv_proj"]
