"""TokenLogprobs: one request's per-token logprobs as plain data with decoded token strings, for the router."""

from __future__ import annotations

from collections.abc import Collection

from lorafleet.infra.replica_api import TokenLogprob
from lorafleet.replicas.outputs import RequestOutput
from lorafleet.replicas.sampling_params import SamplingParams
from lorafleet.replicas.tokenizer import IncrementalDetokenizer, Tokenizer

# JSON has no -inf or NaN; OpenAI-compatible servers (vLLM) clamp to this.
MIN_LOGPROB = -9999.0


class TokenLogprobs:
    """Turns the engine's logprobs ({token_id: logprob} of the sampled token and the top k, one per output token)
    into TokenLogprob entries (token text, id, logprob, top-k (text, logprob)) for the new tokens of each output.

    The sampled tokens' strings come from an incremental detokenizer fed exactly as the engine feeds its own
    (EOS and stop tokens flush instead of adding; the last token flushes), so they join to the engine's text
    (before a stop string is cut): a token that ends inside a UTF-8 character is "" and the next one carries the
    whole character. The top-k alternatives are decoded in the same context, incomplete characters as U+FFFD and
    special tokens by name (so that they are not all "").
    `top` holds the k most likely tokens, most likely first; the sampled token may or may not be among them.
    """

    def __init__(self, tokenizer: Tokenizer, eos_token_ids: Collection[int], params: SamplingParams) -> None:
        self.tokenizer = tokenizer
        self.params = params
        self.ends = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        self.detok: IncrementalDetokenizer | None = None

    def new_entries(self, out: RequestOutput) -> tuple[TokenLogprob, ...] | None:
        """Entries of out.new_token_ids; None when the request asked for no logprobs."""
        if out.logprobs is None or self.params.logprobs is None:
            return None
        if self.detok is None:
            self.detok = self.tokenizer.detokenizer(out.prompt_token_ids, self.params.skip_special_tokens)
        start = len(out.token_ids) - len(out.new_token_ids)
        num_top = self.params.logprobs
        entries = []
        for i, (token_id, logprobs) in enumerate(zip(out.new_token_ids, out.logprobs[start:], strict=True)):
            top = sorted(logprobs.items(), key=lambda kv: kv[1], reverse=True)[:num_top]
            alternatives = {t: self._alternative(t) for t, _ in top if t != token_id}  # before the detok moves on
            token = self.detok.flush() if token_id in self.ends else self.detok.add(token_id)
            if out.finished and i == len(out.new_token_ids) - 1:
                token += self.detok.flush()
            entries.append(TokenLogprob(token, token_id, _clamp(logprobs[token_id]),
                                        tuple((alternatives.get(t, token), _clamp(lp)) for t, lp in top)))
        return tuple(entries)

    def _alternative(self, token_id: int) -> str:
        """The text `token_id` would add here, were it sampled instead (U+FFFD for an incomplete character)."""
        detok = self.detok
        assert detok is not None
        prefix = self.tokenizer.decode(detok.tokens[detok.prefix_offset:detok.read_offset], False)
        window = self.tokenizer.decode([*detok.tokens[detok.prefix_offset:], token_id], False)
        return window[len(prefix):]


def _clamp(logprob: float) -> float:
    return logprob if logprob >= MIN_LOGPROB else MIN_LOGPROB  # NaN compares False: clamped too
