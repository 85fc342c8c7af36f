"""Prometheus metrics of one gateway."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

import structlog
from prometheus_client import CollectorRegistry, Counter, Histogram

log = structlog.get_logger("launchgate")

# A count that fails is logged at most once in this many seconds, with how many failed since
# the last line: while a metrics folder is full or gone every request's count fails, and a line
# per request buried everything else on stdout (as large as the traffic).
FAILED_LOG_INTERVAL_S: Final = 60.0


class Metrics:
    """One registry per gateway, so several apps (tests) never share counters."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._failed = 0  # counts failed since the last metrics.count_failed line
        self._quiet_until = float("-inf")
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
            self._count_failed(e)

    def count_upstream_error(self, kind: str) -> None:
        """One request the upstream could not answer. Never raises (``count_decision``): the
        client gets the 502 or 504 it is owed, not a 500."""
        try:
            self.upstream_errors.labels(kind).inc()
        except Exception as e:
            self._count_failed(e)

    def count_reload(self, result: str) -> None:
        """One configuration reload, ``ok`` or ``failed``. Never raises (``count_decision``): a
        reload applied is not reported as failed."""
        try:
            self.reloads.labels(result).inc()
        except Exception as e:
            self._count_failed(e)

    def _count_failed(self, error: Exception) -> None:
        self._failed += 1
        now = self._clock()
        if now < self._quiet_until:
            return
        log.warning(
            "metrics.count_failed",
            error=f"{type(error).__name__}: {error}",
            failed=self._failed,
            note=f"logged at most once every {FAILED_LOG_INTERVAL_S:g} s",
        )
        self._failed = 0
        self._quiet_until = now + FAILED_LOG_INTERVAL_S
