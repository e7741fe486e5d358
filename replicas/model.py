"""Llama-family decoder (RMSNorm, RoPE, GQA, SwiGLU) over a flat batch of tokens from many sequences."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lorafleet.kernels import KernelBackend
from lorafleet.replicas.adapter_batch import AdapterBatch
from lorafleet.replicas.adapter_linear import AdapterLinear
from lorafleet.replicas.adapter_pool import MODULE_NAMES, AdapterPools, module_index
from lorafleet.replicas.attention import AttentionMetadata, PagedKVCache, paged_attention
from lorafleet.replicas.rotary import apply_rope, rope_cos_sin
from lorafleet.replicas.weights import ModelConfig


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF LlamaRMSNorm: normalise in float32, cast back, then scale."""
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)


class DecoderLayer:
    def __init__(self, config: ModelConfig, layer: int, state: dict[str, torch.Tensor], pools: AdapterPools,
                 backend: KernelBackend | None) -> None:
        p = f"model.layers.{layer}"
        self.config = config
        self.layer = layer
        self.input_norm = state[f"{p}.input_layernorm.weight"]
        self.post_attention_norm = state[f"{p}.post_attention_layernorm.weight"]
        linears = {}
        for name in MODULE_NAMES:
            block = "mlp" if name in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            index = module_index(layer, name)
            linears[name] = AdapterLinear(state[f"{p}.{block}.{name}.weight"], state.get(f"{p}.{block}.{name}.bias"),
                                          pools.in_rows[index], pools.out_rows[index], index, backend)
        self.q, self.k, self.v, self.o = (linears[n] for n in ("q_proj", "k_proj", "v_proj", "o_proj"))
        self.gate, self.up, self.down = (linears[n] for n in ("gate_proj", "up_proj", "down_proj"))

    def __call__(self, hidden: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: AttentionMetadata,
                 kv: PagedKVCache, adapters: AdapterBatch | None) -> torch.Tensor:
        c = self.config
        num_tokens = hidden.shape[0]
        x = rms_norm(hidden, self.input_norm, c.rms_norm_eps)
        q = self.q(x, adapters).view(num_tokens, c.num_heads, c.head_dim)
        k = self.k(x, adapters).view(num_tokens, c.num_kv_heads, c.head_dim)
        v = self.v(x, adapters).view(num_tokens, c.num_kv_heads, c.head_dim)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        out = paged_attention(q, k, v, kv.k[self.layer], kv.v[self.layer], attn, c.head_dim ** -0.5)
        hidden = hidden + self.o(out.view(num_tokens, -1), adapters)
        x = rms_norm(hidden, self.post_attention_norm, c.rms_norm_eps)
        return hidden + self.down(F.silu(self.gate(x, adapters)) * self.up(x, adapters), adapters)


class LlamaModel:
    """Weights as plain tensors; every target linear reads its adapter rows from `pools`."""

    def __init__(self, config: ModelConfig, state: dict[str, torch.Tensor], pools: AdapterPools,
                 max_positions: int, backend: KernelBackend | None = None) -> None:
        self.config = config
        self.embed = state["model.embed_tokens.weight"]
        self.norm = state["model.norm.weight"]
        self.lm_head = state["lm_head.weight"]
        self.layers = [DecoderLayer(config, i, state, pools, backend) for i in range(config.num_layers)]
        cos, sin = rope_cos_sin(config.head_dim, config.rope_theta, config.rope_scaling, max_positions,
                                device=self.embed.device)
        self.cos, self.sin = cos.to(self.embed.dtype), sin.to(self.embed.dtype)

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
        return F.linear(hidden, self.lm_head).float()
