"""What a request costs a vLLM replica of the live fleet, by max_lora_rank: python benchmarks/vllm_fleet_costs.py

The live vLLM benchmark's model and adapters (cluster/demo_target.prepare_vllm_fleet: the `small` preset cut to 2
layers, 12 all-linear LoRA adapters of ranks 8-64), one vLLM engine per max_lora_rank (16 and 64) from .venv-vllm,
pinned like this process, 1 OpenMP thread. The same requests (~30-token prompts, 8 output tokens, batches of
max_num_seqs 8) run for the low ranks (<= 16) at 16 and at 64 and for the high ranks at 64, interleaved, CPU
seconds per request (median of the repeats). From those costs and the fleet's traffic mix (uniform over its
adapters) it derives the rank-class table's share (the low ranks' weight on the class-16 replica that balances the
two replicas' loads) and each fleet's capacity if CPU time were all there is: the rank classes against two
replicas at 64 with a balanced table. Prints a table; writes benchmarks/results/vllm-fleet-costs-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

from standalone import load_packages  # benchmarks/ is sys.path[0] when run as a script

load_packages("benchmarks")   # and takes benchmarks/ off sys.path (its kernels.py would shadow packages)

from lorafleet.benchmarks.results import write_result  # noqa: E402
from lorafleet.benchmarks.vllm_engine import DEFAULT_PYTHON, RemoteVllmRunner  # noqa: E402
from lorafleet.cluster.demo_target import VLLM_FLEET_CLASSES, prepare_vllm_fleet  # noqa: E402


def fleet_model(low: float, low_at_64: float, high_at_64: float, low_fraction: float) -> dict[str, float]:
    """Load balance of the two fleets from seconds per request: low ranks at the low class (`low`) and at 64, high
    ranks at 64; `low_fraction` of the requests have a low rank.

    Rank classes: replica 1 (class 64) takes every high-rank request and a fraction x of all requests from the low
    ranks; replica 0 (the low class) the rest. x balances the two (x = 0 when replica 1 is the busier even so).
    Capacity = requests per second at which the busier replica is fully used. Plain fleet: both at 64, balanced."""
    p_low, p_high = low_fraction, 1.0 - low_fraction
    x = max(0.0, min(p_low, (p_low * low - p_high * high_at_64) / (low + low_at_64)))
    classes = 1.0 / max((p_low - x) * low, p_high * high_at_64 + x * low_at_64)
    plain = 2.0 / (p_low * low_at_64 + p_high * high_at_64)
    return {"low_share_on_class_replica": (p_low - x) / p_low if p_low else 0.0,
            "classes_req_per_s": classes, "plain_req_per_s": plain, "ratio": classes / plain}


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", type=Path, default=Path(".lorafleet/vbench"), help="where the fleet's assets live")
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out-dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    model_dir, adapters = prepare_vllm_fleet(args.root)
    low_class = VLLM_FLEET_CLASSES[0]
    ranks = {a: int(a.rsplit("-r", 1)[1]) for a in adapters}
    low, high = [a for a in adapters if ranks[a] <= low_class], [a for a in adapters if ranks[a] > low_class]
    rng = random.Random(0)

    def requests(ids: list[str]) -> list[tuple[list[int], str]]:
        return [([rng.randrange(100, 8000) for _ in range(30)], ids[i % len(ids)]) for i in range(args.requests)]

    loads = {"low": requests(low), "high": requests(high)}
    runs = {f"low@{low_class}": (low_class, "low"), "low@64": (64, "low"), "high@64": (64, "high")}
    runners = {r: RemoteVllmRunner(model_dir, adapters, python=DEFAULT_PYTHON, num_threads=1, max_lora_rank=r,
                                   max_num_seqs=8, max_batched_tokens=512, max_model_len=512, device="cpu",
                                   dtype="float32", seed=0) for r in sorted({low_class, 64})}
    samples: dict[str, list[float]] = {name: [] for name in runs}
    try:
        for _ in range(args.repeats):
            for name, (rank, load) in runs.items():
                _, cpu_s = runners[rank].generate(loads[load], 8)
                samples[name].append(cpu_s / args.requests)
    finally:
        for runner in runners.values():
            runner.close()
    costs = {name: statistics.median(s) for name, s in samples.items()}
    model = fleet_model(costs[f"low@{low_class}"], costs["low@64"], costs["high@64"], len(low) / len(adapters))
    result = {"model_dir": str(model_dir), "adapter_ranks": ranks, "requests": args.requests, "output_tokens": 8,
              "prompt_tokens": 30, "max_num_seqs": 8, "threads": 1, "cpu_s_per_request": costs,
              "samples": samples, "fleet": model}
    path = write_result("vllm-fleet-costs", result, args.out_dir)
    print("| requests | max_lora_rank | CPU ms per request |\n|---|---|---|")
    for name, (rank, load) in runs.items():
        print(f"| {load} ranks | {rank} | {1e3 * costs[name]:.1f} |")
    print(f"\nlow ranks' share on the class-{low_class} replica that balances the loads: "
          f"{model['low_share_on_class_replica']:.3f}; CPU-bound capacity: rank classes "
          f"{model['classes_req_per_s']:.1f} req/s, two replicas at 64 {model['plain_req_per_s']:.1f} req/s "
          f"({model['ratio']:.2f}x)\nraw JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
