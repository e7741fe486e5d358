"""The `lorafleet` CLI end to end: make-model, make-adapter, adapters validate; bad input = one line, exit 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

LORAFLEET = str(Path(sys.executable).parent / "lorafleet")


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([LORAFLEET, *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_make_model_adapter_validate(tmp_path):
    model = tmp_path / "tiny"
    assert run("make-model", str(model), "--seed", "3").returncode == 0
    for kind, rank in (("lora", 8), ("ia3", 1), ("flora", 2)):
        out = tmp_path / kind
        made = run("make-adapter", str(out), "--base", str(model), "--type", kind, "--rank", str(rank),
                   "--targets", "q_proj,v_proj,down_proj")
        assert made.returncode == 0, made.stderr
        checked = run("adapters", "validate", str(out), "--base", str(model), "--json")
        assert checked.returncode == 0, checked.stderr
        summary = json.loads(checked.stdout)
        assert summary["peft_type"] == kind.upper() and summary["max_rank"] == rank
        assert summary["target_modules"] == ["down_proj", "q_proj", "v_proj"]


@pytest.mark.parametrize("args,message", [
    (["make-model", "{tmp}/m", "--preset", "huge"], "unknown preset 'huge'"),
    (["make-adapter", "{tmp}/a", "--base", "{tmp}/none"], "config.json: base model config not found"),
    (["make-adapter", "{tmp}/a", "--base", "{model}", "--targets", "lm_head"], "unknown target modules ['lm_head']"),
    (["make-adapter", "{tmp}/a", "--base", "{model}", "--rank", "x"], "Invalid value for '--rank'"),
    (["adapters", "validate", "{tmp}/none", "--base", "{model}"], "adapter directory not found"),
    (["adapters", "validate", "{model}", "--base", "{model}"], "config.json: unexpected file"),
    (["adapters", "validate", "{tmp}", "--base", "{model}", "--id", "../x"], "invalid adapter id '../x'"),
    (["no-such-command"], "No such command"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, tiny_model_dir, args, message):
    args = [a.format(tmp=tmp_path, model=tiny_model_dir) for a in args]
    result = run(*args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
    assert message in result.stderr
    assert "Traceback" not in result.stderr + result.stdout


def test_bad_config_env_is_one_line(tmp_path, tiny_model_dir):
    result = run("adapters", "validate", str(tmp_path), "--base", str(tiny_model_dir),
                 env={"LORAFLEET_MAX_RANK": "0"})
    assert result.returncode == 2 and "setting 'max_rank'" in result.stderr
