"""`lorafleet rebalance`, `lorafleet simulate`, `lorafleet profile`: placement from the command line."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from lorafleet.infra.errors import InvalidPlacement


def register(app: typer.Typer) -> None:
    app.command("rebalance")(rebalance_cmd)
    app.command("simulate")(simulate_cmd)
    app.command("profile")(profile_cmd)


def _int_list(text: str, option: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InvalidPlacement(f"{option}: expected comma-separated integers, got '{text}'") from None
    if not values or min(values) < 1:
        raise InvalidPlacement(f"{option}: expected integers >= 1, got '{text}'")
    return values


def _points(path: Path | None):
    from lorafleet.placement.operating_points import OperatingPoints

    return OperatingPoints.load(path) if path is not None else OperatingPoints.default()


def rebalance_cmd(
    dry_run: bool = typer.Option(False, "--dry-run", help="Solve and print the diff; publish nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    num_replicas: int | None = typer.Option(None, help="Replicas to place on (default: settings num_replicas)."),
    seed: int = typer.Option(0, help="Solver tie-break seed."),
    operating_points: Path | None = typer.Option(None, help="Operating points JSON (default: packaged file)."),
    num_periods: int = typer.Option(10, help="Demand EWMA over this many rebalance periods of counters."),
    max_moves: int = typer.Option(20, help="Moved adapters to list."),
) -> None:
    """Read demand and the current table from Redis, solve, print the diff, publish unless --dry-run."""
    from lorafleet.infra.config import get_settings
    from lorafleet.placement.rebalancer import Rebalancer

    settings = get_settings()
    replicas = settings.num_replicas if num_replicas is None else num_replicas
    if replicas < 1 or num_periods < 1:
        raise InvalidPlacement(f"--num-replicas and --num-periods must be >= 1, got {replicas}, {num_periods}")
    # The same rebalancer as the placement controller's: live ranks from heartbeats, ranks through the store.
    rebalancer = Rebalancer.from_settings(settings, points=_points(operating_points), num_periods=num_periods)
    report, change = rebalancer.run(replicas, dry_run=dry_run, seed=seed, max_moves=max_moves)
    if as_json:
        typer.echo(json.dumps(report))
        return
    _print_rebalance(report, change)


def _print_rebalance(report: dict, change) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    moves = Table(title=f"moved adapters ({change.num_moved}, churn {100 * change.churn:.1f}% of traffic)")
    for column in ("adapter", "old replica: p", "new replica: p", "moved"):
        moves.add_column(column)
    for m in report["diff"]["moves"]:
        old = ", ".join(f"{r}:{p:.2f}" for r, p in m["old"].items()) or "-"
        new = ", ".join(f"{r}:{p:.2f}" for r, p in m["new"].items()) or "-"
        moves.add_row(m["adapter_id"], old, new, f"{100 * m['moved_fraction']:.0f}%")
    console.print(moves)
    loads = Table(title="predicted load per replica")
    for column in ("replica", "max rank", "tokens/s", "utilization", "adapters", "adapter MiB"):
        loads.add_column(column, justify="right")
    for row in report["replicas"]:
        mib = row["adapter_bytes"] / 2**20
        loads.add_row(str(row["replica"]), str(row["max_rank"]), f"{row['tokens_per_s']:.0f}",
                      f"{100 * row['utilization']:.0f}%", str(row["num_adapters"]), f"{mib:.0f}")
    console.print(loads)
    state = f"published version {report['version']}" if report["published"] else "dry run: nothing published"
    console.print(f"{state}; {report['num_adapters']} adapters, {report['num_unknown_rank']} with unknown rank")
    if report.get("dead_replicas"):
        console.print(f"replicas without a heartbeat (placed nothing there): {report['dead_replicas']}")


def simulate_cmd(
    policies: str | None = typer.Option(None, help="Comma-separated policies to compare (default: all of "
                                                   "lorafleet.placement.policies.POLICY_NAMES)."),
    seed: int = typer.Option(0, help="Seed of the workload and the policies."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object {policies, workload}."),
    out: Path | None = typer.Option(None, help="Write simulation.json and PNG plots into this folder."),
    preset: str = typer.Option("loraserve", help="Workload preset (lorafleet.placement.workload.PRESETS)."),
    num_adapters: int | None = typer.Option(None, help="Adapters (default: preset)."),
    num_replicas: int = typer.Option(32, help="Replicas."),
    num_requests: int | None = typer.Option(None, help="Requests (default: preset)."),
    load: float = typer.Option(0.7, help="Offered tokens/s as a fraction of the cluster's rank-isolated capacity."),
    zipf: float | None = typer.Option(None, help="Zipf exponent of adapter popularity (default: preset)."),
    ranks: str | None = typer.Option(None, help="Comma-separated rank mix, e.g. 8,16,32,64,128 (default: preset)."),
    kernel: str = typer.Option("padded", help="LoRA kernel cost model: padded (max rank) or sum (of ranks)."),
    store_gbps: float = typer.Option(0.0, help="Shared adapter store bandwidth in GB/s (0 = unlimited)."),
    drift: float | None = typer.Option(None, help="Fraction of popularity positions swapped every 300 s."),
    rebalance_period: float = typer.Option(60.0, help="Rank-aware rebalance period, simulated seconds."),
    operating_points: Path | None = typer.Option(None, help="Operating points JSON (default: packaged file)."),
    replicas_needed: bool = typer.Option(True, "--replicas-needed/--no-replicas-needed",
                                         help="Search the fewest replicas meeting the SLO per policy."),
    search_requests: int = typer.Option(20_000, help="Requests per run of the replicas-needed search."),
    record: bool = typer.Option(False, "--record", help="Also write the raw JSON through the benchmarks' result "
                                "writer (benchmarks/results/simulate-<UTC time>.json, for RESULTS.md)."),
) -> None:
    """Discrete-event simulation of the cluster under each policy: TTFT, TPOT, throughput, SLO, churn."""
    from lorafleet.placement.cost_model import StepCostModel
    from lorafleet.placement.policies import POLICY_NAMES
    from lorafleet.placement.simulator import SimConfig, cluster_capacity, compare, rate_for_load
    from lorafleet.placement.workload import PRESETS

    if preset not in PRESETS:
        raise InvalidPlacement(f"unknown preset '{preset}'; choose from: {', '.join(PRESETS)}")
    names = list(POLICY_NAMES) if policies is None else [p.strip() for p in policies.split(",") if p.strip()]
    changes: dict = {"seed": seed}
    for key, value in (("num_adapters", num_adapters), ("num_requests", num_requests), ("zipf_alpha", zipf),
                       ("drift_fraction", drift)):
        if value is not None:
            changes[key] = value
    if ranks is not None:
        changes.update(ranks=_int_list(ranks, "--ranks"), rank_weights=())
    if search_requests < 1:
        raise InvalidPlacement(f"--search-requests must be >= 1, got {search_requests}")
    try:
        spec = PRESETS[preset].with_(**changes)
        cost = StepCostModel(kernel=kernel, store_bytes_per_s=store_gbps * 1e9)
    except ValueError as exc:
        raise InvalidPlacement(str(exc)) from None
    config = SimConfig(num_replicas=num_replicas, cost=cost, points=_points(operating_points),
                       rebalance_period_s=rebalance_period, seed=seed)
    spec = spec.with_(request_rate=rate_for_load(spec, config.points, num_replicas, load))
    results = compare(spec, names, config, find_replicas=replicas_needed, search_requests=search_requests)
    from lorafleet.placement.workload import generate

    workload = {
        **spec.to_dict(), "preset": preset, "load": load, "num_replicas": num_replicas, "kernel": kernel,
        "store_gbps": store_gbps,
        "slo": {"p95_ttft_s": config.points.slo_p95_ttft_s, "p95_tpot_s": config.points.slo_p95_tpot_s},
        "cluster_capacity_tokens_per_s": cluster_capacity(generate(spec.with_(num_requests=1)), config.points,
                                                          num_replicas),
        "mean_tokens_per_request": spec.mean_tokens_per_request,
        "rebalance_period_s": rebalance_period, "max_adapter_bytes": config.adapter_memory,
    }
    document = {"policies": {n: r.metrics for n, r in results.items()}, "workload": workload}
    if record:
        from lorafleet.benchmarks.results import write_result

        recorded = write_result("simulate", dict(document))
        if not as_json:
            typer.echo(f"wrote {recorded}")
    if out is not None:
        from lorafleet.placement.sim_plots import write_plots

        out.mkdir(parents=True, exist_ok=True)
        (out / "simulation.json").write_text(json.dumps(document, indent=2) + "\n")
        write_plots(results, out, config.points.slo_p95_ttft_s)
    if as_json:
        typer.echo(json.dumps(document))
        return
    _print_simulation(document)
    if out is not None:
        typer.echo(f"wrote {out / 'simulation.json'} and plots to {out}")


def _fmt(value, scale: float = 1.0, digits: int = 3) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def _print_simulation(document: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    w = document["workload"]
    title = (f"{w['num_requests']} requests, {w['num_adapters']} adapters (Zipf {w['zipf_alpha']}, ranks "
             f"{w['ranks']}), {w['num_replicas']} replicas, load {w['load']:.0%}, {w['kernel']} kernels, "
             f"SLO P95 TTFT {w['slo']['p95_ttft_s']} s / TPOT {w['slo']['p95_tpot_s']} s")
    table = Table(title=title)
    for column in ("policy", "TTFT p50 s", "TTFT p95 s", "TTFT p99 s", "TPOT p95 s", "tokens/s", "SLO %",
                   "replicas for SLO", "cold fetches", "churn %"):
        table.add_column(column, justify="right", no_wrap=True)
    for name, m in document["policies"].items():
        table.add_row(name, _fmt(m["p50_ttft_s"]), _fmt(m["p95_ttft_s"]), _fmt(m["p99_ttft_s"]),
                      _fmt(m["p95_tpot_s"], digits=4), f"{m['throughput_tokens_per_s']:.0f}",
                      _fmt(m["slo_attainment"], 100, 1), str(m.get("replicas_needed") or "-"),
                      str(m["num_cold_fetches"]), _fmt(m["churn_per_rebalance"], 100, 1))
    console = Console()
    if not console.is_terminal:
        console = Console(width=140)  # piped output: do not squeeze the table into 80 columns
    console.print(table)


def profile_cmd(
    out: Path = typer.Option(Path("operating_points.json"), help="Where to write the operating points."),
    model: Path | None = typer.Option(None, help="Model directory (default: settings model_dir)."),
    ranks: str = typer.Option("8,16,32,64,128", help="Comma-separated rank classes to profile."),
    slo_ttft: float = typer.Option(1.0, help="SLO: P95 TTFT in seconds."),
    slo_tpot: float = typer.Option(0.1, help="SLO: P95 time per output token in seconds."),
    prompt_tokens: int = typer.Option(256, help="Prompt length of the probe requests (engine)."),
    output_tokens: int = typer.Option(64, help="Output length of the probe requests (engine)."),
    max_batch: int = typer.Option(64, help="Largest batch to try (engine)."),
    simulated: bool = typer.Option(False, "--simulated", help="Profile the simulator's step-time model instead."),
    kernel: str = typer.Option("padded", help="With --simulated: padded or sum kernel cost model."),
    device: str | None = typer.Option(None, help="Engine device, e.g. cuda (default: the engine's)."),
) -> None:
    """Measure max tokens/s per rank class under the SLO and write operating_points.json."""
    rank_list = _int_list(ranks, "--ranks")
    if not (slo_ttft > 0 and slo_tpot > 0) or prompt_tokens < 1 or output_tokens < 2 or max_batch < 1:
        raise InvalidPlacement("need --slo-ttft/--slo-tpot > 0, --prompt-tokens >= 1, --output-tokens >= 2, "
                               "--max-batch >= 1")
    if simulated:
        from lorafleet.placement.cost_model import StepCostModel
        from lorafleet.placement.sim_profile import profile_operating_points

        try:
            cost = StepCostModel(kernel=kernel)
        except ValueError as exc:
            raise InvalidPlacement(str(exc)) from None
        points = profile_operating_points(cost, rank_list, slo_ttft, slo_tpot)
    else:
        try:
            from lorafleet.replicas import Engine, SamplingParams
        except ImportError:
            # A LoRAFleetError, not typer.Exit: the main CLI maps it to one line and exit code 2.
            raise InvalidPlacement("lorafleet.replicas.Engine is not available in this build; "
                                   "use --simulated to profile the simulator's model") from None
        points = _profile_engine(Engine, SamplingParams, model, rank_list, slo_ttft, slo_tpot,
                                 prompt_tokens, output_tokens, max_batch, device)
    path = points.save(out)
    summary = ", ".join(f"r{r}: {points.points[r]:.0f}" for r in points.rank_classes)
    typer.echo(f"wrote {path} (max tokens/s per rank class: {summary})")


def _profile_engine(engine_cls, params_cls, model, rank_list, slo_ttft, slo_tpot, prompt_tokens, output_tokens,
                    max_batch, device):
    """Closed-loop batches on the local engine: for batch sizes 1, 2, 4, ... submit B requests at once and
    read each one's TTFT and TPOT from the engine's request metrics; a rank's operating point is the best
    tokens/s (prompt + output) of a batch size whose P95 TTFT and P95 TPOT both meet the SLO."""
    import tempfile
    import time

    import numpy as np

    from lorafleet.infra.adapter_maker import make_adapter
    from lorafleet.infra.config import get_settings
    from lorafleet.placement.operating_points import OperatingPoints

    model_dir = Path(model or get_settings().model_dir)
    if not (model_dir / "config.json").is_file():
        raise InvalidPlacement(f"{model_dir}: no model (config.json missing); pass --model or run lorafleet make-model")
    overrides = {"max_adapters": len(rank_list), "max_rank": max(rank_list), "max_num_seqs": max_batch}
    if device is not None:
        overrides["device"] = device
    engine = engine_cls.from_pretrained(str(model_dir), **overrides)
    prompt = ([engine.tokenizer.encode("hello world", add_special_tokens=False)[0]] * prompt_tokens)
    params = params_cls(max_tokens=output_tokens, temperature=0.0, ignore_eos=True)
    points, bytes_per_rank, trace = {}, [], {}

    def run(batch: int, adapter_id: str) -> tuple[float, float, float]:
        start = time.perf_counter()
        outs = engine.generate([prompt] * batch, params=params, adapters=[adapter_id] * batch)
        wall = time.perf_counter() - start
        failed = [o for o in outs if o.finish_reason == "error"]
        if failed:
            raise InvalidPlacement(f"profiling adapter {adapter_id} failed: {failed[0].error}")
        ttft = [o.metrics.time_to_first_token for o in outs]
        tpot = [(o.metrics.finish_time - o.metrics.first_token_time) / max(len(o.token_ids) - 1, 1) for o in outs]
        tokens = sum(len(o.prompt_token_ids) + len(o.token_ids) for o in outs)
        return float(np.percentile(ttft, 95)), float(np.percentile(tpot, 95)), tokens / wall

    with tempfile.TemporaryDirectory() as tmp:
        for rank in rank_list:
            path = make_adapter(Path(tmp) / f"r{rank}", model_dir, "lora", rank,
                                ["q_proj", "k_proj", "v_proj", "o_proj"], seed=rank)
            bytes_per_rank.append(sum(f.stat().st_size for f in Path(path).iterdir()) / rank)
            engine.load_adapter(f"profile-r{rank}", str(path))
        run(1, f"profile-r{rank_list[0]}")  # warm-up: first-call allocation is not serving time
        for rank in rank_list:
            adapter_id, best, batch = f"profile-r{rank}", 0.0, 1
            while batch <= max_batch:
                ttft, tpot, tokens_per_s = run(batch, adapter_id)
                trace[f"r{rank}-b{batch}"] = {"p95_ttft_s": ttft, "p95_tpot_s": tpot, "tokens_per_s": tokens_per_s}
                if ttft > slo_ttft or tpot > slo_tpot:
                    break
                best = max(best, tokens_per_s)
                batch *= 2
            if best == 0.0:
                raise InvalidPlacement(f"rank {rank}: even a single request misses the SLO on this engine")
            points[rank] = best
    engine.close()
    memory = OperatingPoints.default()
    return OperatingPoints(
        points, slo_ttft, slo_tpot, memory.max_adapter_bytes, int(max(bytes_per_rank)),
        source=f"engine: lorafleet profile --model {model_dir}",
        meta={"method": "closed-loop batches of 1, 2, 4, ... requests; P95 TTFT and TPOT from request metrics",
              "prompt_tokens": prompt_tokens, "output_tokens": output_tokens, "max_batch": max_batch,
              "device": device or "engine default", "probes": trace},
    )
