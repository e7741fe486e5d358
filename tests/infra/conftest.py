"""Fixtures of the adapter-store tests: real Redis (own key prefix per test), a real local S3 server (moto),
throwaway redis-server processes for outages, and real adapters of the tiny model."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
import uuid
from pathlib import Path

import pytest
from lf_testing import delete_prefix, free_port

SHARED_REDIS_URL = "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def redis_client():
    """The shared Redis on 6379 (tests only touch keys under their own prefix)."""
    from lorafleet.infra.redis_conn import connect

    client = connect(SHARED_REDIS_URL)
    try:
        client.ping()
    except Exception as exc:
        pytest.fail(f"store tests need Redis at {SHARED_REDIS_URL} ({exc})")
    return client


@pytest.fixture
def prefix(redis_client):
    """A fresh key prefix; every key under it is deleted afterwards."""
    name = f"test-store-{uuid.uuid4().hex[:12]}"
    yield name
    delete_prefix(redis_client, name)


@pytest.fixture(scope="session")
def base_spec(tiny_model_dir):
    from lorafleet.infra.base_spec import BaseModelSpec

    return BaseModelSpec.from_model_dir(tiny_model_dir)


@pytest.fixture(scope="session")
def adapter_dirs(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    """Real adapters of the tiny model: name → directory."""
    from lorafleet.infra.adapter_maker import make_adapter

    root = tmp_path_factory.mktemp("adapters")
    specs = {
        "lora8": ("lora", 8, ["q_proj", "v_proj"], 0),
        "lora4": ("lora", 4, ["q_proj", "k_proj", "o_proj"], 1),
        "flora2": ("flora", 2, ["q_proj", "down_proj"], 2),
        "ia3": ("ia3", 1, ["k_proj", "v_proj", "down_proj"], 3),
    }
    return {name: make_adapter(root / name, tiny_model_dir, kind, rank, targets, seed)
            for name, (kind, rank, targets, seed) in specs.items()}


@pytest.fixture(scope="session")
def adapter_files(adapter_dirs) -> dict[str, dict[str, bytes]]:
    return {name: {p.name: p.read_bytes() for p in path.iterdir()} for name, path in adapter_dirs.items()}


@pytest.fixture
def make_store(redis_client, prefix, base_spec, tmp_path):
    """make_store(objects=None, **kw) -> AdapterStore on the shared Redis (test prefix), local dir by default."""
    from lorafleet.infra.object_store import LocalDirObjectStore
    from lorafleet.infra.store import AdapterStore

    def make(objects=None, client=None, **kwargs):
        kwargs.setdefault("base", base_spec)
        objects = objects or LocalDirObjectStore(tmp_path / "store")
        return AdapterStore(objects, client or redis_client, prefix, **kwargs)

    return make


@pytest.fixture
def store(make_store):
    return make_store()


class MotoS3:
    """A real S3 HTTP server (moto, in-process thread) on its own port; stop()/start() to simulate an outage."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.server = None

    def start(self) -> MotoS3:
        from moto.server import ThreadedMotoServer

        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server = None

    def client(self):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1", aws_access_key_id="testing",
            aws_secret_access_key="testing",
            config=Config(connect_timeout=1, read_timeout=5, retries={"max_attempts": 1}, max_pool_connections=64),
        )

    def object_store(self, bucket: str | None = None, prefix: str = "lf"):
        from lorafleet.infra.object_store import S3ObjectStore

        client = self.client()
        bucket = bucket or f"b-{uuid.uuid4().hex[:12]}"
        client.create_bucket(Bucket=bucket)
        return S3ObjectStore(bucket, prefix, endpoint_url=self.endpoint, client=client)


@pytest.fixture(scope="session")
def s3_server():
    server = MotoS3().start()
    yield server
    server.stop()


@pytest.fixture
def private_s3_server():
    """An S3 server of the test's own, free to be stopped (moto keeps buckets in-process across restarts)."""
    server = MotoS3().start()
    yield server
    server.stop()


class ThrowawayRedis:
    """A private redis-server (no persistence) on a free port, to be killed and restarted by a test."""

    def __init__(self, tmp: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.tmp = tmp
        self.proc: subprocess.Popen | None = None

    def start(self) -> ThrowawayRedis:
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.skip("redis-server binary not on PATH")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.tmp)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.02)
        raise RuntimeError(f"redis-server on port {self.port} did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None


@pytest.fixture
def throwaway_redis(tmp_path):
    server = ThrowawayRedis(tmp_path).start()
    yield server
    server.stop()
