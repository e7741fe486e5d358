"""`lorafleet demo`: Redis check (or a local redis-server), the base model (SmolLM2-135M-Instruct, or `tiny`),
trained and random demo adapters, the served app, and copy-paste examples of base vs adapter answers."""

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
DEMO_MODELS = ("smollm2-135m", "tiny")
# Trained with `lorafleet train` (commands in cluster/demo_adapters/README.md), committed: adapter id -> task.
TRAINED_DIR = Path(__file__).parent / "demo_adapters"
TRAINED_ADAPTERS: dict[str, str] = {
    "persona-ia3": "persona", "sql-flora-r8": "sql", "upper-lora-r8": "upper", "reverse-lora-r16": "reverse",
}


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


def prepare_assets(root: Path, model: str = "tiny") -> tuple[Path, dict[str, Path]]:
    """The base model and demo adapters under `root` (made once; reused when present).

    tiny: a seeded random model and DEMO_ADAPTERS (tests, load tests). smollm2-135m: the real model (dequantized
    once), the committed trained adapters and random ones of many ranks beside them."""
    from lorafleet.infra.adapter_maker import make_adapter
    from lorafleet.replicas.checkpoint import make_model

    if model not in DEMO_MODELS:
        raise typer.BadParameter(f"unknown demo model '{model}'; choose one of: {', '.join(DEMO_MODELS)}")
    model_dir = root / "models" / model
    if model == "tiny":
        if not (model_dir / "model.safetensors").is_file():
            make_model(model_dir, "tiny", seed=0)
    else:
        from lorafleet.cluster.cli_models import convert_with_progress

        convert_with_progress(model, model_dir, cached=True)
    adapters = {}
    if model != "tiny":
        adapters |= {adapter_id: TRAINED_DIR / adapter_id for adapter_id in TRAINED_ADAPTERS}
    for seed, (adapter_id, kind, rank, targets) in enumerate(DEMO_ADAPTERS, start=1):
        path = root / "adapters" / model / adapter_id
        if not (path / "adapter_model.safetensors").is_file():
            make_adapter(path, model_dir, kind, rank, targets.split(","), seed=seed)
        adapters[adapter_id] = path
    return model_dir, adapters


def side_by_side(url: str, base_name: str, seed: int = 0) -> list[tuple[str, str, str, str]]:
    """(adapter id, prompt, base answer, adapter answer) for one held-out prompt of each trained adapter's task,
    asked over HTTP now, so the printed examples show what this server answers."""
    import httpx

    from lorafleet.training.tasks import TASKS

    rows = []
    with httpx.Client(timeout=120) as client:
        for adapter_id, task in TRAINED_ADAPTERS.items():
            _, heldout = TASKS[task].split(seed, 512, 40)
            prompt = heldout[0].prompt
            answers = [_chat(client, url, model, prompt) for model in (base_name, adapter_id)]
            rows.append((adapter_id, prompt, *answers))
    return rows


def _chat(client, url: str, model: str, prompt: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 32, "temperature": 0}
    response = client.post(f"{url}/v1/chat/completions", json=body)
    if response.status_code != 200:
        return f"(HTTP {response.status_code})"
    return response.json()["choices"][0]["message"]["content"]


def chat_curl(url: str, model: str, prompt: str) -> str:
    """One line (a JSON body never wraps: it pastes as it is)."""
    import json

    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": 32,
                       "temperature": 0}, ensure_ascii=False).replace("'", "'\\''")   # ' closes and reopens the quote
    return f"curl -s {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{body}'"


def demo_cmd(
    root: Path = typer.Option(Path(".lorafleet"), help="Where the demo model, adapters and store live."),
    model: str = typer.Option("smollm2-135m", help="Base model: smollm2-135m (real, with trained adapters) or "
                              "tiny (random, fast)."),
    port: int = typer.Option(8000, help="HTTP port on 127.0.0.1."),
    num_replicas: int = typer.Option(2, min=1, help="CPU replicas."),
    policy: str = typer.Option("rank-aware", help="Routing policy: rank-aware, random or affinity."),
) -> None:
    """Serve the base model with trained and random demo adapters on 127.0.0.1 (local Ray, CPU replicas)."""
    from rich.console import Console

    from lorafleet.cluster.serving import serve_app, stop_on_signals, wait_forever
    from lorafleet.infra.config import load_settings
    from lorafleet.infra.store import AdapterStore

    console = Console()
    base = load_settings()
    state = ensure_redis(base.redis_url)
    console.print(f"Redis at {base.redis_url}: {state}")
    model_dir, adapters = prepare_assets(root, model)
    settings = load_settings(
        model_dir=str(model_dir.resolve()), store_url=str((root / "store").resolve()),
        redis_prefix=base.redis_prefix if "LORAFLEET_REDIS_PREFIX" in os.environ else DEMO_REDIS_PREFIX,
        num_replicas=num_replicas, routing_policy=policy, http_port=port, base_model_name=model,
        max_num_seqs=16, max_batched_tokens=512, kv_cache_bytes=32 << 20, max_adapters=16, max_rank=64,
        adapter_pool_rows=None if model == "tiny" else 256,   # 256 rows x 30 layers x 7 modules of SmolLM2: 310 MiB
        rebalance_period_s=10.0,
    )
    store = AdapterStore.from_settings(settings)
    for adapter_id, path in adapters.items():
        record = store.push(adapter_id, path, owner="demo", if_changed=True)  # a restart adds no versions
        console.print(f"{adapter_id}: version {record.version}, {record.peft_type} rank {record.max_rank}")
    console.print(f"starting Ray Serve with {num_replicas} CPU replicas (first start takes a minute)...")
    with stop_on_signals(), serve_app(settings, num_cpus=max(2, num_replicas)) as url:
        # Plain print, not rich: a console may wrap long lines, and a wrapped JSON body does not paste.
        typer.echo(examples(url, model))
        console.print("serving; Ctrl-C to stop")
        wait_forever()
    console.print("stopped the app and the local Ray")


def examples(url: str, model: str) -> str:
    """What the demo prints once serving: base vs adapter answers (asked just now) with the curl lines that ask."""
    lines = [f"LoRAFleet is serving at {url}  (OpenAI-compatible; `model` = adapter id, or `{model}` for the base)",
             "", f"  curl {url}/v1/models", ""]
    if model != "tiny":
        for adapter_id, prompt, base_answer, adapter_answer in side_by_side(url, model):
            lines += [f"  # {TRAINED_ADAPTERS[adapter_id]} task: the base model, then {adapter_id}",
                      f"  {chat_curl(url, model, prompt)}", f"  #   -> {base_answer!r}",
                      f"  {chat_curl(url, adapter_id, prompt)}", f"  #   -> {adapter_answer!r}", ""]
    else:
        lines += [f"  {chat_curl(url, 'sql-lora-r8', 'SELECT name FROM')}", ""]
    stream = ('{"model": "' + ("persona-ia3" if model != "tiny" else "chat-lora-r64") + '", "messages": [{"role": '
              '"user", "content": "Hello! who are you?"}], "stream": true}')
    lines += [f"  curl -N {url}/v1/chat/completions -H 'Content-Type: application/json' -d '{stream}'",
              f"  curl {url}/v1/placement ; curl -X POST {url}/v1/placement/rebalance ; curl {url}/metrics", ""]
    return "\n".join(lines)
