"""`lorafleet bench store` smoke test: the whole benchmark path on a 0.5 MiB adapter (real Redis, a local
moto_server started by the benchmark), the JSON written, CLI wiring."""

from __future__ import annotations

import json

from lf_testing import REDIS_URL, in_process_cli


def test_store_bench_smoke(tmp_path, capsys):
    from lorafleet.infra.redis_conn import connect

    run = in_process_cli(capsys, "bench", "store")
    code, out, _ = run("--sizes", "r1-q", "--repeats", "1", "--fetchers", "3", "--rounds", "1", "--redis-url",
                       REDIS_URL, "--work-dir", tmp_path, "--out-dir", tmp_path / "results")
    assert code == 0, out
    [path] = (tmp_path / "results").glob("store-*.json")
    assert f"wrote {path}" in out
    saved = json.loads(path.read_text())
    assert saved["benchmark"] == "store" and saved["s3"] == "local moto_server"
    assert saved["command"] == (f"lorafleet bench store --sizes r1-q --repeats 1 --fetchers 3 --rounds 1 "
                                f"--redis-url {REDIS_URL} --work-dir {tmp_path} --out-dir {tmp_path / 'results'}")
    rows = saved["rows"]
    tiers = {(r["tier"], r["state"]) for r in rows}
    for tier in ("redis", "local dir", "s3 server"):
        assert (tier, "cold") in tiers and (tier, "warm") in tiers and (tier, "3 fetchers x 1") in tiers
    flight = next(r for r in rows if r["tier"] == "s3 single-flight")
    assert flight["num_object_store_fetches"] == 1
    assert all(r["mb_s"] > 0 for r in rows)
    client = connect(REDIS_URL)
    assert not list(client.scan_iter(match="bench-store-*"))  # cleaned up


def test_store_command_help_and_bad_preset(tmp_path, capsys):
    run = in_process_cli(capsys, "bench", "store")
    code, out, _ = run("--help")
    assert code == 0 and "Fetch latency per tier" in out
    code, _, err = run("--sizes", "r9000", "--out-dir", tmp_path)
    assert code == 2 and "unknown presets ['r9000']" in err and not list(tmp_path.iterdir())
