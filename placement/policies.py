"""Replica choice shared by the router (router/routing_policy.py) and the simulator (sim_policies.py).

One vocabulary of policy names; a name means the same choice wherever it appears:
  random        a uniformly random live rank                                        router, simulator
  round-robin   request i to rank i mod N                                           simulator
  least-loaded  the rank with the fewest outstanding requests (rotating among ties)  simulator
  affinity      jump consistent hash of the adapter id over the live ranks          router, simulator
  s-lora-all    every adapter in host memory, an LRU of the same GPU adapter budget,     simulator
                swaps over PCIe (S-LoRA), least-loaded routing
  s-lora-unlimited  every adapter resident on every GPU at no cost, least-loaded        simulator
  rank-aware    the rank-aware solver's RoutingTable: among an adapter's replicas the  router, simulator
                shorter queue of two distinct weighted draws (choose_weighted_p2c);
                adapters not in the table by its consistent-hash default; affinity
                while no table
  rank-aware-sample  the same tables, one draw from the probabilities (RoutingTable.sample)  simulator
The router's names are the values of Settings.routing_policy. Where router and simulator share a name they share
the code below (or RoutingTable.sample); the router then adds its fallback tiers around the chosen rank.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from lorafleet.placement.routing_table import jump_hash, stable_hash64

POLICY_NAMES: tuple[str, ...] = ("random", "round-robin", "least-loaded", "affinity", "s-lora-all", "s-lora-unlimited",
                                 "rank-aware", "rank-aware-sample")


def random_rank(live_ranks: Sequence[int], rng: random.Random) -> int | None:
    """A uniformly random rank of `live_ranks` (ascending); None when there is none."""
    return rng.choice(live_ranks) if live_ranks else None


def affinity_rank(adapter_id: str, live_ranks: Sequence[int]) -> int | None:
    """The adapter's home among `live_ranks` (ascending): jump consistent hash of its id, so a rank joining or
    leaving moves only its share of adapters; None when there is no live rank."""
    return live_ranks[jump_hash(stable_hash64(adapter_id), len(live_ranks))] if live_ranks else None


def choose_weighted_p2c(entry: Sequence[tuple[int, float]], queue_len: Callable[[int], float],
                        rng: random.Random) -> int:
    """Load-aware choice among an adapter's table replicas: the power of two choices (Mitzenmacher) over two
    distinct replicas drawn with the table's probabilities (the second among the others, renormalised); the one
    with the shorter queue wins, ties go to the first draw. One replica: it, without a draw. `entry`: ((rank, p),
    ...), p > 0 summing to 1 (RoutingTable.entries[adapter_id]); `queue_len(rank)`: that replica's waiting + running
    requests as last reported; called for the two candidates only. Two `rng.random()` draws per call."""
    if len(entry) == 1:
        return entry[0][0]
    first = _draw(entry, rng, None)
    second = _draw(entry, rng, first)
    return second if queue_len(second) < queue_len(first) else first


def _draw(entry: Sequence[tuple[int, float]], rng: random.Random, skip: int | None) -> int:
    """A rank of `entry` drawn with its probabilities, `skip` left out (renormalised)."""
    total = sum(p for rank, p in entry if rank != skip) if skip is not None else 1.0
    u, acc = rng.random() * total, 0.0
    for rank, p in entry:
        if rank == skip:
            continue
        acc += p
        if u < acc:
            return rank
    return next(rank for rank, _ in reversed(entry) if rank != skip)   # rounding: the sum may end just below u
