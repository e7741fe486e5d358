"""The engine benchmark end to end on the tiny model with a miniature workload (tables, JSON, goals, CLI)."""

from __future__ import annotations

import json

import pytest
from lf_testing import in_process_cli

from lorafleet.benchmarks.engine import PRESETS, BenchSpec, run_engine_bench, workload
from lorafleet.benchmarks.engine_report import format_markdown
from lorafleet.benchmarks.results import write_result


def test_workload_is_seeded_and_round_robin():
    spec = BenchSpec(num_requests=10, prompt_tokens=5)
    requests = workload(spec, 4, (8, 16), vocab_size=100)
    assert requests == workload(spec, 4, (8, 16), vocab_size=100)
    assert [a for _, a in requests[:5]] == ["r8-0000", "r16-0001", "r8-0002", "r16-0003", "r8-0000"]
    assert all(len(p) == 5 and p[0] == 0 and max(p) < 100 for p, _ in requests)
    assert all(a is None for _, a in workload(spec, 1, None, vocab_size=100))
    assert PRESETS["full"].num_requests == 256 and PRESETS["full"].adapter_counts == (1, 8, 64, 512)


@pytest.mark.slow
def test_bench_runs_end_to_end_on_tiny(tmp_path, tiny_model_dir):
    spec = BenchSpec(num_requests=6, prompt_tokens=8, output_tokens=4, adapter_counts=(1, 3), mixed_ranks=(4, 8),
                     max_num_seqs=4, baseline_adapters=2, rank=4)
    result = run_engine_bench(tiny_model_dir, spec=spec, work_dir=tmp_path / "work", repeats=1)
    names = [r["name"] for r in result["runs"]]
    assert names[:4] == ["base model", "1 adapters r4", "3 adapters r4", "3 adapters r4/8"]
    assert len(names) == 7 and names[-1] == "ours on the baselines' workload"   # 2 adapters: not among the counts
    assert all(r["output_tokens_per_s"] > 0 for r in result["runs"])
    path = write_result("engine", result, tmp_path / "out", command="pytest")
    saved = json.loads(path.read_text())
    assert path.parent == tmp_path / "out" and saved["benchmark"] == "engine" and saved["runs"] == result["runs"]
    assert saved["goals"].keys() == {"one_adapter_vs_base", "many_adapters_vs_one", "vs_hf_peft",
                                     "vs_one_adapter_at_a_time"}
    markdown = format_markdown(result)
    assert "| base model | 0 |" in markdown and "goal >= 5" in markdown


def test_command_writes_json(tmp_path, tiny_model_dir, capsys):
    run = in_process_cli(capsys, "bench", "engine")
    code, out, _ = run("--quick", "--model-dir", tiny_model_dir, "--num-requests", "2", "--adapter-counts", "1,2",
                       "--repeats", "1", "--no-baselines", "--threads", "1", "--work-dir", tmp_path / "work",
                       "--out-dir", tmp_path / "out")
    assert code == 0, out
    [path] = (tmp_path / "out").glob("engine-*.json")
    assert f"wrote {path}" in out and "2 adapters r8/16/32/64" in out
    saved = json.loads(path.read_text())
    assert saved["command"].startswith(f"lorafleet bench engine --quick --model-dir {tiny_model_dir} --num-requests 2 "
                                       "--adapter-counts 1,2 --repeats 1 --no-baselines --threads 1 --work-dir ")
    assert [r["name"] for r in saved["runs"]] == ["base model", "1 adapters r8", "2 adapters r8",
                                                  "2 adapters r8/16/32/64"]
    assert saved["spec"]["num_requests"] == 2 and saved["hardware"]["torch_threads"] == 1
