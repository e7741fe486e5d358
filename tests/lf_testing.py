"""Helpers shared by the test modules (importable: pytest puts tests/ on sys.path via `pythonpath`)."""

from __future__ import annotations

import contextlib
import json
import os
import socket

REDIS_URL = "redis://127.0.0.1:6379/0"
ERROR_KEYS = {"message", "type", "param", "code"}  # OpenAI's error body


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def delete_prefix(client, prefix: str) -> None:
    """Delete every Redis key under `prefix:` (tests only ever touch their own prefix)."""
    keys = list(client.scan_iter(match=f"{prefix}:*", count=1000))
    for i in range(0, len(keys), 1000):
        client.delete(*keys[i : i + 1000])


def make_adapters(root, model_dir, specs: dict) -> dict:
    """{adapter id: directory} for specs {adapter id: (type, rank, targets, seed)} of the model in model_dir."""
    from lorafleet.infra.adapter_maker import make_adapter

    return {name: make_adapter(root / name, model_dir, kind, rank, targets, seed=seed)
            for name, (kind, rank, targets, seed) in specs.items()}


def store_less_replica(model_dir, adapter_dirs: dict, engine_kwargs: dict):
    """A ReplicaServer without the adapter store, with `adapter_dirs` loaded into its engine."""
    from lorafleet.replicas.deployment import ReplicaServer
    from lorafleet.replicas.engine import Engine

    engine = Engine.from_pretrained(str(model_dir), **engine_kwargs)
    server = ReplicaServer(engine, owned=(engine,))
    for name, path in adapter_dirs.items():
        server.engine.load_adapter(name, path)
    return server


def sse_events(client, path: str, body: dict) -> list[dict | str]:
    """POST with stream=true; the parsed `data:` events ("[DONE]" kept as a string)."""
    with client.stream("POST", path, json=body | {"stream": True}) as response:
        assert response.status_code == 200, response.read()
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    assert "Traceback" not in raw
    blocks = [b for b in raw.split("\n\n") if b]
    assert all(b.startswith("data: ") for b in blocks), raw
    return [b[len("data: "):] if b == "data: [DONE]" else json.loads(b[len("data: "):]) for b in blocks]


def assert_openai_error(response, status: int, error_type: str | None = None) -> dict:
    """The body's `error` after checking OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""
    assert response.status_code == status, response.text
    assert "Traceback" not in response.text and 'File "' not in response.text
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == ERROR_KEYS, body
    error = body["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["param"] is None or isinstance(error["param"], str)
    assert error["code"] is None or isinstance(error["code"], str)
    if error_type is not None:
        assert error["type"] == error_type, error
    return error


def in_process_cli(capsys, *leading: str):
    """run(*args) -> (exit code, stdout, stderr) of `lorafleet *leading *args` in this process (settings come from
    the caller's monkeypatched LORAFLEET_* env)."""
    from lorafleet.cluster.cli import main

    def run(*args: object) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            main([*leading, *(str(a) for a in args)])
            code = 0
        except SystemExit as exc:
            code = exc.code
        out, err = capsys.readouterr()
        return code, out, err

    return run


class Blackhole:
    """A TCP server on 127.0.0.1 that accepts connections and never answers: a hung Redis (network partition,
    stopped process) rather than a refused one. `with Blackhole() as url:` gives a redis:// URL to it."""

    def __init__(self) -> None:
        import threading

        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns: list[socket.socket] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True, name="blackhole")

    def _accept(self) -> None:
        self.sock.settimeout(0.1)
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                continue
            self.conns.append(conn)   # held open, never read or written

    def __enter__(self) -> str:
        self._thread.start()
        return f"redis://127.0.0.1:{self.port}/0"

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        for conn in self.conns:
            conn.close()
        self.sock.close()


