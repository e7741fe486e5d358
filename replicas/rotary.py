"""Rotary position embedding with the rope_scaling variants of Llama-family configs (default, linear, llama3, yarn)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from lorafleet.infra.errors import InvalidModel


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _default(theta: float, dim: int, scaling: dict, max_pos: int) -> tuple[torch.Tensor, float]:
    return _base_inv_freq(theta, dim), 1.0


def _linear(theta: float, dim: int, scaling: dict, max_pos: int) -> tuple[torch.Tensor, float]:
    return _base_inv_freq(theta, dim) / scaling["factor"], 1.0


def _llama3(theta: float, dim: int, scaling: dict, max_pos: int) -> tuple[torch.Tensor, float]:
    """Llama 3.1: long wavelengths divided by `factor`, short ones kept, a smooth ramp between."""
    inv_freq = _base_inv_freq(theta, dim)
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_len = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < old_len / high) * ~(wavelen > old_len / low)
    return torch.where(is_medium, smoothed, scaled), 1.0


def _yarn(theta: float, dim: int, scaling: dict, max_pos: int) -> tuple[torch.Tensor, float]:
    """YaRN: interpolate low frequencies, extrapolate high ones, scale attention by 0.1 ln(factor) + 1."""
    old_len = scaling.get("original_max_position_embeddings") or max_pos
    factor = scaling.get("factor") or max_pos / old_len

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        m, m_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = mscale(factor, m) / mscale(factor, m_all) if m and m_all else mscale(factor)
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(old_len / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    lo, hi = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    hi = hi + 0.001 if lo == hi else hi
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation
    return inv_freq, float(attention_factor)


ROPE_TYPES: dict[str, Callable[[float, int, dict, int], tuple[torch.Tensor, float]]] = {
    "default": _default,
    "linear": _linear,
    "llama3": _llama3,
    "yarn": _yarn,
}


def rope_cos_sin(head_dim: int, theta: float, scaling: dict | None, max_positions: int,
                 device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables [max_positions, head_dim] float32, laid out as HF's cat(freqs, freqs) (rotate_half)."""
    scaling = dict(scaling or {})
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in ROPE_TYPES:
        raise InvalidModel(f"config.json: rope_scaling type {rope_type!r} is not supported "
                           f"(supported: {', '.join(ROPE_TYPES)})")
    try:
        inv_freq, attention_factor = ROPE_TYPES[rope_type](theta, head_dim, scaling, max_positions)
    except KeyError as exc:
        raise InvalidModel(f"config.json: rope_scaling of type {rope_type!r} lacks field {exc}") from None
    positions = torch.arange(max_positions, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq.float())          # [max_positions, head_dim / 2]
    emb = torch.cat([freqs, freqs], dim=-1)
    return (emb.cos() * attention_factor).to(device), (emb.sin() * attention_factor).to(device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [T, heads, head_dim]; cos, sin [T, head_dim] (already gathered at each token's position)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin [..., head_dim] with rotate_half's minus folded into its first half, for apply_rope_rolled."""
    half = sin.shape[-1] // 2
    return torch.cat([-sin[..., :half], sin[..., half:]], dim=-1)


def apply_rope_rolled(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """apply_rope in three ops instead of six (x cos + roll(x, half) signed_sin; the same products, each op is
    a pass that a CPU pays for): x [T, heads, head_dim] (any strides), cos, sin_signed [T, head_dim]."""
    out = x * cos[:, None, :]
    return out.addcmul_(x.roll(x.shape[-1] // 2, -1), sin_signed[:, None, :])
