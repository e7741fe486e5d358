"""Engine benchmark on a GPU box with torch (+ triton, tokenizers, safetensors; transformers + peft for the HF
baseline): python benchmarks/gpu_engine.py [--quick].

First checks the engine on the GPU against the same engine on the CPU (base model, a LoRA and a FLoRA adapter,
float32, so the Triton kernels run inside the model) and exits on a mismatch; then runs lorafleet.benchmarks.engine
(the same code as `lorafleet bench engine`): prints the table and a markdown copy for benchmarks/RESULTS.md, and
writes benchmarks/results/engine-<timestamp>.json through lorafleet.benchmarks.results. Works from a plain
checkout: when lorafleet is not installed, the replicas/, kernels/, infra/ and benchmarks/ folders are loaded as
lorafleet.* directly (no pydantic, Ray or redis needed).
"""

from __future__ import annotations

import argparse
import tempfile
from dataclasses import replace
from pathlib import Path

from standalone import REPO, load_packages  # benchmarks/ is sys.path[0] when run as a script


def verify(device: str) -> None:
    """Engine on the GPU (float32) = engine on the CPU, for the base model and mixed LoRA + FLoRA batches."""
    from lorafleet.infra.adapter_maker import make_adapter
    from lorafleet.replicas import Engine, SamplingParams
    from lorafleet.replicas.checkpoint import make_model

    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(Path(tmp) / "tiny", "tiny", seed=0)
        adapters = {
            "lora": make_adapter(Path(tmp) / "lora", model, "lora", 16, ["q_proj", "v_proj", "down_proj"], seed=1),
            "flora": make_adapter(Path(tmp) / "flora", model, "flora", 4, ["q_proj", "k_proj", "up_proj"], seed=2),
        }
        engines = {d: Engine.from_pretrained(model, device=d, max_adapters=4, max_rank=16) for d in ("cpu", device)}
        for engine in engines.values():
            for name, path in adapters.items():
                engine.load_adapter(name, path)
        prompts = [[0, 5 + i, 77, 300 + 7 * i, 12] for i in range(9)]
        names = [None, "lora", "flora"] * 3
        params = SamplingParams(max_tokens=12, temperature=0.0, logprobs=3)
        outs = {d: e.generate(prompts, params, adapters=names) for d, e in engines.items()}
        for a, b in zip(outs["cpu"], outs[device], strict=True):
            assert a.token_ids == b.token_ids, f"GPU tokens differ from CPU for adapter {a.adapter_id}"
        for name in (None, "lora", "flora"):
            diff = (engines["cpu"].score(prompts[0], name) - engines[device].score(prompts[0], name).cpu()).abs()
            assert float(diff.max()) < 1e-3, f"GPU logits differ from CPU by {float(diff.max())} ({name})"
        for engine in engines.values():
            engine.close()
    print("verify: engine on GPU matches the CPU engine (tokens, logits < 1e-3)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small workload (the `quick` preset)")
    parser.add_argument("--preset", default="small", help="model preset to make when --model-dir is not given")
    parser.add_argument("--model-dir", type=Path, default=None, help="a Hugging Face Llama directory")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=("float32", "float16", "bfloat16"))
    parser.add_argument("--num-requests", type=int, default=None)
    parser.add_argument("--max-num-seqs", type=int, default=None)
    parser.add_argument("--adapter-counts", default=None, help="comma-separated, e.g. 1,8,64,512")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (3; 1 over 64 requests)")
    parser.add_argument("--no-baselines", action="store_true")
    parser.add_argument("--skip-verify", action="store_true")
    parser.add_argument("--work-dir", type=Path, default=Path(tempfile.gettempdir()) / "lorafleet-bench-engine")
    parser.add_argument("--out-dir", type=Path, default=REPO / "benchmarks" / "results")
    args = parser.parse_args()
    load_packages("infra", "kernels", "replicas", "benchmarks")
    from lorafleet.benchmarks.engine import PRESETS, run_engine_bench
    from lorafleet.benchmarks.engine_report import format_markdown, print_report
    from lorafleet.benchmarks.results import write_result

    if not args.skip_verify and args.device.startswith("cuda"):
        verify(args.device)
    spec = PRESETS["quick" if args.quick else "full"]
    changes: dict = {}
    if args.num_requests:
        changes["num_requests"] = args.num_requests
    if args.max_num_seqs:
        changes["max_num_seqs"] = args.max_num_seqs
    if args.adapter_counts:
        changes["adapter_counts"] = tuple(int(n) for n in args.adapter_counts.split(","))
    result = run_engine_bench(args.model_dir, spec=replace(spec, **changes), preset=args.preset, device=args.device,
                              dtype=args.dtype, work_dir=args.work_dir, baselines=not args.no_baselines,
                              repeats=args.repeats)
    path = write_result("engine", result, args.out_dir)
    print_report(result)
    print("\n" + format_markdown(result))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
