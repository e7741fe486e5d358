"""The GPU scripts run from a plain checkout (lorafleet not installed) with only torch and friends: no Ray, redis,
pydantic, rich, typer or FastAPI. Here on the CPU at tiny sizes; the JSON goes through the one writer."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PLAIN_CHECKOUT = """
import runpy, sys
for name in ("ray", "redis", "pydantic", "pydantic_settings", "rich", "typer", "fastapi"):
    sys.modules[name] = None  # `import name` raises ImportError, as on a bare GPU box
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]  # lorafleet not installed
sys.argv = sys.argv[1:]
sys.path.insert(0, "benchmarks")  # what `python benchmarks/<script>.py` does
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run(script: str, *args: object) -> str:
    result = subprocess.run([sys.executable, "-c", PLAIN_CHECKOUT, f"benchmarks/{script}", *map(str, args)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_gpu_kernels_script(tmp_path):
    out = _run("gpu_kernels.py", "--shapes", "tiny", "--tokens", "2", "--ranks", "1", "--repeats", "1", "--device",
               "cpu", "--threads", "1", "--out-dir", tmp_path)
    [path] = tmp_path.glob("kernels-*.json")
    assert f"wrote {path}" in out and "| tiny | 2 | 1 |" in out   # markdown: rich is absent
    saved = json.loads(path.read_text())
    assert saved["command"].startswith("python benchmarks/gpu_kernels.py --shapes tiny")
    assert saved["hardware"]["torch_threads"] == 1 and len(saved["grid"]) == 1


def test_gpu_engine_script(tmp_path):
    out = _run("gpu_engine.py", "--device", "cpu", "--dtype", "float32", "--preset", "tiny", "--quick",
               "--num-requests", "2", "--adapter-counts", "1", "--no-baselines", "--work-dir", tmp_path / "work",
               "--out-dir", tmp_path / "out")
    [path] = (tmp_path / "out").glob("engine-*.json")
    assert f"wrote {path}" in out and "| base model | 0 |" in out
    saved = json.loads(path.read_text())
    assert saved["benchmark"] == "engine"
    assert saved["command"].startswith("python benchmarks/gpu_engine.py --device cpu")
    assert [r["name"] for r in saved["runs"]][:2] == ["base model", "1 adapters r8"]
