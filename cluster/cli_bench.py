"""`lorafleet bench ...`: kernels, engine, store (and router) benchmarks; each prints a table and writes JSON."""

from __future__ import annotations

from pathlib import Path

import typer

bench_app = typer.Typer(help="Benchmarks: print a table, write raw JSON under benchmarks/results/.",
                        no_args_is_help=True)


def register(app: typer.Typer) -> None:
    from lorafleet.cluster.cli_bench_store import register_bench

    register_bench(bench_app)
    app.add_typer(bench_app, name="bench")


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


@bench_app.command("kernels")
def kernels_cmd(
    quick: bool = typer.Option(False, "--quick", help="Smaller grid and fewer repeats (~1-2 min on a CPU)."),
    shapes: str | None = typer.Option(None, help="Comma-separated d_in x d_out shapes, e.g. 4096x4096,tiny."),
    tokens: str | None = typer.Option(None, help="Comma-separated token counts T, e.g. 1,16,64,256."),
    ranks: str | None = typer.Option(None, help="Comma-separated ranks, e.g. 1,2,4,8,16,64."),
    device: str | None = typer.Option(None, help="cpu or cuda (default: cuda if available)."),
    repeats: int | None = typer.Option(None, min=1, help="Timed repeats per point."),
    markdown: bool = typer.Option(False, "--markdown", help="Also print the tables as markdown."),
    out_dir: Path = typer.Option(Path("benchmarks/results"), help="Where the raw JSON goes."),
) -> None:
    """FLoRA / LoRA kernels vs the base GEMM and the torch.bmm baseline; mixed-rank vs padded batches."""
    from lorafleet.kernels.bench import run_kernel_bench, write_results
    from lorafleet.kernels.bench_report import format_markdown, print_report

    result = run_kernel_bench(
        shapes=shapes.split(",") if shapes else None, token_counts=_csv_ints(tokens, "--tokens"),
        ranks=_csv_ints(ranks, "--ranks"), device=device, repeats=repeats, quick=quick,
        progress=lambda line: typer.echo(line),
    )
    print_report(result)
    if markdown:
        typer.echo(format_markdown(result))
    typer.echo(f"wrote {write_results(result, out_dir)}")


@bench_app.command("engine")
def engine_cmd(
    quick: bool = typer.Option(False, "--quick", help="Short workload (a few minutes on a CPU)."),
    model_dir: Path | None = typer.Option(None, help="Model directory (default: make the `small` preset)."),
    preset: str = typer.Option("small", help="Preset to make when no --model-dir is given."),
    device: str = typer.Option("cpu", help="cpu or cuda."),
    out_dir: Path = typer.Option(Path("benchmarks/results"), help="Where the raw JSON goes."),
    threads: int | None = typer.Option(None, min=1, help="torch threads (1 gives steadier numbers on a shared "
                                                          "CPU; default: torch's)."),
) -> None:
    """Multi-adapter engine throughput and latency vs the base model, by adapter count and rank mix."""
    from lorafleet.replicas.bench import run_engine_bench

    command = "lorafleet bench engine" + (" --quick" if quick else "") + (f" --threads {threads}" if threads else "")
    run_engine_bench(model_dir, quick=quick, preset=preset, device=device, out_dir=out_dir, num_threads=threads,
                     command=command)


@bench_app.command("router")
def router_cmd(
    quick: bool = typer.Option(False, "--quick", help="Fewer calls and requests (under a minute on a CPU)."),
    model_dir: Path | None = typer.Option(None, help="Model directory (default: make the `tiny` preset)."),
    num_adapters: int = typer.Option(10_000, min=1, help="Adapters in the routing table."),
    num_replicas: int = typer.Option(64, min=1, help="Replicas in the routing table."),
    num_requests: int | None = typer.Option(None, min=1, help="Timed 1-token requests per path (default 300)."),
    out_dir: Path = typer.Option(Path("benchmarks/results"), help="Where the raw JSON goes."),
) -> None:
    """Router overhead: table lookup + sampling, policy choice, HTTP latency minus engine latency (1 token)."""
    from dataclasses import replace

    from lorafleet.router.bench import PRESETS, run_router_bench

    spec = replace(PRESETS["quick" if quick else "full"], num_adapters=num_adapters, num_replicas=num_replicas)
    if num_requests is not None:
        spec = replace(spec, num_requests=num_requests)
    command = "lorafleet bench router" + (" --quick" if quick else "")
    run_router_bench(model_dir, spec=spec, out_dir=out_dir, command=command)
