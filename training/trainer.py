"""Train one adapter on one generated task: PEFT LoRA / IA3, or LoRAFleet FLoRA (training/flora.py).

The examples are the task's prompts rendered with the base model's chat template (as /v1/chat/completions renders
them) followed by the answer and the end-of-turn token; the loss counts the answer tokens only, and the LM head
runs on those positions alone (its vocab-sized matmul would otherwise dominate a small model's step).
"""

from __future__ import annotations

import math
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F

from lorafleet.infra.base_spec import TARGET_MODULES
from lorafleet.training.tasks import TASKS, Example

ADAPTER_TYPES = ("lora", "ia3", "flora")
# Defaults per type. FLoRA: the FLoRA paper's fine-tuning settings (lr 8e-3, batch 8, key and query projections).
# LoRA and IA3 here train for minutes, not the paper's 1,500 steps, so their rates are higher than its 1e-4 / 5e-3.
DEFAULT_LR = {"lora": 2e-3, "ia3": 2e-2, "flora": 8e-3}
SAVE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_TARGETS = {"lora": ("q_proj", "v_proj"), "ia3": ("k_proj", "v_proj", "down_proj"),
                   "flora": ("q_proj", "k_proj")}


@dataclass(slots=True)
class TrainConfig:
    """One training run. `num_layers`: adapt only the last N layers (backprop stops there: faster); 0 = all."""

    adapter_type: str
    task: str
    rank: int = 8
    steps: int = 100
    lr: float | None = None
    batch_size: int = 8
    seed: int = 0
    targets: tuple[str, ...] | None = None
    num_layers: int = 0
    num_train: int = 512
    num_heldout: int = 40
    lora_alpha: float | None = None   # default 2 x rank
    save_dtype: str = "float32"       # of the saved tensors (float16 / bfloat16 halve the files)

    def __post_init__(self) -> None:
        if self.adapter_type not in ADAPTER_TYPES:
            raise ValueError(f"--type must be one of {', '.join(ADAPTER_TYPES)}, got '{self.adapter_type}'")
        if self.task not in TASKS:
            raise ValueError(f"--task must be one of {', '.join(TASKS)}, got '{self.task}'")
        if self.adapter_type == "ia3" and self.rank != 1:
            self.rank = 1   # IA3 is one scaling vector per module
        for name in ("rank", "steps", "batch_size", "num_train", "num_heldout"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.num_layers < 0:
            raise ValueError(f"--num-layers must be >= 0, got {self.num_layers}")
        if self.save_dtype not in SAVE_DTYPES:
            raise ValueError(f"--save-dtype must be one of {', '.join(SAVE_DTYPES)}, got '{self.save_dtype}'")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        self.targets = tuple(self.targets or DEFAULT_TARGETS[self.adapter_type])
        unknown = [t for t in self.targets if t not in TARGET_MODULES]
        if unknown or not self.targets:
            raise ValueError(f"--targets: unknown modules {unknown}; choose from {', '.join(TARGET_MODULES)}")

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else DEFAULT_LR[self.adapter_type]


@dataclass(slots=True)
class TrainResult:
    out_dir: Path
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    num_params: int = 0


def encode_examples(tokenizer, examples: list[Example]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids + end of turn) per example, the prompt rendered as the served chat API renders it."""
    end = tokenizer.eos_token_ids[0]
    out = []
    for example in examples:
        prompt = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": example.prompt}]))
        out.append((prompt, tokenizer.encode(example.answer, add_special_tokens=False) + [end]))
    return out


def _batch(pairs: list[tuple[list[int], list[int]]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, list, list]:
    """Right-padded input ids [B, L], attention mask, and for the loss: (row, position) of each answer token's
    prediction and the token itself."""
    seqs = [p + a for p, a in pairs]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    where, targets = [], []
    for row, ((prompt, answer), seq) in enumerate(zip(pairs, seqs, strict=True)):
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
        for k, token in enumerate(answer):
            where.append((row, len(prompt) + k - 1))   # the position whose output predicts this token
            targets.append(token)
    return ids, mask, where, targets


def train(base_dir: str | Path, out_dir: str | Path, config: TrainConfig,
          on_step: Callable[[int, float], None] | None = None) -> TrainResult:
    """Train and save the adapter (atomically: a half-trained run leaves no directory behind)."""
    from transformers import AutoModelForCausalLM

    from lorafleet.replicas.tokenizer import Tokenizer

    torch.manual_seed(config.seed)
    base_dir, out = Path(base_dir), Path(out_dir)
    tokenizer = Tokenizer.from_model_dir(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    num_layers = model.config.num_hidden_layers
    layers = list(range(num_layers - config.num_layers if config.num_layers else 0, num_layers))
    params, model = _add_adapter(model, config, layers, str(base_dir))
    train_set, _ = TASKS[config.task].split(config.seed, config.num_train, config.num_heldout)
    pairs = encode_examples(tokenizer, train_set)
    pad_id = tokenizer.eos_token_ids[0]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    warmup = max(1, config.steps // 10)
    schedule = torch.optim.lr_scheduler.LambdaLR(   # linear warm-up, cosine decay
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / config.steps)))
    backbone, head = _parts(model)
    rng = random.Random(config.seed)
    result = TrainResult(out, num_params=sum(p.numel() for p in params))
    start = time.perf_counter()
    model.train()
    for step in range(config.steps):
        ids, mask, where, targets = _batch(rng.sample(pairs, min(config.batch_size, len(pairs))), pad_id)
        hidden = backbone(input_ids=ids, attention_mask=mask).last_hidden_state
        rows, cols = zip(*where, strict=True)
        logits = head(hidden[list(rows), list(cols)])
        loss = F.cross_entropy(logits.float(), torch.tensor(targets))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())
        result.losses.append(value)
        if on_step is not None:
            on_step(step, value)
    result.seconds = time.perf_counter() - start
    work = out.parent / f".{out.name}.partial"
    if work.exists():
        shutil.rmtree(work)
    _save(model, work, config, str(base_dir))
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    return result


def _add_adapter(model, config: TrainConfig, layers: list[int], base_dir: str):
    targets = list(config.targets or ())
    if config.adapter_type == "flora":
        from lorafleet.training.flora import add_flora

        return add_flora(model, targets, config.rank, layers, config.seed), model
    from peft import IA3Config, LoraConfig, get_peft_model

    every_layer = len(layers) == model.config.num_hidden_layers
    feedforward = [t for t in targets if t == "down_proj"]   # PEFT's Llama default: IA3 scales its input
    if config.adapter_type == "lora":
        where = {} if every_layer else {"layers_to_transform": layers, "layers_pattern": "layers"}
        peft_config = LoraConfig(r=config.rank, lora_alpha=config.lora_alpha or 2 * config.rank,
                                 target_modules=targets, lora_dropout=0.0, bias="none", **where)
    elif every_layer:
        peft_config = IA3Config(target_modules=targets, feedforward_modules=feedforward)
    else:   # IA3Config has no layers_to_transform: name the modules of those layers with regexes (PEFT full match)
        peft_config = IA3Config(target_modules=_module_regex(layers, targets),
                                feedforward_modules=_module_regex(layers, feedforward) if feedforward else [])
    peft_model = get_peft_model(model, peft_config)
    peft_model.base_model.model.config.base_model_name_or_path = base_dir
    return [p for p in peft_model.parameters() if p.requires_grad], peft_model


def _module_regex(layers: list[int], names: list[str]) -> str:
    modules = "|".join(f"{TARGET_MODULES[n]}\\.{n}" for n in names)
    return rf"model\.layers\.({'|'.join(map(str, layers))})\.({modules})"


def _parts(model):
    """(decoder backbone, LM head) of a plain or PEFT-wrapped LlamaForCausalLM."""
    inner = model.base_model.model if hasattr(model, "peft_config") else model
    return inner.model, inner.lm_head


def _save(model, out: Path, config: TrainConfig, base_dir: str) -> None:
    from safetensors.torch import load_file, save_file

    from lorafleet.infra.adapter_files import WEIGHTS_FILE

    if config.adapter_type == "flora":
        from lorafleet.training.flora import save_flora

        save_flora(model, out, list(config.targets or ()), config.rank, base_dir)
    else:
        model.save_pretrained(out, safe_serialization=True)
        readme = out / "README.md"   # PEFT's model card template: not an adapter file
        if readme.exists():
            readme.unlink()
    if config.save_dtype != "float32":
        dtype = SAVE_DTYPES[config.save_dtype]
        tensors = {k: v.to(dtype).contiguous() for k, v in load_file(out / WEIGHTS_FILE).items()}
        save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
