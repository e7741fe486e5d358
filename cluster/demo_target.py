"""A local demo app to load-test (tiny model, 20 demo adapters), in this process, with a chosen routing policy.

`lorafleet loadtest --policy-compare` / `--sweep` without --host hand `local_demo` to the load-test runner
(loadtests/ knows nothing of the cluster). The demo adapters' ids carry their ranks (`-r16`, `ia3`), so the
load-test report reads every rank class from the ids.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def delete_prefix(redis_url: str, prefix: str) -> None:
    from lorafleet.infra.redis_conn import connect

    client = connect(redis_url)
    for key in client.scan_iter(f"{prefix}:*", count=1000):
        client.delete(key)


@contextmanager
def local_demo(root: Path, policy: str = "rank-aware", *, port: int | None = None, redis_url: str | None = None,
               num_replicas: int = 2, num_cpus: int = 2, warmup_requests: int = 8) -> Iterator[str]:
    """Serve the demo on 127.0.0.1 under a fresh Redis key prefix (deleted on exit); yield its base URL.

    Settings match `lorafleet demo` (cluster/demo.py) except the prefix and a 1-hour rebalance period, so both
    policies of a comparison start from the same (default) routing table.
    """
    import httpx

    from lorafleet.cluster.demo import ensure_redis, prepare_assets
    from lorafleet.cluster.serving import serve_app
    from lorafleet.infra.config import load_settings
    from lorafleet.infra.store import AdapterStore

    base = load_settings(**({"redis_url": redis_url} if redis_url else {}))
    ensure_redis(base.redis_url)
    model_dir, adapters = prepare_assets(root)
    prefix = f"lfload-{uuid.uuid4().hex[:10]}"
    settings = load_settings(
        model_dir=str(model_dir.resolve()), store_url=str((root / "store").resolve()), redis_url=base.redis_url,
        redis_prefix=prefix, num_replicas=num_replicas, routing_policy=policy, http_port=port or free_port(),
        base_model_name="tiny", max_num_seqs=16, max_batched_tokens=512, kv_cache_bytes=32 << 20, max_adapters=8,
        max_rank=64, rebalance_period_s=3600.0,
    )
    try:
        store = AdapterStore.from_settings(settings)
        for adapter_id, path in adapters.items():
            store.push(adapter_id, path, owner="loadtest")
        with serve_app(settings, num_cpus=num_cpus) as url:
            with httpx.Client(timeout=120) as client:  # first requests pay one-off costs: keep them out
                for i in range(warmup_requests):
                    client.post(f"{url}/v1/completions",
                                json={"model": "tiny", "prompt": f"warm up {i}", "max_tokens": 4})
            yield url
    finally:
        delete_prefix(base.redis_url, prefix)
