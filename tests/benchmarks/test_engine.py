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
    assert all(r["cpu_s"] > 0 and r["output_tokens_per_cpu_s"] > 0 for r in result["runs"] if "ttft_mean_s" in r)
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


def test_vllm_table_and_goals_by_wall_and_cpu_time():
    """ours / vLLM per workload and max_lora_rank, by wall time and by process CPU time (runs made up)."""
    from lorafleet.benchmarks.engine_report import vllm_goals_line, vllm_rows

    def run(name: str, wall: float, cpu: float) -> dict:
        return {"name": name, "num_adapters": 0, "output_tokens_per_s": wall, "output_tokens_per_cpu_s": cpu,
                "total_tokens_per_s": 2 * wall, "gflops": 1.0}

    spec = {"adapter_counts": [1, 64], "rank": 8, "mixed_ranks": [8, 64], "vllm_max_lora_ranks": [64, 8]}
    result = {"spec": spec, "runs": [run("base model", 100, 200), run("64 adapters r8", 90, 180),
                                     run("64 adapters r8/64", 80, 160)],
              "vllm": {"runs": [run("vLLM max_lora_rank 64: base model", 50, 160),
                                run("vLLM max_lora_rank 64: 64 adapters r8/64", 20, 40),
                                run("vLLM max_lora_rank 8: 64 adapters r8", 60, 90)]}}
    no_r8_base = vllm_goals_line(result)
    header, body = vllm_rows(result)
    assert header == ("run", "LoRAFleet out tok/s", "vLLM r64", "ours / r64", "ours / r64 (CPU)", "vLLM r8",
                      "ours / r8", "ours / r8 (CPU)")
    assert body[0] == ("base model", "100.0", "50.0", "2.00x", "1.25x", "—", "—", "—")
    assert body[1][5:] == ("60.0", "1.50x", "2.00x")
    line = vllm_goals_line(result)
    assert "base model / vLLM max_lora_rank 64 = 2.00 (1.25 by CPU time) (goal >= 1.3)" in line
    assert "64 adapters r8 / vLLM max_lora_rank 8 = 1.50 (2.00 by CPU time) (goal >= 1.5)" in line
    assert "64 adapters r8/64 / vLLM max_lora_rank 64 = 4.00 (4.00 by CPU time) (goal >= 3.0)" in line
    assert no_r8_base == line
    # With a base run at both ranks, the base goal is against vLLM's faster one (here the rank-8 engine).
    result["vllm"]["runs"].append(run("vLLM max_lora_rank 8: base model", 80, 100))
    assert "base model / vLLM max_lora_rank 8 = 1.25 (2.00 by CPU time) (goal >= 1.3)" in vllm_goals_line(result)