class FreezableProxy:
    """A TCP proxy to host:port that can freeze: while frozen, bytes stop flowing both ways on every connection
    (old and new), like a network partition to a hung server; thaw() lets them flow again. cut() closes every
    connection and refuses new ones (a dropped link: clients see errors at once) until restore(). `url` is
    redis://."""

    def __init__(self, port: int, host: str = "127.0.0.1") -> None:
        import threading

        self.upstream = (host, port)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.url = f"redis://127.0.0.1:{self.sock.getsockname()[1]}/0"
        self.flowing = threading.Event()
        self.flowing.set()
        self.is_cut = False
        self._conns: list[socket.socket] = []
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True, name="proxy-accept").start()

    def freeze(self) -> None:
        self.flowing.clear()

    def thaw(self) -> None:
        self.flowing.set()

    def cut(self) -> None:
        self.is_cut = True
        for conn in list(self._conns):
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def restore(self) -> None:
        self.is_cut = False

    def close(self) -> None:
        self._stop.set()
        self.flowing.set()
        self.sock.close()

    def _accept(self) -> None:
        import threading

        self.sock.settimeout(0.2)
        while not self._stop.is_set():
            try:
                client, _ = self.sock.accept()
            except OSError:
                continue
            if self.is_cut:
                client.close()
                continue
            try:
                server = socket.create_connection(self.upstream, timeout=2)
            except OSError:
                client.close()   # upstream down: refused, as Redis itself would be
                continue
            self._conns = [c for c in self._conns if c.fileno() >= 0] + [client, server]
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True, name="proxy-pump").start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        import select

        try:
            while not self._stop.is_set():
                self.flowing.wait()
                ready, _, _ = select.select([src], [], [], 0.1)
                if not ready or not self.flowing.is_set():
                    continue
                data = src.recv(65536)
                if not data:
                    break
                dst.sendall(data)
        except (OSError, ValueError):   # ValueError: the other pump closed this socket (fileno -1)
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                s.close()


def wait_until(predicate, timeout_s: float = 10.0, what: str = "condition", period_s: float = 0.02) -> float:
    """Seconds until predicate() holds; fails the test (naming `what`) after timeout_s."""
    import time

    start = time.monotonic()
    while not predicate():
        assert time.monotonic() - start < timeout_s, f"not reached in {timeout_s:.0f}s: {what}"
        time.sleep(period_s)
    return time.monotonic() - start


# Kernel tests: a rank mix with 0 (no adapter) to 128 and dims that are not multiples of the kernels' 32 / 64 blocks.
KERNEL_RANK_MIX = (0, 1, 2, 4, 8, 16, 64, 128)
KERNEL_D_IN, KERNEL_D_OUT = 72, 40


def shuffled_ranks() -> list[int]:
    """KERNEL_RANK_MIX in a random order (the caller seeds `random`)."""
    import random

    ranks = list(KERNEL_RANK_MIX)
    random.shuffle(ranks)
    return ranks


