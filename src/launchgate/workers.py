"""``launchgate serve --workers N``: N gateway processes sharing one port (SO_REUSEPORT).

The parent only supervises: it starts the workers, forwards SIGHUP (reload) and
SIGTERM/SIGINT (graceful stop) to them, restarts a worker that died, and exits when
they have all stopped. Workers share the configured store and decision log, both of
which are safe for several processes. Metrics are summed over the workers through
prometheus-client's multiprocess mode; worker 0 serves the admin listener.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

import structlog

from launchgate.config import Config, RestartOnly

log = structlog.get_logger("launchgate")

# The restart-only settings the supervisor started with, handed to every worker it starts: a
# worker started again after the file changed must not listen elsewhere or count in another
# ledger than its siblings (found by QA: one port served two ledgers, a license spent twice).
RUNNING_ENV = "LAUNCHGATE_WORKER_RUNNING"


class Backoff:
    """When to start a worker again after it died: 1 s after its death, doubling for each
    death that follows a short life (a worker that cannot start: a configuration that became
    invalid on disk, a port taken) up to 60 s, and back to 1 s once a worker has lived
    ``settled_s``. Found by QA: a worker that could not start was started again every 1.4 s
    for as long as the supervisor ran, each time logging a failure and loading everything."""

    first_s = 1.0
    max_s = 60.0
    settled_s = 30.0

    def __init__(self) -> None:
        self._delay_s = 0.0

    def after_death(self, lived_s: float) -> float:
        """The delay before the next start of a worker that died after ``lived_s``."""
        if lived_s >= self.settled_s or self._delay_s == 0.0:
            self._delay_s = self.first_s
        else:
            self._delay_s = min(self._delay_s * 2, self.max_s)
        return self._delay_s


def _spawn(
    config_path: Path, index: int, env: dict[str, str], *, respawn: bool = False
) -> subprocess.Popen[bytes]:
    command = [sys.executable, "-m", "launchgate", "serve", "--config", str(config_path)]
    # A worker started again does not create the ledger: see server.serve (create_store).
    again = ["--respawned"] if respawn else []
    return subprocess.Popen([*command, "--worker-index", str(index), *again], env=env)


def supervise(config: Config, workers: int) -> int:
    """Run ``workers`` worker processes until SIGTERM/SIGINT; returns the exit status."""
    config_path = config.source
    stopping = False
    with tempfile.TemporaryDirectory(prefix="launchgate-metrics-") as metrics_dir:
        env = {
            **os.environ,
            "PROMETHEUS_MULTIPROC_DIR": metrics_dir,
            RUNNING_ENV: RestartOnly.of(config).to_json(),
        }
        procs = {i: _spawn(config_path, i, env) for i in range(workers)}
        started = dict.fromkeys(procs, time.monotonic())
        backoff = {i: Backoff() for i in procs}
        restart_at: dict[int, float] = {}  # dead workers: when to start each again

        def forward(signum: int, _: FrameType | None) -> None:
            nonlocal stopping
            if signum in (signal.SIGTERM, signal.SIGINT):
                stopping = True
                signum = signal.SIGTERM
            for proc in procs.values():
                if proc.poll() is None:
                    proc.send_signal(signum)

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, forward)
        log.info("workers.started", workers=workers, pids=[p.pid for p in procs.values()])
        while True:
            time.sleep(0.2)
            now = time.monotonic()
            for index, proc in list(procs.items()):
                if stopping:
                    break
                if index in restart_at:
                    if now >= restart_at[index]:
                        del restart_at[index]
                        procs[index] = _spawn(config_path, index, env, respawn=True)
                        started[index] = now
                    continue
                code = proc.poll()
                if code is None:
                    continue
                delay = backoff[index].after_death(now - started[index])
                restart_at[index] = now + delay
                log.error(
                    "worker.died", worker=index, pid=proc.pid, exit_code=code, restart_in_s=delay
                )
            if stopping and all(p.poll() is not None for p in procs.values()):
                break
    failed = [p.returncode for p in procs.values() if p.returncode not in (0, -signal.SIGTERM)]
    log.info("workers.stopped", exit_codes=[p.returncode for p in procs.values()])
    return 1 if failed else 0
