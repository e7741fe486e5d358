"""Adapter formats (PEFT LoRA, PEFT IA3, LoRAFleet FLoRA): load, validate against the base, one in-memory form.

In-memory form per target module, matching the kernel contracts of DESIGN.md:
- kind "lora" (additive):       delta = scale · Σ_j (x · in_rows[j]) out_rows[j]
  in_rows = lora_A [r, d_in], out_rows = lora_B^T [r, d_out], scale = alpha/r (alpha/sqrt(r) with rsLoRA).
- kind "flora" (multiplicative): y = Σ_j out_rows[j] ∘ ((in_rows[j] ∘ x) W^T), i.e. W' = W ∘ (out_rows^T in_rows)
  FLoRA files: flora_B [r, d_in] = in_rows, flora_A [r, d_out] = out_rows.
  IA3 is rank 1: ia3_l scales outputs (in_rows = 1) or, for feedforward modules, inputs (out_rows = 1).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from lorafleet.infra.adapter_files import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    parse_config,
    parse_safetensors,
    read_adapter_dir,
)
from lorafleet.infra.adapter_ids import validate_adapter_id as validate_adapter_id  # re-exported
from lorafleet.infra.base_spec import TARGET_MODULES, BaseModelSpec
from lorafleet.infra.errors import InvalidAdapter

DEFAULT_MAX_RANK = 128
DEFAULT_MAX_BYTES = 1 << 30
PEFT_TYPES = ("LORA", "IA3", "FLORA")
_KEY = re.compile(
    # PEFT names LoRA tensors `<module>.lora_A.weight` but IA3 vectors plain `<module>.ia3_l`.
    r"base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(?:(lora_A|lora_B|flora_A|flora_B)\.weight|(ia3_l))"
)
_PARAMS = {"LORA": ("lora_A", "lora_B"), "IA3": ("ia3_l",), "FLORA": ("flora_B", "flora_A")}


@dataclass(frozen=True, slots=True)
class ModuleAdapter:
    """One adapted linear: rows of the kernel row pools. in_rows [r, d_in], out_rows [r, d_out]."""

    kind: str
    rank: int
    in_rows: torch.Tensor
    out_rows: torch.Tensor
    scale: float = 1.0

    def __post_init__(self) -> None:
        assert self.kind in ("lora", "flora"), f"unknown kind {self.kind}"
        assert self.in_rows.shape[0] == self.out_rows.shape[0] == self.rank >= 1, "rows must match the rank"

    def delta_weight(self) -> torch.Tensor:
        """[d_out, d_in] update in float64: additive ΔW for lora, multiplicative mask M (W' = W ∘ M) for flora."""
        return self.scale * self.out_rows.double().T @ self.in_rows.double()


@dataclass(frozen=True, slots=True)
class AdapterWeights:
    """A validated adapter: {(layer, module name): ModuleAdapter}."""

    peft_type: str
    modules: dict[tuple[int, str], ModuleAdapter]
    num_bytes: int

    @property
    def max_rank(self) -> int:
        return max(m.rank for m in self.modules.values())

    @property
    def target_modules(self) -> list[str]:
        return sorted({name for _, name in self.modules})

    def summary(self) -> dict:
        """Plain-data description for CLIs and the registry."""
        ranks = sorted({m.rank for m in self.modules.values()})
        return {
            "peft_type": self.peft_type,
            "max_rank": self.max_rank,
            "ranks": ranks,
            "target_modules": self.target_modules,
            "num_layers": len({layer for layer, _ in self.modules}),
            "num_modules": len(self.modules),
            "num_bytes": self.num_bytes,
        }


def load_adapter_dir(
    path: str | Path, base: BaseModelSpec, *, max_rank: int = DEFAULT_MAX_RANK, max_bytes: int = DEFAULT_MAX_BYTES
) -> AdapterWeights:
    """Read and validate an adapter directory; InvalidAdapter names the file and field at fault."""
    files = read_adapter_dir(path, max_bytes)
    return load_adapter_files(files, base, max_rank=max_rank, max_bytes=max_bytes, source=str(path))


def load_adapter_files(
    files: Mapping[str, bytes],
    base: BaseModelSpec,
    *,
    max_rank: int = DEFAULT_MAX_RANK,
    max_bytes: int = DEFAULT_MAX_BYTES,
    source: str = "<adapter>",
    check_finite: bool = True,
) -> AdapterWeights:
    """Validate {adapter_config.json: bytes, adapter_model.safetensors: bytes} (e.g. fetched from the store).
    `check_finite=False` skips the NaN/Inf scan of bytes that passed it before (same digest)."""
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if name not in files:
            raise InvalidAdapter(f"{source}/{name}: missing")
    config_src, weights_src = f"{source}/{CONFIG_FILE}", f"{source}/{WEIGHTS_FILE}"
    config = parse_config(files[CONFIG_FILE], config_src)
    tensors = parse_safetensors(files[WEIGHTS_FILE], weights_src, max_bytes, check_finite=check_finite)
    peft_type = config.get("peft_type")
    if not isinstance(peft_type, str) or peft_type.upper() not in PEFT_TYPES:
        choices = ", ".join(PEFT_TYPES)
        raise InvalidAdapter(f"{config_src}: field 'peft_type' must be one of {choices}, got {peft_type!r}")
    peft_type = peft_type.upper()
    _check_unsupported_options(config, config_src)
    targets = config.get("target_modules")
    grouped = _group_tensors(tensors, peft_type, base, targets, weights_src)
    if not grouped:
        raise InvalidAdapter(f"{weights_src}: no adapter tensors found")
    parse = {"LORA": _lora_module, "IA3": _ia3_module, "FLORA": _flora_module}[peft_type]
    modules = {}
    for (layer, name), params in sorted(grouped.items()):
        key = f"model.layers.{layer}.{TARGET_MODULES[name]}.{name}"
        where = f"{weights_src}: module '{key}'"
        module = parse(config, config_src, key, params, base.module_shapes[name], where)
        if module.rank > max_rank:
            raise InvalidAdapter(f"{where}: rank {module.rank} is above the limit max_rank={max_rank}")
        modules[(layer, name)] = module
    return AdapterWeights(peft_type=peft_type, modules=modules, num_bytes=len(files[WEIGHTS_FILE]))


def _check_unsupported_options(config: dict, src: str) -> None:
    refused = {
        "use_dora": (False, None),
        "fan_in_fan_out": (False, None),
        "modules_to_save": (None, []),
        "lora_bias": (False, None),
        "target_parameters": (None, []),
    }
    for field, allowed in refused.items():
        if config.get(field) not in allowed:
            raise InvalidAdapter(f"{src}: field '{field}'={config[field]!r} is not supported")
    if config.get("bias", "none") != "none":
        raise InvalidAdapter(f"{src}: field 'bias'={config['bias']!r} is not supported (only 'none')")


def _group_tensors(
    tensors: dict[str, torch.Tensor], peft_type: str, base: BaseModelSpec, targets: object, src: str
) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    expected = _PARAMS[peft_type]
    grouped: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _KEY.fullmatch(key)
        if match is None:
            raise InvalidAdapter(f"{src}: tensor '{key}': unknown module (expected {_KEY.pattern})")
        layer, block, name, param = int(match[1]), match[2], match[3], match[4] or match[5]
        if TARGET_MODULES.get(name) != block:
            raise InvalidAdapter(f"{src}: tensor '{key}': unknown target module '{block}.{name}'")
        if layer >= base.num_layers:
            raise InvalidAdapter(f"{src}: tensor '{key}': layer {layer} but the base has {base.num_layers} layers")
        if param not in expected:
            raise InvalidAdapter(f"{src}: tensor '{key}': '{param}' does not belong in a {peft_type} adapter")
        if isinstance(targets, list) and name not in targets:
            raise InvalidAdapter(f"{src}: tensor '{key}': module '{name}' is not in target_modules {targets}")
        grouped.setdefault((layer, name), {})[param] = tensor
    for (layer, name), params in grouped.items():
        for param in expected:
            if param not in params:
                raise InvalidAdapter(f"{src}: module 'model.layers.{layer}.{name}': tensor '{param}' is missing")
    return grouped


def _pattern_value(patterns: object, key: str, default: object, field: str, src: str) -> object:
    """PEFT's rank_pattern / alpha_pattern lookup: a pattern matches a key suffix (`(.*\\.)?pattern$`)."""
    if patterns is None:
        return default
    if not isinstance(patterns, dict):
        raise InvalidAdapter(f"{src}: field '{field}' must be an object")
    for pattern, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({pattern})$", key):
                return value
        except re.error:
            raise InvalidAdapter(f"{src}: field '{field}': invalid pattern {pattern!r}") from None
    return default


def _positive_number(value: object, field: str, src: str, integer: bool) -> float:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds) or not math.isfinite(value) or value <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise InvalidAdapter(f"{src}: field '{field}' must be {kind}, got {value!r}")
    return value


