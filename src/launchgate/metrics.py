"""Prometheus metrics of one gateway."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram


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
        """One launch decision, taken in ``seconds``."""
        counter = self._decision_counters.get((outcome, reason))
        if counter is None:
            counter = self._decision_counters[outcome, reason] = self.decisions.labels(
                outcome, reason
            )
        counter.inc()
        self.decision_seconds.observe(seconds)
