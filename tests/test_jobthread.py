"""The job thread behind the decision log and the SQLite ledger."""

from __future__ import annotations

import os
import threading

import pytest

from launchgate.jobthread import JobThread


def test_jobs_run_in_order_on_one_thread_and_stop_waits_for_them() -> None:
    jobs = JobThread("test-jobs")
    done: list[tuple[int, int]] = []
    for i in range(200):
        jobs.submit(lambda i=i: done.append((i, threading.get_ident())))  # type: ignore[misc]
    jobs.stop(wait=True)
    assert [i for i, _ in done] == list(range(200))
    assert len({t for _, t in done}) == 1
    assert done[0][1] != threading.get_ident()


def test_a_failing_job_does_not_stop_the_ones_after_it() -> None:
    jobs = JobThread("test-jobs")
    done: list[str] = []

    def boom() -> None:
        raise RuntimeError("a bug in a job")

    jobs.submit(boom)
    jobs.submit(lambda: done.append("after"))
    jobs.stop(wait=True)
    assert done == ["after"]


def test_stopping_a_thread_never_started_is_a_no_op() -> None:
    JobThread("test-jobs").stop(wait=True)


def test_a_job_given_after_stop_is_refused_not_lost() -> None:
    """A job queued behind the stop marker would never run (and its waiter hang): refused."""
    jobs = JobThread("test-jobs")
    jobs.submit(lambda: None)
    jobs.stop(wait=True)
    with pytest.raises(RuntimeError, match="stopped"):
        jobs.submit(lambda: None)


async def test_call_returns_or_raises_what_the_job_did_on_the_thread() -> None:
    jobs = JobThread("test-jobs")
    try:
        assert await jobs.call(threading.get_ident) != threading.get_ident()
        assert await jobs.call(lambda: 42) == 42

        def boom() -> None:
            raise ValueError("from the thread")

        with pytest.raises(ValueError, match="from the thread"):
            await jobs.call(boom)
        assert await jobs.call(lambda: "still running") == "still running"
    finally:
        jobs.stop(wait=True)


@pytest.mark.skipif(not hasattr(os, "SCHED_BATCH"), reason="SCHED_BATCH is Linux's")
async def test_the_thread_runs_under_sched_batch_so_waking_it_does_not_preempt_the_loop() -> None:
    """Its jobs run under SCHED_BATCH (no preemption on wake-up); the thread that made it, the
    event loop's, keeps the default policy."""
    thread = JobThread("test")
    try:
        assert await thread.call(lambda: os.sched_getscheduler(0)) == os.SCHED_BATCH
        assert os.sched_getscheduler(0) == os.SCHED_OTHER
    finally:
        thread.stop(wait=True)
