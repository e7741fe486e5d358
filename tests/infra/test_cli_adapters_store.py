"""`lorafleet adapters push/list/show/versions/rm/reindex` against real Redis and a local store."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import redis
from lf_testing import in_process_cli

from lorafleet.infra.version_record import VersionRecord


@pytest.fixture
def cli(monkeypatch, capsys, prefix, tmp_path, tiny_model_dir):
    """cli(*args) -> (exit code, stdout, stderr), in-process, with settings pointing at this test's store."""
    monkeypatch.setenv("LORAFLEET_REDIS_PREFIX", prefix)
    monkeypatch.setenv("LORAFLEET_STORE_URL", str(tmp_path / "store"))
    monkeypatch.setenv("LORAFLEET_MODEL_DIR", str(tiny_model_dir))
    monkeypatch.setenv("COLUMNS", "200")

    return in_process_cli(capsys)


def test_push_list_show_versions_rm(cli, adapter_dirs):
    code, out, err = cli("adapters", "push", adapter_dirs["lora8"], "--id", "sql-r8", "--owner", "alice")
    assert code == 0, err
    assert out.startswith("pushed sql-r8 version 1: LORA rank 8 on q_proj,v_proj (")
    code, out, _ = cli("adapters", "push", adapter_dirs["flora2"], "--id", "sql-r8", "--json")
    assert code == 0 and json.loads(out)["version"] == 2 and json.loads(out)["peft_type"] == "FLORA"
    assert cli("adapters", "push", adapter_dirs["ia3"], "--id", "ia3.v1")[0] == 0

    code, out, _ = cli("adapters", "list")
    assert code == 0 and "2 adapters" in out
    assert "sql-r8" in out and "FLORA" in out and "ia3.v1" in out and "alice" not in out
    lines = cli("adapters", "list", "--json")[1].splitlines()
    assert [json.loads(line)["adapter_id"] for line in lines] == ["ia3.v1", "sql-r8"]

    code, out, _ = cli("adapters", "show", "sql-r8")
    assert code == 0 and "version                    2" in out and "q_proj=2" in out
    assert json.loads(cli("adapters", "show", "sql-r8", "--version", "1", "--json")[1])["owner"] == "alice"

    code, out, _ = cli("adapters", "versions", "sql-r8")
    assert code == 0 and "2 versions" in out and "LORA" in out and "FLORA" in out
    rows = [json.loads(line) for line in cli("adapters", "versions", "sql-r8", "--json")[1].splitlines()]
    assert [(r["version"], r["is_current"]) for r in rows] == [(1, False), (2, True)]

    code, out, _ = cli("adapters", "rm", "sql-r8")
    assert code == 0 and out.startswith("removed sql-r8 (version 2; soft delete")
    assert "sql-r8" in cli("adapters", "list", "--removed")[1]
    assert "(removed)" in cli("adapters", "versions", "sql-r8")[1]
    code, _, err = cli("adapters", "show", "sql-r8")
    assert code == 2 and "error: adapter 'sql-r8' was removed at" in err
    code, out, _ = cli("adapters", "rm", "sql-r8", "--purge")
    assert code == 0 and out.startswith("purged sql-r8: all versions forgotten, 4 blobs deleted")
    code, out, _ = cli("adapters", "reindex")
    assert code == 0 and out.strip() == "reindexed 1 versions: 1 adapters live, 0 removed"


@pytest.mark.parametrize("args,message", [
    (["adapters", "push", "{lora8}", "--id", "../etc"], "error: invalid adapter id '../etc'"),
    (["adapters", "push", "{lora8}", "--id", "x" * 129], "error: invalid adapter id"),
    (["adapters", "push", "{tmp}/none", "--id", "a"], "adapter directory not found"),
    (["adapters", "push", "{lora8}", "--id", "a", "--base", "{tmp}"], "config.json: base model config not found"),
    (["adapters", "show", "nope"], "error: adapter 'nope' not found"),
    (["adapters", "show", "a/b"], "error: invalid adapter id 'a/b'"),
    (["adapters", "versions", "nope"], "error: adapter 'nope' not found"),
    (["adapters", "rm", "nope", "--purge"], "error: adapter 'nope' not found"),
])
def test_bad_input_is_one_line_exit_2(cli, adapter_dirs, tmp_path, args, message):
    args = [a.format(tmp=tmp_path, lora8=adapter_dirs["lora8"]) for a in args]
    code, out, err = cli(*args)
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert "Traceback" not in out + err


def test_oversized_adapter_is_refused(cli, adapter_dirs, monkeypatch):
    monkeypatch.setenv("LORAFLEET_MAX_ADAPTER_BYTES", "1000")
    code, _, err = cli("adapters", "push", adapter_dirs["lora8"], "--id", "big")
    assert code == 2 and "over the limit of 1000 bytes" in err


def test_thousand_adapters_listed_in_a_few_redis_round_trips(cli, redis_client, prefix, monkeypatch):
    """Listing reads the registry in bulk: a per-adapter read (1000 round trips) is the bug this catches."""
    pipe = redis_client.pipeline(transaction=False)
    for i in range(1000):
        record = VersionRecord(f"a{i:04d}", 1, "LORA", 8, {"q_proj": 8}, {
            "adapter_config.json": ("c" * 64, 300), "adapter_model.safetensors": (f"{i:064x}", 16 << 20)},
            time.time(), "bulk")
        pipe.hset(f"{prefix}:adapters:registry", record.adapter_id, record.to_json())
    pipe.execute()
    calls: list[str] = []
    real = redis.Redis.execute_command

    me = threading.get_ident()

    def counted(self, *args, **options):
        if threading.get_ident() == me:       # other tests' background pollers share this process
            calls.append(str(args[0]))
        return real(self, *args, **options)

    monkeypatch.setattr(redis.Redis, "execute_command", counted)
    code, out, _ = cli("adapters", "list", "--json")
    code_table, table, _ = cli("adapters", "list")
    assert code == code_table == 0 and "1000 adapters" in table
    listed = [json.loads(line)["adapter_id"] for line in out.splitlines()]
    assert listed == [f"a{i:04d}" for i in range(1000)]
    assert 0 < len(calls) <= 20, calls[:40]


def test_redis_down_is_one_clear_line(tmp_path):
    """Real process: no traceback, exit 2, the line names Redis and where it was looked for."""
    lorafleet = str(Path(sys.executable).parent / "lorafleet")
    env = {**os.environ, "LORAFLEET_REDIS_URL": "redis://127.0.0.1:1/0", "LORAFLEET_STORE_URL": str(tmp_path)}
    result = subprocess.run([lorafleet, "adapters", "list"], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: adapter registry (list adapters): Redis at redis://127.0.0.1:1/0 is ")
