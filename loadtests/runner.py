"""`lorafleet loadtest`: plan the workload, run Locust headless in a subprocess with a live progress display,
then write the report folder (Locust CSV + HTML, summary.json, report.md, PNG plots) and print the SLO table."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path

from lorafleet.loadtests.load_plan import LoadPlan, LoadTestError, build_plan
from lorafleet.placement.workload import LengthDist

COMPARE_POLICIES = ("random", "rank-aware")
# (demo_root, routing policy, number of adapters) -> a context manager that serves a local demo app and yields its
# base URL; the CLI passes cluster.demo_target.local_demo (load tests do not import the cluster).
DemoStarter = Callable[[Path, str, int], AbstractContextManager[str]]
REPLICA_SYNC_S = 5.0   # replicas poll their assignment every second, then fetch and install
LOCUSTFILE = Path(__file__).with_name("locustfile.py")
_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s?)?$")


def parse_duration(text: str) -> float:
    """'60s', '90', '2m', '1m30s', '1h' -> seconds (> 0)."""
    match = _DURATION.match(text.strip().lower())
    if not text.strip() or match is None or not any(match.groups()):
        raise LoadTestError(f"bad duration {text!r}: use e.g. 60s, 2m, 1m30s")
    hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    total = hours * 3600 + minutes * 60 + seconds
    if total <= 0:
        raise LoadTestError(f"duration must be > 0, got {text!r}")
    return total


@dataclass(frozen=True, slots=True)
class LoadTestConfig:
    """One `lorafleet loadtest` invocation; prompt/output lengths are lognormal medians (placement/workload.py)."""

    host: str | None
    rate: float
    duration_s: float
    num_adapters: int
    zipf: float
    out_dir: Path
    is_policy_compare: bool = False
    slo_ttft_p95_s: float | None = None
    prompt_tokens: int = 32
    output_tokens: int = 16
    length_sigma: float = 0.5
    chat_fraction: float = 0.25
    seed: int = 0
    drain_s: float = 30.0
    demo_root: Path = Path(".lorafleet")
    sweep_rates: tuple[float, ...] = ()  # capacity search (sweep.py): one run per rate, ascending
    warmup_s: float = 0.0   # --policy-compare: an unmeasured run first (then rank-aware rebalances)
    is_stop_early: bool = False  # sweep only: stop after two consecutive rates fail

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise LoadTestError(f"--rate must be > 0 requests/s, got {self.rate}")
        if not self.duration_s > 0:
            raise LoadTestError(f"--duration must be > 0, got {self.duration_s}s")
        if self.num_adapters < 1 or self.zipf < 0:
            raise LoadTestError("--adapters must be >= 1 and --zipf >= 0")
        if self.slo_ttft_p95_s is not None and self.slo_ttft_p95_s <= 0:
            raise LoadTestError(f"--slo-ttft-p95 must be > 0 seconds, got {self.slo_ttft_p95_s}")
        if self.prompt_tokens < 1 or self.output_tokens < 1 or self.length_sigma < 0:
            raise LoadTestError("token lengths must be >= 1 and their sigma >= 0")
        if self.sweep_rates:
            if self.is_policy_compare:
                raise LoadTestError("--sweep and --policy-compare cannot be combined")
            if self.slo_ttft_p95_s is None:
                raise LoadTestError("--sweep requires --slo-ttft-p95 (capacity is the highest rate meeting it)")
            if min(self.sweep_rates) <= 0 or list(self.sweep_rates) != sorted(set(self.sweep_rates)):
                raise LoadTestError(f"--sweep rates must be > 0 and ascending, got {list(self.sweep_rates)}")
        elif self.is_stop_early:
            raise LoadTestError("--stop-early only applies to --sweep")
        if not self.is_policy_compare and not self.sweep_rates and not self.host:
            raise LoadTestError("--host is required (or --policy-compare / --sweep to load-test a local demo)")

    def params(self) -> dict:
        out = asdict(self)
        out["out_dir"], out["demo_root"] = str(self.out_dir), str(self.demo_root)
        out["sweep_rates"] = list(self.sweep_rates)
        return out


def fetch_adapter_ids(host: str, timeout_s: float = 5.0) -> list[str]:
    """Adapter ids the server lists at /v1/models (cards with a parent); LoadTestError if it cannot be reached."""
    import httpx

    try:
        response = httpx.get(f"{host.rstrip('/')}/v1/models", timeout=timeout_s)
        response.raise_for_status()
        cards = response.json()["data"]
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        raise LoadTestError(f"cannot reach a LoRAFleet server at {host}: {exc.__class__.__name__}: {exc}") from None
    adapters = [c["id"] for c in cards if c.get("parent")]
    if not adapters:
        raise LoadTestError(f"{host}/v1/models lists no adapters; push some first (`lorafleet adapters push`)")
    return sorted(adapters)


def plan_for_host(host: str, *, rate: float, duration_s: float, num_adapters: int, zipf: float, seed: int = 0,
                  prompt_tokens: int = 32, output_tokens: int = 16, length_sigma: float = 0.5,
                  chat_fraction: float = 0.25) -> LoadPlan:
    """The plan for the adapters `host` lists; ranks are read from the ids (`-r16`, `ia3`), as the demo's carry."""
    return build_plan(
        fetch_adapter_ids(host), {}, rate=rate, duration_s=duration_s, zipf=zipf,
        num_adapters=num_adapters, chat_fraction=chat_fraction, seed=seed,
        prompt_tokens=LengthDist(prompt_tokens, length_sigma, 1, 8 * prompt_tokens),
        output_tokens=LengthDist(output_tokens, length_sigma, 1, 8 * output_tokens),
    )


