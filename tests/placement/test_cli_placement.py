"""`lorafleet simulate`, `rebalance` and `profile` end to end (subprocesses; real Redis for rebalance)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from lf_testing import simulated_points_file

from lorafleet.infra.demand import DemandCounters
from lorafleet.placement import OperatingPoints, RoutingTableStore

pytestmark = pytest.mark.timeout(300)  # a hang fails fast instead of stalling CI

SMALL = ["--num-adapters", "40", "--num-replicas", "4", "--num-requests", "2000", "--search-requests", "1000"]


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "lorafleet.cluster.cli", *args], capture_output=True, text=True,
                          env=full_env, timeout=120)


def assert_one_line_error(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert fragment in lines[0] and "Traceback" not in result.stderr


def test_simulate_json_contract_and_determinism():
    args = ["simulate", "--policies", "random,rank-aware", "--seed", "3", "--json", *SMALL]
    first, second = run_cli(*args), run_cli(*args)
    assert first.returncode == 0, first.stderr
    document = json.loads(first.stdout)  # exactly one JSON object on stdout
    assert set(document) == {"policies", "workload"}
    assert set(document["policies"]) == {"random", "rank-aware"}
    for metrics in document["policies"].values():
        for key in ("p50_ttft_s", "p95_ttft_s", "p99_ttft_s", "p95_tpot_s", "throughput_tokens_per_s",
                    "slo_attainment", "replicas_needed", "churn_per_rebalance"):
            assert key in metrics
    assert document["workload"]["seed"] == 3 and document["workload"]["num_replicas"] == 4
    assert first.stdout == second.stdout


def test_simulate_record_writes_through_the_result_writer(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lorafleet.cluster.cli", "simulate", "--policies", "random",
                             "--no-replicas-needed", "--record", *SMALL], capture_output=True, text=True, cwd=tmp_path,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    (path,) = (tmp_path / "benchmarks" / "results").glob("simulate-*.json")
    saved = json.loads(path.read_text())
    assert saved["benchmark"] == "simulate" and "--record" in saved["command"] and saved["hardware"]["cpu"]
    assert set(saved["policies"]) == {"random"} and saved["workload"]["num_replicas"] == 4
    assert saved["seconds"]["cpu"] > 0 and 0 < saved["seconds"]["wall"] < 120   # the simulator's own speed


def test_simulate_table_and_plots(tmp_path):
    result = run_cli("simulate", "--policies", "round-robin,affinity", "--no-replicas-needed", "--out",
                     str(tmp_path / "sim"), *SMALL)
    assert result.returncode == 0, result.stderr
    assert "round-robin" in result.stdout and "TTFT p95 s" in result.stdout and "PCIe swaps" in result.stdout
    assert "routing: round-robin = request i to replica i mod N" in result.stdout
    saved = json.loads((tmp_path / "sim" / "simulation.json").read_text())
    assert set(saved["policies"]) == {"round-robin", "affinity"}
    for name in ("ttft_cdf.png", "latency_bars.png", "p95_ttft_by_rank.png"):
        data = (tmp_path / "sim" / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


SWEEP = ["--sweep", "0.4:1.4:1.0", "--seeds", "1,2", "--num-adapters", "30", "--num-replicas", "4",
         "--num-requests", "1500"]


def test_simulate_sweep_json_capacity_per_policy():
    result = run_cli("simulate", "--policies", "random,s-lora-all,rank-aware", "--json", "--replicas-needed",
                     "--search-requests", "800", "--search-load", "0.5", *SWEEP)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert set(document) == {"sweep", "workload"}
    sweep = document["sweep"]
    assert sweep["loads"] == [0.4, 1.4] and sweep["seeds"] == [1, 2] and sweep["search_requests"] == 800
    for c in sweep["capacity_by_seed"].values():
        assert 0 < c["all_mixed_load"] < 1
    for name in ("random", "s-lora-all", "rank-aware"):
        entry = sweep["policies"][name]
        assert entry["routing"] and set(entry["by_seed"]) == {"1", "2"}
        for row in entry["by_seed"].values():
            assert len(row["p95_ttft_s"]) == 2 and row["is_queue_growing"][1] and not row["meets_slo"][1]
            assert row["replicas_for_slo"] >= 1
        assert entry["max_load_meeting_slo_mean"] == 0.4
    assert document["workload"]["pcie_gbps"] == 25.0 and document["workload"]["interference"] == 1.0


def test_simulate_sweep_table_and_record(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lorafleet.cluster.cli", "simulate", "--policies",
                             "random,rank-aware", "--record", *SWEEP], capture_output=True, text=True, cwd=tmp_path,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "P95 TTFT (s), mean of seeds 1, 2" in out and "largest load meeting the SLO" in out
    assert "all-mixed" in out and "routing: random = uniformly random replica" in out and "*" in out
    (path,) = (tmp_path / "benchmarks" / "results").glob("simulate-sweep-*.json")
    saved = json.loads(path.read_text())
    assert saved["benchmark"] == "simulate-sweep" and "--sweep" in saved["command"]
    assert set(saved["sweep"]["policies"]) == {"random", "rank-aware"}


def test_simulate_model_options_reach_the_workload_record():
    args = ["simulate", "--policies", "s-lora-all", "--json", "--no-replicas-needed", "--ranks", "8,128",
            "--rank-weights", "3,1", "--adapter-gib", "0.5", "--pcie-gbps", "5", "--swap-ms", "2", "--fetch-gbps",
            "1", "--fetch-ms", "30", "--interference", "2", *SMALL]
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    w, m = document["workload"], document["policies"]["s-lora-all"]
    assert w["rank_weights"] == [3.0, 1.0] and w["max_adapter_bytes"] == 2**29 and w["pcie_gbps"] == 5.0
    default = OperatingPoints.default().points
    assert float(w["operating_points"]["128"]) < 0.95 * default[128]   # re-profiled at twice the LoRA cost
    assert m["num_swaps"] > 0 and m["num_cold_fetches"] == 0


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--policies", "random,bogus"], "unknown policy 'bogus'"),
        (["--ranks", "8,x"], "--ranks"),
        (["--kernel", "fast"], "unknown kernel model"),
        (["--load", "0"], "load must be > 0"),
        (["--num-replicas", "0"], "num_replicas"),
        (["--preset", "nope"], "unknown preset"),
        (["--num-adapters", "0"], "num_adapters"),
        (["--operating-points", "/nonexistent/op.json"], "not found"),
        (["--sweep", "0.9:0.7:0.1"], "--sweep"),
        (["--sweep", "a:b:c"], "--sweep"),
        (["--sweep", "0.7,0.8", "--seeds", "x"], "--seeds"),
        (["--rank-weights", "1,-2"], "--rank-weights"),
        (["--rank-weights", "1,2"], "one weight per rank"),
        (["--interference", "0"], "--interference"),
        (["--pcie-gbps", "0"], "pcie"),
    ],
)
def test_simulate_bad_input_is_one_line_exit_2(args, fragment, capsys):
    from lorafleet.cluster.cli import main  # in-process: the same entry point as the console script

    with pytest.raises(SystemExit) as info:
        main(["simulate", "--json", *args])
    captured = capsys.readouterr()
    result = subprocess.CompletedProcess([], info.value.code, captured.out, captured.err)
    assert_one_line_error(result, fragment)
    assert captured.out == ""


@pytest.fixture
def seeded_redis(redis_prefix, tmp_path):
    client, prefix = redis_prefix
    counters, store = DemandCounters(client, prefix), RoutingTableStore(client, prefix)
    now = time.time()
    for i in range(12):
        adapter_id = f"ad-{i}"
        store.put_adapter_info(adapter_id, (8, 128)[i % 2], 0)
        for k in range(5):
            counters.record(adapter_id, 20_000 // (i + 1), 10, now=now - 30 * k)
    env = {"LORAFLEET_REDIS_PREFIX": prefix, "LORAFLEET_NUM_REPLICAS": "4", "LORAFLEET_REBALANCE_PERIOD_S": "30",
           "LORAFLEET_OPERATING_POINTS": simulated_points_file(),
           "LORAFLEET_STORE_URL": str(tmp_path / "store")}   # an empty object store of its own
    return client, prefix, store, env


def test_rebalance_dry_run_then_publish(seeded_redis):
    _, _, store, env = seeded_redis
    dry = run_cli("rebalance", "--dry-run", "--json", env=env)
    assert dry.returncode == 0, dry.stderr
    report = json.loads(dry.stdout)
    assert report["published"] is False and report["num_adapters"] == 12 and store.version() == 0
    assert report["diff"]["churn"] == 1.0 and len(report["replicas"]) == 4
    assert report["num_unknown_rank"] == 0

    published = json.loads(run_cli("rebalance", "--json", env=env).stdout)
    assert published["published"] is True and published["version"] == 1
    table = store.load()
    assert table.version == 1 and len(table.entries) == 12 and table.num_replicas == 4
    for entry in table.entries.values():
        assert sum(p for _, p in entry) == pytest.approx(1.0)

    again = run_cli("rebalance", env=env)  # rich tables, same demand: nothing moves
    assert again.returncode == 0, again.stderr
    assert "published version 2" in again.stdout and "churn 0.0%" in again.stdout
    assert store.version() == 2


def test_rebalance_after_the_registry_was_lost_still_sees_the_ranks(redis_prefix, tmp_path, tiny_model_dir):
    """Like the placement controller, `lorafleet rebalance` reads ranks through the adapter store, which rebuilds
    a registry Redis lost from the object store: no adapter falls back to the unknown (maximum) rank."""
    from lf_testing import delete_prefix, make_adapters

    from lorafleet.infra.config import load_settings
    from lorafleet.infra.registry import Registry
    from lorafleet.infra.store import AdapterStore

    client, prefix = redis_prefix
    env = {"LORAFLEET_REDIS_PREFIX": prefix, "LORAFLEET_NUM_REPLICAS": "2", "LORAFLEET_REBALANCE_PERIOD_S": "30",
           "LORAFLEET_OPERATING_POINTS": simulated_points_file(),
           "LORAFLEET_STORE_URL": str(tmp_path / "store"), "LORAFLEET_MODEL_DIR": str(tiny_model_dir)}
    store = AdapterStore.from_settings(load_settings(redis_prefix=prefix, store_url=env["LORAFLEET_STORE_URL"],
                                                     model_dir=env["LORAFLEET_MODEL_DIR"]))
    adapters = make_adapters(tmp_path / "adapters", tiny_model_dir, {
        "sql-r8": ("lora", 8, ["q_proj", "v_proj"], 0), "tone-ia3": ("ia3", 1, ["k_proj", "v_proj", "down_proj"], 1)})
    for adapter_id, path in adapters.items():
        store.push(adapter_id, path)
    delete_prefix(client, prefix)   # Redis restarted empty; the object store keeps every adapter
    assert Registry(client, prefix).list_current() == []
    counters, now = DemandCounters(client, prefix), time.time()
    for adapter_id in adapters:
        for k in range(3):
            counters.record(adapter_id, 5_000, 10, now=now - 30 * k)

    result = run_cli("rebalance", "--dry-run", "--json", env=env)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["num_adapters"] == 2 and report["num_unknown_rank"] == 0
    assert max(row["max_rank"] for row in report["replicas"]) == 8   # 128 (settings max_rank) if one was unknown
    assert {r.adapter_id for r in Registry(client, prefix).list_current()} == set(adapters)   # rebuilt


def test_rebalance_without_operating_points_says_where_they_come_from(seeded_redis):
    """A served app's replicas measure capacities on first start; without them (or a file) nothing is solved."""
    _, _, _, env = seeded_redis
    bare = {k: v for k, v in env.items() if k != "LORAFLEET_OPERATING_POINTS"}
    assert_one_line_error(run_cli("rebalance", "--dry-run", env=bare), "no operating points yet")
    with_file = run_cli("rebalance", "--dry-run", "--json", "--operating-points", simulated_points_file(), env=bare)
    assert with_file.returncode == 0, with_file.stderr
    assert json.loads(with_file.stdout)["operating_points"] == simulated_points_file()


