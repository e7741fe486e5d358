"""`lorafleet bench kernels|engine|router|store`: each prints its table and writes raw JSON through
lorafleet.benchmarks.results (hardware, date and the `lorafleet bench ...` command that reproduces it)."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

import typer

from lorafleet.benchmarks.results import RESULTS_DIR  # stdlib only: the CLI starts without torch

DTYPES = ("float16", "bfloat16", "float32")

bench_app = typer.Typer(help="Benchmarks: print a table, write raw JSON under benchmarks/results/.",
                        no_args_is_help=True)

def _out_dir_option() -> Any:
    return typer.Option(RESULTS_DIR, help="Where the raw JSON goes (<benchmark>-<UTC timestamp>.json).")


def _threads_option(default: int | None, why: str) -> Any:
    return typer.Option(default, min=1, help=f"torch CPU threads for the run ({why}).")


def register(app: typer.Typer) -> None:
    app.add_typer(bench_app, name="bench")


def reproducing_command(ctx: typer.Context) -> str:
    """`lorafleet bench <name>` plus every option whose value differs from its default."""
    words = ["lorafleet", "bench", ctx.info_name or ""]
    for param in ctx.command.params:  # typer's own click copy: options are told by param_type_name
        value = ctx.params.get(param.name or "")
        if param.param_type_name != "option" or value is None or value == param.default:
            continue
        if getattr(param, "is_flag", False):
            words.append(param.opts[0] if value else param.secondary_opts[0])
        else:
            words += [param.opts[0], str(value)]
    return shlex.join(words)


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _csv_ints(text: str | None, option: str) -> list[int] | None:
    if text is None:
        return None
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}", param_hint=option) from None
    if not values or min(values) < 1:
        raise typer.BadParameter(f"expected positive integers, got {text!r}", param_hint=option)
    return values


def _check_dtype(dtype: str | None) -> None:
    if dtype is not None and dtype not in DTYPES:
        raise typer.BadParameter(f"choose from {', '.join(DTYPES)}", param_hint="--dtype")


@bench_app.command("kernels")
def kernels_cmd(
    ctx: typer.Context,
    quick: bool = typer.Option(False, "--quick", help="Smaller grid and fewer repeats (~1-2 min on a CPU)."),
    shapes: str | None = typer.Option(None, help="Comma-separated d_in x d_out shapes, e.g. 4096x4096,tiny."),
    tokens: str | None = typer.Option(None, help="Comma-separated token counts T, e.g. 1,16,64,256."),
    ranks: str | None = typer.Option(None, help="Comma-separated ranks, e.g. 1,2,4,8,16,64."),
    device: str | None = typer.Option(None, help="cpu or cuda (default: cuda if available)."),
    dtype: str | None = typer.Option(None, help="float16, bfloat16 or float32 (default: fp16 on cuda, else fp32)."),
    repeats: int | None = typer.Option(None, min=1, help="Timed repeats per point."),
    threads: int | None = _threads_option(None, "default: torch's"),
    markdown: bool = typer.Option(False, "--markdown", help="Also print the tables as markdown."),
    out_dir: Path = _out_dir_option(),
) -> None:
    """FLoRA / LoRA kernels vs the base GEMM and the torch.bmm baseline; mixed-rank vs padded batches."""
    import torch

    from lorafleet.benchmarks.kernels import run_kernel_bench
    from lorafleet.benchmarks.kernels_report import format_markdown, print_report
    from lorafleet.benchmarks.results import write_result

    _check_dtype(dtype)
    _set_threads(threads)
    try:
        result = run_kernel_bench(
            shapes=shapes.split(",") if shapes else None, token_counts=_csv_ints(tokens, "--tokens"),
            ranks=_csv_ints(ranks, "--ranks"), device=device, dtype=getattr(torch, dtype) if dtype else None,
            repeats=repeats, quick=quick, progress=typer.echo)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--shapes") from None
    path = write_result("kernels", result, out_dir, command=reproducing_command(ctx))
    print_report(result)
    if markdown:
        typer.echo(f"\n{format_markdown(result)}\n")
    typer.echo(f"wrote {path}")


@bench_app.command("engine")
def engine_cmd(
    ctx: typer.Context,
    quick: bool = typer.Option(False, "--quick", help="Short workload (a few minutes on a CPU)."),
    model_dir: Path | None = typer.Option(None, help="Model directory (default: make the --preset model)."),
    preset: str = typer.Option("small", "--model", "--preset", help="Model when no --model-dir is given: a random "
                               "preset (small, tiny) or a real one (smollm2-135m, dequantized once and cached)."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    dtype: str = typer.Option("float32", help="float16, bfloat16 or float32."),
    num_requests: int | None = typer.Option(None, min=1, help="Requests of the workload (default: the preset's)."),
    adapter_counts: str | None = typer.Option(None, help="Comma-separated adapter counts (default: the preset's)."),
    repeats: int | None = typer.Option(None, min=1, help="Interleaved repeats of every run (default: 3 if quick)."),
    baselines: bool = typer.Option(True, "--baselines/--no-baselines", help="Also run the HF PEFT and "
                                   "one-adapter-per-batch baselines."),
    threads: int | None = _threads_option(None, "1 gives steadier numbers on a shared CPU; default: torch's"),
    engine: str = typer.Option("lorafleet", help="Engines in the table: lorafleet (plus vLLM when it imports "
                               "here), or lorafleet,vllm: vLLM from .venv-vllm in a child process, on the same "
                               "workloads, runs interleaved with ours; with --threads N both are pinned to N CPUs."),
    vllm_max_lora_ranks: str | None = typer.Option(None, help="Comma-separated max_lora_rank of each vLLM engine "
                                                   "(default: the preset's, 64,8; vLLM at 64 runs LoRA rows slowly)."),
    work_dir: Path = typer.Option(Path(".lorafleet/bench-engine"), help="Where the model and adapters are kept."),
    markdown: bool = typer.Option(False, "--markdown", help="Also print the table as markdown."),
    out_dir: Path = _out_dir_option(),
) -> None:
    """Multi-adapter engine throughput and latency vs the base model, by adapter count and rank mix."""
    from dataclasses import replace

    from lorafleet.benchmarks.engine import PRESETS, run_engine_bench
    from lorafleet.benchmarks.engine_report import format_markdown, print_report
    from lorafleet.benchmarks.results import write_result

    _check_dtype(dtype)
    spec = PRESETS["quick" if quick else "full"]
    if num_requests is not None:
        spec = replace(spec, num_requests=num_requests)
    counts = _csv_ints(adapter_counts, "--adapter-counts")
    if counts:
        spec = replace(spec, adapter_counts=tuple(counts))
    vllm_ranks = _csv_ints(vllm_max_lora_ranks, "--vllm-max-lora-ranks")
    if vllm_ranks:
        spec = replace(spec, vllm_max_lora_ranks=tuple(vllm_ranks))
    engines = {e.strip() for e in engine.split(",") if e.strip()}
    if "lorafleet" not in engines or engines - {"lorafleet", "vllm"}:
        raise typer.BadParameter(f"choose lorafleet or lorafleet,vllm, got {engine!r}", param_hint="--engine")
    _set_threads(threads)
    with _vllm_engines("vllm" in engines, threads):
        result = run_engine_bench(model_dir, spec=spec, preset=preset, device=device, dtype=dtype,
                                  work_dir=work_dir, baselines=baselines, repeats=repeats)
    path = write_result("engine", result, out_dir, command=reproducing_command(ctx))
    print_report(result)
    if markdown:
        typer.echo(f"\n{format_markdown(result)}\n")
    typer.echo(f"wrote {path}")


def _vllm_engines(is_wanted: bool, threads: int | None) -> Any:
    """vLLM's rows from the vLLM venv while open (benchmarks/vllm_engine.py); with `threads`, this process is pinned
    to that many of its CPUs first (as taskset does) and the vLLM child to the same ones."""
    import contextlib
    import os

    if not is_wanted:
        return contextlib.nullcontext()
    import torch

    from lorafleet.benchmarks.vllm_engine import vllm_from_venv

    if threads:
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:threads])
    return vllm_from_venv(num_threads=torch.get_num_threads())


@bench_app.command("router")
def router_cmd(
    ctx: typer.Context,
    quick: bool = typer.Option(False, "--quick", help="Fewer calls and requests (under a minute on a CPU)."),
    model_dir: Path | None = typer.Option(None, help="Model directory (default: make the `tiny` preset)."),
    num_adapters: int = typer.Option(10_000, min=1, help="Adapters in the routing table."),
    num_replicas: int = typer.Option(64, min=1, help="Replicas in the routing table."),
    num_requests: int | None = typer.Option(None, min=1, help="Timed 1-token requests per path (default 300)."),
    threads: int = _threads_option(1, "the tiny model gains nothing from more; fewer spinning threads, steadier"),
    out_dir: Path = _out_dir_option(),
) -> None:
    """Router overhead: table lookup + sampling, policy choice, HTTP latency minus engine latency (1 token)."""
    from dataclasses import replace

    from lorafleet.benchmarks.results import write_result
    from lorafleet.benchmarks.router import PRESETS, print_report, run_router_bench

    spec = replace(PRESETS["quick" if quick else "full"], num_adapters=num_adapters, num_replicas=num_replicas)
    if num_requests is not None:
        spec = replace(spec, num_requests=num_requests)
    _set_threads(threads)
    result = run_router_bench(model_dir, spec=spec)
    path = write_result("router", result, out_dir, command=reproducing_command(ctx))
    print_report(result)
    typer.echo(f"wrote {path}")


@bench_app.command("store")
def store_cmd(
    ctx: typer.Context,
    sizes: str = typer.Option("r8-qkvo,r64-all", help="Adapter presets, Llama-7B shapes: r8-qkvo (16 MiB), "
                              "r64-all (305 MiB), r1-q (0.5 MiB)."),
    repeats: int = typer.Option(5, min=1, help="Timed repeats per measurement (the median is reported)."),
    fetchers: int = typer.Option(32, min=1, help="Concurrent fetchers for the throughput rows."),
    rounds: int = typer.Option(2, min=1, help="Fetches per fetcher in the throughput rows."),
    redis_url: str | None = typer.Option(None, help="Redis to use (default: settings redis_url); keys are "
                                         "written under a fresh prefix and deleted afterwards."),
    s3_endpoint: str | None = typer.Option(None, help="An S3-compatible endpoint (default: start a local "
                                           "moto_server); a throwaway bucket is created there."),
    work_dir: Path | None = typer.Option(None, help="Directory for the local object store (a real disk)."),
    threads: int | None = _threads_option(None, "validation on push; default: torch's"),
    out_dir: Path = _out_dir_option(),
) -> None:
    """Fetch latency per tier (Redis hot blobs, local dir, S3 server), cold and warm, and throughput with
    concurrent fetchers, each with the ratio to a raw read of the same bytes."""
    from lorafleet.benchmarks.results import write_result
    from lorafleet.benchmarks.store import print_results, run_store_bench
    from lorafleet.benchmarks.store_setup import PRESETS

    presets = [s.strip() for s in sizes.split(",") if s.strip()]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown or not presets:
        raise typer.BadParameter(f"unknown presets {unknown}; choose from: {', '.join(PRESETS)}", param_hint="--sizes")
    _set_threads(threads)
    result = run_store_bench(presets, repeats=repeats, num_fetchers=fetchers, rounds=rounds, redis_url=redis_url,
                             s3_endpoint=s3_endpoint, work_dir=work_dir)
    path = write_result("store", result, out_dir, command=reproducing_command(ctx))
    print_results(result)
    typer.echo(f"wrote {path}")