def seed_demand(client, prefix: str, num_adapters: int, num_periods: int):
    """Adapters ad-0.. of alternating ranks 8 / 64 with Zipf-like demand counted over the last periods (30 s);
    returns the prefix's RoutingTableStore."""
    import time

    from lorafleet.infra.demand import DemandCounters
    from lorafleet.placement import RoutingTableStore

    counters, tables = DemandCounters(client, prefix), RoutingTableStore(client, prefix)
    now = time.time()
    for i in range(num_adapters):
        tables.put_adapter_info(f"ad-{i}", (8, 64)[i % 2], 0)
        for k in range(num_periods):
            counters.record(f"ad-{i}", 40_000 // (i + 1), 10, now=now - 30 * k)
    return tables


def simulated_points_file() -> str:
    """The simulator's packaged operating points (7B, simulated): for placement tests without served replicas."""
    from importlib import resources

    return str(resources.files("lorafleet.placement").joinpath("operating_points.json"))


class LocalRayCluster:
    """A real multi-node Ray cluster on this machine: a head and worker raylets started with `ray start` as separate
    processes with their own resources (Ray 2.60 turns token authentication on: every client here gets
    RAY_AUTH_MODE=token and this cluster's own RAY_AUTH_TOKEN). Its GCS is on a free port, never Redis's 6379.
    stop() kills exactly this cluster's processes (the ones under its own temp dir): other Ray instances on the
    machine are left alone."""

    def __init__(self, *, head_resources: dict, worker_resources: list[dict], worker_cpus: int = 1) -> None:
        import secrets
        import uuid

        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.temp_dir = f"/tmp/lfray-{uuid.uuid4().hex[:8]}"   # short: Ray's socket paths must fit in 107 bytes
        self.head_resources, self.worker_resources, self.worker_cpus = head_resources, worker_resources, worker_cpus
        # its own token: on a fresh machine there is no ~/.ray/auth_token until some local ray.init() writes one
        self.env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32),
                    # Serve's routers probe a replica's queue length with a 0.1 s deadline and route a request to the
                    # next tier of candidates when it passes; four raylets on two shared cores miss it now and then
                    # (Serve's documented remedy for a slow network: a longer deadline).
                    "RAY_SERVE_QUEUE_LENGTH_RESPONSE_DEADLINE_S": "0.5"}
        self.worker_raylets: list[int] = []   # pid of each worker's raylet, in start order

    def _ray(self, *args: str) -> None:
        import subprocess
        import sys
        from pathlib import Path

        ray = str(Path(sys.executable).parent / "ray")
        result = subprocess.run([ray, "start", *args, "--disable-usage-stats"], env=self.env, capture_output=True,
                                text=True, timeout=180)
        assert result.returncode == 0, result.stdout + result.stderr

    def raylet_pids(self) -> set[int]:
        import psutil

        pids = set()
        for proc in psutil.process_iter(["pid", "cmdline"]):
            cmd = " ".join(proc.info["cmdline"] or ())
            if self.temp_dir in cmd and "raylet/raylet" in cmd:
                pids.add(proc.info["pid"])
        return pids

    def start(self) -> LocalRayCluster:
        self._ray("--head", f"--port={self.gcs_port}", "--num-cpus=1", f"--resources={json.dumps(self.head_resources)}",
                  "--include-dashboard=true", f"--dashboard-port={self.dashboard_port}", f"--temp-dir={self.temp_dir}")
        for resources in self.worker_resources:
            before = self.raylet_pids()
            self._ray(f"--address={self.address}", f"--num-cpus={self.worker_cpus}",
                      f"--resources={json.dumps(resources)}")
            (new,) = self.raylet_pids() - before
            self.worker_raylets.append(new)
        return self

    def kill_worker(self, index: int) -> None:
        """The worker node dies: its raylet and every process it started (replicas included), SIGKILL."""
        import psutil

        raylet = psutil.Process(self.worker_raylets[index])
        for proc in [*raylet.children(recursive=True), raylet]:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()

    def stop(self) -> None:
        import psutil

        # the cluster's own processes carry its temp dir; their workers (replicas, dashboard agents) only their parent
        procs = [p for p in psutil.process_iter(["pid", "cmdline"])
                 if self.temp_dir in " ".join(p.info["cmdline"] or ())]
        for proc in list(procs):
            with contextlib.suppress(psutil.NoSuchProcess):
                procs += proc.children(recursive=True)
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        import shutil

        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def run(self, *args: str, timeout_s: float = 120) -> str:
        """A Ray / Serve CLI command against this cluster (`serve deploy ...`, `ray list ...`); its stdout."""
        import subprocess
        import sys
        from pathlib import Path

        tool = str(Path(sys.executable).parent / args[0])
        result = subprocess.run([tool, *args[1:]], env=self.env, capture_output=True, text=True, timeout=timeout_s)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout


def vllm_python():
    """The vLLM replicas' interpreter, .venv-vllm/bin/python (`make test` builds it): the test fails, not skips,
    when it is missing."""
    from pathlib import Path

    import pytest

    path = Path(__file__).resolve().parent.parent / ".venv-vllm" / "bin" / "python"
    if not path.is_file():
        pytest.fail(f"{path} is missing: `make vllm-venv` builds it (`make test` does)")
    return path


