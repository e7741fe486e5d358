"""`lorafleet rebalance`, `lorafleet simulate`, `lorafleet profile`: placement from the command line."""

from __future__ import annotations

import json
import time
from pathlib import Path

import typer

from lorafleet.infra.errors import InvalidPlacement


def register(app: typer.Typer) -> None:
    app.command("rebalance")(rebalance_cmd)
    app.command("simulate")(simulate_cmd)
    app.command("profile")(profile_cmd)
    app.command("simulate-autoscaling")(simulate_autoscaling_cmd)
    from lorafleet.cluster.cli_bench import bench_app  # registered before this module (cluster/cli.py)

    bench_app.command("placement")(bench_placement_cmd)


def _number_list(text: str, option: str, parse: type[int] | type[float]) -> tuple:
    """Comma-separated integers >= 1 (parse=int) or numbers >= 0 (parse=float); InvalidPlacement naming the option."""
    kind, least = ("integers", 1) if parse is int else ("numbers", 0)
    try:
        values = tuple(parse(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise InvalidPlacement(f"{option}: expected comma-separated {kind}, got '{text}'") from None
    if not values or min(values) < least:
        raise InvalidPlacement(f"{option}: expected {kind} >= {least}, got '{text}'")
    return values


def _points(path: Path | None):
    from lorafleet.placement.operating_points import OperatingPoints

    return OperatingPoints.load(path) if path is not None else OperatingPoints.default()


def rebalance_cmd(
    dry_run: bool = typer.Option(False, "--dry-run", help="Solve and print the diff; publish nothing."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
    num_replicas: int | None = typer.Option(None, help="Replicas to place on (default: settings num_replicas)."),
    seed: int = typer.Option(0, help="Solver tie-break seed."),
    operating_points: Path | None = typer.Option(None, help="Operating points JSON (default: the settings' "
                                                 "operating_points file, else what the served replicas measured)."),
    num_periods: int = typer.Option(10, help="Demand EWMA over this many rebalance periods of counters."),
    max_moves: int = typer.Option(20, help="Moved adapters to list."),
) -> None:
    """Read demand and the current table from Redis, solve, print the diff, publish unless --dry-run."""
    from lorafleet.infra.config import get_settings
    from lorafleet.placement.operating_points import OperatingPoints
    from lorafleet.placement.rebalancer import Rebalancer

    settings = get_settings()
    replicas = settings.num_replicas if num_replicas is None else num_replicas
    if replicas < 1 or num_periods < 1:
        raise InvalidPlacement(f"--num-replicas and --num-periods must be >= 1, got {replicas}, {num_periods}")
    # The same rebalancer as the placement controller's: live ranks from heartbeats, ranks through the store.
    points = None
    if operating_points is not None:
        fixed = OperatingPoints.load(operating_points)   # a bad file fails here, before Redis is asked
        points = lambda: (fixed, str(operating_points))   # noqa: E731 (the rebalancer reads points at each run)
    rebalancer = Rebalancer.from_settings(settings, points=points, num_periods=num_periods)
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
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object {policies, workload} (with --sweep: "
                                 "{sweep, workload})."),
    out: Path | None = typer.Option(None, help="Write simulation.json and PNG plots into this folder."),
    preset: str = typer.Option("loraserve", help="Workload preset (lorafleet.placement.workload.PRESETS)."),
    num_adapters: int | None = typer.Option(None, help="Adapters (default: preset)."),
    num_replicas: int = typer.Option(32, help="Replicas."),
    num_requests: int | None = typer.Option(None, help="Requests (default: preset)."),
    load: float = typer.Option(0.7, help="Offered tokens/s as a fraction of the cluster's rank-isolated capacity."),
    sweep: str | None = typer.Option(None, help="Load sweep START:STOP:STEP (e.g. 0.7:0.95:0.025) or a,b,c: P95 "
                                     "TTFT per policy per load and the largest load meeting the SLO."),
    seeds: str | None = typer.Option(None, help="With --sweep: comma-separated seeds (default: --seed); the "
                                     "largest load meeting the SLO is averaged over them."),
    search_load: float = typer.Option(0.9, help="With --sweep --replicas-needed: load of the replicas search."),
    zipf: float | None = typer.Option(None, help="Zipf exponent of adapter popularity (default: preset)."),
    ranks: str | None = typer.Option(None, help="Comma-separated rank mix, e.g. 8,16,32,64,128 (default: preset)."),
    rank_weights: str | None = typer.Option(None, help="Comma-separated weights of --ranks (default: uniform)."),
    kernel: str = typer.Option("padded", help="LoRA kernel cost model: padded (max rank) or sum (of ranks)."),
    interference: float = typer.Option(1.0, help="Scale of the LoRA cost term (1 = calibrated to LoRAServe Fig. 1); "
                                       "without --operating-points the points are re-profiled for it."),
    adapter_gib: float | None = typer.Option(None, help="GPU adapter memory per replica, GiB (default: the "
                                             "operating points', 8)."),
    pcie_gbps: float = typer.Option(25.0, help="Host->GPU copy bandwidth, GB/s, of s-lora-all's swaps."),
    swap_ms: float = typer.Option(1.0, help="Fixed cost per host->GPU adapter load, ms."),
    fetch_gbps: float = typer.Option(2.0, help="Adapter store -> replica bandwidth, GB/s, per replica."),
    fetch_ms: float = typer.Option(20.0, help="Fixed latency per adapter fetch from the store, ms."),
    store_gbps: float = typer.Option(0.0, help="Shared adapter store bandwidth in GB/s (0 = unlimited)."),
    drift: float | None = typer.Option(None, help="Fraction of popularity positions swapped every 300 s."),
    rebalance_period: float = typer.Option(60.0, help="Rank-aware rebalance period, simulated seconds."),
    operating_points: Path | None = typer.Option(None, help="Operating points JSON (default: packaged file)."),
    replicas_needed: bool | None = typer.Option(None, "--replicas-needed/--no-replicas-needed",
                                                help="Search the fewest replicas meeting the SLO per policy "
                                                "(default: on, off with --sweep)."),
    search_requests: int = typer.Option(100_000, help="Requests per run of the replicas-needed search."),
    record: bool = typer.Option(False, "--record", help="Also write the raw JSON through the benchmarks' result "
                                "writer (benchmarks/results/simulate-<UTC time>.json, for RESULTS.md)."),
) -> None:
    """Discrete-event simulation of the cluster under each policy: TTFT, TPOT, throughput, SLO, churn."""
    from lorafleet.placement.cost_model import StepCostModel
    from lorafleet.placement.policies import POLICY_NAMES
    from lorafleet.placement.simulator import SimConfig, cluster_capacity, compare, rate_for_load
    from lorafleet.placement.workload import PRESETS, generate

    if preset not in PRESETS:
        raise InvalidPlacement(f"unknown preset '{preset}'; choose from: {', '.join(PRESETS)}")
    names = list(POLICY_NAMES) if policies is None else [p.strip() for p in policies.split(",") if p.strip()]
    changes: dict = {"seed": seed}
    for key, value in (("num_adapters", num_adapters), ("num_requests", num_requests), ("zipf_alpha", zipf),
                       ("drift_fraction", drift)):
        if value is not None:
            changes[key] = value
    if ranks is not None:
        changes.update(ranks=_number_list(ranks, "--ranks", int), rank_weights=())
    if rank_weights is not None:
        changes["rank_weights"] = _number_list(rank_weights, "--rank-weights", float)
    if search_requests < 1:
        raise InvalidPlacement(f"--search-requests must be >= 1, got {search_requests}")
    if not interference > 0 or (adapter_gib is not None and not adapter_gib > 0):
        raise InvalidPlacement("--interference and --adapter-gib must be > 0")
    try:
        spec = PRESETS[preset].with_(**changes)
        base = StepCostModel(kernel=kernel)
        cost = base.with_(store_bytes_per_s=store_gbps * 1e9, pcie_bytes_per_s=pcie_gbps * 1e9,
                          swap_latency_s=swap_ms / 1e3, fetch_bytes_per_s=fetch_gbps * 1e9,
                          fetch_latency_s=fetch_ms / 1e3, lora_token_rank_s=base.lora_token_rank_s * interference)
    except ValueError as exc:
        raise InvalidPlacement(str(exc)) from None
    points = _points(operating_points)
    if interference != 1.0 and operating_points is None:   # capacities of the model actually simulated
        from lorafleet.placement.sim_profile import profile_operating_points

        typer.echo(f"profiling the simulated operating points at --interference {interference:g}", err=True)
        points = profile_operating_points(cost, points.rank_classes, points.slo_p95_ttft_s, points.slo_p95_tpot_s)
    memory = None if adapter_gib is None else int(adapter_gib * 2**30)
    config = SimConfig(num_replicas=num_replicas, cost=cost, points=points, max_adapter_bytes=memory,
                       rebalance_period_s=rebalance_period, seed=seed)
    workload = {
        **spec.to_dict(), "preset": preset, "load": load, "num_replicas": num_replicas, "kernel": kernel,
        "store_gbps": store_gbps, "pcie_gbps": pcie_gbps, "swap_ms": swap_ms, "fetch_gbps": fetch_gbps,
        "fetch_ms": fetch_ms, "interference": interference,
        "slo": {"p95_ttft_s": config.points.slo_p95_ttft_s, "p95_tpot_s": config.points.slo_p95_tpot_s},
        "operating_points": {str(r): round(v, 1) for r, v in config.points.points.items()},
        "mean_tokens_per_request": spec.mean_tokens_per_request,
        "rebalance_period_s": rebalance_period, "max_adapter_bytes": config.adapter_memory,
    }
    if sweep is not None:
        _simulate_sweep(spec, names, config, workload, sweep, seeds, search_load, bool(replicas_needed),
                        search_requests, as_json, record)
        return
    spec = spec.with_(request_rate=rate_for_load(spec, config.points, num_replicas, load))
    began, began_cpu = time.perf_counter(), time.process_time()
    results = compare(spec, names, config, find_replicas=replicas_needed is not False,
                      search_requests=search_requests)
    # the simulator's own speed (trace generation + every policy run + searches), kept out of --json: that
    # output is deterministic for a seed
    seconds = {"wall": time.perf_counter() - began, "cpu": time.process_time() - began_cpu}
    workload["request_rate"] = spec.request_rate
    workload["cluster_capacity_tokens_per_s"] = cluster_capacity(generate(spec.with_(num_requests=1)),
                                                                 config.points, num_replicas)
    document = {"policies": {n: r.metrics for n, r in results.items()}, "workload": workload}
    if record:
        _record("simulate", {**document, "seconds": seconds}, as_json)
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


def _simulate_sweep(spec, names, config, workload, sweep, seeds, search_load, find_replicas, search_requests,
                    as_json, record) -> None:
    from lorafleet.placement.sim_sweep import parse_loads
    from lorafleet.placement.sim_sweep import sweep as run_sweep

    loads = parse_loads(sweep)
    seed_list = _number_list(seeds, "--seeds", int) if seeds is not None else (spec.seed,)
    if find_replicas and not search_load > 0:
        raise InvalidPlacement(f"--search-load must be > 0, got {search_load}")
    progress = None if as_json else (lambda line: typer.echo(line, err=True))
    result = run_sweep(spec, names, config, loads, seed_list, search_load if find_replicas else None,
                       search_requests, progress)
    workload = {**workload, "load": None}
    document = {"sweep": result, "workload": workload}
    if record:
        _record("simulate-sweep", document, as_json)
    _show(document, as_json, _print_sweep)


def simulate_autoscaling_cmd(
    epochs: int = typer.Option(24, min=2, help="Windows in the simulated day (one autoscaling decision each)."),
    epoch_requests: int = typer.Option(4000, min=50, help="Requests per window."),
    max_replicas: int = typer.Option(32, min=1, help="Upper bound; the first window runs at it."),
    min_replicas: int = typer.Option(1, min=1, help="Lower bound."),
    peak_load: float = typer.Option(0.8, help="Noon demand as a fraction of max_replicas' rank-isolated capacity."),
    peak_to_trough: float = typer.Option(5.0, help="Noon rate / midnight rate."),
    seed: int = typer.Option(0, help="Trace seed."),
    trend_damping: float = typer.Option(0.5, min=0.0, max=1.0,
                                        help="Adapter-aware: damping of its trend forecast (0 = reactive)."),
    queue_trend_damping: float = typer.Option(0.0, min=0.0, max=1.0,
                                              help="Queue: the same forecast (0 = Serve's policy as shipped)."),
    operating_points: Path | None = typer.Option(None, help="Operating points JSON (default: the simulated 7B)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of the table."),
    record: bool = typer.Option(False, "--record", help="Also write the raw JSON under benchmarks/results/."),
) -> None:
    """Autoscaling over a diurnal day: adapter-aware vs queue length, each tuned to the same P95 TTFT SLO;
    replica-hours of each (see placement/autoscale_sim.py for the model and its limits)."""
    from lorafleet.placement.autoscale_sim import TUNING_RUNS, DiurnalSpec, compare_autoscaling
    from lorafleet.placement.simulator import SimConfig

    spec = DiurnalSpec(epochs=epochs, epoch_requests=epoch_requests, max_replicas=max_replicas,
                       min_replicas=min_replicas, peak_load=peak_load, peak_to_trough=peak_to_trough, seed=seed,
                       trend_damping=trend_damping, queue_trend_damping=queue_trend_damping)
    config = SimConfig(num_replicas=max_replicas, points=_points(operating_points), seed=seed)
    began = time.perf_counter()
    if as_json:
        document = compare_autoscaling(spec, config)
    else:
        from rich.progress import Progress

        with Progress(transient=True) as bar:
            task = bar.add_task("tuning both policies", total=sum(TUNING_RUNS.values()))
            document = compare_autoscaling(spec, config, progress=lambda: bar.advance(task))
    if record:
        _record("simulate-autoscaling", {**document, "seconds": time.perf_counter() - began}, as_json)
    _show(document, as_json, _print_autoscaling)


def _record(kind: str, document: dict, as_json: bool) -> None:
    """The raw JSON through the benchmarks' one result writer (benchmarks/results/KIND-DATE.json)."""
    from lorafleet.benchmarks.results import write_result

    recorded = write_result(kind, dict(document))
    if not as_json:
        typer.echo(f"wrote {recorded}")


def _show(document: dict, as_json: bool, printer) -> None:
    if as_json:
        typer.echo(json.dumps(document))
    else:
        printer(document)


def _print_autoscaling(document: dict) -> None:
    from rich.table import Table

    s = document["spec"]
    table = Table(title=f"a day in {s['epochs']} windows of {s['epoch_requests']} requests, rate "
                        f"{s['peak_to_trough']}x noon/midnight, {s['min_replicas']}-{s['max_replicas']} replicas, "
                        f"SLO P95 TTFT {document['slo_p95_ttft_s']} s, trend damping adapter-aware "
                        f"{s.get('trend_damping', 0)} / queue {s.get('queue_trend_damping', 0)}")
    for column in ("autoscaling", "tuned target", "replica-hours", "vs fixed", "P95 TTFT s", "meets SLO",
                   "replicas per window"):
        table.add_column(column, justify="right")
    fixed = document["fixed"]["replica_hours"]
    rows = {**document["policies"], "off (max replicas)": {**document["fixed"], "target": None}}
    for name, r in rows.items():
        table.add_row(name, "-" if r["target"] is None else f"{r['target']:g}", f"{r['replica_hours']:.4g}",
                      f"{r['replica_hours'] / fixed:.0%}", f"{r['p95_ttft_s']:.3f}", "yes" if r["meets_slo"] else "NO",
                      " ".join(str(c) for c in r["replicas"]))
    console = _console()
    console.print(table)
    if "saving" in document:
        console.print(f"adapter-aware uses {document['saving']:.1%} fewer replica-hours than queue length "
                      f"(goal: >= 25%)")


def _fmt(value, scale: float = 1.0, digits: int = 3) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def _console():
    from rich.console import Console

    console = Console()
    return console if console.is_terminal else Console(width=160)  # piped: do not squeeze tables into 80 columns


def _print_simulation(document: dict) -> None:
    from rich.table import Table

    from lorafleet.placement.sim_policies import POLICIES

    w = document["workload"]
    title = (f"{w['num_requests']} requests, {w['num_adapters']} adapters (Zipf {w['zipf_alpha']}, ranks "
             f"{w['ranks']}), {w['num_replicas']} replicas, load {w['load']:.0%}, {w['kernel']} kernels, "
             f"SLO P95 TTFT {w['slo']['p95_ttft_s']} s / TPOT {w['slo']['p95_tpot_s']} s")
    table = Table(title=title)
    for column in ("policy", "TTFT p50 s", "TTFT p95 s", "TTFT p99 s", "TPOT p95 s", "tokens/s", "SLO %",
                   "replicas for SLO", "store fetches", "PCIe swaps", "churn %", "queues"):
        table.add_column(column, justify="right", no_wrap=True)
    for name, m in document["policies"].items():
        table.add_row(name, _fmt(m["p50_ttft_s"]), _fmt(m["p95_ttft_s"]), _fmt(m["p99_ttft_s"]),
                      _fmt(m["p95_tpot_s"], digits=4), f"{m['throughput_tokens_per_s']:.0f}",
                      _fmt(m["slo_attainment"], 100, 1), str(m.get("replicas_needed") or "-"),
                      str(m["num_cold_fetches"]), str(m["num_swaps"]), _fmt(m["churn_per_rebalance"], 100, 1),
                      "growing" if m["is_queue_growing"] else "stable")
    console = _console()
    console.print(table)
    console.print(_routing_legend(document["policies"], POLICIES))


def _routing_legend(names, policies) -> str:
    return "routing: " + "; ".join(f"{n} = {policies[n].routing}" for n in names)


def _print_sweep(document: dict) -> None:
    from rich.table import Table

    s, w = document["sweep"], document["workload"]
    names, seeds = list(s["policies"]), ", ".join(str(x) for x in s["seeds"])
    console = _console()
    for seed, c in s["capacity_by_seed"].items():
        console.print(f"seed {seed}: rank-isolated capacity {c['rank_isolated_tokens_per_s']:,.0f} tokens/s (load 1.0);"
                      f" all-mixed {c['all_mixed_tokens_per_s']:,.0f} tokens/s (load {c['all_mixed_load']:.3f})")
    console.print(f"P95 TTFT (s), mean of seeds {seeds}; {w['num_requests']} requests, {w['num_replicas']} replicas, "
                  f"SLO P95 TTFT <= {w['slo']['p95_ttft_s']} s; * = queues still growing at the end of the trace")
    table = Table()
    table.add_column("load", justify="right")
    for name in names:
        table.add_column(name, justify="right", no_wrap=True)
    for k, load in enumerate(s["loads"]):
        cells = []
        for name in names:
            rows = s["policies"][name]["by_seed"].values()
            p95 = [r["p95_ttft_s"][k] for r in rows]
            growing = any(r["is_queue_growing"][k] for r in rows)
            cells.append("-" if None in p95 else f"{sum(p95) / len(p95):.3f}{'*' if growing else ''}")
        table.add_row(f"{load:.3f}", *cells)
    console.print(table)
    console.print(f"capacity: the largest load meeting the SLO (every grid load up to it meets it), seeds {seeds}")
    summary = Table()
    for column in ("policy", "per seed", "mean", "x random", "replicas for SLO" + (
            f" at {s['search_load']}" if s["search_load"] else ""), "mean replicas", "fewer than random"):
        summary.add_column(column, justify="right", no_wrap=True)
    base = s["policies"].get("random", {})
    for name in names:
        p = s["policies"][name]
        per_seed = ", ".join(_fmt(r["max_load_meeting_slo"]) for r in p["by_seed"].values())
        ratio = (p["max_load_meeting_slo_mean"] / base["max_load_meeting_slo_mean"]
                 if p["max_load_meeting_slo_mean"] and base.get("max_load_meeting_slo_mean") else None)
        replicas = ", ".join(str(r.get("replicas_for_slo") or "-") for r in p["by_seed"].values())
        mean_replicas = p.get("replicas_for_slo_mean")
        fewer = (1 - mean_replicas / base["replicas_for_slo_mean"]
                 if mean_replicas and base.get("replicas_for_slo_mean") else None)
        summary.add_row(name, per_seed, _fmt(p["max_load_meeting_slo_mean"]), _fmt(ratio, digits=2),
                        replicas if s["search_load"] else "-", _fmt(mean_replicas, digits=1), _fmt(fewer, 100, 1))
    console.print(summary)
    console.print("routing: " + "; ".join(f"{n} = {s['policies'][n]['routing']}" for n in names))


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
    rank_list = _number_list(ranks, "--ranks", int)
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
            from lorafleet.replicas import Engine
        except ImportError:
            # A LoRAFleetError, not typer.Exit: the main CLI maps it to one line and exit code 2.
            raise InvalidPlacement("lorafleet.replicas.Engine is not available in this build; "
                                   "use --simulated to profile the simulator's model") from None
        points = _profile_engine(Engine, model, rank_list, slo_ttft, slo_tpot, prompt_tokens, output_tokens,
                                 max_batch, device)
    path = points.save(out)
    summary = ", ".join(f"r{r}: {points.points[r]:.0f}" for r in points.rank_classes)
    typer.echo(f"wrote {path} (max tokens/s per rank class: {summary})")


def _profile_engine(engine_cls, model, rank_list, slo_ttft, slo_tpot, prompt_tokens, output_tokens, max_batch,
                    device):
    """The served replicas' own measurement (replicas/profiler.py) on the local engine, for an operator."""
    from lorafleet.infra.config import get_settings
    from lorafleet.placement.operating_points import OperatingPoints
    from lorafleet.replicas.profiler import ProfileSpec, profile_engine

    model_dir = Path(model or get_settings().model_dir)
    if not (model_dir / "config.json").is_file():
        raise InvalidPlacement(f"{model_dir}: no model (config.json missing); pass --model or run lorafleet make-model")
    overrides = {"max_adapters": len(rank_list), "max_rank": max(rank_list), "max_num_seqs": max_batch}
    if device is not None:
        overrides["device"] = device
    spec = ProfileSpec(tuple(rank_list), slo_ttft, slo_tpot, prompt_tokens, output_tokens, max_batch)
    with engine_cls.from_pretrained(str(model_dir), **overrides) as engine:
        doc = profile_engine(engine, spec)
    return OperatingPoints.from_dict({**doc, "source": f"engine: lorafleet profile --model {model_dir}"})


def bench_placement_cmd(
    ctx: typer.Context,
    preset: str = typer.Option("100k", help="100k (100,000 adapters x 1,000 replicas, 8 GiB) or 1m (1,000,000 x "
                               "4,096, 24 GiB)."),
    num_adapters: int | None = typer.Option(None, min=1, help="Override the preset's adapters."),
    num_replicas: int | None = typer.Option(None, min=1, help="Override the preset's replicas."),
    adapter_gib: float | None = typer.Option(None, min=0.001, help="Override the adapter memory per replica."),
    repeats: int | None = typer.Option(None, min=1, help="Timed repeats per step (the median is reported)."),
    publish: bool = typer.Option(True, "--publish/--no-publish", help="Time the Redis publish and load."),
    redis_url: str | None = typer.Option(None, help="Redis for the publish rows (default: settings redis_url); "
                                         "keys go under a throwaway prefix and are deleted."),
    out_dir: Path = typer.Option(Path("benchmarks/results"), help="Where the raw JSON goes."),
) -> None:
    """Solver time (cold, and with a previous table under ±20% demand noise), placement quality, routing table
    size, JSON and Redis publish/load times on a Zipf workload; wall and CPU seconds (pin with taskset)."""
    from dataclasses import replace

    from lorafleet.benchmarks.placement import PRESETS, print_report, run_placement_bench
    from lorafleet.benchmarks.results import write_result
    from lorafleet.cluster.cli_bench import reproducing_command

    if preset not in PRESETS:
        raise InvalidPlacement(f"--preset: choose from {', '.join(PRESETS)}")
    changes = {k: v for k, v in {"num_adapters": num_adapters, "num_replicas": num_replicas,
                                 "adapter_gib": adapter_gib, "repeats": repeats}.items() if v is not None}
    spec = replace(PRESETS[preset], publish=publish, **changes)
    result = run_placement_bench(spec, redis_url)
    path = write_result("placement", result, out_dir, command=reproducing_command(ctx))
    print_report(result)
    typer.echo(f"wrote {path}")
