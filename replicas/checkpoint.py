"""Seeded random Llama-family checkpoints in Hugging Face layout, for demos, tests and CPU benchmarks."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from lorafleet.replicas.tokenizer_builder import SPECIAL_TOKENS, build_tokenizer


@dataclass(frozen=True, slots=True)
class ModelPreset:
    """Shape of a Llama-family model; field names follow Hugging Face's LlamaConfig."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        assert self.hidden_size % self.num_attention_heads == 0, "hidden_size must divide into heads"
        assert self.num_attention_heads % self.num_key_value_heads == 0, "heads must group into KV heads"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


# ~1.0M parameters, GQA (4 heads over 2 KV heads), untied head: the test model.
# ~100M parameters, d_model 768, GQA 12/4, tied embeddings: the CPU benchmark model.
PRESETS: dict[str, ModelPreset] = {
    "tiny": ModelPreset(
        vocab_size=1024, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        tie_word_embeddings=False,
    ),
    "small": ModelPreset(
        vocab_size=8192, hidden_size=768, intermediate_size=2048, num_hidden_layers=14,
        num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=4096,
        tie_word_embeddings=True,
    ),
}


def hf_config(preset: ModelPreset) -> dict:
    """config.json contents for `preset` (LlamaForCausalLM)."""
    config = asdict(preset)
    config.update(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        head_dim=preset.head_dim,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        attention_dropout=0.0,
        initializer_range=0.02,
        rope_scaling=None,
        bos_token_id=SPECIAL_TOKENS.index("<s>"),
        eos_token_id=SPECIAL_TOKENS.index("</s>"),
        pad_token_id=SPECIAL_TOKENS.index("<pad>"),
        torch_dtype="float32",
        use_cache=True,
    )
    return config


def random_state_dict(preset: ModelPreset, seed: int) -> dict[str, torch.Tensor]:
    """Seeded weights, scaled so activations keep unit size and logits are peaked (stable greedy ties)."""
    gen = torch.Generator().manual_seed(seed)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * std

    def norm_weight(size: int) -> torch.Tensor:
        return 1.0 + normal(size, std=0.1)

    d, h = preset.hidden_size, preset.head_dim
    q_out, kv_out = preset.num_attention_heads * h, preset.num_key_value_heads * h
    state = {"model.embed_tokens.weight": normal(preset.vocab_size, d, std=1.0)}
    for i in range(preset.num_hidden_layers):
        p = f"model.layers.{i}"
        state |= {
            f"{p}.input_layernorm.weight": norm_weight(d),
            f"{p}.self_attn.q_proj.weight": normal(q_out, d, std=1 / math.sqrt(d)),
            f"{p}.self_attn.k_proj.weight": normal(kv_out, d, std=1 / math.sqrt(d)),
            f"{p}.self_attn.v_proj.weight": normal(kv_out, d, std=1 / math.sqrt(d)),
            # Residual branches scaled down by depth so the stream stays dominated by the embedding.
            f"{p}.self_attn.o_proj.weight": normal(d, q_out, std=0.5 / math.sqrt(q_out)),
            f"{p}.post_attention_layernorm.weight": norm_weight(d),
            f"{p}.mlp.gate_proj.weight": normal(preset.intermediate_size, d, std=1 / math.sqrt(d)),
            f"{p}.mlp.up_proj.weight": normal(preset.intermediate_size, d, std=1 / math.sqrt(d)),
            f"{p}.mlp.down_proj.weight": normal(
                d, preset.intermediate_size, std=0.5 / math.sqrt(preset.intermediate_size)
            ),
        }
    state["model.norm.weight"] = norm_weight(d)
    if not preset.tie_word_embeddings:
        # Logit std ~3 after the final RMSNorm: greedy picks are far from ties.
        state["lm_head.weight"] = normal(preset.vocab_size, d, std=3 / math.sqrt(d))
    return state


def make_model(out_dir: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write config.json, model.safetensors, tokenizer files and generation_config.json to `out_dir`."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset '{preset}'; choose one of: {', '.join(PRESETS)}")
    spec = PRESETS[preset]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = hf_config(spec)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    state = {k: v.contiguous() for k, v in random_state_dict(spec, seed).items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    generation = {
        "bos_token_id": config["bos_token_id"],
        "eos_token_id": config["eos_token_id"],
        "pad_token_id": config["pad_token_id"],
        "do_sample": False,
    }
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    build_tokenizer(spec.vocab_size).save(str(out / "tokenizer.json"))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "pad_token": "<pad>",
        "unk_token": None,
        "add_bos_token": True,
        "model_max_length": spec.max_position_embeddings,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return out


# A minimal ChatML-style template so /v1/chat/completions works on the demo model.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
