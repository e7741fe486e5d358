"""Store benchmark (`lorafleet bench store`): adapter fetch latency per tier (Redis hot blobs, local dir, S3 server),
cold and warm, and throughput with concurrent fetchers, each against a raw read of the same bytes."""

from __future__ import annotations

import functools
import shutil
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any
from urllib.parse import urlparse

from lorafleet.benchmarks import store_setup as setup
from lorafleet.infra.object_store import LocalDirObjectStore, S3ObjectStore, blob_key
from lorafleet.infra.redis_conn import connect
from lorafleet.infra.store import AdapterStore
from lorafleet.infra.store_source import StoreSource
from lorafleet.infra.version_record import BUNDLE_FILES, VersionRecord

BIG = 4 * 2**30  # hot cache budget and size limit that hold every benchmark adapter


def timed(fn: Callable[[], object], repeats: int, before: Callable[[], object] | None = None) -> list[float]:
    """Seconds per call of fn; `before` runs untimed ahead of each call (e.g. to make the next call cold)."""
    seconds = []
    for _ in range(repeats):
        if before is not None:
            before()
        start = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - start)
    return seconds


def concurrently(fns: list[Callable[[], object]]) -> float:
    """Wall seconds for all fns started together on their own threads."""
    barrier = threading.Barrier(len(fns) + 1)
    errors: list[BaseException] = []

    def run(fn: Callable[[], object]) -> None:
        barrier.wait()
        try:
            fn()
        except BaseException as exc:  # re-raised below on the caller's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(fn,)) for fn in fns]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return time.perf_counter() - start


def _repeat(fn: Callable[..., object], times: int, *args: object) -> None:
    for _ in range(times):
        fn(*args)  # results dropped at once: 32 fetchers holding every copy would only measure memory pressure


def _row(tier: str, adapter: str, state: str, num_bytes: int, seconds: float, raw_seconds: float | None,
         raw: str, **extra: object) -> dict:
    mb_s = num_bytes / seconds / 1e6
    raw_mb_s = num_bytes / raw_seconds / 1e6 if raw_seconds else None
    return {"tier": tier, "adapter": adapter, "state": state, "num_bytes": num_bytes, "p50_ms": seconds * 1e3,
            "mb_s": mb_s, "raw_mb_s": raw_mb_s, "ratio": mb_s / raw_mb_s if raw_mb_s else None, "raw": raw, **extra}


