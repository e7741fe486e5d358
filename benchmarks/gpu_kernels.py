"""Kernel benchmark on a GPU box that has only torch + triton: python benchmarks/gpu_kernels.py [--quick].

First checks the compiled Triton kernels against the float64 reference on the GPU (exits on a mismatch),
then runs lorafleet.benchmarks.kernels (the same code as `lorafleet bench kernels`): prints the tables and a
markdown copy for benchmarks/RESULTS.md, and writes benchmarks/results/kernels-<timestamp>.json through
lorafleet.benchmarks.results. Works from a plain checkout: when lorafleet is not installed, the kernels/ and
benchmarks/ folders are loaded as lorafleet.* directly (they import nothing but torch, and triton when present).
"""

from __future__ import annotations

import argparse
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small grid (CPU: ~1-2 minutes)")
    parser.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    parser.add_argument("--dtype", default=None, choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--shapes", default=None, help="comma list of tiny,4096x4096,4096x11008")
    parser.add_argument("--tokens", default=None, help="comma list of token counts T")
    parser.add_argument("--ranks", default=None, help="comma list of ranks")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    parser.add_argument("--skip-verify", action="store_true")
    parser.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    args = parser.parse_args(argv)
    load_packages("kernels", "benchmarks")
    import torch

    from lorafleet.benchmarks.kernels import run_kernel_bench
    from lorafleet.benchmarks.kernels_report import format_markdown, print_report
    from lorafleet.benchmarks.results import write_result

    if args.threads:
        torch.set_num_threads(args.threads)
    if not torch.cuda.is_available():
        print("warning: no CUDA device; this times the CPU torch path (add --quick)", file=sys.stderr)
    elif not args.skip_verify and (args.device or "cuda").startswith("cuda"):
        verify(args.device or "cuda")

    def ints(text: str | None) -> list[int] | None:
        return [int(v) for v in text.split(",")] if text else None

    result = run_kernel_bench(
        shapes=args.shapes.split(",") if args.shapes else None, token_counts=ints(args.tokens),
        ranks=ints(args.ranks), device=args.device, dtype=getattr(torch, args.dtype) if args.dtype else None,
        repeats=args.repeats, quick=args.quick, progress=lambda line: print(line, flush=True))
    path = write_result("kernels", result, args.out_dir)
    print_report(result)
    print(f"\n{format_markdown(result)}\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
