"""Kernel benchmark on a GPU box that has only torch + triton: python benchmarks/gpu_kernels.py [--quick].

First checks the compiled Triton kernels against the float64 reference on the GPU (exits on a mismatch),
then runs lorafleet.kernels.bench (the same code as `lorafleet bench kernels`): prints the tables and a markdown
copy for benchmarks/RESULTS.md, and writes benchmarks/results/kernels-<timestamp>.json. Works from a plain
checkout: when lorafleet is not installed, the kernels/ folder is loaded as lorafleet.kernels directly (it
imports nothing but torch, and triton when present). Other flags: see --help.
"""

from __future__ import annotations

import sys

from standalone import REPO, load_packages  # benchmarks/ is sys.path[0] when run as a script


def verify(device: str) -> None:
    """Compiled Triton against the float64 reference on mixed-rank batches before timing anything."""
    import torch

    from lorafleet.kernels import flora_linear, flora_linear_reference, lora_delta, lora_delta_reference
    from lorafleet.kernels.synthetic import make_adapter_batch

    ranks = [16, 0, 1, 2, 3, 4, 8, 64, 128, 200]  # "identical" gives every token the first
    for dtype, tol in ((torch.float32, 1e-4), (torch.float16, 1e-2), (torch.bfloat16, 5e-2)):
        for popularity in ("distinct", "identical", "skewed"):
            b = make_adapter_batch(67, 520, 1100, ranks, popularity=popularity, dtype=dtype, device=device)
            w = b.to(torch.float64)
            args = (b.token_start, b.token_rank)
            checks = {
                "flora_linear": (flora_linear(b.x, b.weight, b.in_rows, b.out_rows, *args),
                                 flora_linear_reference(w.x, w.weight, w.in_rows, w.out_rows, *args)),
                "lora_delta": (lora_delta(b.x, b.in_rows, b.out_rows, *args, b.token_scale),
                               lora_delta_reference(w.x, w.in_rows, w.out_rows, *args, b.token_scale)),
            }
            for name, (got, want) in checks.items():
                error = ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-9)).item()
                if not error <= tol:
                    raise SystemExit(f"{name} {dtype} {popularity}: relative error {error:.2e} > {tol}")
    print(f"verified flora_linear and lora_delta against float64 on {device}")


def main(argv: list[str]) -> int:
    load_packages("kernels")
    import torch

    from lorafleet.kernels.bench import main as bench_main

    if torch.cuda.is_available():
        verify("cuda")
    else:
        print("warning: no CUDA device; this times the CPU torch path (add --quick)", file=sys.stderr)
    if "--results-dir" not in argv:
        argv = [*argv, "--results-dir", str(REPO / "benchmarks" / "results")]
    return bench_main([*argv, "--markdown"])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