def test_rebalance_bad_input_and_redis_down(seeded_redis):
    _, _, _, env = seeded_redis
    assert_one_line_error(run_cli("rebalance", "--num-replicas", "0", env=env), "--num-replicas")
    down = {**env, "LORAFLEET_REDIS_URL": "redis://127.0.0.1:1/0"}
    assert_one_line_error(run_cli("rebalance", "--dry-run", env=down), "Redis unreachable")


def test_profile_needs_the_engine_or_a_model(tmp_path):
    try:
        from lorafleet.replicas import Engine  # noqa: F401
    except ImportError:
        assert_one_line_error(run_cli("profile", "--out", str(tmp_path / "op.json")), "Engine is not available")
    else:
        result = run_cli("profile", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "op.json"))
        assert_one_line_error(result, "config.json missing")
    assert not (tmp_path / "op.json").exists()
    assert_one_line_error(run_cli("profile", "--ranks", "0"), "--ranks")


def test_profile_simulated_writes_loadable_points(tmp_path):
    out = tmp_path / "op.json"
    result = run_cli("profile", "--simulated", "--ranks", "8,128", "--out", str(out))
    assert result.returncode == 0, result.stderr
    points = OperatingPoints.load(out)
    assert points.rank_classes == (8, 128) and points.points[8] > points.points[128] > 0
    assert points.source.startswith("simulated")


