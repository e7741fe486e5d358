"""bfloat16 engine (prepacked oneDNN GEMMs on AMX / AVX512-BF16 where the CPU has them) against transformers +
peft in bfloat16: logits within the kernels' bf16 tolerance, greedy tokens equal until a near-tie (two tokens
within that tolerance in transformers' own logits), where either choice is right."""

from __future__ import annotations

import pytest
import torch
import transformers
from peft import PeftModel

from lorafleet.replicas import Engine, SamplingParams

BF16_REL_TOL = 3e-2     # tests/kernels/conftest.py REL_TOL[torch.bfloat16]
NUM_NEW_TOKENS = 16
ATTN = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALL_LINEAR = ATTN + ["gate_proj", "up_proj", "down_proj"]
PROMPTS = [[0, 437, 322, 16, 572, 5], [0, 55, 57, 66, 41, 43, 120, 250, 17], [0, 300, 301, 302],
           [0, *range(700, 731)]]


def hf_model(model_dir, adapter_dir=None, dtype=torch.bfloat16):
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    return model if adapter_dir is None else PeftModel.from_pretrained(model, adapter_dir).eval()


def hf_greedy(model, prompt: list[int], num_tokens: int) -> tuple[list[int], torch.Tensor]:
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=num_tokens,
                             min_new_tokens=num_tokens, do_sample=False, output_logits=True,
                             return_dict_in_generate=True, pad_token_id=2)
    return out.sequences[0, len(prompt):].tolist(), torch.stack(out.logits)[:, 0].float()


def assert_greedy_parity(ours: list[int], theirs: list[int], their_logits: torch.Tensor) -> int:
    """Equal tokens up to the first difference, which must be a near-tie in transformers' logits (ours within
    BF16_REL_TOL of its top token); after it the two continue from different prefixes. Returns the steps equal."""
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        if a != b:
            logits = their_logits[step]
            gap = float((logits[b] - logits[a]) / logits.abs().max())
            assert gap <= BF16_REL_TOL, f"step {step}: token {a} is {gap:.3f} below transformers' {b}"
            return step
    return len(ours)


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual - expected).abs().max() / expected.abs().max())


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    with Engine.from_pretrained(tiny_model_dir, dtype="bfloat16", max_adapters=4, max_rank=64,
                                kv_cache_bytes=8 << 20) as engine:
        yield engine


@pytest.mark.parametrize("adapter", ["base", "lora-r8-attn", "lora-r16-all-rslora", "ia3-all"])
def test_tiny_model_in_bfloat16_matches_transformers_peft(engine, tiny_model_dir, peft_adapter, adapter):
    paths = {
        "lora-r8-attn": lambda: peft_adapter("lora", r=8, targets=ATTN, seed=8),
        "lora-r16-all-rslora": lambda: peft_adapter("lora", r=16, targets=ALL_LINEAR, rslora=True, seed=16),
        "ia3-all": lambda: peft_adapter("ia3", targets=ALL_LINEAR, feedforward=["gate_proj", "up_proj", "down_proj"],
                                        seed=6),
    }
    adapter_id = None if adapter == "base" else adapter
    if adapter_id is not None:
        engine.load_adapter(adapter_id, paths[adapter]())
    model = hf_model(tiny_model_dir, None if adapter_id is None else paths[adapter]())
    params = SamplingParams(max_tokens=NUM_NEW_TOKENS, temperature=0.0, ignore_eos=True)
    num_equal = 0
    for prompt in PROMPTS:
        with torch.no_grad():
            expected = model(torch.tensor([prompt])).logits[0].float()
        assert relative_error(engine.score(prompt, adapter_id), expected) <= BF16_REL_TOL
        theirs, their_logits = hf_greedy(model, prompt, NUM_NEW_TOKENS)
        ours = engine.generate([prompt], params, adapters=[adapter_id])[0].token_ids
        num_equal += assert_greedy_parity(ours, theirs, their_logits)
    assert num_equal >= len(PROMPTS) * NUM_NEW_TOKENS // 2, "most greedy steps should agree outright"


@pytest.mark.slow
def test_smollm2_in_bfloat16_matches_transformers_peft(smollm2_dir, trained_adapters):
    """The real model: greedy parity as above on chat prompts with the trained adapters, and logits no further
    from the float32 model than transformers' own bfloat16 logits are (30 layers add up past one kernel's 3e-2)."""
    texts = {None: "What is the capital of France?", "upper-lora-r8": "Write a haiku about the sea.",
             "persona-ia3": "Who are you?"}
    with Engine.from_pretrained(smollm2_dir, dtype="bfloat16", max_adapters=4, max_rank=16,
                                max_model_len=512) as engine:
        for adapter_id, text in texts.items():
            path = None if adapter_id is None else trained_adapters[adapter_id]
            if adapter_id is not None:
                engine.load_adapter(adapter_id, path)
            bf16, fp32 = hf_model(smollm2_dir, path), hf_model(smollm2_dir, path, torch.float32)
            prompt = engine.tokenizer.encode(engine.tokenizer.apply_chat_template([{"role": "user", "content": text}]))
            with torch.no_grad():
                exact = fp32(torch.tensor([prompt])).logits[0].float()
                theirs_error = relative_error(bf16(torch.tensor([prompt])).logits[0].float(), exact)
            assert relative_error(engine.score(prompt, adapter_id), exact) <= 1.25 * theirs_error, adapter_id
            theirs, their_logits = hf_greedy(bf16, prompt, NUM_NEW_TOKENS)
            ours = engine.generate([prompt], SamplingParams(max_tokens=NUM_NEW_TOKENS, temperature=0.0,
                                                            ignore_eos=True), adapters=[adapter_id])[0]
            assert_greedy_parity(ours.token_ids, theirs, their_logits)