def _count_new(path: Path, offset: int) -> tuple[int, int, int]:
    """(new complete lines, of which errors, new offset) appended to the records file since `offset`."""
    if not path.is_file():
        return 0, 0, offset
    with path.open("rb") as f:
        f.seek(offset)
        data = f.read()
    end = data.rfind(b"\n") + 1
    lines = data[:end].splitlines()
    return len(lines), sum(b'"ok": false' in line for line in lines), offset + end


def run_locust(host: str, plan: LoadPlan, out_dir: Path, *, drain_s: float, label: str, console) -> float:
    """Locust headless (subprocess: gevent monkey-patching stays out of this process) replaying `plan`;
    shows progress, returns the wall time in seconds. Writes locust_*.csv, locust.html, locust.log, records.jsonl."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    out_dir = out_dir.resolve()   # Locust runs in out_dir: every path it is given must not be relative
    out_dir.mkdir(parents=True, exist_ok=True)
    records = out_dir / "records.jsonl"
    records.unlink(missing_ok=True)
    env = {**os.environ, "LORAFLEET_LOADTEST_PLAN": str(plan.to_json(out_dir / "plan.json")),
           "LORAFLEET_LOADTEST_RECORDS": str(records), "LORAFLEET_LOADTEST_DRAIN_S": str(drain_s)}
    run_time = int(plan.duration_s + drain_s + 30)  # backstop: the scheduler quits when the plan is done
    command = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-u", "1", "-r", "1",
               "-t", f"{run_time}s", "--host", host, "--csv", str(out_dir / "locust"), "--csv-full-history",
               "--html", str(out_dir / "locust.html"), "--only-summary", "--exit-code-on-error", "0",
               "--stop-timeout", "5", "--loglevel", "WARNING"]
    done = errors = offset = 0
    started = time.monotonic()
    with (out_dir / "locust.log").open("w") as log, Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
        TextColumn("{task.fields[errors]} errors · {task.fields[rate]:.1f} req/s"), console=console,
        transient=False,
    ) as progress:
        task = progress.add_task(label, total=len(plan.requests), errors=0, rate=0.0)
        proc = subprocess.Popen(command, cwd=out_dir, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            while proc.poll() is None:
                time.sleep(0.5)
                new, new_errors, offset = _count_new(records, offset)
                done, errors = done + new, errors + new_errors
                progress.update(task, completed=done, errors=errors,
                                rate=done / max(time.monotonic() - started, 1e-9))
                if time.monotonic() - started > run_time + 60:
                    proc.kill()
                    raise LoadTestError(f"locust did not stop after {run_time + 60}s; see {out_dir / 'locust.log'}")
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    wall_s = time.monotonic() - started
    if proc.returncode != 0 or not (out_dir / "locust_stats.csv").is_file():
        tail = (out_dir / "locust.log").read_text()[-800:]
        raise LoadTestError(f"locust failed (exit {proc.returncode}); last output:\n{tail}")
    return wall_s


def report_run(config: LoadTestConfig, plan: LoadPlan, out_dir: Path, wall_s: float, title: str,
               extra: dict | None = None) -> tuple[dict, list[dict]]:
    """summary.json, report.md and the PNG plots of one run; returns (summary, records)."""
    from lorafleet.loadtests.plots import plot_run
    from lorafleet.loadtests.report import load_records, locust_counts, markdown_table, summarize, write_summary

    records = load_records(out_dir / "records.jsonl")
    # The run's length without Locust's start-up: first request start to last request end.
    if records:
        wall_s = max(r["t"] + r["latency_s"] for r in records) - min(r["t"] for r in records)
    params = {**config.params(), **(extra or {}), "num_planned": len(plan.requests),
              "planned_share_by_rank_class": plan.request_share_by_rank_class(),
              "adapter_ids_by_popularity": list(plan.adapter_ids)}
    summary = summarize(records, wall_s=wall_s, params=params, locust=locust_counts(out_dir / "locust_stats.csv"),
                        slo_ttft_p95_s=config.slo_ttft_p95_s)
    write_summary(summary, out_dir / "summary.json")
    (out_dir / "report.md").write_text(f"# {title}\n\n{markdown_table({title: summary})}\n")
    plot_run(records, plan.duration_s, out_dir, title)
    return summary, records


def adapter_states(host: str) -> dict[str, int]:
    """Requests so far by where their adapter was at the replica (base / device / host / cold = fetched from the
    store), summed over replicas, from the router's /metrics (lorafleet_adapter_cache_requests_total). A server
    whose metrics cannot be read gives {}: the report then has no adapter-state column."""
    import httpx

    try:
        return adapter_states_from_metrics(httpx.get(f"{host}/metrics", timeout=10).text)
    except httpx.HTTPError:
        return {}


def adapter_states_from_metrics(text: str) -> dict[str, int]:
    """{adapter state: requests} summed over replicas, from a Prometheus text exposition."""
    from prometheus_client.parser import text_string_to_metric_families

    totals: dict[str, int] = {}
    for family in text_string_to_metric_families(text):
        if family.name != "lorafleet_adapter_cache_requests":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total"):
                state = sample.labels.get("adapter_state", "?")
                totals[state] = totals.get(state, 0) + int(sample.value)
    return totals


def run_one(config: LoadTestConfig, host: str, out_dir: Path, label: str, console,
            extra: dict | None = None, *, duration_s: float | None = None, seed: int | None = None
            ) -> tuple[dict, list[dict]]:
    """Plan at config.rate against `host`, replay it with Locust into out_dir, report; (summary, records)."""
    duration_s = config.duration_s if duration_s is None else duration_s
    plan = plan_for_host(host, rate=config.rate, duration_s=duration_s, num_adapters=config.num_adapters,
                         zipf=config.zipf, seed=config.seed if seed is None else seed,
                         prompt_tokens=config.prompt_tokens, output_tokens=config.output_tokens,
                         length_sigma=config.length_sigma, chat_fraction=config.chat_fraction)
    before = adapter_states(host)
    wall_s = run_locust(host, plan, out_dir, drain_s=config.drain_s, label=label, console=console)
    after = adapter_states(host)
    states = {k: after.get(k, 0) - before.get(k, 0) for k in after} if after else {}
    title = (f"{label}: {config.rate:g} req/s, {duration_s:g} s, {config.num_adapters} adapters, "
             f"zipf {config.zipf:g}")
    summary, records = report_run(config, plan, out_dir, wall_s, title, extra)
    if states:
        summary["adapter_states"] = states   # what the replicas found: cold = a load from the store
        from lorafleet.loadtests.report import write_summary

        write_summary(summary, out_dir / "summary.json")
    return summary, records


def warm_up(config: LoadTestConfig, host: str, out_dir: Path, policy: str, console) -> None:
    """The same workload (another seed) for config.warmup_s, unmeasured, so demand counters and caches are past
    their first minute; then, for rank-aware, a rebalance from that demand, and time for the replicas to act on
    the new table (prefetch) before the measured run starts."""
    import httpx

    run_one(config, host, out_dir, f"{policy} warm-up", console, duration_s=config.warmup_s, seed=config.seed + 1)
    if policy == "rank-aware":
        response = httpx.post(f"{host}/v1/placement/rebalance", timeout=120)
        report = response.json() if response.status_code == 200 else {}
        console.print(f"rebalanced: table version {report.get('version')}, {report.get('num_adapters')} adapters "
                      f"placed" if report else f"rebalance failed ({response.status_code}): {response.text[:200]}")
        time.sleep(REPLICA_SYNC_S)


def make_console():
    """A rich Console: the terminal's width, 120 columns when piped."""
    from rich.console import Console

    return Console(width=None if sys.stdout.isatty() else 120)


