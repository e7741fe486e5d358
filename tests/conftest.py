"""Shared fixtures: a tiny seeded model made once per session, and CPU thread settings for 2-core CI."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The `tiny` preset (seed 0) in Hugging Face layout; read-only for tests."""
    from lorafleet.replicas.checkpoint import make_model

    return make_model(tmp_path_factory.mktemp("tiny-model"), "tiny", seed=0)
