"""Llama-family decoder (RMSNorm, RoPE, GQA, SwiGLU) over a flat batch of tokens from many sequences."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorafleet.kernels import BaseLinear, KernelBackend, can_prepack
from lorafleet.replicas.adapter_batch import AdapterBatch
from lorafleet.replicas.adapter_linear import AdapterLinear
from lorafleet.replicas.adapter_pool import AdapterPools, module_index
from lorafleet.replicas.attention import AttentionMetadata, PagedKVCache, paged_attention
from lorafleet.replicas.rotary import apply_rope, apply_rope_rolled, rope_cos_sin, signed_sin
from lorafleet.replicas.weights import ModelConfig

# Modules that read the same input: one GEMM each on the CPU path, one module per GEMM on the GPU path.
ATTN_IN = ("q_proj", "k_proj", "v_proj")
MLP_IN = ("gate_proj", "up_proj")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm: normalise in float32, cast back, then scale (in place where HF allocates: same values)."""
    h = x.float()
    h = h * h.pow(2).mean(-1, keepdim=True).add_(eps).rsqrt_()
    return weight * h.to(x.dtype)


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU's silu(gate) * up, in place on the silu output."""
    return F.silu(gate).mul_(up)


class DecoderLayer:
    def __init__(self, config: ModelConfig, layer: int, state: dict[str, torch.Tensor], pools: AdapterPools,
                 backend: KernelBackend | None, is_fused: bool) -> None:
        p = f"model.layers.{layer}"
        self.config = config
        self.layer = layer
        self.is_fused = is_fused
        self.input_norm = state[f"{p}.input_layernorm.weight"]
        self.post_attention_norm = state[f"{p}.post_attention_layernorm.weight"]

        def linear(*names: str) -> AdapterLinear:
            keys = [f"{p}.{'mlp' if n in (*MLP_IN, 'down_proj') else 'self_attn'}.{n}" for n in names]
            weights = [state[f"{k}.weight"] for k in keys]
            indices = [module_index(layer, n) for n in names]
            return AdapterLinear(weights, [state.get(f"{k}.bias") for k in keys], [pools.in_rows[i] for i in indices],
                                 [pools.out_rows[i] for i in indices], indices, backend,
                                 prepack=is_fused and all(can_prepack(w) for w in weights))

        if is_fused:
            self.qkv, self.gate_up = [linear(*ATTN_IN)], [linear(*MLP_IN)]
        else:
            self.qkv, self.gate_up = [linear(n) for n in ATTN_IN], [linear(n) for n in MLP_IN]
        self.o, self.down = linear("o_proj"), linear("down_proj")

    def __call__(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionMetadata,
                 kv: PagedKVCache, adapters: AdapterBatch | None) -> torch.Tensor:
        c = self.config
        num_tokens = hidden.shape[0]
        x = rms_norm(hidden, self.input_norm, c.rms_norm_eps)
        if self.is_fused:   # q and k side by side in the one output: one RoPE pass over both (sin is signed)
            qkv = self.qkv[0](x, adapters)
            qk = apply_rope_rolled(qkv[:, :(c.num_heads + c.num_kv_heads) * c.head_dim].unflatten(1, (-1, c.head_dim)),
                                   cos, sin)
            q, k = qk[:, :c.num_heads], qk[:, c.num_heads:]
            v = qkv[:, (c.num_heads + c.num_kv_heads) * c.head_dim:].view(num_tokens, c.num_kv_heads, c.head_dim)
        else:
            q, k, v = project(self.qkv, x, adapters)
            q = apply_rope(q.view(num_tokens, c.num_heads, c.head_dim), cos, sin)
            k = apply_rope(k.view(num_tokens, c.num_kv_heads, c.head_dim), cos, sin)
            v = v.view(num_tokens, c.num_kv_heads, c.head_dim)
        out = paged_attention(q, k, v, kv.k[self.layer], kv.v[self.layer], attn, c.head_dim ** -0.5)
        hidden = hidden + self.o(out.reshape(num_tokens, -1), adapters)
        x = rms_norm(hidden, self.post_attention_norm, c.rms_norm_eps)
        gate, up = project(self.gate_up, x, adapters)
        return hidden + self.down(silu_mul(gate, up), adapters)


def project(linears: list[AdapterLinear], x: torch.Tensor, adapters: AdapterBatch | None) -> list[torch.Tensor]:
    """Each module's output [T, d_out_i], from one fused AdapterLinear (column views) or one per module."""
    return [y for linear in linears for y in linear.split(linear(x, adapters))]


class LlamaModel:
    """Weights as plain tensors; every target linear reads its adapter rows from `pools`.

    is_fused (default: on a CPU): q/k/v and gate/up as one GEMM each, weights prepacked for oneDNN where it
    can (BaseLinear), one RoPE pass over q and k; False (the GPU path): one GEMM per module on the checkpoint's
    tensors. Prepacked, a module some adapter may target keeps its plain weight too (FLoRA / IA3 multiply into
    W), so those modules take twice their bytes; the others and lm_head keep only the packed copy.
    """

    def __init__(self, config: ModelConfig, state: dict[str, torch.Tensor], pools: AdapterPools,
                 max_positions: int, backend: KernelBackend | None = None, is_fused: bool | None = None) -> None:
        self.config = config
        self.embed = state["model.embed_tokens.weight"]
        self.norm = state["model.norm.weight"]
        self.is_fused = self.embed.device.type == "cpu" if is_fused is None else is_fused
        lm_head = state["lm_head.weight"]
        self.lm_head = BaseLinear(lm_head, prepack=self.is_fused and can_prepack(lm_head), keep_weight=False)
        self.layers = [DecoderLayer(config, i, state, pools, backend, self.is_fused) for i in range(config.num_layers)]
        cos, sin = rope_cos_sin(config.head_dim, config.rope_theta, config.rope_scaling, max_positions,
                                device=self.embed.device)
        self.cos, self.sin = cos.to(self.embed.dtype), (signed_sin(sin) if self.is_fused else sin).to(self.embed.dtype)

    @property
    def dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttentionMetadata, kv: PagedKVCache,
                adapters: AdapterBatch | None, logits_index: torch.Tensor) -> torch.Tensor:
        """input_ids, positions [T] int64; logits_index [B] int64 rows to project. Returns logits [B, V] float32."""
        hidden = F.embedding(input_ids, self.embed)
        cos, sin = self.cos[positions], self.sin[positions]
        for layer in self.layers:
            hidden = layer(hidden, cos, sin, attn, kv, adapters)
        hidden = rms_norm(hidden.index_select(0, logits_index), self.norm, self.config.rms_norm_eps)
        return self.lm_head(hidden).float()
