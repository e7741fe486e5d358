"""Sampling: greedy, temperature, top-k, top-p, per-request seeds, logprobs; SamplingParams validation."""

from __future__ import annotations

import pytest
import torch

from lorafleet.replicas import SamplingParams
from lorafleet.replicas.sampler import Sampler


def _sampler(seed: int = 0) -> Sampler:
    return Sampler(torch.device("cpu"), seed)


def _draw(logits: torch.Tensor, params: SamplingParams, num: int, seed: int = 0) -> torch.Tensor:
    """num draws from one row, batched as num identical rows sharing the engine generator."""
    result = _sampler(seed)(logits.expand(num, -1).contiguous(), [params] * num, [None] * num)
    return torch.tensor(result.token_ids)


def test_greedy_is_argmax_and_logprobs_are_log_softmax():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    params = [SamplingParams(temperature=0.0, logprobs=3)] * 4
    result = _sampler()(logits, params, [None] * 4)
    assert result.token_ids == logits.argmax(-1).tolist()
    reference = torch.log_softmax(logits, -1)
    for row, entry in enumerate(result.logprobs):
        top = reference[row].topk(3)
        assert list(entry) == top.indices.tolist()   # the sampled (argmax) token is the first of the top-3
        assert list(entry.values()) == pytest.approx(top.values.tolist())


def test_temperature_sampling_follows_the_distribution():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    tokens = _draw(logits, SamplingParams(temperature=1.0), 20_000)
    observed = torch.bincount(tokens, minlength=4).float() / tokens.numel()
    torch.testing.assert_close(observed, torch.softmax(logits[0], -1), atol=0.015, rtol=0)
    hot = torch.bincount(_draw(logits, SamplingParams(temperature=2.0), 20_000), minlength=4).float() / 20_000
    torch.testing.assert_close(hot, torch.softmax(logits[0] / 2, -1), atol=0.015, rtol=0)


def test_top_k_and_top_p_cut_the_tail():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert set(_draw(logits, SamplingParams(top_k=2), 2000).tolist()) == {0, 1}
    assert set(_draw(logits, SamplingParams(top_p=0.75), 2000).tolist()) == {0, 1}    # 0.5 + 0.3 reaches 0.75
    assert set(_draw(logits, SamplingParams(top_p=0.9), 2000).tolist()) == {0, 1, 2}
    assert set(_draw(logits, SamplingParams(top_p=0.01), 200).tolist()) == {0}         # the top token stays
    counts = torch.bincount(_draw(logits, SamplingParams(top_k=2), 20_000), minlength=4).float() / 20_000
    torch.testing.assert_close(counts[:2], torch.tensor([0.5, 0.3]) / 0.8, atol=0.015, rtol=0)


def test_seeded_rows_ignore_their_neighbours():
    sampler = _sampler()
    logits = torch.randn(3, 100, generator=torch.Generator().manual_seed(1))
    seeded = SamplingParams(temperature=1.0, seed=42)
    draws = []
    for others in (0, 2):
        rows = torch.cat([logits[:1]] + [logits[1:]] * (others // 2))
        params = [seeded] + [SamplingParams(temperature=1.0)] * others
        gen = sampler.new_generator(42)
        draws.append([sampler(rows, params, [gen] + [None] * others).token_ids[0] for _ in range(20)])
    assert draws[0] == draws[1] and len(set(draws[0])) > 1


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(temperature=-1), dict(top_p=0), dict(top_p=1.5),
                                 dict(top_k=-1), dict(stop=[""]), dict(logprobs=-1)])
def test_invalid_params_are_clear_errors(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_engine_seeded_sampling_is_reproducible(make_engine):
    engine = make_engine()
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=1234, ignore_eos=True)
    prompt = [0, 437, 322, 16, 572, 5]
    first = engine.generate([prompt], params)[0].token_ids
    assert engine.generate([prompt], params)[0].token_ids == first
    # Same seed inside a busy batch (other requests unseeded) gives the same tokens.
    noisy = SamplingParams(max_tokens=16, temperature=1.0, ignore_eos=True)
    outs = engine.generate([[0, 9, 9], prompt, [0, 7]], [noisy, params, noisy])
    assert outs[1].token_ids == first
    other_seed = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, seed=99, ignore_eos=True)
    assert engine.generate([prompt], other_seed)[0].token_ids != first
