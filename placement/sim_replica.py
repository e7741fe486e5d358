"""One simulated replica: continuous batching, a rank-dependent step time, an LRU of resident adapters.

Event-jumping: while the batch does not change, every decode step takes the same time, so the replica
jumps straight to the next completion, fetch completion or arrival instead of looping per token.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from dataclasses import dataclass
from heapq import heappop, heappush

from lorafleet.placement.cost_model import StepCostModel

INF = math.inf


@dataclass(slots=True)
class RequestData:
    """Per-request columns (Python lists: faster than numpy for scalar access) and per-adapter facts."""

    arrival: list[float]
    adapter: list[int]
    prompt: list[int]
    output: list[int]
    rank: list[int]  # per request: rank of its adapter
    adapter_bytes: list[int]  # per adapter index
    first_token: list[float]  # written: time of the first token
    finish: list[float]  # written: time of the last token


@dataclass(slots=True)
class SharedStore:
    """The adapter store all replicas fetch from: one FIFO pipe of `bytes_per_s` (0 = unlimited)."""

    bytes_per_s: float = 0.0
    free_at: float = 0.0

    def transfer(self, start: float, num_bytes: int) -> float:
        """Time `num_bytes` requested at `start` have left the store."""
        if self.bytes_per_s <= 0:
            return start
        self.free_at = max(start, self.free_at) + num_bytes / self.bytes_per_s
        return self.free_at


class ReplicaSim:
    """State of one replica; `advance(t)` runs every step that starts before t, `submit(i, t)` enqueues.

    GPU adapter memory (`max_adapter_bytes`, None = unlimited) is never exceeded: an adapter takes its bytes when it
    goes to the GPU, evicting least recently used adapters no request holds; when those do not free enough, it
    waits (FIFO) until requests finish. With `host_all` (S-LoRA: every adapter in host memory) a miss is a swap over
    PCIe, its bytes reserved while in flight; otherwise a miss is a fetch from the adapter store over the replica's
    link, staged in host memory and put on the GPU when it arrives.
    """

    def __init__(self, index: int, cost: StepCostModel, max_adapter_bytes: int | None, data: RequestData,
                 store: SharedStore | None = None, host_all: bool = False):
        self.index = index
        self.store = store or SharedStore()
        self.cost = cost
        self.max_adapter_bytes = max_adapter_bytes  # None = unlimited (everything stays resident)
        self.host_all = host_all
        self.data = data
        self.clock = 0.0
        self.waiting: deque[int] = deque()
        self.blocked: dict[int, list[int]] = {}  # adapter -> requests waiting for its load
        self.fetch_heap: list[tuple[float, int]] = []
        self.fetching: dict[int, float] = {}  # adapter -> time its load completes (bytes reserved)
        self.pending: deque[int] = deque()  # loads waiting for GPU memory, FIFO
        self.pending_set: set[int] = set()
        self.link_free_at = 0.0
        self.resident: OrderedDict[int, int] = OrderedDict()  # LRU: adapter -> bytes
        self.used_bytes = 0  # resident + loading
        self.max_used_bytes = 0
        self.pinned: dict[int, int] = {}  # adapter -> requests holding it (queued, loading or running)
        self.running: list[tuple[int, int]] = []  # heap of (finish step, request)
        self.num_steps = 0
        self.num_running = 0
        self.rank_sum = 0
        self.rank_count: dict[int, int] = {}
        self.max_rank = 0
        self.adapter_count: dict[int, int] = {}
        self.distinct_rank_sum = 0
        self.num_outstanding = 0
        self.num_fetches = 0  # loads from the adapter store
        self.fetched_bytes = 0
        self.num_swaps = 0  # loads from host memory over PCIe
        self.swapped_bytes = 0
        self.num_evictions = 0
        self.busy_s = 0.0
        self.batch_steps = 0  # Σ over steps of the sequences in the step (mean batch = / num_steps)
        self.distinct_steps = 0  # Σ over steps of the distinct adapters in the step

    # -- adapters ---------------------------------------------------------------------------------
    def preload(self, adapter: int) -> bool:
        """Make `adapter` resident at no cost (the state before the simulated period) if it fits."""
        if adapter in self.resident:
            return True
        num_bytes = self.data.adapter_bytes[adapter]
        if self.max_adapter_bytes is not None and self.used_bytes + num_bytes > self.max_adapter_bytes:
            return False
        self.resident[adapter] = num_bytes
        self.used_bytes += num_bytes
        self.max_used_bytes = max(self.max_used_bytes, self.used_bytes)
        return True

    def prefetch(self, adapter: int, now: float) -> None:
        """Load `adapter` ahead of its requests (lowest priority: never waits for GPU memory; a fetched copy that
        finds no room is dropped)."""
        if adapter in self.resident or adapter in self.fetching or adapter in self.pending_set:
            return
        if not self.host_all:
            self._start_fetch(adapter, now)
        elif not self.pending and self._make_room(self.data.adapter_bytes[adapter]):
            self._start_swap(adapter, now)

    def _make_room(self, num_bytes: int) -> bool:
        """Evict least recently used unpinned adapters until `num_bytes` more fit; False (nothing evicted)
        if they cannot."""
        budget = self.max_adapter_bytes
        if budget is None or self.used_bytes + num_bytes <= budget:
            return True
        pinned = self.pinned
        free = budget - self.used_bytes + sum(b for a, b in self.resident.items() if not pinned.get(a))
        if free < num_bytes:
            return False
        for adapter in list(self.resident):
            if self.used_bytes + num_bytes <= budget:
                break
            if not pinned.get(adapter):
                self.used_bytes -= self.resident.pop(adapter)
                self.num_evictions += 1
        return True

    def _request_load(self, adapter: int, now: float) -> None:
        if adapter in self.fetching or adapter in self.pending_set:
            return
        if not self.host_all:
            self._start_fetch(adapter, now)  # GPU memory is taken when the bytes arrive
        elif not self.pending and self._make_room(self.data.adapter_bytes[adapter]):
            self._start_swap(adapter, now)
        else:
            self._wait_for_room(adapter)

    def _wait_for_room(self, adapter: int) -> None:
        self.pending.append(adapter)
        self.pending_set.add(adapter)

    def _retry_pending(self, now: float) -> None:
        """Loads waiting for GPU memory, first come first served: a swap starts (host_all) or the fetched copy,
        staged in host memory, goes to the GPU."""
        while self.pending and self._make_room(self.data.adapter_bytes[self.pending[0]]):
            adapter = self.pending.popleft()
            self.pending_set.discard(adapter)
            if self.host_all:
                self._start_swap(adapter, now)
            else:
                self.used_bytes += self.data.adapter_bytes[adapter]
                self.max_used_bytes = max(self.max_used_bytes, self.used_bytes)
                self._make_resident(adapter)

    def _start_swap(self, adapter: int, now: float) -> None:
        """Host -> GPU over PCIe; the bytes are reserved now, so the budget holds while they are in flight."""
        num_bytes = self.data.adapter_bytes[adapter]
        self.used_bytes += num_bytes
        self.max_used_bytes = max(self.max_used_bytes, self.used_bytes)
        ready = max(now, self.link_free_at) + self.cost.swap_time(num_bytes)  # one PCIe link per replica
        self.link_free_at = ready
        self.fetching[adapter] = ready
        heappush(self.fetch_heap, (ready, adapter))
        self.num_swaps += 1
        self.swapped_bytes += num_bytes

    def _start_fetch(self, adapter: int, now: float) -> None:
        """Adapter store -> this replica (staged in host memory; GPU memory is taken on arrival)."""
        num_bytes = self.data.adapter_bytes[adapter]
        start = max(now, self.link_free_at)  # one fetch link per replica
        ready = max(start + self.cost.fetch_time(num_bytes),
                    self.store.transfer(start, num_bytes) + self.cost.fetch_latency_s)
        self.link_free_at = ready
        self.fetching[adapter] = ready
        heappush(self.fetch_heap, (ready, adapter))
        self.num_fetches += 1
        self.fetched_bytes += num_bytes

    def _make_resident(self, adapter: int) -> None:
        self.resident[adapter] = self.data.adapter_bytes[adapter]
        self.waiting.extend(self.blocked.pop(adapter, ()))

    def _complete_fetches(self, clock: float) -> None:
        heap = self.fetch_heap
        while heap and heap[0][0] <= clock:
            _, adapter = heappop(heap)
            del self.fetching[adapter]
            if self.host_all:  # a swap: its bytes were reserved when it started
                self._make_resident(adapter)
            elif not self.pending and self._make_room(self.data.adapter_bytes[adapter]):
                self.used_bytes += self.data.adapter_bytes[adapter]
                self.max_used_bytes = max(self.max_used_bytes, self.used_bytes)
                self._make_resident(adapter)
            elif adapter in self.blocked:  # requests wait for it: it waits for room, staged in host memory
                self._wait_for_room(adapter)
            # else: a prefetch that found no room is dropped
        if self.pending:  # a prefetched adapter nobody holds yet is evictable
            self._retry_pending(clock)

    # -- requests ---------------------------------------------------------------------------------
    def submit(self, i: int, now: float) -> None:
        adapter = self.data.adapter[i]
        self.num_outstanding += 1
        self.pinned[adapter] = self.pinned.get(adapter, 0) + 1
        if adapter in self.resident:
            self.resident.move_to_end(adapter)
            self.waiting.append(i)
        else:
            self.blocked.setdefault(adapter, []).append(i)
            self._request_load(adapter, now)

    def _admit(self) -> tuple[list[int], int, int]:
        """FCFS admission into the batch; returns (admitted, prefill tokens, Σ_t r_t of the step)."""
        data, cost = self.data, self.cost
        admitted: list[int] = []
        prefill = 0
        rank_tokens = self.rank_sum
        while self.waiting and self.num_running < cost.max_num_seqs:
            i = self.waiting[0]
            p = data.prompt[i]
            if admitted and prefill + p > cost.max_batched_tokens:
                break
            self.waiting.popleft()
            admitted.append(i)
            prefill += p
            r, a = data.rank[i], data.adapter[i]
            rank_tokens += p * r
            self.num_running += 1
            self.rank_sum += r
            self.rank_count[r] = self.rank_count.get(r, 0) + 1
            if r > self.max_rank:
                self.max_rank = r
            count = self.adapter_count.get(a, 0)
            if count == 0:
                self.distinct_rank_sum += r
            self.adapter_count[a] = count + 1
        return admitted, prefill, rank_tokens

    def _finish_due(self, clock: float) -> None:
        data, running = self.data, self.running
        while running and running[0][0] <= self.num_steps:
            _, i = heappop(running)
            data.finish[i] = clock
            r, a = data.rank[i], data.adapter[i]
            self.num_running -= 1
            self.num_outstanding -= 1
            self.rank_sum -= r
            left = self.rank_count[r] - 1
            if left:
                self.rank_count[r] = left
            else:
                del self.rank_count[r]
                if r == self.max_rank:
                    self.max_rank = max(self.rank_count, default=0)
            left = self.adapter_count[a] - 1
            if left:
                self.adapter_count[a] = left
            else:
                del self.adapter_count[a]
                self.distinct_rank_sum -= r
            left = self.pinned[a] - 1
            if left:
                self.pinned[a] = left
            else:
                del self.pinned[a]
                if self.pending:  # its memory may now go to a waiting load
                    self._retry_pending(clock)

    def advance(self, t: float) -> None:
        """Run every step that starts before time t (t = inf: until idle)."""
        clock = self.clock
        if clock >= t:
            return
        cost, data = self.cost, self.data
        step_time = cost.step_time
        while True:
            if self.fetch_heap and self.fetch_heap[0][0] <= clock:
                self._complete_fetches(clock)
            if not self.running and not self.waiting:
                next_fetch = self.fetch_heap[0][0] if self.fetch_heap else INF
                if next_fetch >= t:
                    if t < INF:
                        clock = max(clock, t)
                    break
                clock = max(clock, next_fetch)
                continue
            if clock >= t:
                break
            if self.waiting and self.num_running < cost.max_num_seqs:
                num_decode = self.num_running
                admitted, prefill, rank_tokens = self._admit()
                s = step_time(num_decode + prefill, self.max_rank, rank_tokens, self.distinct_rank_sum)
                clock += s
                self.busy_s += s
                self.num_steps += 1
                self.batch_steps += num_decode + len(admitted)
                self.distinct_steps += len(self.adapter_count)
                for i in admitted:
                    data.first_token[i] = clock
                    heappush(self.running, (self.num_steps + data.output[i] - 1, i))
            else:
                s = step_time(self.num_running, self.max_rank, self.rank_sum, self.distinct_rank_sum)
                k = self.running[0][0] - self.num_steps
                if t < INF:
                    k = min(k, max(1, math.ceil((t - clock) / s)))
                if self.fetch_heap:
                    k = min(k, max(1, math.ceil((self.fetch_heap[0][0] - clock) / s)))
                clock += k * s
                self.busy_s += k * s
                self.num_steps += k
                self.batch_steps += k * self.num_running
                self.distinct_steps += k * len(self.adapter_count)
            if self.running and self.running[0][0] <= self.num_steps:
                self._finish_due(clock)
        self.clock = clock
