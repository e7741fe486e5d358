"""`lorafleet loadtest`: Locust load test of a LoRAFleet server (or the local demo, per routing policy or rate)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

DEFAULT_RATE = 4.0


def register(app: typer.Typer) -> None:
    app.command("loadtest")(loadtest_cmd)


def loadtest_cmd(
    host: str | None = typer.Option(None, help="Base URL of the server, e.g. http://127.0.0.1:8000."),
    rate: float | None = typer.Option(None, help=f"Target arrival rate, requests/s (open-loop Poisson); "
                                                 f"{DEFAULT_RATE:g} if not given."),
    duration: str = typer.Option("60s", help="How long to send requests (per rate with --sweep): 60s, 2m, 1m30s."),
    adapters: int = typer.Option(20, help="Adapters to spread requests over (Zipf popularity)."),
    zipf: float = typer.Option(1.1, help="Zipf exponent of adapter popularity (0 = uniform)."),
    out: Path = typer.Option(Path("benchmarks/results/loadtest"),
                             help="Report folder (CSV, HTML, summary.json, PNGs); the default is git-ignored."),
    policy_compare: bool = typer.Option(False, "--policy-compare",
                                        help="Start the local demo twice (random, rank-aware) and compare."),
    sweep: str | None = typer.Option(None, help="Capacity search: comma-separated rates, e.g. 2,4,8,16; one run "
                                                "per rate against --host, or a local demo started once. "
                                                "Needs --slo-ttft-p95."),
    stop_early: bool = typer.Option(False, "--stop-early",
                                    help="With --sweep: stop after two consecutive rates fail the SLO."),
    slo_ttft_p95: float | None = typer.Option(None, help="SLO: P95 time to first token, seconds."),
    prompt_tokens: int = typer.Option(32, help="Median prompt length in words (lognormal)."),
    output_tokens: int = typer.Option(16, help="Median max_tokens per request (lognormal)."),
    chat_fraction: float = typer.Option(0.25, help="Share of requests sent to /v1/chat/completions."),
    seed: int = typer.Option(0, help="Workload seed."),
    demo_root: Path = typer.Option(Path(".lorafleet"), help="Demo assets folder for --policy-compare / --sweep."),
    warmup: str = typer.Option("0s", help="--policy-compare: an unmeasured run first (e.g. 30s), after which "
                                          "rank-aware rebalances from the demand it saw."),
    engine: str = typer.Option("lorafleet", help="--sweep / --policy-compare without --host: the local demo's "
                               "engine; vllm serves the vLLM fleet (cluster/demo_target.vllm_fleet: 2 replicas at "
                               "rank classes 8 and 64)."),
    vllm_max_lora_rank: int | None = typer.Option(None, help="With --engine vllm: every replica at this "
                                                  "max_lora_rank instead of its rank class (a plain vLLM fleet)."),
    record: bool = typer.Option(False, "--record", help="Also write the summaries through the benchmarks' result "
                                "writer (benchmarks/results/loadtest-<UTC time>.json, for RESULTS.md)."),
) -> None:
    """Run Locust headless against a server, write a report folder and print an SLO table."""
    from functools import partial

    from lorafleet.cluster.demo_target import local_demo, vllm_fleet
    from lorafleet.loadtests.load_plan import LoadTestError
    from lorafleet.loadtests.runner import LoadTestConfig, parse_duration, run_loadtest
    from lorafleet.loadtests.sweep import parse_rates, run_sweep

    sweep_rates: tuple[float, ...] = ()
    if sweep is not None:
        if rate is not None:
            raise LoadTestError("--sweep and --rate cannot be combined: --sweep sets the rates")
        sweep_rates = parse_rates(sweep)
    config = LoadTestConfig(
        host=host, rate=DEFAULT_RATE if rate is None else rate, duration_s=parse_duration(duration),
        num_adapters=adapters, zipf=zipf, out_dir=out, is_policy_compare=policy_compare,
        slo_ttft_p95_s=slo_ttft_p95, prompt_tokens=prompt_tokens, output_tokens=output_tokens,
        chat_fraction=chat_fraction, seed=seed, demo_root=demo_root, sweep_rates=sweep_rates,
        is_stop_early=stop_early, warmup_s=0.0 if warmup.strip() in ("0", "0s") else parse_duration(warmup),
    )
    if engine not in ("lorafleet", "vllm") or (vllm_max_lora_rank is not None and engine != "vllm"):
        raise LoadTestError("--engine is lorafleet or vllm; --vllm-max-lora-rank needs --engine vllm")
    start_demo = local_demo if engine == "lorafleet" else partial(vllm_fleet, max_lora_rank=vllm_max_lora_rank)
    run = run_sweep if config.sweep_rates else run_loadtest
    summaries = run(config, start_demo=start_demo)
    if record:
        from lorafleet.benchmarks.results import write_result

        params = {**config.params(), "engine": engine, "vllm_max_lora_rank": vllm_max_lora_rank}
        result = {"params": params, "runs": summaries}
        if config.sweep_rates:   # the sweep's rows and capacity answer (run_sweep's top-level summary.json)
            result["sweep"] = json.loads((config.out_dir / "summary.json").read_text())
        typer.echo(f"wrote {write_result('loadtest', result)}")
