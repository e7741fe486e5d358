"""`lorafleet bench store` smoke test: the whole benchmark path on a 0.5 MiB adapter, results JSON, CLI wiring."""

from __future__ import annotations

import json

import typer
from typer.testing import CliRunner

from lorafleet.cluster.cli_bench_store import register_bench


def test_store_bench_smoke(tmp_path, s3_server, redis_client):
    from lorafleet.infra.store_bench import run_store_bench

    results = run_store_bench(["r1-q"], repeats=1, num_fetchers=3, rounds=1, redis_url="redis://127.0.0.1:6379/0",
                              s3_endpoint=s3_server.endpoint, out_dir=tmp_path / "results", work_dir=tmp_path,
                              print_table=False)
    saved = json.loads((tmp_path / "results").glob("store-*.json").__next__().read_text())
    assert saved["rows"] == results["rows"]
    tiers = {(r["tier"], r["state"]) for r in results["rows"]}
    for tier in ("redis", "local dir", "s3 server"):
        assert (tier, "cold") in tiers and (tier, "warm") in tiers and (tier, "3 fetchers x 1") in tiers
    assert ("host", "warm") in tiers
    flight = next(r for r in results["rows"] if r["tier"] == "s3 single-flight")
    assert flight["num_object_store_fetches"] == 1
    assert all(r["mb_s"] > 0 for r in results["rows"])
    assert not list(redis_client.scan_iter(match="bench-store-*"))  # cleaned up


def test_register_bench_adds_store_command():
    bench = typer.Typer()
    register_bench(bench)
    app = typer.Typer()
    app.add_typer(bench, name="bench")
    runner = CliRunner()
    assert "Fetch latency per tier" in runner.invoke(app, ["bench", "store", "--help"]).output
    result = runner.invoke(app, ["bench", "store", "--sizes", "r9000"])
    assert result.exit_code == 2 and "unknown presets ['r9000']" in result.output
