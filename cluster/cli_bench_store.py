"""`lorafleet bench store`: adapter store fetch latency and throughput per tier (added to the `bench` sub-app)."""

from __future__ import annotations

from pathlib import Path

import typer


def register_bench(bench_app: typer.Typer) -> None:
    bench_app.command("store")(store_cmd)


def store_cmd(
    sizes: str = typer.Option("r8-qkvo,r64-all", help="Adapter presets, Llama-7B shapes: r8-qkvo (16 MiB), "
                              "r64-all (305 MiB), r1-q (0.5 MiB)."),
    repeats: int = typer.Option(5, min=1, help="Timed repeats per measurement (the median is reported)."),
    fetchers: int = typer.Option(32, min=1, help="Concurrent fetchers for the throughput rows."),
    rounds: int = typer.Option(2, min=1, help="Fetches per fetcher in the throughput rows."),
    redis_url: str | None = typer.Option(None, help="Redis to use (default: settings redis_url); keys are "
                                         "written under a fresh prefix and deleted afterwards."),
    s3_endpoint: str | None = typer.Option(None, help="An S3-compatible endpoint (default: start a local "
                                           "moto_server); a throwaway bucket is created there."),
    out_dir: Path = typer.Option(Path("benchmarks/results"), help="Where the raw JSON results go."),
    work_dir: Path | None = typer.Option(None, help="Directory for the local object store (a real disk)."),
) -> None:
    """Fetch latency per tier (host, Redis, local dir, S3 server), cold and warm, and throughput with
    concurrent fetchers, each with the ratio to a raw read of the same bytes."""
    from lorafleet.infra.store_bench import run_store_bench
    from lorafleet.infra.store_bench_setup import PRESETS

    presets = [s.strip() for s in sizes.split(",") if s.strip()]
    unknown = [p for p in presets if p not in PRESETS]
    if unknown or not presets:
        raise typer.BadParameter(f"unknown presets {unknown}; choose from: {', '.join(PRESETS)}", param_hint="--sizes")
    run_store_bench(presets, repeats=repeats, num_fetchers=fetchers, rounds=rounds, redis_url=redis_url,
                    s3_endpoint=s3_endpoint, out_dir=out_dir, work_dir=work_dir)
