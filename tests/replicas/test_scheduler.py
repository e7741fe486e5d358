"""Scheduler (pure Python): FCFS, budgets, chunked prefill, preemption by recompute, adapter gating."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from lorafleet.infra.errors import AdapterNotFound
from lorafleet.replicas.kv_cache import BlockManager
from lorafleet.replicas.sampling_params import SamplingParams
from lorafleet.replicas.scheduler import Scheduler
from lorafleet.replicas.sequence import Sequence, SequenceStatus


class FakeGate:
    """Adapter cache stand-in: `status` per adapter, `num_slots` device slots, LRU-free eviction of unpinned."""

    def __init__(self, num_slots: int = 4, status: dict[str, str] | None = None) -> None:
        self.num_slots = num_slots
        self.status = status or {}
        self.pins: dict[str, int] = {}     # resident adapters -> pin count

    def adapter_status(self, adapter_id):
        return self.status.get(adapter_id, "ready")

    def adapter_error(self, adapter_id):
        return AdapterNotFound(f"adapter '{adapter_id}' not found")

    def try_acquire(self, adapter_id):
        if adapter_id not in self.pins:
            if len(self.pins) >= self.num_slots:
                unpinned = [a for a, n in self.pins.items() if n == 0]
                if not unpinned:
                    return None
                del self.pins[unpinned[0]]
            self.pins[adapter_id] = 0
        self.pins[adapter_id] += 1
        return list(self.pins).index(adapter_id)

    def release(self, adapter_id, slot):
        self.pins[adapter_id] -= 1
        assert self.pins[adapter_id] >= 0


def seq(name: str, num_prompt: int = 4, max_tokens: int = 4, adapter: str | None = None) -> Sequence:
    return Sequence(name, list(range(1, num_prompt + 1)), SamplingParams(max_tokens=max_tokens), adapter, 0.0)


def make(num_blocks=64, block_size=4, max_num_seqs=8, max_batched_tokens=64, gate=None):
    return Scheduler(BlockManager(num_blocks, block_size), gate or FakeGate(), max_num_seqs=max_num_seqs,
                     max_batched_tokens=max_batched_tokens)


def run_step(sched: Scheduler, out) -> list[Sequence]:
    """What the engine does after a forward pass: advance, sample a token, finish at max_tokens."""
    finished = []
    for item in out.scheduled:
        samples = item.samples
        item.seq.num_computed_tokens += item.num_new_tokens
        if samples:
            item.seq.append_token(7)
            if item.seq.num_output_tokens >= item.seq.params.max_tokens:
                sched.finish(item.seq, "length")
                finished.append(item.seq)
    return finished


def test_fcfs_admission_within_seq_and_token_budgets():
    sched = make(max_num_seqs=2, max_batched_tokens=10)
    seqs = [seq(f"r{i}", num_prompt=4) for i in range(4)]
    for s in seqs:
        sched.add(s)
    out = sched.schedule()
    assert [(i.seq.request_id, i.num_new_tokens) for i in out.scheduled] == [("r0", 4), ("r1", 4)]
    run_step(sched, out)
    out = sched.schedule()   # both decode; r2 waits for a free sequence slot
    assert [(i.seq.request_id, i.num_new_tokens) for i in out.scheduled] == [("r0", 1), ("r1", 1)]


def test_long_prompt_is_chunked_and_decodes_go_first():
    sched = make(max_batched_tokens=8)
    short, long = seq("short", num_prompt=3), seq("long", num_prompt=20)
    sched.add(short)
    run_step(sched, sched.schedule())
    sched.add(long)
    chunks = []
    while long.num_output_tokens == 0:
        out = sched.schedule()
        assert out.scheduled[0].seq is short and out.scheduled[0].num_new_tokens == 1   # decode first
        assert out.num_batched_tokens <= 8
        chunks += [i.num_new_tokens for i in out.scheduled if i.seq is long]
        run_step(sched, out)
    assert chunks == [7, 7, 6] and long.num_computed_tokens == 20


def test_new_requests_join_every_step_and_finished_leave_at_once():
    sched = make()
    a = seq("a", max_tokens=2)
    sched.add(a)
    run_step(sched, sched.schedule())
    sched.add(seq("b"))
    out = sched.schedule()
    assert {i.seq.request_id for i in out.scheduled} == {"a", "b"}
    finished = run_step(sched, out)
    assert finished == [a] and a.status is SequenceStatus.FINISHED and not a.block_table
    assert [s.request_id for s in sched.running] == ["b"]


def test_kv_exhaustion_preempts_newest_and_recomputes():
    sched = make(num_blocks=4, block_size=4)
    old, new = seq("old", num_prompt=8, max_tokens=4), seq("new", num_prompt=8, max_tokens=4)
    sched.add(old)
    sched.add(new)
    run_step(sched, sched.schedule())           # 2 blocks each: cache full
    assert sched.blocks.num_free_blocks == 0
    out = sched.schedule()                      # both need a 3rd block for token 9: the newest is preempted
    assert out.preempted == [new] and [i.seq for i in out.scheduled] == [old]
    assert new.status is SequenceStatus.WAITING and new.num_computed_tokens == 0 and not new.block_table
    assert new.num_output_tokens == 1           # outputs kept: recompute covers prompt + outputs
    while old.status is not SequenceStatus.FINISHED:
        run_step(sched, sched.schedule())
    out = sched.schedule()
    assert [(i.seq, i.num_new_tokens) for i in out.scheduled] == [(new, 9)]
    assert sched.num_preemptions == 1


def test_preempted_request_keeps_its_adapter_pin_and_resumes_on_the_same_slot():
    """A newer adapter version arriving while a request is preempted must not change the rows it resumes on."""
    gate = FakeGate()
    sched = make(num_blocks=4, block_size=4, gate=gate)
    old, new = seq("old", 8, 4, adapter="a"), seq("new", 8, 4, adapter="b")
    sched.add(old)
    sched.add(new)
    run_step(sched, sched.schedule())
    slot = new.adapter_slot
    out = sched.schedule()
    assert out.preempted == [new] and new.adapter_slot == slot and gate.pins["b"] == 1   # still pinned
    while old.status is not SequenceStatus.FINISHED:
        run_step(sched, sched.schedule())
    out = sched.schedule()
    assert [i.seq for i in out.scheduled] == [new] and new.adapter_slot == slot and gate.pins["b"] == 1
    while new.status is not SequenceStatus.FINISHED:
        run_step(sched, sched.schedule())
    assert gate.pins == {"a": 0, "b": 0}   # released once, at the end


def test_preempted_request_keeps_its_place_ahead_of_later_arrivals():
    sched = make(num_blocks=4, block_size=4, max_num_seqs=2)
    first, second, third = seq("1", 8, 8), seq("2", 8, 8), seq("3", 4, 2)
    for s in (first, second):
        sched.add(s)
    run_step(sched, sched.schedule())
    sched.add(third)
    out = sched.schedule()
    assert out.preempted == [second]
    assert [s.request_id for s in sched.waiting] == ["2", "3"]


def test_loading_adapter_waits_without_blocking_others():
    gate = FakeGate(status={"slow": "loading"})
    sched = make(gate=gate)
    sched.add(seq("a", adapter="slow"))
    sched.add(seq("b", adapter="fast"))
    sched.add(seq("c"))
    out = sched.schedule()
    assert [i.seq.request_id for i in out.scheduled] == ["b", "c"]
    gate.status["slow"] = "ready"
    run_step(sched, out)
    out = sched.schedule()
    assert "a" in [i.seq.request_id for i in out.scheduled]


def test_failed_adapter_fails_only_its_requests():
    gate = FakeGate(status={"missing": "failed"})
    sched = make(gate=gate)
    bad, good = seq("bad", adapter="missing"), seq("good", adapter="x")
    sched.add(bad)
    sched.add(good)
    out = sched.schedule()
    assert out.failed == [bad] and bad.finish_reason == "error" and isinstance(bad.error, AdapterNotFound)
    assert [i.seq for i in out.scheduled] == [good]


def test_full_adapter_slots_block_later_arrivals_no_overtaking():
    gate = FakeGate(num_slots=1)
    sched = make(gate=gate)
    sched.add(seq("a1", adapter="A", max_tokens=2))
    sched.add(seq("b", adapter="B"))
    sched.add(seq("a2", adapter="A"))   # A is resident, but b came first: a2 must not overtake it
    out = sched.schedule()
    assert [i.seq.request_id for i in out.scheduled] == ["a1"]
    run_step(sched, out)
    run_step(sched, sched.schedule())   # a1 finishes, unpinning A
    out = sched.schedule()
    assert [i.seq.request_id for i in out.scheduled] == ["b"]


def test_abort_waiting_and_running_frees_everything():
    gate = FakeGate()
    sched = make(gate=gate)
    running, waiting = seq("run", adapter="A"), seq("wait", num_prompt=200)
    sched.add(running)
    run_step(sched, sched.schedule())
    sched.add(waiting)
    assert sched.abort("run") is running and running.finish_reason == "abort"
    assert sched.abort("wait") is waiting
    assert sched.abort("nope") is None
    assert sched.blocks.num_free_blocks == sched.blocks.num_blocks and gate.pins["A"] == 0
    assert not sched.has_unfinished()


@settings(max_examples=40, deadline=None)
@given(
    lengths=st.lists(st.tuples(st.integers(1, 40), st.integers(1, 12), st.sampled_from([None, "A", "B", "C"])),
                     min_size=1, max_size=25),
    num_blocks=st.integers(13, 40), block_size=st.sampled_from([1, 4, 16]),
    max_num_seqs=st.integers(1, 8), max_batched_tokens=st.integers(8, 64),
)
def test_random_workloads_finish_with_invariants(lengths, num_blocks, block_size, max_num_seqs, max_batched_tokens):
    num_blocks = max(num_blocks, -(-52 // block_size))        # the longest request (40 + 12) must fit alone
    max_num_seqs = min(max_num_seqs, max_batched_tokens)
    gate = FakeGate(num_slots=2)
    sched = make(num_blocks, block_size, max_num_seqs, max_batched_tokens, gate)
    seqs = [seq(f"r{i}", p, m, a) for i, (p, m, a) in enumerate(lengths)]
    pending = list(seqs)
    finish_order = []
    for _ in range(10_000):
        if pending:
            sched.add(pending.pop(0))                           # one arrival per step
        out = sched.schedule()
        assert out.num_batched_tokens <= max_batched_tokens and len(sched.running) <= max_num_seqs
        for item in out.scheduled:
            assert len(item.seq.block_table) * block_size >= item.seq.num_computed_tokens + item.num_new_tokens
        used = sum(len(s.block_table) for s in sched.running)
        assert used == sched.blocks.num_used_blocks
        finish_order += run_step(sched, out)
        if not pending and not sched.has_unfinished():
            break
    else:
        raise AssertionError("workload did not finish: starvation or livelock")
    assert all(s.num_output_tokens == s.params.max_tokens for s in seqs)
    assert sched.blocks.num_free_blocks == num_blocks and all(n == 0 for n in gate.pins.values())
    assert sorted(s.request_id for s in finish_order) == sorted(s.request_id for s in seqs)


def test_an_older_long_prefill_never_stalls_younger_decodes():
    gate = FakeGate(status={"slow": "loading"})
    sched = make(max_batched_tokens=8, gate=gate)
    old, young = seq("old", num_prompt=40, adapter="slow"), seq("young", num_prompt=3, max_tokens=10)
    sched.add(old)
    sched.add(young)
    run_step(sched, sched.schedule())           # old waits for its adapter; young prefills
    gate.status["slow"] = "ready"
    for _ in range(4):                          # old prefills in chunks while young decodes every step
        out = sched.schedule()
        assert [(i.seq.request_id, i.num_new_tokens) for i in out.scheduled][0] == ("young", 1)
        run_step(sched, out)
