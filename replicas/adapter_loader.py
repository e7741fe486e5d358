"""AdapterLoader: bytes or a directory -> validated AdapterWeights in the pool dtype; each digest validated once."""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import replace
from pathlib import Path

import torch

from lorafleet.infra.adapter_source import FetchedAdapter
from lorafleet.infra.adapters import AdapterWeights, load_adapter_dir, load_adapter_files
from lorafleet.infra.base_spec import BaseModelSpec
from lorafleet.infra.errors import InvalidAdapter

MAX_VALIDATED_DIGESTS = 100_000


class AdapterLoader:
    """Validation against the base and the engine's limits, then rows converted to the pool dtype (pinned for CUDA).

    A digest (the exact bytes of one version) that passed once skips the NaN/Inf scan when it is fetched again
    (after a host-tier eviction): the bytes were sha256-checked against the same digest, so they are the same.
    Thread-safe: loader threads call it concurrently.
    """

    def __init__(self, spec: BaseModelSpec, target_modules: tuple[str, ...], *, max_rank: int, max_bytes: int,
                 dtype: torch.dtype, pin_memory: bool) -> None:
        self.spec = spec
        self.target_modules = target_modules
        self.max_rank = max_rank
        self.max_bytes = max_bytes
        self.dtype = dtype
        self.pin_memory = pin_memory
        self._validated: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()
        self.num_validations = 0
        self.num_revalidations_skipped = 0

    def from_dir(self, path: str | Path) -> AdapterWeights:
        weights = load_adapter_dir(path, self.spec, max_rank=self.max_rank, max_bytes=self.max_bytes)
        return self._convert(self._check_targets(weights, str(path)))

    def from_fetched(self, fetched: FetchedAdapter) -> AdapterWeights:
        with self._lock:
            is_known = fetched.digest in self._validated
            if is_known:
                self._validated.move_to_end(fetched.digest)
        source = f"adapter '{fetched.adapter_id}' version {fetched.version}"
        weights = load_adapter_files(fetched.files, self.spec, max_rank=self.max_rank, max_bytes=self.max_bytes,
                                     source=source, check_finite=not is_known)
        weights = self._convert(self._check_targets(weights, source))
        with self._lock:
            if is_known:
                self.num_revalidations_skipped += 1
            else:
                self.num_validations += 1
                self._validated[fetched.digest] = None
                while len(self._validated) > MAX_VALIDATED_DIGESTS:
                    self._validated.popitem(last=False)
        return weights

    def _check_targets(self, weights: AdapterWeights, source: str) -> AdapterWeights:
        extra = sorted(set(weights.target_modules) - set(self.target_modules))
        if extra:
            raise InvalidAdapter(f"{source}: targets {extra}, but this engine serves adapters on "
                                 f"{list(self.target_modules)} only (EngineConfig.target_modules)")
        return weights

    def _convert(self, weights: AdapterWeights) -> AdapterWeights:
        """Rows in the pool dtype once, on the loader thread, so install() is a plain copy."""
        modules = {}
        for key, m in weights.modules.items():
            in_rows, out_rows = m.in_rows.to(self.dtype).contiguous(), m.out_rows.to(self.dtype).contiguous()
            if self.pin_memory:
                in_rows, out_rows = in_rows.pin_memory(), out_rows.pin_memory()
            modules[key] = replace(m, in_rows=in_rows, out_rows=out_rows)
        return replace(weights, modules=modules)
