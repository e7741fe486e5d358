"""The two Triton lora_delta paths side by side on a GPU: python benchmarks/gpu_sgmv_paths.py [--dtype float16].

Fused (one kernel per rank class; each column split redoes the shrink) against Punica's split (a split-K shrink
into fp32 partials, then an expand), base GEMM + delta accumulated as a layer runs it, every token its own adapter,
interleaved (benchmarks.timing.bench: CUDA events, L2 flushed, median). Checks both against float64 first. Prints a
markdown table and writes benchmarks/results/sgmv-paths-<timestamp>.json through lorafleet.benchmarks.results.
"""

from __future__ import annotations

import argparse
import sys

from standalone import REPO, load_packages  # benchmarks/ is sys.path[0] when run as a script


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--tokens", default="1,16,64,256")
    parser.add_argument("--ranks", default="8,16,64")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    load_packages("kernels", "benchmarks")
    import torch

    from lorafleet.benchmarks.kernels import SHAPES
    from lorafleet.benchmarks.results import write_result
    from lorafleet.benchmarks.timing import bench
    from lorafleet.kernels import lora_delta_reference, plan_adapter_batch
    from lorafleet.kernels.synthetic import make_adapter_batch
    from lorafleet.kernels.triton_sgmv import lora_delta_triton

    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU (the Triton paths are timed compiled)")
    device, dtype = torch.device("cuda"), getattr(torch, args.dtype)
    rows = []
    with torch.inference_mode():
        for shape in ("4096x4096", "4096x11008"):
            d_in, d_out = SHAPES[shape]
            for num_tokens in (int(t) for t in args.tokens.split(",")):
                for rank in (int(r) for r in args.ranks.split(",")):
                    b = make_adapter_batch(num_tokens, d_in, d_out, [rank], dtype=dtype, device=device, seed=rank)
                    plan = plan_adapter_batch(b.token_start, b.token_rank, b.token_scale, device=device)
                    want = lora_delta_reference(b.x.double(), b.in_rows.double(), b.out_rows.double(),
                                                b.token_start, b.token_rank, b.token_scale)
                    for split in (False, True):
                        got = lora_delta_triton(b.x, b.in_rows, b.out_rows, plan, torch.empty_like(want, dtype=dtype),
                                                False, split=split)
                        error = ((got.double() - want).abs().max() / want.abs().max()).item()
                        if not error <= 5e-2:
                            raise SystemExit(f"{shape} T={num_tokens} r={rank} split={split}: error {error:.2e}")
                    y = torch.empty(num_tokens, d_out, dtype=dtype, device=device)

                    def run(split: bool | None) -> object:
                        torch.matmul(b.x, b.weight.T, out=y)
                        if split is not None:
                            lora_delta_triton(b.x, b.in_rows, b.out_rows, plan, y, True, split=split)
                        return y

                    s = bench({"base": lambda: run(None), "fused": lambda: run(False), "split": lambda: run(True)},
                              device=device, repeats=args.repeats, warmup=3)
                    rows.append({"shape": shape, "tokens": num_tokens, "rank": rank,
                                 "ms": {k: v * 1e3 for k, v in s.items()},
                                 "fused_x": s["fused"] / s["base"], "split_x": s["split"] / s["base"],
                                 "fused_over_split": s["fused"] / s["split"]})
                    print(f"{shape} T={num_tokens} r={rank}: base {s['base'] * 1e3:.3f} ms, "
                          f"fused {rows[-1]['fused_x']:.2f}x, split {rows[-1]['split_x']:.2f}x", flush=True)
    result = {"device": torch.cuda.get_device_name(device), "dtype": args.dtype, "rows": rows,
              "statistic": "median", "repeats": args.repeats}
    path = write_result("sgmv-paths", result, args.out_dir)
    print("\n| shape | T | rank | base ms | base+fused x | base+split x | fused/split |\n|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['shape']} | {r['tokens']} | {r['rank']} | {r['ms']['base']:.3f} | {r['fused_x']:.2f} | "
              f"{r['split_x']:.2f} | {r['fused_over_split']:.2f} |")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
