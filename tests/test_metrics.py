"""Metrics: a count that fails never fails what it counts, and is not logged per request."""

from __future__ import annotations

import pytest
import structlog

from launchgate.metrics import FAILED_LOG_INTERVAL_S, Metrics


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def failing(metrics: Metrics, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every count fails, as with the metrics folder of `serve --workers` full or gone."""

    def full(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(metrics.decision_seconds, "observe", full)
    for counter in (metrics.upstream_errors, metrics.reloads):
        monkeypatch.setattr(counter, "labels", full)


def test_failed_counts_are_logged_once_a_minute_with_how_many(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Found in review: a line per launch while counting failed (as many lines as launches).
    The first failure is logged at once; the rest of the interval's only by their number."""
    clock = Clock()
    metrics = Metrics(clock=clock)
    failing(metrics, monkeypatch)
    with structlog.testing.capture_logs() as logs:
        for _ in range(1000):
            metrics.count_decision("allow", "licensed", 0.001)
        metrics.count_upstream_error("connect")
        metrics.count_reload("ok")
        clock.now += FAILED_LOG_INTERVAL_S - 0.001
        metrics.count_decision("allow", "licensed", 0.001)
        clock.now += 0.001
        metrics.count_decision("deny", "license_required", 0.001)
    lines = [e for e in logs if e["event"] == "metrics.count_failed"]
    assert [e["failed"] for e in lines] == [1, 1003]  # 999 + 2 + 1 quiet, then this one
    assert lines[0]["error"] == "OSError: [Errno 28] No space left on device"
    assert lines[0]["log_level"] == "warning"


def test_counts_that_work_are_counted() -> None:
    metrics = Metrics()
    metrics.count_decision("allow", "licensed", 0.001)
    metrics.count_decision("allow", "licensed", 0.001)
    metrics.count_upstream_error("timeout")
    metrics.count_reload("failed")
    value = metrics.registry.get_sample_value
    assert value("launchgate_decisions_total", {"outcome": "allow", "reason": "licensed"}) == 2
    assert value("launchgate_upstream_errors_total", {"kind": "timeout"}) == 1
    assert value("launchgate_config_reloads_total", {"result": "failed"}) == 1
    assert value("launchgate_decision_seconds_count") == 2
