"""Prometheus metrics of one gateway."""

from __future__ import annotations

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram

log = structlog.get_logger("launchgate")


class Metrics:
    """One registry per gateway, so several apps (tests) never share counters."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.decisions = Counter(
            "launchgate_decisions",
            "Launch decisions by outcome and reason code.",
            ["outcome", "reason"],
            registry=self.registry,
        )
        self.decision_seconds = Histogram(
            "launchgate_decision_seconds",
            "Time from receiving a launch to its decision (body read, verify, reserve, record).",
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=self.registry,
        )
        self.upstream_errors = Counter(
            "launchgate_upstream_errors",
            "Requests the upstream could not answer, by kind.",
            ["kind"],
            registry=self.registry,
        )
        self.reloads = Counter(
            "launchgate_config_reloads",
            "Configuration reloads by result.",
            ["result"],
            registry=self.registry,
        )
        # Each (outcome, reason)'s counter, looked up once: labels() costs more than the count.
        self._decision_counters: dict[tuple[str, str], Counter] = {}

    def count_decision(self, outcome: str, reason: str, seconds: float) -> None:
        """One launch decision, taken in ``seconds``. Never raises: a count that fails (with
        several workers each is a write to a file under PROMETHEUS_MULTIPROC_DIR, which can be
        full or gone) must not fail a launch whose units are reserved and not yet sent (found
        in review: every launch failed 500, and a reservation left behind is counted as used)."""
        try:
            counter = self._decision_counters.get((outcome, reason))
            if counter is None:
                counter = self._decision_counters[outcome, reason] = self.decisions.labels(
                    outcome, reason
                )
            counter.inc()
            self.decision_seconds.observe(seconds)
        except Exception as e:
            log.warning("metrics.count_failed", error=f"{type(e).__name__}: {e}")
