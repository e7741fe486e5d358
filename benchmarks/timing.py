"""The one timing helper of the benchmarks: warm-up, L2 flush, device sync, interleaved repeats."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch

# Larger than any GPU's L2 (H100: 50 MB, H200: 60 MB); decode reads weights from HBM, so must we.
_FLUSH_BYTES = 256 << 20


def bench(fns: Mapping[str, Callable[[], object]], *, device: torch.device, repeats: int = 10,
          warmup: int = 2) -> dict[str, float]:
    """Seconds per call of each named fn (see statistic()), after `warmup` calls of each.

    Calls are interleaved round-robin, so drift and bursts from other processes hit every fn alike and the
    ratios between them stay honest. CUDA: events around each call, L2 flushed before it, median.
    CPU: perf_counter, minimum: on a shared CPU other processes only ever add time (as timeit advises).
    """
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    if device.type != "cuda":
        for _ in range(repeats):
            for name, fn in fns.items():
                began = time.perf_counter()
                fn()
                samples[name].append(time.perf_counter() - began)
        return {name: min(times) for name, times in samples.items()}
    flush = torch.empty(_FLUSH_BYTES, dtype=torch.int8, device=device)
    events: dict[str, list[tuple[torch.cuda.Event, torch.cuda.Event]]] = {name: [] for name in fns}
    torch.cuda.synchronize(device)
    for _ in range(repeats):
        for name, fn in fns.items():
            flush.zero_()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            events[name].append((start, end))
    torch.cuda.synchronize(device)
    return {name: statistics.median(s.elapsed_time(e) for s, e in pairs) / 1e3 for name, pairs in events.items()}


def statistic(device: torch.device) -> str:
    """Which statistic bench() reports on this device."""
    return "median" if device.type == "cuda" else "min"
