"""Where a decode step's time goes: the engine's parts timed in place, exclusive CPU time per part.

The parts are the callables the model, the runner and the engine call (looked up at call time), wrapped for
the profiled steps and restored after. With one torch thread every op runs synchronously on the calling
thread, so its thread CPU time is the op's time, and unlike wall time it leaves out the neighbours that share
the core. On a GPU the parts would need a sync each and are not meaningful (the caller skips them).
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import ModuleType
from typing import Any

from lorafleet.replicas import adapter_linear, model
from lorafleet.replicas.engine import Engine
from lorafleet.replicas.sampling_params import SamplingParams

OTHER = "rest: scheduler, embedding, outputs, Python"


class PartTimer:
    """Exclusive time per part: a part's time leaves out the parts it calls (LoRA inside q/k/v, ...)."""

    def __init__(self, clock: Callable[[], float] = time.thread_time) -> None:
        self.clock = clock
        self.seconds: dict[str, float] = defaultdict(float)
        self._children: list[float] = []

    def wrap(self, name: str, fn: Callable) -> Callable:
        clock = self.clock

        def timed(*args: Any, **kwargs: Any) -> Any:
            self._children.append(0.0)
            start = clock()
            try:
                return fn(*args, **kwargs)
            finally:
                elapsed = clock() - start
                self.seconds[name] += elapsed - self._children.pop()
                if self._children:
                    self._children[-1] += elapsed
        return timed


class _Timed:
    """A wrapped callable object that keeps its other attributes (AdapterLinear.split)."""

    def __init__(self, obj: Any, timed: Callable) -> None:
        self._obj, self._timed = obj, timed

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._timed(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._obj, name)


@contextmanager
def instrumented(engine: Engine, timer: PartTimer) -> Iterator[None]:
    """Wrap the parts of one engine (and the model module's functions) while the block runs."""
    undo: list[Callable[[], None]] = []

    def patch(owner: Any, key: str | int, name: str) -> None:
        if isinstance(key, int):   # an entry of a layer's list of AdapterLinears
            old = owner[key]
            owner[key] = _Timed(old, timer.wrap(name, old))
            undo.append(lambda: owner.__setitem__(key, old))
            return
        old = getattr(owner, key)
        is_own = isinstance(owner, ModuleType) or key in vars(owner)   # else a method of the class
        setattr(owner, key, _Timed(old, timer.wrap(name, old)))
        undo.append(lambda: setattr(owner, key, old) if is_own else delattr(owner, key))

    for key, name in (("rms_norm", "RMSNorm"), ("apply_rope", "RoPE"), ("apply_rope_rolled", "RoPE"),
                      ("silu_mul", "SiLU x up"), ("paged_attention", "attention (KV write, gather, SDPA)")):
        patch(model, key, name)
    patch(adapter_linear, "lora_delta", "LoRA delta (lora_delta)")
    patch(adapter_linear, "flora_linear", "FLoRA / IA3 (flora_linear)")
    llama = engine.runner.model
    for layer in llama.layers:
        for group, name in ((layer.qkv, "q/k/v GEMM"), (layer.gate_up, "gate/up GEMM")):
            for i in range(len(group)):
                patch(group, i, name)
        patch(layer, "o", "o GEMM")
        patch(layer, "down", "down GEMM")
    patch(llama, "lm_head", "lm_head GEMM")
    patch(engine.runner, "prepare", "prepare: batch, KV slots, adapter plans")
    patch(engine, "sampler", "sampler")
    try:
        yield
    finally:
        for restore in reversed(undo):
            restore()


def profile_decode(engine: Engine, prompts: list[list[int]], adapters: list[str | None], num_steps: int) -> dict:
    """Decode steps of one full batch (every prompt prefilled first): ms per step of each part, and their sum."""
    params = SamplingParams(max_tokens=num_steps + 3, temperature=0.0, ignore_eos=True)
    ids = [engine.add_request(p, params, a) for p, a in zip(prompts, adapters, strict=True)]
    while engine.scheduler.num_waiting or engine.scheduler.num_running < len(ids) or _prefilling(engine):
        engine.step()
    engine.step()   # one decode step untimed (first-touch of the step's buffers)
    timer = PartTimer()
    with instrumented(engine, timer):
        wall, cpu = time.perf_counter(), timer.clock()
        for _ in range(num_steps):
            engine.step()
        wall, cpu = time.perf_counter() - wall, timer.clock() - cpu
    while engine.has_unfinished():
        engine.step()
    parts = dict(timer.seconds)
    parts[OTHER] = cpu - sum(parts.values())
    return {"num_seqs": len(ids), "num_steps": num_steps, "step_wall_ms": 1e3 * wall / num_steps,
            "step_cpu_ms": 1e3 * cpu / num_steps,
            "parts_cpu_ms": {name: 1e3 * s / num_steps for name, s in sorted(parts.items(), key=lambda kv: -kv[1])}}


def _prefilling(engine: Engine) -> bool:
    return any(s.num_computed_tokens < s.num_tokens - 1 for s in engine.scheduler.running)
