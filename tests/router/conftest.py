"""Fixtures shared by the router tests: one in-process replica on the tiny model, a real AdapterStore (real Redis,
own prefix) holding its adapters, a factory for RouterCore + app + TestClient, and one torch thread."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from lf_testing import make_adapters, store_less_replica

from lorafleet.replicas.deployment import ReplicaServer
from lorafleet.router.app import create_app
from lorafleet.router.auth import ApiKeys
from lorafleet.router.core import InProcessBackend, RouterConfig, RouterCore

HARDENING_BASE = "tiny"
HARDENING_ADAPTERS = {  # adapter id -> (type, rank, targets, seed)
    "alpha-lora": ("lora", 4, ["q_proj", "v_proj"], 11),
    "beta-lora": ("lora", 4, ["q_proj", "v_proj"], 12),
    "gamma-ia3": ("ia3", 1, ["k_proj", "down_proj"], 13),
}
HARDENING_ENGINE_KWARGS = {"max_num_seqs": 8, "kv_cache_bytes": 16 << 20, "kernel_backend": "torch",
                           "max_model_len": 512}


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """The tiny model gains nothing from 2 threads, and spinning OpenMP threads hurt on a shared 2-core box."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def hardening_adapter_dirs(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_adapters(tmp_path_factory.mktemp("hardening-adapters"), tiny_model_dir, HARDENING_ADAPTERS)


@pytest.fixture(scope="session")
def hardening_replica(tiny_model_dir: Path, hardening_adapter_dirs: dict[str, Path]) -> Iterator[ReplicaServer]:
    server = store_less_replica(tiny_model_dir, hardening_adapter_dirs, HARDENING_ENGINE_KWARGS)
    yield server
    server.engine.close()


@pytest.fixture(scope="session")
def hardening_store(tiny_model_dir: Path, hardening_adapter_dirs: dict[str, Path],
                    tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real AdapterStore (Redis at 127.0.0.1:6379, a prefix of its own) with the adapters pushed."""
    from lf_testing import delete_prefix

    from lorafleet.infra.config import load_settings
    from lorafleet.infra.store import AdapterStore

    prefix = f"lftest-hardening-{uuid.uuid4().hex[:8]}"
    settings = load_settings(redis_prefix=prefix, store_url=str(tmp_path_factory.mktemp("hardening-store")),
                             model_dir=str(tiny_model_dir), max_adapter_bytes=4 << 20)
    store = AdapterStore.from_settings(settings, base=tiny_model_dir)
    try:
        store.redis.ping()
    except Exception:
        pytest.fail("these tests need a Redis server at 127.0.0.1:6379")
    for name, path in hardening_adapter_dirs.items():
        store.push(name, path)
    yield store
    delete_prefix(store.redis, prefix)


@pytest.fixture(scope="session")
def make_core(hardening_replica: ReplicaServer) -> Callable[..., RouterCore]:
    """make_core(config=None, store=None, api_keys=None, admin_key=None) -> a RouterCore on the shared replica."""

    def make(config: RouterConfig | None = None, store: object | None = None, api_keys: dict | None = None,
             admin_key: str | None = None) -> RouterCore:
        return RouterCore(InProcessBackend(hardening_replica), config or RouterConfig(HARDENING_BASE), store=store,
                          auth=ApiKeys(api_keys, admin_key))

    return make


@pytest.fixture
def make_client(make_core: Callable[..., RouterCore]) -> Iterator[Callable[..., TestClient]]:
    """make_client(**make_core's arguments) -> a TestClient on a fresh core; `client.core` is that core."""
    clients: list[TestClient] = []

    def make(*args: object, **kwargs: object) -> TestClient:
        core = make_core(*args, **kwargs)
        client = TestClient(create_app(lambda: core), raise_server_exceptions=False)
        client.__enter__()
        client.core = core  # type: ignore[attr-defined]
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)
