"""Engine behaviour: continuous batching, KV exhaustion + preemption, chunked prefill, cancellation, stops,
streaming."""

from __future__ import annotations

import asyncio
import random

import pytest

from lorafleet.infra.errors import AdapterNotFound
from lorafleet.replicas import SamplingParams

GREEDY = SamplingParams(max_tokens=12, temperature=0.0)


def _prompts(num: int, seed: int = 0, lo: int = 3, hi: int = 30) -> list[list[int]]:
    rng = random.Random(seed)
    return [[0] + [rng.randrange(5, 1024) for _ in range(rng.randrange(lo, hi))] for _ in range(num)]


def _drain(engine, finished=None):
    finished = {} if finished is None else finished
    while engine.has_unfinished():
        finished |= {o.request_id: o for o in engine.step() if o.finished}
    return finished


def test_requests_arriving_mid_generation_match_solo_runs(make_engine):
    engine = make_engine()
    prompts = _prompts(6)
    alone = [engine.generate([p], GREEDY)[0].token_ids for p in prompts]
    finished, ids = {}, []
    for prompt in prompts:
        ids.append(engine.add_request(prompt, GREEDY))
        for _ in range(3):                                   # three steps between arrivals
            finished |= {o.request_id: o for o in engine.step() if o.finished}
    _drain(engine, finished)
    assert [finished[i].token_ids for i in ids] == alone


def test_kv_exhaustion_preempts_and_recomputes_with_identical_tokens(make_engine):
    prompts = _prompts(8, seed=1, lo=20, hi=40)
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    roomy = make_engine()
    expected = [o.token_ids for o in roomy.generate(prompts, params)]
    tight = make_engine(num_kv_blocks=16, kv_block_size=8)     # 128 token slots for 8 x ~60 tokens
    outs = tight.generate(prompts, params)
    assert [o.token_ids for o in outs] == expected
    assert tight.stats()["num_preemptions"] > 0 and sum(o.metrics.num_preemptions for o in outs) > 0
    assert tight.stats()["kv_blocks_used"] == 0


def test_long_prompt_is_prefilled_in_chunks(make_engine):
    prompt = _prompts(1, seed=2, lo=150, hi=151)[0]
    whole = make_engine().score(prompt)
    chunked = make_engine(max_batched_tokens=32, max_num_seqs=4)
    out = chunked.generate([prompt], GREEDY)[0]
    assert out.token_ids == make_engine().generate([prompt], GREEDY)[0].token_ids
    assert chunked.num_steps >= 5 + len(out.token_ids) - 1
    assert whole.shape == (151, 1024)


def test_cancel_running_and_waiting_requests(make_engine):
    engine = make_engine(max_num_seqs=2)
    params = SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(p, params) for p in _prompts(3, seed=3)]
    for _ in range(3):
        engine.step()
    engine.abort(ids[0])                                      # running
    engine.abort(ids[2])                                      # still waiting (max_num_seqs=2)
    outs = {o.request_id: o for o in engine.step()}
    assert outs[ids[0]].finished and outs[ids[0]].finish_reason == "abort"
    assert 0 < len(outs[ids[0]].token_ids) < 50
    assert outs[ids[2]].finish_reason == "abort" and outs[ids[2]].token_ids == []
    finished = _drain(engine)
    assert finished[ids[1]].finish_reason == "length"
    assert engine.stats()["kv_blocks_used"] == 0
    engine.abort("unknown")                                   # harmless
    assert engine.step() == []


def test_stop_token_ids_stop_strings_and_eos(make_engine, tiny_model_dir):
    engine = make_engine()
    prompt = _prompts(1, seed=4)[0]
    free = engine.generate([prompt], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))[0]
    stop_id = free.token_ids[5]
    first = free.token_ids.index(stop_id)
    out = engine.generate([prompt], SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop_id]))[0]
    assert out.finish_reason == "stop" and out.token_ids == free.token_ids[:first + 1]
    text = free.text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    out = engine.generate([prompt], SamplingParams(max_tokens=20, temperature=0, stop=[stop], ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.text == text[:text.index(stop)]
    eos = engine.tokenizer.eos_token_ids[0]
    assert out.token_ids[-1] != eos
    long = engine.generate([prompt], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert long.finish_reason == "length" and len(long.token_ids) == 5


def test_text_is_the_decoded_tokens(make_engine):
    engine = make_engine()
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=5, ignore_eos=True)
    for out in engine.generate(["Hello, world!", "SELECT name FROM", "def f(x):"], params):
        assert out.text == engine.tokenizer.decode(out.token_ids)


def test_prompt_longer_than_max_model_len_is_rejected_and_length_cap(make_engine):
    engine = make_engine(max_model_len=32)
    with pytest.raises(ValueError, match="max_model_len"):
        engine.add_request(list(range(40)), GREEDY)
    with pytest.raises(ValueError, match="empty"):
        engine.add_request([], GREEDY)
    out = engine.generate([list(range(1, 29))], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 4


def test_stream_yields_deltas_that_add_up(make_engine):
    engine = make_engine()
    params = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)
    prompts = _prompts(3, seed=6)
    expected = engine.generate(prompts, params)

    async def consume(prompt):
        tokens, text, outs = [], "", []
        async for out in engine.stream(prompt, params):
            tokens += out.new_token_ids
            text += out.new_text
            outs.append(out)
        return tokens, text, outs

    async def main():
        return await asyncio.gather(*(consume(p) for p in prompts))

    for (tokens, text, outs), exp in zip(asyncio.run(main()), expected, strict=True):
        assert tokens == exp.token_ids and text == exp.text
        assert outs[-1].finished and not any(o.finished for o in outs[:-1]) and len(outs) == 10


def test_stream_raises_request_error_and_early_exit_aborts(make_engine):
    engine = make_engine()

    async def main():
        with pytest.raises(AdapterNotFound):
            async for _ in engine.stream([0, 5], GREEDY, adapter_id="nope"):
                pass
        params = SamplingParams(max_tokens=100, temperature=0.0, ignore_eos=True)
        async for out in engine.stream([0, 5, 6], params, request_id="early"):
            if len(out.token_ids) == 3:
                break
        for _ in range(100):                                  # the driver drains the abort
            if not engine.has_unfinished():
                break
            await asyncio.sleep(0.01)

    asyncio.run(main())
    assert not engine.has_unfinished() and engine.stats()["kv_blocks_used"] == 0


def test_duplicate_request_id_rejected(make_engine):
    engine = make_engine()
    engine.add_request([0, 5], GREEDY, request_id="x")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request([0, 5], GREEDY, request_id="x")
    _drain(engine)
    engine.add_request([0, 5], GREEDY, request_id="x")       # free again once finished
