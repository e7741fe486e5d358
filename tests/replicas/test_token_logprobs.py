"""TokenLogprobs: token strings that join to the engine's text (split characters, EOS, flush), top-k, clamping."""

from __future__ import annotations

import dataclasses
import json

import pytest

from lorafleet.infra.replica_api import TokenLogprob
from lorafleet.replicas import SamplingParams
from lorafleet.replicas.outputs import RequestOutput
from lorafleet.replicas.token_logprobs import MIN_LOGPROB, TokenLogprobs
from lorafleet.replicas.tokenizer import Tokenizer

EOS = 1   # "</s>" of the tiny preset's tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir) -> Tokenizer:
    return Tokenizer.from_model_dir(tiny_model_dir)


def output(prompt_ids: list[int], token_ids: list[int], num_new: int, logprobs: list[dict[int, float]] | None,
           finished: bool = False) -> RequestOutput:
    return RequestOutput("req-0", None, prompt_ids, token_ids, "", token_ids[len(token_ids) - num_new:], "", finished,
                         logprobs=logprobs)


def test_a_character_split_across_tokens_is_carried_by_the_token_that_completes_it(tokenizer):
    prompt = tokenizer.encode("Hello")
    e_1, e_2 = tokenizer.encode("é", add_special_tokens=False)   # byte-level BPE: two byte tokens, no merge
    (x,) = tokenizer.encode("x", add_special_tokens=False)
    steps = [{e_1: -0.5, x: -1.0}, {e_2: -0.1, x: -3.0}, {EOS: -0.2, x: -0.3, e_1: -5.0}]
    logprobs = TokenLogprobs(tokenizer, (EOS,), SamplingParams(logprobs=2))

    first = logprobs.new_entries(output(prompt, [e_1], 1, steps[:1]))
    assert first == (TokenLogprob("", e_1, -0.5, (("", -0.5), ("x", -1.0))),)
    rest = logprobs.new_entries(output(prompt, [e_1, e_2, EOS], 2, steps, finished=True))
    assert rest == (
        # the alternative x here would follow the pending half character
        TokenLogprob("é", e_2, -0.1, (("é", -0.1), ("\ufffdx", -3.0))),
        # EOS ends the text (""); only the top 2 are kept
        TokenLogprob("", EOS, -0.2, (("", -0.2), ("x", -0.3))),
    )


def test_the_last_token_flushes_an_incomplete_character_as_the_engine_does(tokenizer):
    prompt = tokenizer.encode("Hello")
    e_1, _ = tokenizer.encode("é", add_special_tokens=False)
    logprobs = TokenLogprobs(tokenizer, (EOS,), SamplingParams(logprobs=0))
    assert logprobs.new_entries(output(prompt, [e_1], 1, [{e_1: -0.5}], finished=True)) == (
        TokenLogprob("\ufffd", e_1, -0.5, ()),)


def test_special_token_alternatives_have_their_names_and_ignore_eos_adds_eos_as_text(tokenizer):
    prompt = tokenizer.encode("Hello")
    (x,) = tokenizer.encode("x", add_special_tokens=False)
    logprobs = TokenLogprobs(tokenizer, (EOS,), SamplingParams(logprobs=1, ignore_eos=True))
    (entry,) = logprobs.new_entries(output(prompt, [x], 1, [{x: -1.0, EOS: -0.5}]))
    assert entry.top == (("</s>", -0.5),)   # an alternative, by name; the sampled x is not in the top 1
    (entry,) = logprobs.new_entries(output(prompt, [x, EOS], 1, [{x: -1.0, EOS: -0.5}, {EOS: -0.1}]))
    assert entry.token == ""   # ignore_eos: EOS is decoded like any token (special tokens are skipped)


def test_nothing_unless_asked_and_no_infinities_in_json(tokenizer):
    prompt = tokenizer.encode("Hello")
    (x,) = tokenizer.encode("x", add_special_tokens=False)
    assert TokenLogprobs(tokenizer, (EOS,), SamplingParams()).new_entries(output(prompt, [x], 1, None)) is None
    logprobs = TokenLogprobs(tokenizer, (EOS,), SamplingParams(logprobs=1))
    (entry,) = logprobs.new_entries(output(prompt, [x], 1, [{x: float("-inf"), 5: float("nan")}]))
    assert entry.logprob == MIN_LOGPROB and entry.top[0][1] == MIN_LOGPROB
    json.dumps(dataclasses.asdict(entry), allow_nan=False)


@pytest.mark.parametrize("chunk", [1, 3])
def test_entries_join_to_the_engines_text_and_carry_its_logprobs(make_engine, tokenizer, chunk):
    """Sampled outputs of the tiny random model (split characters, out-of-vocabulary ids, EOS), replayed in chunks
    of `chunk` tokens as a stream would deliver them."""
    engine = make_engine()
    for seed in range(6):
        out = engine.generate("Once upon a time", SamplingParams(max_tokens=24, temperature=1.0, seed=seed,
                                                                 logprobs=3))[0]
        logprobs = TokenLogprobs(engine.tokenizer, engine.eos_token_ids, SamplingParams(logprobs=3))
        entries = []
        for end in range(chunk, len(out.token_ids) + chunk, chunk):
            end = min(end, len(out.token_ids))
            partial = dataclasses.replace(out, token_ids=out.token_ids[:end], logprobs=out.logprobs[:end],
                                          new_token_ids=out.token_ids[len(entries):end],
                                          finished=end == len(out.token_ids))
            entries += list(logprobs.new_entries(partial))
        assert "".join(e.token for e in entries) == out.text, seed
        assert [e.token_id for e in entries] == out.token_ids
        for e, step in zip(entries, out.logprobs, strict=True):
            assert e.logprob == step[e.token_id]
            values = [lp for _, lp in e.top]
            assert len(values) == 3 and values == sorted(values, reverse=True)
            assert values == sorted(step.values(), reverse=True)[:3]
