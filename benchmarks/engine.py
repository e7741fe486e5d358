"""Engine benchmark: tokens/s, TTFT and TPOT as the number of distinct adapters grows, against two baselines
(HF PEFT mixed-adapter batches via `adapter_names=`, and this engine serving one adapter at a time)."""

from __future__ import annotations

import functools
import hashlib
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from lorafleet.benchmarks import engine_vllm
from lorafleet.benchmarks.engine_profile import profile_decode
from lorafleet.replicas.config import EngineConfig
from lorafleet.replicas.engine import Engine
from lorafleet.replicas.sampling_params import SamplingParams
from lorafleet.replicas.weights import ModelConfig


@dataclass(frozen=True, slots=True)
class BenchSpec:
    """A fixed workload: num_requests prompts of prompt_tokens, each generating exactly output_tokens;
    request i uses adapter i mod N (so min(N, num_requests) adapters are in use), all arriving at once."""

    num_requests: int = 256
    prompt_tokens: int = 64
    output_tokens: int = 64
    adapter_counts: tuple[int, ...] = (1, 8, 64, 512)
    rank: int = 8
    mixed_ranks: tuple[int, ...] = (8, 16, 32, 64)
    targets: tuple[str, ...] = ("q_proj", "v_proj")   # PEFT's default LoRA targets for Llama
    max_num_seqs: int = 64
    baseline_adapters: int = 64                        # N of the HF PEFT and swap-per-batch baselines
    vllm_max_lora_ranks: tuple[int, ...] = (64, 8)     # one vLLM engine each, when vllm imports
    seed: int = 0


PRESETS: dict[str, BenchSpec] = {
    "full": BenchSpec(),
    "quick": BenchSpec(num_requests=64, prompt_tokens=32, output_tokens=32, adapter_counts=(1, 8, 64),
                       max_num_seqs=32, baseline_adapters=8),
}

Request = tuple[list[int], str | None]
SWAP = "baseline: ours, one adapter per batch"
HF_PEFT = "baseline: HF PEFT adapter_names="
SAME = "ours on the baselines' workload"
FP32_BASE = "base model, float32"


def adapter_id(rank: int, index: int) -> str:
    return f"r{rank}-{index:04d}"


def workload(spec: BenchSpec, num_adapters: int, ranks: tuple[int, ...] | None, vocab_size: int) -> list[Request]:
    """Seeded prompts (same for every run); adapter i mod N with rank ranks[i mod len] (None: base model)."""
    rng = random.Random(spec.seed)
    requests = []
    for i in range(spec.num_requests):
        prompt = [0] + [rng.randrange(5, vocab_size) for _ in range(spec.prompt_tokens - 1)]
        index = i % num_adapters
        requests.append((prompt, None if ranks is None else adapter_id(ranks[index % len(ranks)], index)))
    return requests


def make_assets(work_dir: Path, model_dir: Path, needed: set[str], targets: tuple[str, ...]) -> dict[str, Path]:
    """PEFT-format LoRA directories for the adapter ids the runs use (kept in work_dir between runs)."""
    from lorafleet.infra.adapter_maker import make_adapter

    base = hashlib.sha256((model_dir / "config.json").read_bytes()).hexdigest()[:8]   # adapters fit one base
    paths = {}
    for name in sorted(needed):
        rank, index = int(name[1:].split("-")[0]), int(name.split("-")[1])
        path = work_dir / f"adapters-{base}" / f"{name}-{'-'.join(targets)}"
        if not (path / "adapter_model.safetensors").is_file():
            make_adapter(path, model_dir, "lora", rank, list(targets), seed=rank * 100_000 + index)
        paths[name] = path
    return paths


def _summary(name: str, requests: list[Request], outs, wall_s: float, t0: float, spec: BenchSpec,
             flops_per_token: float, cpu_s: float) -> dict:
    ttft = [o.metrics.first_token_time - t0 for o in outs]
    tpot = [(o.metrics.finish_time - o.metrics.first_token_time) / max(1, len(o.token_ids) - 1) for o in outs]
    assert all(len(o.token_ids) == spec.output_tokens for o in outs), "every request must generate output_tokens"
    num_out = sum(len(o.token_ids) for o in outs)
    num_total = num_out + sum(len(p) for p, _ in requests)
    return {
        "name": name, "num_adapters": len({a for _, a in requests if a}), "wall_s": wall_s, "cpu_s": cpu_s,
        "output_tokens_per_s": num_out / wall_s, "output_tokens_per_cpu_s": num_out / cpu_s,
        "total_tokens_per_s": num_total / wall_s,
        "ttft_mean_s": statistics.mean(ttft), "ttft_p95_s": sorted(ttft)[int(0.95 * (len(ttft) - 1))],
        "tpot_mean_ms": 1e3 * statistics.mean(tpot), "gflops": flops_per_token * num_total / wall_s / 1e9,
    }


