"""`lorafleet keys add/list/rm` against real Redis (own prefix): digests stored, keys shown once, errors one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from lf_testing import REDIS_URL, free_port, in_process_cli

from lorafleet.router.key_store import key_digest


@pytest.fixture
def cli(monkeypatch, capsys, redis_prefix):
    """cli(*args) -> (exit code, stdout, stderr), in-process, with settings pointing at this test's prefix."""
    monkeypatch.setenv("LORAFLEET_REDIS_PREFIX", redis_prefix[1])
    monkeypatch.setenv("LORAFLEET_REDIS_URL", REDIS_URL)
    monkeypatch.setenv("COLUMNS", "200")

    return in_process_cli(capsys)


def test_add_list_rm(cli, redis_prefix):
    client, prefix = redis_prefix
    code, out, err = cli("keys", "add", "--adapters", "alpha-lora,beta-lora,alpha-lora", "--name", "team-a")
    assert code == 0, err
    key = out.strip()
    assert len(out.splitlines()) == 1 and len(key) >= 40   # stdout is the key alone: KEY=$(lorafleet keys add ...)
    digest = key_digest(key)
    assert f"added API key {digest[:12]} (adapters alpha-lora,beta-lora, name 'team-a')" in err
    assert "LORAFLEET_API_KEYS_FROM_REDIS=1" in err   # this environment's routers would not read it
    other = cli("keys", "add", "--all")[1].strip()

    stored = client.hgetall(f"{prefix}:api_keys")
    assert set(stored) == {digest.encode(), key_digest(other).encode()}
    record = json.loads(stored[digest.encode()])
    assert record["adapters"] == ["alpha-lora", "beta-lora"] and record["name"] == "team-a"
    dump = b"".join(k + v for k, v in stored.items())
    assert key.encode() not in dump and other.encode() not in dump   # only digests in Redis

    code, out, err = cli("keys", "list")
    assert code == 0 and "2 API keys" in out and digest[:12] in out and "alpha-lora,beta-lora" in out, err
    assert "team-a" in out and key not in out and other not in out
    rows = [json.loads(line) for line in cli("keys", "list", "--json")[1].splitlines()]
    assert [r["digest"] for r in rows] == [digest, key_digest(other)]   # oldest first
    assert rows[1]["adapters"] == "*"

    code, out, err = cli("keys", "rm", digest[:6].upper())
    assert code == 0 and out.startswith(f"removed API key {digest[:12]}"), err
    assert set(client.hkeys(f"{prefix}:api_keys")) == {key_digest(other).encode()}
    assert cli("keys", "list")[1].count("1 API key") == 1


def test_base_model_only_key(cli):
    code, out, err = cli("keys", "add", "--adapters", "")
    assert code == 0 and "(adapters (base model only))" in err
    assert json.loads(cli("keys", "list", "--json")[1])["adapters"] == []


@pytest.mark.parametrize("args,message", [
    (["keys", "add"], "give exactly one of --adapters a,b and --all"),
    (["keys", "add", "--all", "--adapters", "a"], "give exactly one of --adapters a,b and --all"),
    (["keys", "add", "--adapters", "../x"], "invalid adapter id '../x'"),
    (["keys", "add", "--all", "--name", "x" * 65], "at most 64 printable characters"),
    (["keys", "rm", "ab"], "not a digest prefix"),
    (["keys", "rm", "0000"], "no API key with digest prefix '0000'"),
])
def test_bad_input_is_one_line_exit_2(cli, args, message):
    code, out, err = cli(*args)
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: ") and message in err, err
    assert out == ""


def test_ambiguous_prefix_and_a_key_given_instead_of_a_digest(cli, redis_prefix):
    client, prefix = redis_prefix
    a, b = "abcd" + "0" * 60, "abcd" + "1" * 60
    client.hset(f"{prefix}:api_keys", mapping={a: json.dumps("*"), b: json.dumps("*")})
    code, _, err = cli("keys", "rm", "abcd")
    assert code == 2 and err == "error: digest prefix 'abcd' matches 2 API keys; give more characters\n"
    assert cli("keys", "rm", "abcd1")[0] == 0
    assert client.hkeys(f"{prefix}:api_keys") == [a.encode()]
    key = cli("keys", "add", "--all")[1].strip()
    code, _, err = cli("keys", "rm", key)   # the key itself by mistake: refused, and not echoed
    assert code == 2 and key not in err and "never the key itself" in err


def test_bad_entries_are_listed_as_warnings(cli, redis_prefix):
    client, prefix = redis_prefix
    good = cli("keys", "add", "--all")[1].strip()
    client.hset(f"{prefix}:api_keys", mapping={"f" * 64: b"[1, 2]", "not-a-digest": b'"*"'})
    code, out, err = cli("keys", "list")
    assert code == 0 and "1 API key" in out and key_digest(good)[:12] in out
    assert f"warning: API key {'f' * 12} in {prefix}:api_keys skipped" in err
    assert "1 field(s)" in err and "not-a-digest" not in err + out


@pytest.mark.parametrize("args", [["keys", "add", "--all"], ["keys", "list"], ["keys", "rm", "abcd"]])
def test_redis_down_is_one_clear_line(args):
    """Real process: no traceback, exit 2, the line names Redis and where it was looked for."""
    lorafleet = str(Path(sys.executable).parent / "lorafleet")
    url = f"redis://127.0.0.1:{free_port()}/0"
    env = {**os.environ, "LORAFLEET_REDIS_URL": url}
    result = subprocess.run([lorafleet, *args], capture_output=True, text=True, timeout=60, env=env)
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and result.stdout == "", result.stderr
    assert result.stderr.startswith("error: API keys (") and f"Redis at {url} is unreachable" in result.stderr
