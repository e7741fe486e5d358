"""PlacementController: rebalances every period in a background thread; a plain class (cluster/app.py deploys it)."""

from __future__ import annotations

import logging
import threading
import time

logger = logging.getLogger("lorafleet.placement")
COUNT_CHECK_S = 2.0   # with autoscaling: how often the controller looks at the replica count


class PlacementController:
    """Rebalances every `rebalance_period_s`: demand counters → solver → routing table in Redis (routers re-read
    it within a second). `lorafleet rebalance` publishes through the same Redis key at any time, with the same
    Rebalancer.from_settings (ranks through the adapter store, live ranks from the replicas' heartbeats)."""

    def __init__(self, settings: dict | None = None, num_replicas: int | None = None, *,
                 start_loop: bool = True) -> None:
        from lorafleet.infra.config import load_settings
        from lorafleet.placement.rebalancer import Rebalancer

        self._stop = threading.Event()
        cfg = load_settings(**(settings or {}))
        self.num_replicas = num_replicas or cfg.num_replicas
        self.period_s = cfg.rebalance_period_s
        self.is_autoscaled = cfg.autoscaling != "off"   # the replica count follows the heartbeats
        self.rebalancer = Rebalancer.from_settings(cfg)
        self.last_report: dict | None = None
        if start_loop:
            threading.Thread(target=self._loop, daemon=True, name="lorafleet-rebalance").start()

    def _loop(self) -> None:
        next_period = time.monotonic() + self.period_s
        while not self._stop.wait(COUNT_CHECK_S if self.is_autoscaled else max(0.0, next_period - time.monotonic())):
            if time.monotonic() >= next_period or self.follow_replica_count():
                self.rebalance()
                next_period = time.monotonic() + self.period_s

    def follow_replica_count(self) -> bool:
        """With autoscaling: take the number of replicas that beat now; True when it changed (rebalance now, so
        a new replica gets adapters and a removed one's go elsewhere, without waiting for the period)."""
        if not self.is_autoscaled or self.rebalancer.liveness is None:
            return False
        try:
            ranks = self.rebalancer.liveness.beating_ranks()
        except Exception as exc:   # Redis down: keep the count
            logger.warning("replica count not read: %s", exc)
            return False
        count = (ranks[-1] + 1) if ranks else self.num_replicas
        if count == self.num_replicas:
            return False
        logger.info("replicas %d -> %d: rebalancing", self.num_replicas, count)
        self.num_replicas = count
        return True

    def rebalance(self) -> dict | None:
        """One period now; returns the last successful report (None before the first)."""
        try:
            self.last_report, _ = self.rebalancer.run(self.num_replicas)
        except Exception as exc:  # Redis down or nothing to place: keep the current table, retry next period
            logger.warning("rebalance skipped: %s", exc)
        return self.last_report

    def stop(self) -> None:
        """End the background loop (its current period finishes first)."""
        self._stop.set()

    def __del__(self) -> None:
        self._stop.set()