def run_engine(engine: Engine, name: str, requests: list[Request], spec: BenchSpec, flops_per_token: float) -> dict:
    params = SamplingParams(max_tokens=spec.output_tokens, temperature=0.0, ignore_eos=True)
    t0, cpu = time.monotonic(), time.process_time()   # process CPU time: the core's neighbours left out
    outs = engine.generate([p for p, _ in requests], params, adapters=[a for _, a in requests])
    result = _summary(name, requests, outs, time.monotonic() - t0, t0, spec, flops_per_token,
                      time.process_time() - cpu)
    return result | {"num_preemptions": sum(o.metrics.num_preemptions for o in outs)}


def run_swap_baseline(engine: Engine, requests: list[Request], spec: BenchSpec, flops_per_token: float) -> dict:
    """One adapter at a time: requests grouped by adapter (first-come order), one batch per adapter."""
    params = SamplingParams(max_tokens=spec.output_tokens, temperature=0.0, ignore_eos=True)
    groups: dict[str | None, list[int]] = {}
    for i, (_, a) in enumerate(requests):
        groups.setdefault(a, []).append(i)
    outs: list = [None] * len(requests)
    t0, cpu = time.monotonic(), time.process_time()
    for a, indices in groups.items():
        for i, out in zip(indices, engine.generate([requests[i][0] for i in indices], params, adapters=a),
                          strict=True):
            outs[i] = out
    return _summary(SWAP, requests, outs, time.monotonic() - t0, t0, spec, flops_per_token,
                    time.process_time() - cpu)


def hf_peft_model(model_dir: Path, names: list[str], paths: dict[str, Path], device: str, dtype: torch.dtype):
    """transformers model with every adapter of `names` loaded into one PeftModel."""
    import transformers
    from peft import PeftModel

    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    base = base.to(device).eval()  # type: ignore[arg-type]
    model = PeftModel.from_pretrained(base, paths[names[0]], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(paths[name], adapter_name=name)
    return model.eval()


def run_hf_peft_baseline(model, requests: list[Request], spec: BenchSpec, device: str,
                         flops_per_token: float) -> dict:
    """Static batches of max_num_seqs requests, each token's adapter chosen by generate(adapter_names=...)."""
    t0 = time.monotonic()
    with torch.inference_mode():
        for lo in range(0, len(requests), spec.max_num_seqs):
            batch = requests[lo:lo + spec.max_num_seqs]   # equal prompt lengths: no padding needed
            ids = torch.tensor([p for p, _ in batch], device=device)
            out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                                 adapter_names=[a for _, a in batch], max_new_tokens=spec.output_tokens,
                                 min_new_tokens=spec.output_tokens, do_sample=False, pad_token_id=2)
            assert out.shape[1] == ids.shape[1] + spec.output_tokens
    wall = time.monotonic() - t0
    num_out = spec.output_tokens * len(requests)
    num_total = num_out + sum(len(p) for p, _ in requests)
    return {"name": HF_PEFT, "num_adapters": len({a for _, a in requests if a}), "wall_s": wall,
            "output_tokens_per_s": num_out / wall, "total_tokens_per_s": num_total / wall,
            "gflops": flops_per_token * num_total / wall / 1e9}


def flops_per_token(config: ModelConfig) -> float:
    """2 x the matmul parameters a token passes through (attention scores left out)."""
    d, h = config.hidden_size, config.head_dim
    per_layer = d * h * (2 * config.num_heads + 2 * config.num_kv_heads) + 3 * d * config.intermediate_size
    return 2.0 * (config.num_layers * per_layer + config.vocab_size * d)


