"""Training mechanics on the tiny model: the loss falls, the saved adapter validates, and the engine serves it as
the trainer computed it (PEFT for LoRA / IA3, the FLoRA training modules for FLoRA); bad arguments exit 2."""

from __future__ import annotations

import pytest
import torch
from lf_testing import in_process_cli

from lorafleet.infra.adapters import load_adapter_dir
from lorafleet.infra.base_spec import BaseModelSpec
from lorafleet.replicas import Engine, SamplingParams
from lorafleet.training import TrainConfig, train
from lorafleet.training.trainer import encode_examples

ENGINE = {"kernel_backend": "torch", "max_num_seqs": 8, "kv_cache_bytes": 8 << 20}


@pytest.fixture(autouse=True)
def _two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tiny_model_dir, tmp_path_factory):
    """One short run per adapter type on the persona task (a fixed answer: learnable in seconds)."""
    root = tmp_path_factory.mktemp("trained")
    out = {}
    for kind, rank, lr in (("lora", 4, 1e-2), ("ia3", 1, 5e-2), ("flora", 2, 2e-2)):
        config = TrainConfig(kind, "persona", rank=rank, steps=40, lr=lr, num_train=64, num_heldout=8, seed=1,
                             targets=("q_proj", "v_proj", "down_proj") if kind != "ia3" else None)
        out[kind] = (train(tiny_model_dir, root / kind, config), config)
    return out


@pytest.mark.parametrize("kind", ["lora", "ia3", "flora"])
def test_loss_falls_and_the_adapter_validates(trained, tiny_model_dir, kind):
    result, config = trained[kind]
    first, last = sum(result.losses[:5]) / 5, sum(result.losses[-5:]) / 5
    assert len(result.losses) == config.steps and last < 0.6 * first, (first, last)
    weights = load_adapter_dir(result.out_dir, BaseModelSpec.from_model_dir(tiny_model_dir))
    assert weights.peft_type == kind.upper() and weights.max_rank == config.rank
    assert sorted(p.name for p in result.out_dir.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


@pytest.mark.parametrize("kind", ["lora", "ia3"])
def test_the_engine_serves_a_peft_trained_adapter_as_peft_computes_it(trained, tiny_model_dir, kind):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    result, _ = trained[kind]
    prompt = "Hello. who are you?"
    with Engine.from_pretrained(tiny_model_dir, **ENGINE) as engine:
        engine.load_adapter("a", result.out_dir)
        ids = engine.tokenizer.encode(engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}]))
        ours = engine.generate(ids, SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True), "a")[0]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft = PeftModel.from_pretrained(base, result.out_dir).eval()
    with torch.no_grad():
        theirs = peft.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, min_new_tokens=12)
    assert ours.token_ids == theirs[0, len(ids):].tolist()


def test_the_engine_serves_a_trained_flora_adapter_as_training_computed_it(trained, tiny_model_dir):
    """The FLoRA file format round trip: engine logits with the saved adapter = the training modules' logits."""
    from transformers import AutoModelForCausalLM

    from lorafleet.training.flora import add_flora
    from lorafleet.training.tasks import Example

    result, config = trained["flora"]
    with Engine.from_pretrained(tiny_model_dir, **ENGINE) as engine:
        engine.load_adapter("f", result.out_dir)
        (prompt, answer), = encode_examples(engine.tokenizer, [Example("Hi! who are you?", "x")])
        ids = prompt + answer
        ours = engine.score(ids, "f")
        base_logits = engine.score(ids)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    add_flora(model, list(config.targets), config.rank, list(range(model.config.num_hidden_layers)), seed=0)
    state = load_adapter_dir(result.out_dir, BaseModelSpec.from_model_dir(tiny_model_dir)).modules
    for (layer, name), module in state.items():
        target = getattr(getattr(model.model.layers[layer], "mlp" if name == "down_proj" else "self_attn"), name)
        target.in_rows.data.copy_(module.in_rows)
        target.out_rows.data.copy_(module.out_rows)
    with torch.no_grad():
        theirs = model(torch.tensor([ids])).logits[0]
    assert torch.allclose(ours, theirs, atol=1e-4, rtol=1e-4)
    assert (ours - base_logits).abs().max() > 1e-2   # the adapter does change the model


def test_cli_trains_reports_and_rejects_bad_arguments(capsys, tiny_model_dir, tmp_path):
    run = in_process_cli(capsys, "train")
    out = tmp_path / "cli-lora"
    code, stdout, stderr = run(out, "--base", tiny_model_dir, "--type", "lora", "--rank", "2", "--task", "sql",
                               "--steps", "3", "--threads", "2")
    assert code == 0, stderr
    assert "valid LORA adapter" in stdout and "held-out exact match on 'sql': base" in stdout
    assert (out / "adapter_model.safetensors").is_file() and not (tmp_path / ".cli-lora.partial").exists()
    for args, fragment in (
        (["--type", "dora"], "--type must be one of"),
        (["--task", "poetry"], "--task must be one of"),
        (["--steps", "0"], "--steps must be >= 1"),
        (["--lr", "-1"], "--lr must be a positive number"),
        (["--targets", "lm_head"], "unknown modules"),
        (["--save-dtype", "int8"], "--save-dtype must be one of"),
    ):
        defaults = {"--type": "lora", "--task": "sql"}
        code, _, stderr = run(tmp_path / "bad", "--base", tiny_model_dir,
                              *[x for k, v in defaults.items() if k not in args for x in (k, v)], *args)
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and fragment in lines[0], (args, stderr)
    code, _, stderr = run(tmp_path / "bad", "--base", tmp_path / "nowhere", "--task", "sql")
    assert code == 2 and "not a model directory" in stderr
    assert not (tmp_path / "bad").exists()
