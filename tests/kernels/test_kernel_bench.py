"""Kernel benchmark on the tiny shape: result structure, ratios, tables, JSON file, command line."""

import json

import pytest
import torch

from lorafleet.kernels.bench import main, run_kernel_bench, write_results
from lorafleet.kernels.bench_report import format_markdown, format_mixed_table, format_table


@pytest.fixture(scope="module")
def result():
    threads = torch.get_num_threads()
    result = run_kernel_bench(shapes=["tiny"], token_counts=[1, 4], ranks=[1, 8], device="cpu", repeats=1,
                              threads=1)
    assert torch.get_num_threads() == threads and "on 1 threads" in result["device"]
    return result


def test_grid_and_mixed_points(result):
    assert [(p["tokens"], p["rank"]) for p in result["grid"]] == [(1, 1), (1, 8), (4, 1), (4, 8)]
    for point in result["grid"]:
        assert set(point["ms"]) == {"base", "flora", "base+delta", "base+bmm"}
        assert all(ms > 0 for ms in point["ms"].values())
        assert point["ratio_to_base"]["flora"] == pytest.approx(point["ms"]["flora"] / point["ms"]["base"])
        assert point["gbps"]["base"] > 0 and point["base_gflops"] > 0
    assert [(p["tokens"], p["op"]) for p in result["mixed"]] == [(4, "flora"), (4, "delta")]
    assert result["device_type"] == "cpu" and result["dtype"] == "float32" and result["backend"] == "torch"


def test_tables(result):
    assert format_table(result).row_count == 4
    assert format_mixed_table(result).row_count == 2
    markdown = format_markdown(result)
    assert markdown.count("| tiny |") == 6 and "padded to 128" in markdown


def test_results_file(result, tmp_path):
    path = write_results(result, tmp_path / "results")
    assert path.name.startswith("kernels-") and path.suffix == ".json"
    assert json.loads(path.read_text())["grid"] == result["grid"]


def test_command_line(tmp_path, capsys):
    assert main(["--shapes", "tiny", "--tokens", "2", "--ranks", "2", "--repeats", "1", "--device", "cpu",
                 "--results-dir", str(tmp_path)]) == 0
    assert len(list(tmp_path.glob("kernels-*.json"))) == 1
    assert "padded/mixed" in capsys.readouterr().out


def test_unknown_shape_is_rejected():
    with pytest.raises(ValueError, match="unknown shapes"):
        run_kernel_bench(shapes=["huge"], device="cpu")