def _check_shape(tensor: torch.Tensor, shape: tuple[int, ...], what: str) -> None:
    if tuple(tensor.shape) != shape:
        raise InvalidAdapter(f"{what}: shape {list(tensor.shape)} does not match the base (expected {list(shape)})")


def _lora_module(config, src, key, params, shape, where) -> ModuleAdapter:
    d_out, d_in = shape
    r = _positive_number(config.get("r", 8), "r", src, integer=True)
    r = _pattern_value(config.get("rank_pattern"), key, r, "rank_pattern", src)
    r = _positive_number(r, "rank_pattern", src, integer=True)
    alpha = _positive_number(config.get("lora_alpha", 8), "lora_alpha", src, integer=False)
    alpha = _pattern_value(config.get("alpha_pattern"), key, alpha, "alpha_pattern", src)
    alpha = _positive_number(alpha, "alpha_pattern", src, integer=False)
    rslora = config.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise InvalidAdapter(f"{src}: field 'use_rslora' must be true or false")
    lora_a, lora_b = params["lora_A"], params["lora_B"]
    _check_shape(lora_a, (r, d_in), f"{where} lora_A (rank {r} from r/rank_pattern)")
    _check_shape(lora_b, (d_out, r), f"{where} lora_B (rank {r} from r/rank_pattern)")
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    return ModuleAdapter("lora", r, lora_a, lora_b.T.contiguous(), float(scale))


