"""PlacementController: rebalances every period in a background thread; a plain class (cluster/app.py deploys it)."""

from __future__ import annotations

import logging
import threading

logger = logging.getLogger("lorafleet.placement")


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
        self.rebalancer = Rebalancer.from_settings(cfg)
        self.last_report: dict | None = None
        if start_loop:
            threading.Thread(target=self._loop, daemon=True, name="lorafleet-rebalance").start()

    def _loop(self) -> None:
        while not self._stop.wait(self.period_s):
            self.rebalance()

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
