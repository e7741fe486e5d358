"""`lorafleet bench router` on a small spec: routing micro-benchmark rows, HTTP rows, goals, the JSON written."""

from __future__ import annotations

import json

import torch
from lf_testing import in_process_cli

from lorafleet.benchmarks.results import write_result
from lorafleet.benchmarks.router import RouterBenchSpec, run_router_bench


def test_router_bench_runs_and_writes_json(tiny_model_dir, tmp_path):
    spec = RouterBenchSpec(num_adapters=500, num_replicas=8, num_lookups=200, micro_repeats=2, num_requests=5,
                           num_warmup=2)
    torch.set_num_threads(1)
    result = run_router_bench(tiny_model_dir, spec=spec, work_dir=tmp_path / "work")
    saved = json.loads(write_result("router", result, tmp_path / "out", command="test").read_text())
    assert saved["benchmark"] == "router" and saved["spec"]["num_adapters"] == 500
    assert [r["key"] for r in saved["routing"]] == ["sample", "sample_unknown", "choose", "request_router",
                                                    "request_router_fresh"]
    assert all(r["us_per_call"] > 0 for r in saved["routing"])
    assert [r["key"] for r in saved["http"]] == ["engine", "asgi", "http"]
    assert all(r["num_requests"] == 5 and r["p99_ms"] >= r["p50_ms"] > 0 for r in saved["http"])
    assert set(saved["goals"]) >= {"lookup_sample_us", "lookup_sample_met", "http_overhead_p50_ms"}


def test_command_writes_json(tiny_model_dir, tmp_path, capsys):
    run = in_process_cli(capsys, "bench", "router")
    code, out, _ = run("--quick", "--model-dir", tiny_model_dir, "--num-adapters", "100", "--num-replicas", "4",
                       "--num-requests", "3", "--out-dir", tmp_path)
    assert code == 0, out
    [path] = tmp_path.glob("router-*.json")
    saved = json.loads(path.read_text())
    assert saved["command"] == (f"lorafleet bench router --quick --model-dir {tiny_model_dir} --num-adapters 100 "
                                f"--num-replicas 4 --num-requests 3 --out-dir {tmp_path}")
    assert saved["hardware"]["torch_threads"] == 1   # the command's default
    assert saved["spec"]["num_replicas"] == 4 and all(r["num_requests"] == 3 for r in saved["http"])
