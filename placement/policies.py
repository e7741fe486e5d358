"""Replica choice shared by the router (router/routing_policy.py) and the simulator (sim_policies.py).

One vocabulary of policy names; a name means the same choice wherever it appears:
  random        a uniformly random live rank                                        router, simulator
  round-robin   request i to rank i mod N                                           simulator
  least-loaded  the rank with the fewest outstanding requests (rotating among ties)  simulator
  affinity      jump consistent hash of the adapter id over the live ranks          router, simulator
  s-lora-all    every adapter resident everywhere, least-loaded routing             simulator
  rank-aware    sample the rank-aware solver's RoutingTable (RoutingTable.sample);  router, simulator
                affinity while no table is published
The router's names are the values of Settings.routing_policy. Where router and simulator share a name they share
the code below (or RoutingTable.sample); the router then adds its fallback tiers around the chosen rank.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from lorafleet.placement.routing_table import jump_hash, stable_hash64

POLICY_NAMES: tuple[str, ...] = ("random", "round-robin", "least-loaded", "affinity", "s-lora-all", "rank-aware")


def random_rank(live_ranks: Sequence[int], rng: random.Random) -> int | None:
    """A uniformly random rank of `live_ranks` (ascending); None when there is none."""
    return rng.choice(live_ranks) if live_ranks else None


def affinity_rank(adapter_id: str, live_ranks: Sequence[int]) -> int | None:
    """The adapter's home among `live_ranks` (ascending): jump consistent hash of its id, so a rank joining or
    leaving moves only its share of adapters; None when there is no live rank."""
    return live_ranks[jump_hash(stable_hash64(adapter_id), len(live_ranks))] if live_ranks else None