def _ia3_module(config, src, key, params, shape, where) -> ModuleAdapter:
    d_out, d_in = shape
    ff = config.get("feedforward_modules") or []
    if isinstance(ff, str):
        is_ff = re.fullmatch(ff, key) is not None
    elif isinstance(ff, list) and all(isinstance(m, str) for m in ff):
        is_ff = any(key.endswith(m) for m in ff)
    else:
        raise InvalidAdapter(f"{src}: field 'feedforward_modules' must be a list of names or a regex string")
    ia3 = params["ia3_l"]
    if is_ff:  # PEFT IA3 scales the input of feedforward modules
        _check_shape(ia3, (1, d_in), f"{where} ia3_l (feedforward)")
        return ModuleAdapter("flora", 1, ia3.reshape(1, d_in), torch.ones(1, d_out, dtype=ia3.dtype))
    _check_shape(ia3, (d_out, 1), f"{where} ia3_l")
    return ModuleAdapter("flora", 1, torch.ones(1, d_in, dtype=ia3.dtype), ia3.reshape(1, d_out))


def _flora_module(config, src, key, params, shape, where) -> ModuleAdapter:
    d_out, d_in = shape
    r = _positive_number(config.get("r"), "r", src, integer=True)
    _check_shape(params["flora_B"], (r, d_in), f"{where} flora_B (rank {r})")
    _check_shape(params["flora_A"], (r, d_out), f"{where} flora_A (rank {r})")
    return ModuleAdapter("flora", r, params["flora_B"], params["flora_A"])
