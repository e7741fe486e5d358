"""`lorafleet loadtest` bad input (sweep conflicts included): one line on stderr, exit code 2, no report."""

from __future__ import annotations

import pytest

from lorafleet.cluster.cli import main


@pytest.mark.parametrize("args,fragment", [
    (["--host", "http://127.0.0.1:9", "--rate", "-1"], "--rate must be > 0"),
    (["--host", "http://127.0.0.1:9", "--duration", "ten"], "bad duration"),
    (["--host", "http://127.0.0.1:9", "--duration", "2s"], "cannot reach"),
    (["--rate", "2"], "--host is required"),
    (["--host", "http://127.0.0.1:9", "--adapters", "many"], "adapters"),
    (["--sweep", "2,4"], "--sweep requires --slo-ttft-p95"),
    (["--sweep", "2,4", "--slo-ttft-p95", "0.5", "--rate", "3"], "--sweep and --rate cannot be combined"),
    (["--sweep", "2,4", "--slo-ttft-p95", "0.5", "--policy-compare"], "--sweep and --policy-compare"),
    (["--sweep", "2,fast", "--slo-ttft-p95", "0.5"], "bad --sweep"),
    (["--host", "http://127.0.0.1:9", "--stop-early"], "--stop-early only applies to --sweep"),
    (["--sweep", "2", "--slo-ttft-p95", "0.5", "--engine", "trt"], "--engine is lorafleet or vllm"),
    (["--sweep", "2", "--slo-ttft-p95", "0.5", "--vllm-max-lora-rank", "64"], "--vllm-max-lora-rank needs --engine"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, args, fragment):
    out = tmp_path / "report"
    with pytest.raises(SystemExit) as exc:
        main(["loadtest", *args, "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error:") and fragment in err, err
    assert not (out / "summary.json").exists()
