"""Llama-family checkpoints in Hugging Face layout: config.json -> ModelConfig, safetensors (sharded too) -> tensors."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from lorafleet.infra.base_spec import read_model_config
from lorafleet.infra.errors import InvalidModel

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM")


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """The fields of a Hugging Face Llama config.json that the model uses."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        assert self.num_heads % self.num_kv_heads == 0, "attention heads must group evenly into KV heads"
        assert self.head_dim % 2 == 0, "RoPE needs an even head_dim"

    @classmethod
    def from_dict(cls, config: dict, source: str = "config.json") -> ModelConfig:
        archs = config.get("architectures") or ["LlamaForCausalLM"]
        if not any(a in SUPPORTED_ARCHITECTURES for a in archs) and config.get("model_type") != "llama":
            raise InvalidModel(f"{source}: architectures {archs} is not a Llama-family model")
        if config.get("hidden_act", "silu") != "silu":
            raise InvalidModel(f"{source}: field 'hidden_act'={config['hidden_act']!r} is not supported (only silu)")
        try:
            hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            rope = config.get("rope_parameters") or {}    # transformers >= 5 folds rope_theta in here
            eos = config.get("eos_token_id")
            return cls(
                vocab_size=int(config["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_layers=int(config["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
                max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                rope_theta=float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0),
                rope_scaling=config.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default"
                                                            else None),
                attention_bias=bool(config.get("attention_bias", False)),
                mlp_bias=bool(config.get("mlp_bias", False)),
                bos_token_id=config.get("bos_token_id"),
                eos_token_ids=tuple(eos if isinstance(eos, list) else [] if eos is None else [eos]),
            )
        except (KeyError, TypeError, ValueError, AssertionError) as exc:
            raise InvalidModel(f"{source}: unsupported or missing field ({exc!r})") from None

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> ModelConfig:
        config, source = read_model_config(model_dir)
        return cls.from_dict(config, source)


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: one file, or the shards named by the index."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (model_dir / s).is_file()]
        if missing:
            raise InvalidModel(f"{index}: shard(s) {missing} not found")
        return [model_dir / s for s in shards]
    if (model_dir / SINGLE_FILE).is_file():
        return [model_dir / SINGLE_FILE]
    if list(model_dir.glob("*.bin")):
        raise InvalidModel(f"{model_dir}: only pickle (*.bin) weights found; convert them to safetensors")
    raise InvalidModel(f"{model_dir}: no {SINGLE_FILE} or {INDEX_FILE}")


def load_state_dict(model_dir: str | Path, config: ModelConfig, dtype: torch.dtype,
                    device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor the model needs, cast to dtype on device; lm_head falls back to the tied embedding."""
    tensors: dict[str, torch.Tensor] = {}
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has keys(), not __iter__
                if name.endswith("rotary_emb.inv_freq"):
                    continue
                tensors[name] = f.get_tensor(name).to(device=device, dtype=dtype).contiguous()
    if config.tie_word_embeddings or "lm_head.weight" not in tensors:
        tensors["lm_head.weight"] = tensors.get("model.embed_tokens.weight")  # type: ignore[assignment]
    missing = [n for n in expected_names(config) if tensors.get(n) is None]
    if missing:
        raise InvalidModel(f"{model_dir}: checkpoint lacks {len(missing)} tensor(s), e.g. {missing[:3]}")
    return tensors


def expected_names(config: ModelConfig) -> list[str]:
    names = ["model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"]
    for i in range(config.num_layers):
        p = f"model.layers.{i}"
        names += [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"]
        names += [f"{p}.self_attn.{m}.weight" for m in ("q_proj", "k_proj", "v_proj", "o_proj")]
        names += [f"{p}.mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")]
    return names
