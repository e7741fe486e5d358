"""Operating points of this engine: max tokens/s per rank class under the SLO, measured on the engine itself.

Closed-loop batches: for batch sizes 1, 2, 4, ... up to max_num_seqs, B requests with a rank-r adapter are submitted
at once; each one's TTFT and TPOT come from the engine's request metrics. A rank class's operating point is the
best tokens/s (prompt + output) of a batch size whose P95 TTFT and P95 TPOT both meet the SLO. The result is the
operating-points JSON of lorafleet.placement.operating_points (the solver's capacities), as a plain dict: the
replicas layer does not import placement.

`lorafleet profile --model DIR` runs it for an operator; a served app's replica of rank 0 runs it on first start
(replicas/deployment.py), cached per model, device and engine settings (`cache_key`).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lorafleet.infra.errors import InvalidModel
from lorafleet.replicas.engine import Engine
from lorafleet.replicas.sampling_params import SamplingParams

RANK_CLASSES = (8, 16, 32, 64, 128)
PROBE_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True, slots=True)
class ProfileSpec:
    """What to measure: rank classes, the SLO, the probe requests' lengths, the largest batch."""

    ranks: tuple[int, ...] = RANK_CLASSES
    slo_ttft_s: float = 1.0
    slo_tpot_s: float = 0.1
    prompt_tokens: int = 128
    output_tokens: int = 32
    max_batch: int = 64

    def __post_init__(self) -> None:
        if not self.ranks or min(self.ranks) < 1:
            raise ValueError("profile: ranks must be integers >= 1")
        if not (self.slo_ttft_s > 0 and self.slo_tpot_s > 0) or self.prompt_tokens < 1 or self.output_tokens < 2 \
                or self.max_batch < 1:
            raise ValueError("profile: need SLOs > 0, prompt_tokens >= 1, output_tokens >= 2, max_batch >= 1")


