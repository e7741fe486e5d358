"""Kernel benchmark on the tiny shape: result structure, ratios, tables, the JSON written, the command line."""

import json

import pytest
import torch
from lf_testing import in_process_cli

from lorafleet.benchmarks.kernels import run_kernel_bench
from lorafleet.benchmarks.kernels_report import format_markdown, format_mixed_table, format_table
from lorafleet.benchmarks.results import write_result


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = run_kernel_bench(shapes=["tiny"], token_counts=[1, 4], ranks=[1, 8], device="cpu", repeats=1)
        path = write_result("kernels", result, tmp_path_factory.mktemp("results"), command="test")
    finally:
        torch.set_num_threads(threads)
    assert "on 1 threads" in result["device"]
    return result, path


def test_grid_and_mixed_points(written):
    result, _ = written
    assert [(p["tokens"], p["rank"]) for p in result["grid"]] == [(1, 1), (1, 8), (4, 1), (4, 8)]
    for point in result["grid"]:
        assert set(point["ms"]) == {"base", "flora", "base+delta", "base+bmm"}
        assert all(ms > 0 for ms in point["ms"].values())
        assert point["ratio_to_base"]["flora"] == pytest.approx(point["ms"]["flora"] / point["ms"]["base"])
        assert point["gbps"]["base"] > 0 and point["base_gflops"] > 0
    assert [(p["tokens"], p["op"]) for p in result["mixed"]] == [(4, "flora"), (4, "delta")]
    assert result["device_type"] == "cpu" and result["dtype"] == "float32" and result["backend"] == "torch"


def test_tables(written):
    result, _ = written
    assert format_table(result).row_count == 4
    assert format_mixed_table(result).row_count == 2
    markdown = format_markdown(result)
    assert markdown.count("| tiny |") == 6 and "padded to 128" in markdown
    assert f"torch {torch.__version__}" in markdown and result["date"] in markdown


def test_results_file(written):
    result, path = written
    assert path.name.startswith("kernels-") and path.suffix == ".json"
    saved = json.loads(path.read_text())
    assert saved["benchmark"] == "kernels" and saved["command"] == "test" and saved["hardware"]["torch_threads"] == 1
    assert saved["grid"] == result["grid"] and saved["mixed"] == result["mixed"]


def test_command_line(tmp_path, capsys):
    run = in_process_cli(capsys, "bench", "kernels")
    code, out, _ = run("--shapes", "tiny", "--tokens", "2", "--ranks", "2", "--repeats", "1", "--device", "cpu",
                       "--threads", "1", "--markdown", "--out-dir", tmp_path)
    assert code == 0 and "padded/mixed" in out and "| tiny | 2 | 2 |" in out
    [path] = tmp_path.glob("kernels-*.json")
    assert f"wrote {path}" in out
    saved = json.loads(path.read_text())
    assert saved["command"] == (f"lorafleet bench kernels --shapes tiny --tokens 2 --ranks 2 --device cpu --repeats 1 "
                                f"--threads 1 --markdown --out-dir {tmp_path}")
    assert saved["hardware"]["torch_threads"] == 1 and [p["tokens"] for p in saved["grid"]] == [2]


def test_bad_input_is_rejected(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown shapes"):
        run_kernel_bench(shapes=["huge"], device="cpu")
    run = in_process_cli(capsys, "bench", "kernels")
    code, _, err = run("--shapes", "huge", "--out-dir", tmp_path)
    assert code == 2 and "unknown shapes" in err
    assert run("--dtype", "int8", "--out-dir", tmp_path)[0] == 2
    assert not list(tmp_path.iterdir())
