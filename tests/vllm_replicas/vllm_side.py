"""The vLLM side of tests/vllm_replicas (run by .venv-vllm/bin/python, not pytest): JSON job on stdin, JSON answers
on stdout.

Job: {"model_dir", "config": VllmConfig fields, "adapters": {id: dir}, "batches": [[[adapter or null, prompt ids,
max_tokens, logprobs or null, [stop strings]], ...], ...], "raw_batch": [[adapter or null, prompt ids, max_tokens]]}.
Each batch runs as one generate() call (all requests added before the first step, so they share batches). The
optional raw batch bypasses the base-request workaround (no LoRA for base rows, as vLLM's own API sends them).
Answers: {"batches": [[{"token_ids", "text", "finish_reason", "logprobs"}, ...], ...], "raw": [token ids, ...]}.
"""

from __future__ import annotations

import json
import sys


def main() -> None:
    job = json.load(sys.stdin)
    from lorafleet.replicas import SamplingParams
    from lorafleet.replicas.vllm_engine import VllmConfig, VllmEngine

    config = VllmConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in job["config"].items()})
    with VllmEngine(job["model_dir"], config) as engine:
        for adapter_id, path in job["adapters"].items():
            engine.load_adapter(adapter_id, path)
        answers = {"batches": [], "raw": []}
        for batch in job["batches"]:
            params = [SamplingParams(max_tokens=n, temperature=0.0, logprobs=lp, stop=tuple(stop))
                      for _, _, n, lp, stop in batch]
            outs = engine.generate([ids for _, ids, *_ in batch], params, [a for a, *_ in batch])
            answers["batches"].append([
                {"token_ids": o.token_ids, "text": o.text, "finish_reason": o.finish_reason,
                 "logprobs": None if o.logprobs is None else [{str(t): lp for t, lp in d.items()} for d in o.logprobs]}
                for o in outs])
        if job.get("raw_batch"):
            answers["raw"] = raw_generate(engine, job["raw_batch"])
    print(json.dumps(answers))


def raw_generate(engine, batch) -> list[list[int]]:
    """Greedy token ids through vLLM's LLMEngine directly, base rows without a LoRA (what the workaround avoids)."""
    from vllm import SamplingParams

    final: dict[str, list[int]] = {}
    for i, (adapter_id, ids, max_tokens) in enumerate(batch):
        lora = None if adapter_id is None else engine._lora_request(engine.adapters.held(adapter_id))
        engine.llm.add_request(f"raw-{i}", {"prompt_token_ids": ids}, SamplingParams(max_tokens=max_tokens,
                               temperature=0.0), lora_request=lora)
    while engine.llm.has_unfinished_requests():
        for out in engine.llm.step():
            if out.finished:
                final[out.request_id] = list(out.outputs[0].token_ids)
    return [final[f"raw-{i}"] for i in range(len(batch))]


if __name__ == "__main__":
    main()
