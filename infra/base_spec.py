"""The shapes an adapter must match: adapter-targetable modules of a Llama-family base, from config.json."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from lorafleet.infra.errors import InvalidModel

# Module name -> the block it lives in (HF Llama naming); these are the linears adapters may target.
TARGET_MODULES: dict[str, str] = {
    "q_proj": "self_attn",
    "k_proj": "self_attn",
    "v_proj": "self_attn",
    "o_proj": "self_attn",
    "gate_proj": "mlp",
    "up_proj": "mlp",
    "down_proj": "mlp",
}

_REQUIRED = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")


@dataclass(frozen=True, slots=True)
class BaseModelSpec:
    """num_layers and (d_out, d_in) of each targetable linear of the base model."""

    num_layers: int
    module_shapes: dict[str, tuple[int, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        assert self.num_layers >= 1, "a base model has at least one layer"
        assert set(self.module_shapes) == set(TARGET_MODULES), "every target module needs a shape"

    @classmethod
    def from_config(cls, config: dict, source: str = "config.json") -> BaseModelSpec:
        """Spec from a Hugging Face Llama config dict; InvalidModel names a missing or bad field."""
        for name in _REQUIRED:
            value = config.get(name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidModel(f"{source}: field '{name}' must be a positive integer, got {value!r}")
        d = config["hidden_size"]
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads") or heads
        head_dim = config.get("head_dim") or d // heads
        inter = config["intermediate_size"]
        q_out, kv_out = heads * head_dim, kv_heads * head_dim
        shapes = {
            "q_proj": (q_out, d),
            "k_proj": (kv_out, d),
            "v_proj": (kv_out, d),
            "o_proj": (d, q_out),
            "gate_proj": (inter, d),
            "up_proj": (inter, d),
            "down_proj": (d, inter),
        }
        return cls(num_layers=config["num_hidden_layers"], module_shapes=shapes)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path) -> BaseModelSpec:
        """Spec from `model_dir/config.json`."""
        config, source = read_model_config(model_dir)
        return cls.from_config(config, source=source)


def read_model_config(model_dir: str | Path) -> tuple[dict, str]:
    """(`model_dir/config.json` as a dict, its path for messages); InvalidModel if missing or not an object."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise InvalidModel(f"{path}: base model config not found")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidModel(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise InvalidModel(f"{path}: top level must be a JSON object")
    return config, str(path)
