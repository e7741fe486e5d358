"""`lorafleet demo`: Redis check (or a local redis-server), tiny model, demo adapters, and what runs today."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import typer

from lorafleet.infra.errors import StoreUnavailable

ATTN, ALL = "q_proj,v_proj", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
# (adapter id, type, rank, targets): 20 adapters, every kind, ranks 1..64, attention-only and all-linear.
DEMO_ADAPTERS: list[tuple[str, str, int, str]] = [
    ("sql-lora-r8", "lora", 8, ATTN),
    ("chat-lora-r64", "lora", 64, ALL),
    ("style-ia3", "ia3", 1, "k_proj,v_proj,down_proj"),
    ("tone-flora-r4", "flora", 4, "q_proj,v_proj,up_proj"),
    *[(f"tenant{i:02d}-lora-r{r}", "lora", r, ATTN if i % 2 else ALL)
      for i, r in enumerate((1, 2, 4, 8, 16, 32, 64, 16, 8, 4), start=1)],
    *[(f"tenant{i:02d}-ia3", "ia3", 1, "k_proj,v_proj,down_proj") for i in (11, 12, 13)],
    *[(f"tenant{i:02d}-flora-r{r}", "flora", r, ATTN) for i, r in ((14, 2), (15, 8), (16, 16))],
]
DEMO_REDIS_PREFIX = "lorafleet-demo"


def register(app: typer.Typer) -> None:
    app.command("demo")(demo_cmd)


def ensure_redis(url: str, wait_s: float = 5.0) -> str:
    """Ping Redis at `url`; if nothing answers on a local address, start redis-server; else StoreUnavailable."""
    import redis

    def ping() -> bool:
        try:
            return bool(redis.Redis.from_url(url, socket_connect_timeout=0.5).ping())
        except (redis.ConnectionError, redis.TimeoutError, OSError):
            return False

    if ping():
        return "running"
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 6379
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise StoreUnavailable(f"no Redis answers at {url}; start it or set LORAFLEET_REDIS_URL")
    server = shutil.which("redis-server")
    if server is None:
        raise StoreUnavailable(
            f"no Redis answers at {url} and redis-server is not installed: "
            "run `apt-get install redis-server` or set LORAFLEET_REDIS_URL"
        )
    subprocess.run(
        [server, "--port", str(port), "--bind", host, "--daemonize", "yes", "--save", "", "--appendonly", "no"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if ping():
            return "started"
        time.sleep(0.1)
    raise StoreUnavailable(f"started redis-server on {host}:{port} but it does not answer at {url}")


def prepare_assets(root: Path) -> tuple[Path, dict[str, Path]]:
    """Tiny model and demo adapters under `root` (made once; reused when present)."""
    from lorafleet.infra.adapter_maker import make_adapter
    from lorafleet.replicas.checkpoint import make_model

    model_dir = root / "models" / "tiny"
    if not (model_dir / "model.safetensors").is_file():
        make_model(model_dir, "tiny", seed=0)
    adapters = {}
    for seed, (adapter_id, kind, rank, targets) in enumerate(DEMO_ADAPTERS, start=1):
        path = root / "adapters" / adapter_id
        if not (path / "adapter_model.safetensors").is_file():
            make_adapter(path, model_dir, kind, rank, targets.split(","), seed=seed)
        adapters[adapter_id] = path
    return model_dir, adapters


def demo_cmd(
    root: Path = typer.Option(Path(".lorafleet"), help="Where the demo model, adapters and store live."),
    port: int = typer.Option(8000, help="HTTP port on 127.0.0.1."),
    num_replicas: int = typer.Option(2, min=1, help="CPU replicas."),
    policy: str = typer.Option("rank-aware", help="Routing policy: rank-aware, random or affinity."),
) -> None:
    """Serve the tiny model with 20 demo adapters on 127.0.0.1 (local Ray, CPU replicas) until Ctrl-C."""
    from rich.console import Console

    from lorafleet.cluster.serving import serve_app, stop_on_signals, wait_forever
    from lorafleet.infra.config import load_settings
    from lorafleet.infra.store import AdapterStore

    console = Console()
    base = load_settings()
    state = ensure_redis(base.redis_url)
    console.print(f"Redis at {base.redis_url}: {state}")
    model_dir, adapters = prepare_assets(root)
    settings = load_settings(
        model_dir=str(model_dir.resolve()), store_url=str((root / "store").resolve()),
        redis_prefix=base.redis_prefix if "LORAFLEET_REDIS_PREFIX" in os.environ else DEMO_REDIS_PREFIX,
        num_replicas=num_replicas, routing_policy=policy, http_port=port, base_model_name="tiny",
        max_num_seqs=16, max_batched_tokens=512, kv_cache_bytes=32 << 20, max_adapters=8, max_rank=64,
        rebalance_period_s=10.0,
    )
    store = AdapterStore.from_settings(settings)
    for adapter_id, path in adapters.items():
        record = store.push(adapter_id, path, owner="demo", if_changed=True)  # a restart adds no versions
        console.print(f"{adapter_id}: version {record.version}, {record.peft_type} rank {record.max_rank}")
    console.print(f"starting Ray Serve with {num_replicas} CPU replicas (first start takes a minute)...")
    with stop_on_signals(), serve_app(settings, num_cpus=max(2, num_replicas)) as url:
        console.print(EXAMPLES.format(url=url, adapter="sql-lora-r8"), markup=False, highlight=False)
        console.print("serving; Ctrl-C to stop")
        wait_forever()
    console.print("stopped the app and the local Ray")


EXAMPLES = """LoRAFleet is serving at {url}  (OpenAI-compatible; `model` = adapter id, or `tiny` for the base)

  curl {url}/v1/models
  curl {url}/v1/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "{adapter}", "prompt": "SELECT name FROM", "max_tokens": 16, "temperature": 0}}'
  curl -N {url}/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{{"model": "chat-lora-r64", "messages": [{{"role": "user", "content": "hi"}}], "stream": true}}'
  curl {url}/v1/placement ; curl -X POST {url}/v1/placement/rebalance ; curl {url}/metrics

  python -c "from openai import OpenAI; c = OpenAI(base_url='{url}/v1', api_key='none'); \\
print(c.completions.create(model='style-ia3', prompt='Hello', max_tokens=8).choices[0].text)"
"""
