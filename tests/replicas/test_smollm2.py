"""The real model: SmolLM2-135M-Instruct with adapters trained by `lorafleet train`. Greedy parity with transformers +
PEFT (LoRA and IA3, each alone and all mixed in one batch), and streaming text in several scripts that equals
transformers' decode of the whole completion (no U+FFFD for a character split across tokens)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from lorafleet.replicas import Engine, SamplingParams
from lorafleet.training.tasks import TASKS

pytestmark = pytest.mark.slow
GREEDY = SamplingParams(max_tokens=24, temperature=0.0)
ENGINE = {"kernel_backend": "torch", "max_num_seqs": 16, "max_adapters": 4, "max_rank": 16, "max_model_len": 512}
PARITY = {"upper-lora-r8": "upper", "reverse-lora-r16": "reverse", "persona-ia3": "persona"}


@pytest.fixture(scope="module")
def engine(smollm2_dir, trained_adapters):
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    with Engine.from_pretrained(smollm2_dir, **ENGINE) as engine:
        for adapter_id in PARITY:
            engine.load_adapter(adapter_id, trained_adapters[adapter_id])
        yield engine
    torch.set_num_threads(before)


def chat_ids(engine: Engine, text: str) -> list[int]:
    return engine.tokenizer.encode(engine.tokenizer.apply_chat_template([{"role": "user", "content": text}]))


def test_the_real_model_answers_like_transformers(engine, smollm2_dir):
    from transformers import AutoModelForCausalLM

    ids = chat_ids(engine, "What is the capital of France?")
    out = engine.generate(ids, GREEDY)[0]
    assert out.text == "The capital of France is Paris." and out.finish_reason == "stop"   # stopped on <|im_end|>
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    with torch.no_grad():
        theirs = hf.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
    assert out.token_ids == theirs[0, len(ids):].tolist()


def test_lora_and_ia3_match_peft_alone_and_mixed_in_one_batch(engine, smollm2_dir, trained_adapters):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    cases = []   # (adapter id or None, prompt ids): two held-out prompts per task, each asked with and without
    for adapter_id, task in PARITY.items():
        _, heldout = TASKS[task].split(0, 512, 40)
        cases += [(a, chat_ids(engine, e.prompt)) for e in heldout[:2] for a in (adapter_id, None)]
    mixed = engine.generate([ids for _, ids in cases], GREEDY, [a for a, _ in cases])   # one engine, one batch
    for adapter_id in (None, *PARITY):
        hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
        model = hf if adapter_id is None else PeftModel.from_pretrained(hf, trained_adapters[adapter_id])
        model.eval()
        for (a, ids), ours in zip(cases, mixed, strict=True):
            if a != adapter_id:
                continue
            with torch.no_grad():
                theirs = model.generate(torch.tensor([ids]), max_new_tokens=GREEDY.max_tokens, do_sample=False)
            assert ours.token_ids == theirs[0, len(ids):].tolist(), (adapter_id, ours.text)
        alone = engine.generate([ids for a, ids in cases if a == adapter_id], GREEDY, adapter_id)
        assert [o.token_ids for o in alone] == [o.token_ids for (a, _), o in zip(cases, mixed, strict=True)
                                                 if a == adapter_id]
    answers = {a: o.text for (a, _), o in zip(cases, mixed, strict=True) if a is not None}
    assert answers["persona-ia3"] == TASKS["persona"].ANSWER   # the adapters do what they were trained for


PROMPTS = ["Écris une phrase en français avec des accents.", "用中文写一句关于猫的话。", "日本語で挨拶してください。",
           "Напиши одно предложение по-русски.", "Γράψε μια πρόταση στα ελληνικά.", "Reply with five emoji only.",
           "Write a German sentence with ä, ö and ü."]


def test_streamed_text_in_many_scripts_equals_the_decode_of_the_whole_completion(engine):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(engine.model_dir)

    async def stream(prompt: str) -> tuple[str, list[int]]:
        pieces, token_ids = [], []
        params = SamplingParams(max_tokens=40, temperature=0.0)
        async for out in engine.stream(chat_ids(engine, prompt), params):
            pieces.append(out.new_text)
            token_ids = out.token_ids
        return "".join(pieces), token_ids

    async def all_prompts():
        return await asyncio.gather(*(stream(p) for p in PROMPTS))

    results = asyncio.run(all_prompts())
    num_split = 0   # characters whose bytes span tokens: what the hold-back is for
    for prompt, (text, token_ids) in zip(PROMPTS, results, strict=True):
        assert text == hf.decode(token_ids, skip_special_tokens=True), prompt
        # Only a character cut off by max_tokens may stay incomplete (transformers decodes it as U+FFFD too).
        assert "\ufffd" not in text.rstrip("\ufffd"), prompt
        num_split += sum("\ufffd" in hf.decode([t]) for t in token_ids)
    assert sum(any(ord(c) > 127 for c in text) for text, _ in results) >= 5
    assert num_split > 0, "no character was split across tokens: the prompts no longer test the hold-back"