def run_in_vllm_venv(script, job: dict, timeout_s: float = 900.0, num_threads: int = 2) -> dict:
    """Run `script` with the vLLM venv's interpreter, `job` as JSON on stdin; its last stdout line parsed as JSON."""
    import os
    import subprocess

    env = {**os.environ, "OMP_NUM_THREADS": str(num_threads), "VLLM_LOGGING_LEVEL": "WARNING"}
    result = subprocess.run([str(vllm_python()), str(script)], input=json.dumps(job), capture_output=True, text=True,
                            timeout=timeout_s, env=env)
    assert result.returncode == 0, f"{script} failed:\n{result.stderr[-6000:]}"
    return json.loads(result.stdout.strip().splitlines()[-1])


def replica_actor_names() -> set[str]:
    """Names of the served app's replica actors (a replaced replica gets a new name)."""
    import ray

    return {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
            if a["name"].startswith("SERVE_REPLICA::lorafleet#replica#")}


def num_running_replicas() -> int:
    from ray import serve

    status = serve.status().applications["lorafleet"].deployments["replica"]
    return status.replica_states.get("RUNNING", 0)


def run_load(url: str, bodies: list[dict], concurrency: int, on_progress=None, headers: dict | None = None,
             path: str = "/v1/completions", timeout_s: float = 120.0) -> list[dict]:
    """POST every body (bounded concurrency); one record per request: its body, start/end time (monotonic), the
    response (None for a dropped connection, with `exc`). `on_progress(num_done)` is awaited after each answer."""
    import asyncio
    import time

    import httpx

    records: list[dict] = []

    async def main() -> None:
        sem = asyncio.Semaphore(concurrency)
        async with httpx.AsyncClient(timeout=timeout_s, headers=headers) as client:

            async def one(body: dict) -> None:
                async with sem:
                    record = {"body": body, "start": time.monotonic()}
                    try:
                        record["response"] = await client.post(f"{url}{path}", json=body)
                    except httpx.HTTPError as exc:
                        record["response"], record["exc"] = None, repr(exc)
                    record["end"] = time.monotonic()
                    records.append(record)
                    if on_progress is not None:
                        await on_progress(len(records))

            await asyncio.gather(*(one(b) for b in bodies))

    asyncio.run(main())
    return records


def healthz_ok(url: str) -> bool:
    """The app's /healthz answers 200 (False while it is starting or gone)."""
    import httpx

    try:
        return httpx.get(f"{url}/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


class BusyReplicaKiller:
    """on_progress hook of a load run: from the `start_at`-th answer on, SIGKILL (ray.kill) the first Serve replica
    actor of `actor_names` that reports requests in flight (from the `force_at`-th answer: any). Afterwards
    `kill_at` holds the monotonic time of the kill and `victim` its actor name, rank and requests in flight."""

    def __init__(self, actor_names, start_at: int, force_at: int, stats_timeout_s: float = 30.0) -> None:
        self.actor_names, self.start_at, self.force_at = sorted(actor_names), start_at, force_at
        self.stats_timeout_s = stats_timeout_s
        self.kill_at: list[float] = []
        self.victim: dict = {}

    async def __call__(self, num_done: int) -> None:
        import asyncio
        import time

        import ray

        if self.victim or num_done < self.start_at:
            return
        self.victim["name"] = None   # claimed: answers arriving while this awaits the stats do not kill again
        for name in self.actor_names:
            actor = ray.get_actor(name, namespace="serve")
            stats = await asyncio.wait_for(actor.record_routing_stats.remote(), self.stats_timeout_s)
            if stats.get("num_inflight", 0) > 0 or num_done >= self.force_at:
                self.kill_at.append(time.monotonic())
                ray.kill(actor, no_restart=True)
                self.victim.update(name=name, rank=stats.get("rank"), num_inflight=stats.get("num_inflight"))
                return
        self.victim.clear()   # nothing in flight on any replica: try again at the next answer