class _Bench:
    def __init__(self, redis_url: str, s3_endpoint: str, root: Path, repeats: int) -> None:
        self.redis_url, self.s3_endpoint, self.repeats = redis_url, s3_endpoint, repeats
        self.prefix = f"bench-store-{uuid.uuid4().hex[:8]}"
        self.bucket = f"lorafleet-bench-{uuid.uuid4().hex[:8]}"
        setup.s3_client(s3_endpoint).create_bucket(Bucket=self.bucket)
        self.local_root = root / "objects"
        self.redis = connect(redis_url, timeout_s=60)
        self._s3 = setup.s3_client(s3_endpoint)
        parsed = urlparse(redis_url)
        self.redis_host, self.redis_port = parsed.hostname or "127.0.0.1", parsed.port or 6379
        self.rows: list[dict] = []

    def store(self, backend: str, *, hot: bool, fresh_connections: bool = False) -> AdapterStore:
        client = connect(self.redis_url, timeout_s=60) if fresh_connections else self.redis
        if backend == "local":
            objects = LocalDirObjectStore(self.local_root)
        else:
            objects = S3ObjectStore(self.bucket, "lf", endpoint_url=self.s3_endpoint,
                                    client=setup.s3_client(self.s3_endpoint) if fresh_connections else self._s3)
        return AdapterStore(objects, client, f"{self.prefix}-{backend}", base=setup.llama7b_spec(),
                            hot_cache_max_bytes=BIG if hot else 0, max_rank=64, max_bytes=BIG)

    def close(self) -> None:
        keys = list(self.redis.scan_iter(match=f"{self.prefix}*", count=1000))
        for i in range(0, len(keys), 1000):
            self.redis.delete(*keys[i : i + 1000])

    def push(self, name: str, files: dict[str, bytes]) -> VersionRecord:
        num_bytes = sum(map(len, files.values()))
        record = None
        for backend in ("local", "s3"):
            store = self.store(backend, hot=True)
            start = time.perf_counter()
            record = store.push(name, files=files, owner="bench")
            self.rows.append(_row(f"push → {backend}", name, "validate+write", num_bytes,
                                  time.perf_counter() - start, None, "-"))
        return record

    def median(self, fn: Callable[[], object], before: Callable[[], object] | None = None) -> float:
        return statistics.median(timed(fn, self.repeats, before))

    def raw_s3(self, client: Any, shas: list[str]) -> list[bytes]:
        return [client.get_object(Bucket=self.bucket, Key="lf/" + blob_key(s))["Body"].read() for s in shas]

    def latency(self, name: str, record: VersionRecord) -> None:
        n = record.num_bytes
        shas = [record.files[f][0] for f in BUNDLE_FILES]
        blob_paths = [self.local_root / blob_key(sha) for sha in shas]
        read_files = lambda: [p.read_bytes() for p in blob_paths]  # noqa: E731
        # Redis hot blobs: registry lookup + pipelined GETs + sha256 check; cold = a new connection
        hot = self.store("local", hot=True)
        keys = [hot.hot.blob_prefix + sha for sha in shas]
        state: dict = {}
        with StoreSource(hot) as src:
            src.fetch(name)  # the blobs are hot from here on
            raw = self.median(lambda: self.redis.mget(keys))
            self.rows.append(_row("redis", name, "warm", n, self.median(lambda: src.fetch(name)), raw, "redis-py MGET"))
        cold = self.median(lambda: state["src"].fetch(name),
                           before=lambda: state.update(src=StoreSource(self.store("local", hot=True,
                                                                                    fresh_connections=True))))
        has_cli = shutil.which("redis-cli") is not None
        cli = self.median(lambda: setup.redis_cli_get(self.redis_host, self.redis_port, keys)) if has_cli else None
        self.rows.append(_row("redis", name, "cold", n, cold, cli, "redis-cli GET" if has_cli else "no redis-cli"))
        # local directory: registry lookup + file reads + sha256 check; cold = evicted from the page cache
        with StoreSource(self.store("local", hot=False)) as src:
            evict = lambda: setup.drop_page_cache(blob_paths)  # noqa: E731
            cold, raw_cold = self.median(lambda: src.fetch(name), evict), self.median(read_files, evict)
            self.rows.append(_row("local dir", name, "cold", n, cold, raw_cold, "file read"))
            warm, raw_warm = self.median(lambda: src.fetch(name)), self.median(read_files)
            self.rows.append(_row("local dir", name, "warm", n, warm, raw_warm, "file read"))
        # S3 server: registry lookup + GetObject + sha256 check; cold = new client and connections
        cold = self.median(lambda: state["src"].fetch(name),
                           before=lambda: state.update(src=StoreSource(self.store("s3", hot=False,
                                                                                    fresh_connections=True))))
        raw_cold = self.median(lambda: self.raw_s3(state["client"], shas),
                               before=lambda: state.update(client=setup.s3_client(self.s3_endpoint)))
        self.rows.append(_row("s3 server", name, "cold", n, cold, raw_cold, "boto3 GetObject"))
        with StoreSource(self.store("s3", hot=False)) as src:
            src.fetch(name)
            warm, raw_warm = self.median(lambda: src.fetch(name)), self.median(lambda: self.raw_s3(self._s3, shas))
            self.rows.append(_row("s3 server", name, "warm", n, warm, raw_warm, "boto3 GetObject"))

    def throughput(self, name: str, record: VersionRecord, num_fetchers: int, rounds: int) -> None:
        """num_fetchers replicas (a StoreSource each) fetch the same adapter `rounds` times each."""
        n = record.num_bytes * num_fetchers * rounds
        shas = [record.files[f][0] for f in BUNDLE_FILES]
        blob_paths = [self.local_root / blob_key(sha) for sha in shas]
        hot = self.store("local", hot=True)
        tiers: dict[str, tuple[AdapterStore, Callable[[], object], str]] = {
            "redis": (hot, lambda: self.redis.mget([hot.hot.blob_prefix + s for s in shas]), "redis-py MGET"),
            "local dir": (self.store("local", hot=False), lambda: [p.read_bytes() for p in blob_paths], "file read"),
            "s3 server": (self.store("s3", hot=False), lambda: self.raw_s3(self._s3, shas), "boto3 GetObject"),
        }
        for tier, (store, raw_read, raw_name) in tiers.items():
            sources = [StoreSource(store) for _ in range(num_fetchers)]
            seconds = concurrently([functools.partial(_repeat, s.fetch, rounds, name) for s in sources])
            raw = concurrently([lambda: _repeat(raw_read, rounds)] * num_fetchers)
            self.rows.append(_row(tier, name, f"{num_fetchers} fetchers x {rounds}", n, seconds, raw, raw_name))
        # single-flight: num_fetchers threads of one replica asking for an adapter it lacks -> one S3 fetch
        with StoreSource(self.store("s3", hot=False)) as src:
            seconds = concurrently([lambda: src.fetch(name)] * num_fetchers)
            num_fetches = src.metrics.snapshot()["hits"]["object_store"]
        with StoreSource(self.store("s3", hot=False)) as one:   # holds no copies: every fetch reads S3
            single = self.median(lambda: one.fetch(name))
        self.rows.append(_row("s3 single-flight", name, f"{num_fetchers} waiters -> {num_fetches} fetch",
                              record.num_bytes, seconds, single, "1 fetch alone", num_object_store_fetches=num_fetches))


