"""The fastest an engine could run the engine benchmark on this CPU: its weight GEMMs alone, at this core's rate.

    python benchmarks/cpu_gemm_floor.py [--preset small] [--engine-json benchmarks/results/engine-....json]

Times the model's linear layers (q/k/v, o, gate/up, down, lm_head: the shapes the engine runs, prepacked through
oneDNN like the engine's BaseLinear) at the step sizes of `lorafleet bench engine --quick` (prefill steps of
max_num_seqs x prompt_tokens rows, decode steps of max_num_seqs rows), each layer with its own weight so weights
stream from memory as in a real forward pass; then adds them up over the workload's steps. That sum is a floor for
ANY engine running these GEMMs in this dtype on this core: attention, norms, sampling and Python all come on top.
With an engine JSON (one holding vLLM's runs too) it sets the floor beside both engines' base-model wall times.
Prints a table; writes benchmarks/results/gemm-floor-<timestamp>.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from standalone import load_packages  # benchmarks/ is sys.path[0] when run as a script

load_packages("benchmarks")   # and takes benchmarks/ off sys.path (its kernels.py would shadow packages)

import torch  # noqa: E402

from lorafleet.benchmarks.engine import PRESETS as WORKLOADS  # noqa: E402
from lorafleet.benchmarks.results import write_result  # noqa: E402
from lorafleet.benchmarks.timing import bench  # noqa: E402
from lorafleet.kernels.base_linear import BaseLinear, can_prepack  # noqa: E402
from lorafleet.replicas.checkpoint import PRESETS as MODELS  # noqa: E402


def gemm_shapes(preset: str) -> dict[str, tuple[int, int, int]]:
    """Per GEMM of the engine's fused model: (d_in, d_out, copies per forward pass)."""
    m = MODELS[preset]
    d, hd, layers = m.hidden_size, m.head_dim, m.num_hidden_layers
    return {
        "q/k/v": (d, (m.num_attention_heads + 2 * m.num_key_value_heads) * hd, layers),
        "o": (m.num_attention_heads * hd, d, layers),
        "gate/up": (d, 2 * m.intermediate_size, layers),
        "down": (m.intermediate_size, d, layers),
        "lm_head": (d, m.vocab_size, 1),
    }


def time_gemms(shapes: dict[str, tuple[int, int, int]], rows: int, dtype: torch.dtype,
               repeats: int) -> dict[str, float]:
    """Seconds per forward pass of each GEMM at `rows` rows (all its copies, distinct weights, best of repeats)."""
    gen = torch.Generator().manual_seed(0)
    fns = {}
    for name, (d_in, d_out, copies) in shapes.items():
        x = torch.randn(rows, d_in, generator=gen).to(dtype)
        linears = []
        for _ in range(copies):
            w = (torch.randn(d_out, d_in, generator=gen) * d_in ** -0.5).to(dtype)
            linears.append(BaseLinear(w, prepack=can_prepack(w), keep_weight=False))
        fns[name] = lambda x=x, linears=linears: [f(x) for f in linears]
    return bench(fns, device=torch.device("cpu"), repeats=repeats, warmup=1)


def base_wall_times(engine_json: Path) -> dict[str, float]:
    """Base-model wall seconds per engine in a `lorafleet bench engine` JSON (ours and vLLM's fastest)."""
    data = json.loads(engine_json.read_text())
    times = {f"LoRAFleet: {r['name']}": r["wall_s"] for r in data["runs"] if r["name"] == "base model"}
    vllm = [r for r in (data.get("vllm") or {}).get("runs", []) if r["name"].endswith(": base model")]
    if vllm:
        best = min(vllm, key=lambda r: r["wall_s"])
        times[best["name"]] = best["wall_s"]
    return times


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small", choices=sorted(MODELS))
    parser.add_argument("--workload", default="quick", choices=sorted(WORKLOADS))
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--engine-json", type=Path, help="a `lorafleet bench engine` JSON to compare against")
    parser.add_argument("--out-dir", default="benchmarks/results")
    args = parser.parse_args(argv)
    spec, dtype = WORKLOADS[args.workload], getattr(torch, args.dtype)
    shapes = gemm_shapes(args.preset)
    # The engine's schedule for this workload: waves of max_num_seqs requests, each one prefill step of all their
    # prompts (lm_head on each prompt's last row only), then output_tokens - 1 decode steps of one row each.
    seqs = min(spec.max_num_seqs, spec.num_requests)
    waves = -(-spec.num_requests // seqs)
    prefill_rows, decode_rows = seqs * spec.prompt_tokens, seqs
    decode_steps = spec.output_tokens - 1
    with torch.inference_mode():
        prefill = time_gemms({k: v for k, v in shapes.items() if k != "lm_head"}, prefill_rows, dtype, args.repeats)
        prefill |= time_gemms({"lm_head": shapes["lm_head"]}, seqs, dtype, args.repeats)
        decode = time_gemms(shapes, decode_rows, dtype, args.repeats)
    rows = []
    for name, (d_in, d_out, copies) in shapes.items():
        p_rows = seqs if name == "lm_head" else prefill_rows
        flop = 2 * d_in * d_out * copies
        rows.append({
            "gemm": name, "d_in": d_in, "d_out": d_out, "copies": copies,
            "prefill_ms": 1e3 * prefill[name], "prefill_gflops": flop * p_rows / prefill[name] / 1e9,
            "decode_ms": 1e3 * decode[name], "decode_gflops": flop * decode_rows / decode[name] / 1e9,
        })
    floor_s = waves * (sum(prefill.values()) + decode_steps * sum(decode.values()))
    output_tokens = spec.num_requests * spec.output_tokens
    result = {
        "preset": args.preset, "workload": args.workload, "dtype": args.dtype, "threads": torch.get_num_threads(),
        "prepacked": can_prepack(torch.empty(1, 1, dtype=dtype)), "repeats": args.repeats,
        "schedule": {"waves": waves, "prefill_rows": prefill_rows, "decode_rows": decode_rows,
                     "decode_steps_per_wave": decode_steps},
        "gemms": rows, "floor_s": floor_s, "floor_output_tokens_per_s": output_tokens / floor_s,
        "engines": {},
    }
    if args.engine_json:
        result["engine_json"] = str(args.engine_json)
        result["engines"] = {name: {"wall_s": wall, "output_tokens_per_s": output_tokens / wall,
                                    "wall_over_floor": wall / floor_s}
                             for name, wall in base_wall_times(args.engine_json).items()}
    path = write_result("gemm-floor", result, args.out_dir)
    print(f"| GEMM | d_in x d_out | copies | prefill ms ({prefill_rows} rows) | GFLOP/s | decode step ms "
          f"({decode_rows} rows) | GFLOP/s |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['gemm']} | {r['d_in']} x {r['d_out']} | {r['copies']} | {r['prefill_ms']:.2f} | "
              f"{r['prefill_gflops']:.1f} | {r['decode_ms']:.2f} | {r['decode_gflops']:.1f} |")
    print(f"\nGEMM floor of the workload ({waves} waves x (1 prefill + {decode_steps} decode steps)): {floor_s:.2f} s, "
          f"at most {output_tokens / floor_s:.1f} output tok/s")
    for name, e in result["engines"].items():
        print(f"{name}: {e['wall_s']:.2f} s = {e['wall_over_floor']:.2f}x the floor "
              f"({e['output_tokens_per_s']:.1f} tok/s)")
    print(f"raw JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
