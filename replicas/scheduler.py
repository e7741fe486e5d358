"""Continuous-batching scheduler: FCFS, chunked prefill beside decodes, preemption by recompute (no torch).

Every step: running sequences first (decodes, then prefill chunks; oldest first within each), preempting
the newest running sequences when KV blocks run out; then waiting sequences join in arrival
order while max_num_seqs, max_batched_tokens and the KV cache allow. A waiting sequence whose adapter is
still loading is skipped without blocking the ones behind it; one that needs a resource (KV blocks, an
adapter slot) stops admission, so later arrivals never overtake it for that resource (no starvation).
"""

from __future__ import annotations

from bisect import insort
from collections import deque
from dataclasses import dataclass, field
from typing import Literal, Protocol

from lorafleet.replicas.kv_cache import BlockManager
from lorafleet.replicas.sequence import Sequence, SequenceStatus

AdapterStatus = Literal["ready", "loading", "failed"]


class AdapterGate(Protocol):
    """What the scheduler needs from the adapter cache: is it loadable, and pin it on the device."""

    def adapter_status(self, adapter_id: str) -> AdapterStatus: ...

    def adapter_error(self, adapter_id: str) -> Exception: ...

    def try_acquire(self, adapter_id: str) -> int | None:
        """Pin the adapter in device memory (evicting unpinned ones): its slot, or None when no room now."""
        ...

    def release(self, adapter_id: str, slot: int) -> None: ...


@dataclass(frozen=True, slots=True)
class ScheduledSeq:
    """Compute tokens [num_computed, num_computed + num_new_tokens) of seq this step."""

    seq: Sequence
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True when this step reaches the last token, so its logits give the next token."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)
    failed: list[Sequence] = field(default_factory=list)      # finished with an adapter error
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


def _order(seq: Sequence) -> int:
    return seq.arrival_order


class Scheduler:
    def __init__(self, blocks: BlockManager, adapters: AdapterGate, *, max_num_seqs: int,
                 max_batched_tokens: int) -> None:
        assert 1 <= max_num_seqs <= max_batched_tokens
        self.blocks = blocks
        self.adapters = adapters
        self.max_num_seqs = max_num_seqs
        self.max_batched_tokens = max_batched_tokens
        self.waiting: list[Sequence] = []   # sorted by arrival (preempted sequences go back in their place)
        self.running: list[Sequence] = []   # sorted by arrival; the newest is preempted first
        self.num_preemptions = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        assert seq.status is SequenceStatus.WAITING and not seq.block_table
        insort(self.waiting, seq, key=_order)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        self._fail_unloadable(out)
        budget = self.max_batched_tokens
        # Decodes before prefill chunks (a long prompt must not stall the others' next token), oldest first.
        queue = deque(sorted(self.running, key=lambda s: (s.num_uncomputed_tokens > 1, s.arrival_order)))
        while queue:
            seq = queue.popleft()
            num_new = min(seq.num_uncomputed_tokens, budget)
            if num_new == 0:
                continue
            while not self.blocks.can_allocate(seq, num_new):
                victim = max(queue, key=_order) if queue else seq   # the newest arrival gives way
                if victim is not seq:
                    queue.remove(victim)
                self._preempt(victim)
                out.preempted.append(victim)
                if victim is seq:
                    break
            else:
                self.blocks.allocate(seq, num_new)
                out.scheduled.append(ScheduledSeq(seq, num_new))
                budget -= num_new
        if out.preempted:   # memory is short: let the running ones drain before admitting more
            return out
        for seq in list(self.waiting):
            if len(self.running) >= self.max_num_seqs or budget == 0:
                break
            is_acquired_now = False
            if seq.adapter_id is not None and seq.adapter_slot is None:
                if self.adapters.adapter_status(seq.adapter_id) != "ready":
                    continue    # still loading: wait without blocking the requests behind
                seq.adapter_slot = self.adapters.try_acquire(seq.adapter_id)
                if seq.adapter_slot is None:
                    break       # every adapter slot is pinned by running requests
                is_acquired_now = True
            num_new = min(seq.num_uncomputed_tokens, budget)
            if not self.blocks.can_allocate(seq, num_new):
                if is_acquired_now:
                    self._release_adapter(seq)
                break
            self.blocks.allocate(seq, num_new)
            self.waiting.remove(seq)
            seq.status = SequenceStatus.RUNNING
            insort(self.running, seq, key=_order)
            out.scheduled.append(ScheduledSeq(seq, num_new))
            budget -= num_new
        return out

    def finish(self, seq: Sequence, reason: str, error: Exception | None = None) -> None:
        """Take seq out of the scheduler for good: free its blocks, unpin its adapter."""
        assert seq.status is not SequenceStatus.FINISHED, f"{seq} finished twice"
        (self.running if seq.status is SequenceStatus.RUNNING else self.waiting).remove(seq)
        self.blocks.free(seq)
        self._release_adapter(seq)
        seq.status = SequenceStatus.FINISHED
        seq.finish_reason = reason
        seq.error = error

    def abort(self, request_id: str) -> Sequence | None:
        """Finish the request with reason 'abort' wherever it is; None if unknown or already finished."""
        for seq in (*self.running, *self.waiting):
            if seq.request_id == request_id:
                self.finish(seq, "abort")
                return seq
        return None

    def _fail_unloadable(self, out: SchedulerOutput) -> None:
        for seq in [s for s in self.waiting if s.adapter_id is not None and s.adapter_slot is None]:
            if self.adapters.adapter_status(seq.adapter_id) == "failed":
                self.finish(seq, "error", self.adapters.adapter_error(seq.adapter_id))
                out.failed.append(seq)

    def _preempt(self, seq: Sequence) -> None:
        """Preemption by recompute: drop the KV, keep the tokens; the sequence re-prefills later. It keeps its
        adapter pin, so it resumes on the same adapter version even if a newer one arrived meanwhile."""
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.num_computed_tokens = 0
        seq.num_preemptions += 1
        seq.status = SequenceStatus.WAITING
        insort(self.waiting, seq, key=_order)
        self.num_preemptions += 1

    def _release_adapter(self, seq: Sequence) -> None:
        if seq.adapter_slot is not None:
            self.adapters.release(seq.adapter_id, seq.adapter_slot)
            seq.adapter_slot = None
