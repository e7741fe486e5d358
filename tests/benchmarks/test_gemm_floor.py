"""benchmarks/cpu_gemm_floor.py: the GEMMs it times are the model's, and its floor adds up the workload's steps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from lorafleet.benchmarks.engine import PRESETS as WORKLOADS
from lorafleet.benchmarks.engine import flops_per_token
from lorafleet.replicas.checkpoint import PRESETS as MODELS
from lorafleet.replicas.checkpoint import hf_config
from lorafleet.replicas.weights import ModelConfig

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
import cpu_gemm_floor  # noqa: E402  (its import takes benchmarks/ off sys.path again)


def test_gemm_shapes_are_the_models_matmul_flops():
    """Every matmul parameter a token passes through, once: the engine bench's own FLOP count per token."""
    for preset in MODELS:
        config = ModelConfig.from_dict(hf_config(MODELS[preset]))
        flops = sum(2 * d_in * d_out * copies for d_in, d_out, copies in cpu_gemm_floor.gemm_shapes(preset).values())
        assert flops == flops_per_token(config), preset


def test_floor_sums_the_schedule_and_sets_engines_beside_it(tmp_path):
    engine_json = tmp_path / "engine.json"
    vllm_runs = [{"name": "vLLM max_lora_rank 64: base model", "wall_s": 5.0},
                 {"name": "vLLM max_lora_rank 8: base model", "wall_s": 4.0}]
    ours = [{"name": "base model", "wall_s": 2.0}, {"name": "1 adapters r8", "wall_s": 9.0}]
    engine_json.write_text(json.dumps({"runs": ours, "vllm": {"runs": vllm_runs}}))
    out = subprocess.run([sys.executable, "benchmarks/cpu_gemm_floor.py", "--preset", "tiny", "--repeats", "1",
                          "--engine-json", engine_json, "--out-dir", tmp_path / "out"],
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    [path] = (tmp_path / "out").glob("gemm-floor-*.json")
    saved = json.loads(path.read_text())
    spec, sched = WORKLOADS["quick"], saved["schedule"]
    assert sched == {"waves": 2, "prefill_rows": 32 * 32, "decode_rows": 32, "decode_steps_per_wave": 31}
    assert spec.num_requests == 64 and spec.max_num_seqs == 32 and spec.prompt_tokens == spec.output_tokens == 32
    gemms = {g["gemm"]: g for g in saved["gemms"]}
    assert set(gemms) == {"q/k/v", "o", "gate/up", "down", "lm_head"}
    per_wave_ms = sum(g["prefill_ms"] + 31 * g["decode_ms"] for g in gemms.values())
    assert abs(saved["floor_s"] - 2 * per_wave_ms / 1e3) < 1e-9 * saved["floor_s"] + 1e-12
    assert abs(saved["floor_output_tokens_per_s"] * saved["floor_s"] - 64 * 32) < 1e-6
    engines = saved["engines"]
    assert set(engines) == {"LoRAFleet: base model", "vLLM max_lora_rank 8: base model"}   # vLLM's faster engine
    assert engines["LoRAFleet: base model"]["wall_over_floor"] == 2.0 / saved["floor_s"]
    assert f"raw JSON: {path}" in out.stdout