def run_engine_bench(model_dir: str | Path | None = None, *, quick: bool = False, spec: BenchSpec | None = None,
                     preset: str = "small", device: str = "cpu", dtype: str = "float32",
                     work_dir: str | Path = ".lorafleet/bench-engine", baselines: bool = True,
                     repeats: int | None = None) -> dict:
    """Run the workload for base, each adapter count (rank spec.rank) and mixed ranks, then the baselines (and the
    base model in float32 when dtype is not, and vLLM's runs when vllm imports); every run `repeats` times,
    interleaved (a shared machine drifts), reporting each run's median. On a CPU, then a decode-step profile of
    the base model and of the most adapters (benchmarks.engine_profile).
    Returns plain data (the caller writes it with benchmarks.results.write_result and prints the table);
    runs on torch's current CPU threads."""
    from lorafleet.replicas.checkpoint import make_model

    spec = spec or PRESETS["quick" if quick else "full"]
    work_dir = Path(work_dir)
    if model_dir is None:
        from lorafleet.replicas.pretrained import PRETRAINED, ensure

        if preset in PRETRAINED:   # a real model: dequantized once into the shared cache
            model_dir = ensure(preset)
        else:
            model_dir = work_dir / f"model-{preset}"
            if not (model_dir / "config.json").is_file():
                make_model(model_dir, preset, seed=0)
    model_dir = Path(model_dir)
    top = max(spec.adapter_counts)
    runs: list[tuple[str, tuple[int, ...] | None, int]] = [("base model", None, 1)]
    runs += [(f"{n} adapters r{spec.rank}", (spec.rank,), n) for n in spec.adapter_counts]
    runs.append((f"{top} adapters r{'/'.join(map(str, spec.mixed_ranks))}", spec.mixed_ranks, top))
    vocab = ModelConfig.from_model_dir(model_dir).vocab_size
    loads = {name: workload(spec, n, ranks, vocab) for name, ranks, n in runs}
    baseline_load = workload(spec, spec.baseline_adapters, (spec.rank,), vocab)
    needed = {a for reqs in [*loads.values(), baseline_load] for _, a in reqs if a}
    paths = make_assets(work_dir, model_dir, needed, spec.targets)

    max_model_len = spec.prompt_tokens + spec.output_tokens + 16
    common = dict(device=device, dtype=dtype, max_num_seqs=spec.max_num_seqs, target_modules=spec.targets,
                  max_batched_tokens=max(2048, spec.max_num_seqs), max_rank=max(spec.mixed_ranks),
                  max_model_len=max_model_len)
    # KV blocks for what the workload can hold at once: several engines share one GPU in this run (each would
    # otherwise take gpu_memory_utilization of it), and the CPU default is already larger than this.
    kv_blocks = spec.max_num_seqs * (-(-max_model_len // EngineConfig().kv_block_size) + 1)
    engine = Engine.from_pretrained(model_dir, max_adapters=spec.max_num_seqs, num_kv_blocks=kv_blocks, **common,
                                    adapter_pool_rows=spec.max_num_seqs * max(spec.mixed_ranks))
    fpt = flops_per_token(engine.model_config)
    t_load = time.monotonic()
    for name, path in paths.items():
        engine.load_adapter(name, path)      # host tier: every adapter validated and in host memory
    load_s = time.monotonic() - t_load
    engine.generate([[0, 5, 6, 7]] * 4, SamplingParams(max_tokens=4, temperature=0.0))   # warm-up
    thunks: list[tuple[str, Callable[[], dict]]] = [
        (name, functools.partial(run_engine, engine, name, loads[name], spec, fpt)) for name, _, _ in runs]
    skipped = []
    if baselines:
        swap = Engine.from_pretrained(model_dir, max_adapters=1, adapter_pool_rows=max(spec.mixed_ranks),
                                      num_kv_blocks=kv_blocks, **common)
        baseline_names = sorted({a for _, a in baseline_load if a})
        for name in baseline_names:
            swap.load_adapter(name, paths[name])
        thunks.append((SWAP, lambda: run_swap_baseline(swap, baseline_load, spec, fpt)))
        try:
            hf = hf_peft_model(model_dir, baseline_names, paths, device, getattr(torch, dtype))
            thunks.append((HF_PEFT, lambda: run_hf_peft_baseline(hf, baseline_load, spec, device, fpt)))
        except ImportError as exc:
            skipped.append({"name": HF_PEFT, "skipped": repr(exc)})
        if spec.baseline_adapters not in spec.adapter_counts:   # else that run is the same workload already
            thunks.append((SAME, lambda: run_engine(engine, SAME, baseline_load, spec, fpt)))
    engines = [engine] + ([swap] if baselines else [])
    if dtype != "float32":   # the same run measures what the dtype buys over float32
        fp32 = Engine.from_pretrained(model_dir, max_adapters=1, num_kv_blocks=kv_blocks,
                                      **(common | {"dtype": "float32"}))
        engines.append(fp32)
        thunks.append((FP32_BASE, lambda: run_engine(fp32, FP32_BASE, loads["base model"], spec, fpt)))
    vllm_rows, vllm_skipped = _vllm_thunks(model_dir, paths, loads, runs, spec, common, fpt)
    thunks += vllm_rows
    repeats = repeats or (3 if spec.num_requests <= 64 else 1)
    samples: dict[str, list[dict]] = {name: [] for name, _ in thunks}
    for r in range(repeats):
        for name, thunk in thunks[r % len(thunks):] + thunks[:r % len(thunks)]:   # rotate the order
            samples[name].append(thunk())
    results = [_median(samples[name]) for name, _ in thunks if not name.startswith("vLLM")] + skipped
    vllm = {"runs": [_median(samples[name]) for name, _ in vllm_rows], "skipped": vllm_skipped}
    if vllm_rows:
        vllm["version"] = engine_vllm.version()
    profile = {}
    if device == "cpu":   # where a decode step's time goes, base model and the most adapters
        top = f"{max(spec.adapter_counts)} adapters r{spec.rank}"
        for name in ("base model", top):
            first = loads[name][:spec.max_num_seqs]
            profile[name] = profile_decode(engine, [p for p, _ in first], [a for _, a in first],
                                           max(1, spec.output_tokens - 4))
    for e in engines:
        e.close()
    return {
        "model": str(model_dir), "device": device, "dtype": dtype, "spec": asdict(spec),
        "adapter_load_s": load_s, "num_adapters_loaded": len(paths), "repeats": repeats, "runs": results,
        "goals": _goals(results, spec), "vllm": vllm, "decode_profile": profile,
    }


def _vllm_thunks(model_dir: Path, paths: dict[str, Path], loads: dict[str, list[Request]],
                 runs: list[tuple[str, tuple[int, ...] | None, int]], spec: BenchSpec, common: dict,
                 fpt: float) -> tuple[list[tuple[str, Callable[[], dict]]], list[str]]:
    """vLLM's timed runs for every max_lora_rank of the spec, when vllm imports; and why any are missing."""
    if not engine_vllm.is_available():
        return [], ["vllm is not installed"]
    ranks = {name: max(r) if r else 0 for name, r, _ in runs}
    thunks, skipped = [], []
    for max_lora_rank in spec.vllm_max_lora_ranks:
        try:
            runner = engine_vllm.VllmRunner(
                model_dir, paths, max_lora_rank=max_lora_rank, max_num_seqs=spec.max_num_seqs,
                max_batched_tokens=common["max_batched_tokens"], max_model_len=common["max_model_len"],
                device=common["device"], dtype=common["dtype"], seed=spec.seed)
            thunks += engine_vllm.vllm_thunks(runner, loads, ranks, spec.output_tokens, fpt)
        except Exception as exc:   # a vLLM that cannot start must not cost the rest of the benchmark
            skipped.append(f"max_lora_rank {max_lora_rank}: {exc!r}")
    return thunks, skipped


def _median(samples: list[dict]) -> dict:
    """The repeat with the median output tokens/s, with every repeat's tokens/s beside it."""
    ranked = sorted(samples, key=lambda r: r["output_tokens_per_s"])
    median = ranked[(len(ranked) - 1) // 2] | {
        "repeats_output_tokens_per_s": [r["output_tokens_per_s"] for r in samples]}
    if all("output_tokens_per_cpu_s" in r for r in samples):   # its own median (another repeat's, maybe)
        per_cpu = [r["output_tokens_per_cpu_s"] for r in samples]
        median |= {"repeats_output_tokens_per_cpu_s": per_cpu, "output_tokens_per_cpu_s": statistics.median(per_cpu)}
    return median


def _goals(results: list[dict], spec: BenchSpec) -> dict:
    """The ratios of issue 5 (issue 18's: many adapters / base, dtype / float32, ours / vLLM come from the runs
    in engine_report)."""
    tps: dict[str, float] = {r["name"]: r["output_tokens_per_s"] for r in results if "output_tokens_per_s" in r}
    base, one = tps["base model"], tps[f"1 adapters r{spec.rank}"]
    top = tps[f"{max(spec.adapter_counts)} adapters r{spec.rank}"]
    goals = {"one_adapter_vs_base": one / base, "many_adapters_vs_one": top / one}
    same = tps.get(SAME) or tps.get(f"{spec.baseline_adapters} adapters r{spec.rank}")
    for key, name in (("vs_hf_peft", HF_PEFT), ("vs_one_adapter_at_a_time", SWAP)):
        if same and tps.get(name):
            goals[key] = same / tps[name]
    return goals