def run_store_bench(
    presets: list[str] | None = None, *, repeats: int = 5, num_fetchers: int = 32, rounds: int = 2,
    redis_url: str | None = None, s3_endpoint: str | None = None, work_dir: str | Path | None = None,
) -> dict:
    """Run the store benchmark; return plain data (the caller writes it with benchmarks.results.write_result
    and prints it with print_results)."""
    from lorafleet.infra.config import load_settings

    presets = presets or ["r8-qkvo", "r64-all"]
    unknown = [p for p in presets if p not in setup.PRESETS]
    if unknown:
        raise ValueError(f"unknown adapter presets {unknown}; choose from: {', '.join(setup.PRESETS)}")
    redis_url = redis_url or load_settings().redis_url
    server = None if s3_endpoint else setup.MotoServerProcess().start()
    endpoint = s3_endpoint if server is None else server.endpoint
    try:
        # work_dir: where the local object store lives (a real disk: cold reads must come from it)
        with TemporaryDirectory(prefix="lorafleet-bench-store-", dir=work_dir) as tmp:
            bench = _Bench(redis_url, str(endpoint), Path(tmp), repeats)
            try:
                for i, name in enumerate(presets):
                    files = setup.make_llama7b_adapter(setup.PRESETS[name], seed=i)
                    record = bench.push(name, files)
                    bench.latency(name, record)
                    if i == 0:
                        bench.throughput(name, record, num_fetchers, rounds)
                    del files
            finally:
                bench.close()
    finally:
        if server is not None:
            server.stop()
    return {
        "reference_mb_s": _reference_speeds(), "redis_url": redis_url, "s3": s3_endpoint or "local moto_server",
        "repeats": repeats, "num_fetchers": num_fetchers, "rounds": rounds,
        "adapters": {p: {"rank": setup.PRESETS[p].rank, "targets": list(setup.PRESETS[p].targets)} for p in presets},
        "rows": bench.rows,
    }


def _reference_speeds(num_bytes: int = 64 * 2**20) -> dict[str, float]:
    """What bounds the tiers on this machine: sha256 (checked on every fetch) and a memory copy, in MB/s."""
    import hashlib

    data = bytes(num_bytes)
    sha = statistics.median(timed(lambda: hashlib.sha256(data).digest(), 3))
    copy = statistics.median(timed(lambda: bytearray(data), 3))
    return {"sha256": num_bytes / sha / 1e6, "memcpy": num_bytes / copy / 1e6}


def print_results(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    hardware = results.get("hardware", {})   # the header write_result adds
    table = Table(title=f"adapter store fetch ({hardware.get('cpu', '-')}, {results.get('date', '-')})")
    for name in ("tier", "adapter", "MiB", "state", "p50 ms", "MB/s", "raw MB/s", "ratio", "raw read"):
        table.add_column(name, justify="left" if name in ("tier", "adapter", "state", "raw read") else "right")
    fmt = lambda v, spec: "-" if v is None else format(v, spec)  # noqa: E731
    for r in results["rows"]:
        table.add_row(r["tier"], r["adapter"], f"{r['num_bytes'] / 2**20:.1f}", r["state"], fmt(r["p50_ms"], ".2f"),
                      fmt(r["mb_s"], ".0f"), fmt(r["raw_mb_s"], ".0f"), fmt(r["ratio"], ".2f"), r["raw"])
    console = Console()
    console.width = max(console.width, 150)  # the table is wide; wrapping cells would garble it in a pipe
    console.print(table)
    ref = results["reference_mb_s"]
    console.print(f"this machine: sha256 {ref['sha256']:.0f} MB/s, memcpy {ref['memcpy']:.0f} MB/s")