@pytest.mark.slow
def test_profile_measures_the_local_engine(tmp_path, tiny_model_dir):
    pytest.importorskip("lorafleet.replicas", reason="the engine is not built yet")
    out = tmp_path / "op.json"
    result = run_cli("profile", "--model", str(tiny_model_dir), "--ranks", "8", "--max-batch", "2",
                     "--prompt-tokens", "8", "--output-tokens", "3", "--slo-ttft", "60", "--slo-tpot", "60",
                     "--out", str(out))
    assert result.returncode == 0, result.stderr
    points = OperatingPoints.load(out)
    assert points.source.startswith("engine") and points.rank_classes == (8,) and points.points[8] > 0
    assert "r8-b1" in points.meta["probes"]


def test_bench_placement_records_times_quality_and_the_table_it_published(tmp_path):
    """The scale benchmark on a small fleet: every step timed, the solver's quality and the table's size reported
    for what it really solved and published (a broken publish/load or an overloaded table shows here)."""
    result = run_cli("bench", "placement", "--num-adapters", "600", "--num-replicas", "8", "--repeats", "1",
                     "--out-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    [path] = tmp_path.glob("placement-*.json")
    record = json.loads(path.read_text())
    assert record["spec"]["num_adapters"] == 600 and record["spec"]["num_replicas"] == 8
    assert set(record["steps"]) >= {"solve_cold", "solve_warm", "to_json", "from_json", "publish", "load"}
    assert record["table"]["num_entries"] == 600 and record["table"]["num_pieces"] >= 600
    assert record["table"]["json_bytes"] > 600 * 10
    for kind in ("cold", "warm"):
        quality = record["quality"][kind]
        assert not quality["is_overloaded"] and quality["max_utilization"] <= 1.0
        assert sum(quality["class_budgets"].values()) == 8
    assert 0.0 <= record["quality"]["warm"]["churn"] < 0.5
    assert "solve_cold" in result.stdout and "600 adapters x 8 replicas" in result.stdout


def test_bench_placement_bad_input_is_one_line_exit_2():
    assert_one_line_error(run_cli("bench", "placement", "--num-replicas", "0"), "num-replicas")
