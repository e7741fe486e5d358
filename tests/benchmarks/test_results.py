"""The one result writer: file name and place, the header (hardware, date, command), no clobbering."""

from __future__ import annotations

import json
import os
import re

import torch

from lorafleet.benchmarks.results import RESULTS_DIR, command_line, write_result


def test_writer_puts_the_file_in_the_given_dir_with_hardware_and_command(tmp_path):
    result = {"rows": [{"x": 1}]}
    path = write_result("demo", result, tmp_path / "out", command="lorafleet bench demo --quick")
    assert path.parent == tmp_path / "out" and re.fullmatch(r"demo-\d{8}T\d{6}Z\.json", path.name)
    saved = json.loads(path.read_text())
    assert list(saved)[:4] == ["benchmark", "date", "command", "hardware"]
    assert saved["benchmark"] == "demo" and saved["command"] == "lorafleet bench demo --quick"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", saved["date"])
    hw = saved["hardware"]
    assert hw["cpu"] and hw["num_cpus"] == os.cpu_count() and hw["python"]
    assert hw["torch"] == torch.__version__ and hw["torch_threads"] == torch.get_num_threads()
    assert saved["rows"] == [{"x": 1}]
    assert result == saved   # the header is added in place, so printed tables show what the file holds


def test_two_results_in_one_second_keep_both_files(tmp_path):
    paths = {write_result("demo", {"i": i}, tmp_path, command="c") for i in range(3)}
    assert len(paths) == 3 and sorted(json.loads(p.read_text())["i"] for p in paths) == [0, 1, 2]


def test_default_command_is_this_process_command_line():
    assert command_line(["/x/.venv/bin/lorafleet", "bench", "router", "--quick"]) == "lorafleet bench router --quick"
    assert command_line(["benchmarks/gpu_kernels.py", "--shapes", "a b"]) == \
        "python benchmarks/gpu_kernels.py --shapes 'a b'"
    assert write_result.__defaults__ == (RESULTS_DIR, None) and str(RESULTS_DIR) == "benchmarks/results"
