"""Held-out exact match of the base model and adapters on a task, with LoRAFleet's own engine (greedy)."""

from __future__ import annotations

from pathlib import Path

from lorafleet.training.tasks import TASKS, exact_match


def heldout_accuracy(base_dir: str | Path, task: str, adapters: dict[str, Path], *, seed: int = 0,
                     num_train: int = 512, num_heldout: int = 40) -> dict[str | None, float]:
    """{None (the base model): accuracy, adapter id: accuracy} on the task's held-out prompts, as served by chat."""
    from lorafleet.replicas import Engine, SamplingParams

    _, heldout = TASKS[task].split(seed, num_train, num_heldout)
    engine = Engine.from_pretrained(base_dir, kernel_backend="torch", max_num_seqs=32, max_adapters=8,
                                    max_rank=max(64, _max_rank(adapters)))
    try:
        for adapter_id, path in adapters.items():
            engine.load_adapter(adapter_id, path)
        tokenizer = engine.tokenizer
        prompts = [tokenizer.apply_chat_template([{"role": "user", "content": e.prompt}]) for e in heldout]
        longest = max(len(tokenizer.encode(e.answer, add_special_tokens=False)) for e in heldout)
        params = SamplingParams(max_tokens=longest + 8, temperature=0.0)
        scores: dict[str | None, float] = {}
        for adapter_id in [None, *adapters]:
            outs = engine.generate(prompts, params, [adapter_id] * len(prompts))
            hits = sum(exact_match(o.text, e.answer) for o, e in zip(outs, heldout, strict=True))
            scores[adapter_id] = hits / len(heldout)
        return scores
    finally:
        engine.close()


def _max_rank(adapters: dict[str, Path]) -> int:
    import json

    ranks = [json.loads((Path(p) / "adapter_config.json").read_text()).get("r", 1) for p in adapters.values()]
    return max((r for r in ranks if isinstance(r, int)), default=1)
