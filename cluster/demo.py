"""`lorafleet demo`: Redis check (or a local redis-server), tiny model, demo adapters, and what runs today."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

import typer

from lorafleet.infra.errors import StoreUnavailable

# (adapter id, type, rank, targets): one of each kind, ranks from 1 to 64, attention-only and all-linear.
DEMO_ADAPTERS: list[tuple[str, str, int, str]] = [
    ("sql-lora-r8", "lora", 8, "q_proj,v_proj"),
    ("chat-lora-r64", "lora", 64, "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"),
    ("style-ia3", "ia3", 1, "k_proj,v_proj,down_proj"),
    ("tone-flora-r4", "flora", 4, "q_proj,v_proj,up_proj"),
]


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
    root: Path = typer.Option(Path(".lorafleet"), help="Where the demo model and adapters live."),
) -> None:
    """Start what LoRAFleet can run locally: Redis, tiny model, demo adapters, validated."""
    from rich.console import Console
    from rich.table import Table

    from lorafleet.infra.adapters import load_adapter_dir
    from lorafleet.infra.base_spec import BaseModelSpec
    from lorafleet.infra.config import load_settings

    console = Console()
    settings = load_settings()
    state = ensure_redis(settings.redis_url)
    console.print(f"Redis at {settings.redis_url}: {state}")
    model_dir, adapters = prepare_assets(root)
    console.print(f"tiny model: {model_dir}")
    spec = BaseModelSpec.from_model_dir(model_dir)
    table = Table(title="demo adapters (validated against the base)")
    for column in ("adapter id", "type", "ranks", "targets", "bytes"):
        table.add_column(column)
    for adapter_id, path in adapters.items():
        summary = load_adapter_dir(path, spec, max_rank=settings.max_rank).summary()
        table.add_row(
            adapter_id, summary["peft_type"], ",".join(map(str, summary["ranks"])),
            ",".join(summary["target_modules"]), str(summary["num_bytes"]),
        )
    console.print(table)
    console.print(
        "The Ray Serve app is not built yet (issue 8), so no HTTP server is started. "
        f"Try: .venv/bin/lorafleet adapters validate {adapters['sql-lora-r8']} --base {model_dir}"
    )