def cache_key(engine: Engine, spec: ProfileSpec) -> str:
    """Same model (config + weights file sizes), device, dtype, batching limits and probe: same operating points."""
    config = engine.config
    parts = {
        "model_config": (engine.model_dir / "config.json").read_text(),
        "weights": sorted((p.name, p.stat().st_size) for p in engine.model_dir.glob("*.safetensors")),
        "engine": {k: getattr(config, k) for k in ("device", "dtype", "max_num_seqs", "max_batched_tokens",
                                                     "kv_block_size", "kernel_backend", "host_cache_max_bytes")},
        "spec": [spec.ranks, spec.slo_ttft_s, spec.slo_tpot_s, spec.prompt_tokens, spec.output_tokens, spec.max_batch],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def profile_engine(engine: Engine, spec: ProfileSpec) -> dict:
    """Measure and return the operating-points document (see the module docstring). Loads one probe adapter per
    rank class into the engine and unloads them afterwards; run it while the engine serves nothing else."""
    from lorafleet.infra.adapter_maker import make_adapter

    ranks = tuple(r for r in spec.ranks if r <= engine.config.max_rank) or (min(spec.ranks),)
    max_batch = min(spec.max_batch, engine.config.max_num_seqs)
    probe = engine.tokenizer.encode("hello world", add_special_tokens=False)[:1] or [0]
    prompt = probe * spec.prompt_tokens
    params = SamplingParams(max_tokens=spec.output_tokens, temperature=0.0, ignore_eos=True)
    points, bytes_per_rank, trace = {}, [], {}

    def run(batch: int, adapter_id: str) -> tuple[float, float, float]:
        start = time.perf_counter()
        outs = engine.generate([prompt] * batch, params=params, adapters=[adapter_id] * batch)
        wall = time.perf_counter() - start
        failed = [o for o in outs if o.finish_reason == "error"]
        if failed:
            raise InvalidModel(f"profiling adapter {adapter_id} failed: {failed[0].error}")
        ttft = [o.metrics.time_to_first_token for o in outs]
        tpot = [(o.metrics.finish_time - o.metrics.first_token_time) / max(len(o.token_ids) - 1, 1) for o in outs]
        tokens = sum(len(o.prompt_token_ids) + len(o.token_ids) for o in outs)
        return float(np.percentile(ttft, 95)), float(np.percentile(tpot, 95)), tokens / wall

    with tempfile.TemporaryDirectory() as tmp:
        try:
            for rank in ranks:
                path = make_adapter(Path(tmp) / f"r{rank}", engine.model_dir, "lora", rank, list(PROBE_TARGETS),
                                    seed=rank)
                bytes_per_rank.append(sum(f.stat().st_size for f in Path(path).iterdir()) / rank)
                engine.load_adapter(f"profile-r{rank}", str(path))
            run(1, f"profile-r{ranks[0]}")  # warm-up: first-call allocation is not serving time
            for rank in ranks:
                adapter_id, best, batch = f"profile-r{rank}", 0.0, 1
                while batch <= max_batch:
                    ttft, tpot, tokens_per_s = run(batch, adapter_id)
                    trace[f"r{rank}-b{batch}"] = {"p95_ttft_s": ttft, "p95_tpot_s": tpot,
                                                   "tokens_per_s": tokens_per_s}
                    if ttft > spec.slo_ttft_s or tpot > spec.slo_tpot_s:
                        break
                    best = max(best, tokens_per_s)
                    batch *= 2
                # Even one request missing the SLO is a capacity: the rate a single sequence sustains.
                points[rank] = best or trace[f"r{rank}-b1"]["tokens_per_s"]
        finally:
            for rank in ranks:
                engine.unload_adapter(f"profile-r{rank}")
    per_rank = int(max(bytes_per_rank))
    config = engine.config
    return {
        "source": f"engine profile of {engine.model_dir} ({config.device}, {config.dtype})",
        "slo": {"p95_ttft_s": spec.slo_ttft_s, "p95_tpot_s": spec.slo_tpot_s},
        "points": [{"rank": r, "max_tokens_per_s": round(points[r], 3)} for r in sorted(points)],
        # The adapters a replica holds ready: its host tier (the device pool is a cache over it, swapped per
        # request); sizes in the registry's units (file bytes); per rank: a q,k,v,o probe's file.
        "memory": {"max_adapter_bytes": config.host_cache_max_bytes, "adapter_bytes_per_rank": per_rank},
        "device_pool_rows": config.num_pool_rows,
        "method": "closed-loop batches of 1, 2, 4, ... requests; P95 TTFT and TPOT from request metrics",
        "prompt_tokens": spec.prompt_tokens, "output_tokens": spec.output_tokens, "max_batch": max_batch,
        "device": config.device, "dtype": config.dtype, "probes": trace,
        "is_slo_met": all(trace[f"r{r}-b1"]["p95_ttft_s"] <= spec.slo_ttft_s
                          and trace[f"r{r}-b1"]["p95_tpot_s"] <= spec.slo_tpot_s for r in points),
    }


def ensure_profile(engine: Engine, capacities, profile_dir: str | Path, spec: ProfileSpec) -> dict:
    """The served app's capacities on first start: the document in Redis when it is for this model, device and
    settings; else the cached file of a previous start; else a fresh profile (cached). Published to `capacities`
    (an infra.capacity_store.CapacityStore) for the placement controller; returns what it published."""
    key = cache_key(engine, spec)
    current = capacities.get()
    if current is not None and current.get("key") == key:
        return current
    path = Path(profile_dir).resolve() / f"{key}.json"
    if path.is_file():
        points = json.loads(path.read_text())
    else:
        points = profile_engine(engine, spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(points, indent=2) + "\n")
        tmp.replace(path)   # atomic: a replica starting beside this one never reads half a file
    capacities.put(key, str(path), points)
    return {"key": key, "file": str(path), "points": points}
