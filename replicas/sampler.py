"""Sampler: greedy, temperature, top-k, top-p, per-request seeded generators, optional logprobs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lorafleet.replicas.sampling_params import SamplingParams


@dataclass(frozen=True, slots=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[dict[int, float] | None]   # per row: {token: logprob} of the sampled + top-k tokens


class Sampler:
    """One call per step over the rows that need a token. Rows with a seed draw from their own generator,
    so a seeded request gives the same tokens whatever else is in the batch."""

    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def new_generator(self, seed: int) -> torch.Generator:
        gen = torch.Generator(device=self.device)
        gen.manual_seed(seed)
        return gen

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams],
                 generators: list[torch.Generator | None]) -> SampleResult:
        """logits [B, V] float32; params and generators: one per row."""
        num_rows = logits.shape[0]
        tokens = torch.argmax(logits, dim=-1)
        sampled_rows = [i for i, p in enumerate(params) if not p.is_greedy]
        if sampled_rows:
            rows = torch.tensor(sampled_rows, device=logits.device)
            probs = self._filtered_probs(logits.index_select(0, rows), [params[i] for i in sampled_rows])
            # Exponential race (Gumbel-max in disguise): argmax p / E, E ~ Exp(1) drawn from each row's generator.
            noise = torch.empty_like(probs)
            for j, i in enumerate(sampled_rows):
                noise[j].exponential_(generator=generators[i] or self.generator)
            tokens[rows] = torch.argmax(probs / noise, dim=-1)
        token_list = tokens.tolist()
        logprobs: list[dict[int, float] | None] = [None] * num_rows
        wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
        if wanted:
            rows = torch.tensor(wanted, device=logits.device)
            log_probs = torch.log_softmax(logits.index_select(0, rows), dim=-1)
            top = log_probs.topk(max(params[i].logprobs or 0 for i in wanted), dim=-1)
            for j, i in enumerate(wanted):
                entry = {token_list[i]: float(log_probs[j, token_list[i]])}
                n = params[i].logprobs or 0
                entry.update(zip(top.indices[j, :n].tolist(), top.values[j, :n].tolist(), strict=True))
                logprobs[i] = entry
        return SampleResult(token_list, logprobs)

    @staticmethod
    def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
        """Softmax of logits / temperature with top-k and top-p (nucleus) applied; [B, V] float32."""
        temps = torch.tensor([p.temperature for p in params], device=logits.device).unsqueeze(1)
        logits = logits / temps
        if any(p.top_k for p in params) or any(p.top_p < 1 for p in params):
            sorted_logits, order = logits.sort(dim=-1, descending=True)
            vocab = logits.shape[-1]
            top_k = torch.tensor([p.top_k or vocab for p in params], device=logits.device).unsqueeze(1)
            ranks = torch.arange(vocab, device=logits.device).unsqueeze(0)
            drop = ranks >= top_k
            sorted_probs = torch.softmax(sorted_logits.masked_fill(drop, float("-inf")), dim=-1)
            top_p = torch.tensor([p.top_p for p in params], device=logits.device).unsqueeze(1)
            # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
            drop |= (sorted_probs.cumsum(dim=-1) - sorted_probs) >= top_p
            sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
            logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
        return torch.softmax(logits, dim=-1)
