"""Load lorafleet.* from a plain checkout (no pip install), for the GPU benchmark scripts beside this file."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


def load_packages(*names: str) -> None:
    """Make `lorafleet.<name>` importable for each folder name, unless lorafleet is installed already.

    Mirrors pyproject's package-dir mapping ("lorafleet.kernels" = "kernels", ...) without installing, so a
    GPU box with only torch (+ triton) runs the benchmarks without pydantic, Ray or redis. Also takes this
    folder off sys.path (where running a script put it): its kernels.py, engine.py, ... would otherwise shadow
    top-level packages of those names (transformers probes one called `kernels`).
    """
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    try:
        importlib.import_module(f"lorafleet.{names[-1]}")  # installed with pip install -e .
        return
    except ImportError:
        pass
    parent = types.ModuleType("lorafleet")
    parent.__path__ = []
    sys.modules["lorafleet"] = parent
    for name in names:
        spec = importlib.util.spec_from_file_location(
            f"lorafleet.{name}", REPO / name / "__init__.py", submodule_search_locations=[str(REPO / name)])
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[f"lorafleet.{name}"] = module
        setattr(parent, name, module)
    for name in names:  # executed after all are registered: replicas imports infra and kernels
        module = sys.modules[f"lorafleet.{name}"]
        module.__spec__.loader.exec_module(module)