def run_loadtest(config: LoadTestConfig, console=None, *, start_demo: DemoStarter | None = None) -> dict[str, dict]:
    """Run one load test against config.host, or with is_policy_compare one per routing policy against a local
    demo app that `start_demo` serves; print the SLO table. (A capacity sweep is sweep.run_sweep.)

    Returns {run name: summary}. With a comparison the runs go to out_dir/<policy>/ and out_dir gets the
    combined summary.json, report.md and ttft_cdf.png (both policies on one plot).
    """
    from lorafleet.loadtests.plots import plot_ttft_cdf
    from lorafleet.loadtests.report import markdown_table, slo_table

    assert not config.sweep_rates, "a sweep runs through sweep.run_sweep"
    if config.is_policy_compare and start_demo is None:
        raise LoadTestError("--policy-compare needs a local demo app to start (start_demo)")
    console = console or make_console()
    config.out_dir.mkdir(parents=True, exist_ok=True)
    summaries: dict[str, dict] = {}
    if not config.is_policy_compare:
        assert config.host is not None, "the CLI requires --host without --policy-compare or --sweep"
        fetch_adapter_ids(config.host)  # fail fast, before anything is written
        summaries["loadtest"], _ = run_one(config, config.host, config.out_dir, "loadtest", console)
    else:
        assert start_demo is not None
        if config.host:
            console.print(f"--policy-compare load-tests a local demo app; ignoring --host {config.host}")
        all_records = {}
        for policy in COMPARE_POLICIES:
            console.print(f"starting the local demo app with routing policy [bold]{policy}[/] ...")
            with start_demo(config.demo_root, policy, config.num_adapters) as url:
                if config.warmup_s > 0:
                    warm_up(config, url, config.out_dir / policy / "warm-up", policy, console)
                summaries[policy], all_records[policy] = run_one(
                    config, url, config.out_dir / policy, policy, console, extra={"routing_policy": policy})
        write_summary_all = {"params": config.params(), "runs": summaries}
        (config.out_dir / "summary.json").write_text(json.dumps(write_summary_all, indent=2) + "\n")
        (config.out_dir / "report.md").write_text(f"# Routing policy comparison\n\n{markdown_table(summaries)}\n")
        plot_ttft_cdf(all_records, config.out_dir / "ttft_cdf.png", "TTFT by routing policy and rank class")
    console.print(slo_table(summaries))
    console.print(f"report: {config.out_dir}")
    return summaries
