"""``launchgate serve --workers N``: N gateway processes sharing one port (SO_REUSEPORT).

The parent only supervises: it starts the workers, forwards SIGHUP (reload) and
SIGTERM/SIGINT (graceful stop) to them, restarts a worker that died, and exits when
they have all stopped. Workers end with it (a supervisor killed with SIGKILL does not
leave them serving on, out of reach of its signals), and a supervisor refuses a port
that something already serves. Workers share the configured store and decision log, both of
which are safe for several processes. Metrics are summed over the workers through
prometheus-client's multiprocess mode; worker 0 serves the admin listener.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
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
    """When to start a worker again after it died: 1 s after the death of a worker that had
    been serving, and, for a worker that died before it served (a configuration that became
    invalid on disk, a port taken), a pause that doubles with each such death up to 60 s.
    Found by QA: a worker that could not start was started again every 1.4 s for as long as
    the supervisor ran, each time logging a failure and loading everything; and, when the
    pause went by how long a worker had lived, workers killed every few seconds (an OOM
    killer, say) waited longer each time until all of them waited at once, the port unserved."""

    first_s = 1.0
    max_s = 60.0

    def __init__(self) -> None:
        self._delay_s = 0.0

    def after_death(self, *, served: bool) -> float:
        """The delay before the next start of a worker that died, having ``served`` or not."""
        if served or self._delay_s == 0.0:
            self._delay_s = self.first_s
        else:
            self._delay_s = min(self._delay_s * 2, self.max_s)
        return self._delay_s


# The pipe on which a worker says that it serves: see tell_supervisor.
READY_FD_ENV = "LAUNCHGATE_WORKER_READY_FD"


class Worker:
    """A worker's process, and the pipe on which it says it serves (see ``tell_supervisor``)."""

    def __init__(self, proc: subprocess.Popen[bytes], ready_fd: int) -> None:
        self.proc = proc
        self.pid = proc.pid
        self._ready_fd: int | None = ready_fd
        self._served = False
        os.set_blocking(ready_fd, False)

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def poll(self) -> int | None:
        return self.proc.poll()

    def send_signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def served(self) -> bool:
        """Whether it began to serve: what it wrote stays in the pipe after it died."""
        if self._ready_fd is not None:
            try:
                said = os.read(self._ready_fd, 1)
            except BlockingIOError:  # alive, not serving yet
                return False
            self._served = said == b"r"
            os.close(self._ready_fd)
            self._ready_fd = None
        return self._served


def tell_supervisor() -> None:
    """Say to the supervisor, if there is one, that this worker serves (listens) now."""
    fd = os.environ.pop(READY_FD_ENV, None)
    if fd is None:
        return
    with contextlib.suppress(OSError, ValueError):
        try:
            os.write(int(fd), b"r")
        finally:
            os.close(int(fd))


def _spawn(config_path: Path, index: int, env: dict[str, str], *, respawn: bool = False) -> Worker:
    command = [sys.executable, "-m", "launchgate", "serve", "--config", str(config_path)]
    # A worker started again does not create the ledger: see server.serve (create_store).
    again = ["--respawned"] if respawn else []
    ready, told = os.pipe()
    try:
        proc = subprocess.Popen(
            [*command, "--worker-index", str(index), *again],
            env={**env, READY_FD_ENV: str(told)},
            pass_fds=(told,),
            preexec_fn=_in_child(os.getpid()),
        )
    except BaseException:
        os.close(ready)
        raise
    finally:
        os.close(told)
    return Worker(proc, ready)


_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _in_child(parent: int) -> Callable[[], None]:
    """What a worker's process does before it runs launchgate:

    - ignore SIGHUP until its gateway handles it (``server.serve`` installs the handler): a
      reload sent while it starts would end it, and its siblings get one when it is started
      again (found in review: workers restarted together killed each other); it reads the
      files as they are then anyway;
    - have the kernel send it SIGTERM (a graceful stop) when the supervisor dies, however it
      dies (Linux). Found by QA: workers of a supervisor killed with SIGKILL served on, beyond
      the reach of any SIGHUP, and a second supervisor's workers joined them on the port.
    """
    libc = ctypes.CDLL(None) if sys.platform.startswith("linux") else None

    def child() -> None:
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        if libc is not None:
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
            if os.getppid() != parent:  # the supervisor died before the line above
                os._exit(1)

    return child


def port_taken(host: str, port: int) -> bool:
    """Whether ``host:port`` is served already. Workers bind with SO_REUSEPORT, which would let
    them join whatever serves the port now (found by QA: another supervisor's workers); a bind
    without it fails while anything listens there. With SO_REUSEADDR, as the workers bind, so
    that connections of an earlier run in TIME_WAIT do not count (found in review). Other
    errors (no such address, no permission) are raised as they are."""
    if port == 0:
        return False
    for family, kind, proto, _, address in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as e:
                if e.errno == errno.EADDRINUSE:
                    return True
                raise
    return False


def _reload_siblings(procs: dict[int, Worker], started: int) -> None:
    """SIGHUP every worker but the one just started, which reads the files as they are now:
    so do its siblings, and one port keeps one policy (found by QA: files edited but not yet
    reloaded were taken up by a worker started again alone, and a restricted account's
    launches passed on one worker in two). A file that no longer loads leaves the siblings
    as they run and keeps the new worker from starting."""
    siblings = [p for i, p in procs.items() if i != started and p.poll() is None]
    for proc in siblings:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGHUP)
    if siblings:
        log.warning("workers.reloaded", reason="a worker was started again", workers=len(siblings))


def supervise(config: Config, workers: int) -> int:
    """Run ``workers`` worker processes until SIGTERM/SIGINT; returns the exit status: 1 when a
    worker stopped otherwise than as asked or could not start, else 0 (a worker that had served
    and died, logged as it died, and was waiting to be started again does not count)."""
    config_path = config.source
    stopping = False
    _remove_abandoned_metrics()
    with (
        tempfile.TemporaryDirectory(
            prefix=f"{_METRICS_PREFIX}{os.getpid()}-", ignore_cleanup_errors=True
        ) as metrics_dir,
        _held(Path(metrics_dir) / _METRICS_LOCK),
    ):
        env = {
            **os.environ,
            "PROMETHEUS_MULTIPROC_DIR": metrics_dir,
            RUNNING_ENV: RestartOnly.of(config).to_json(),
        }
        procs: dict[int, Worker] = {}
        backoff = {i: Backoff() for i in range(workers)}
        restart_at: dict[int, float] = {}  # dead workers: when to start each again

        def forward(signum: int, _: FrameType | None) -> None:
            nonlocal stopping
            if signum in (signal.SIGTERM, signal.SIGINT):
                stopping = True
                signum = signal.SIGTERM
            for proc in procs.values():
                if proc.poll() is None:
                    proc.send_signal(signum)

        def start(index: int, *, respawn: bool = False) -> bool:
            """Start worker ``index``; False when a stop came meanwhile (the worker, not yet
            among ``procs`` when ``forward`` ran, is stopped here)."""
            procs[index] = _spawn(config_path, index, env, respawn=respawn)
            if stopping:
                procs[index].send_signal(signal.SIGTERM)
            return not stopping

        # Before the first worker: a stop while they start reaches each one started.
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, forward)
        for index in range(workers):
            if stopping or not start(index):
                break
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
                        if not start(index, respawn=True):
                            break
                        _reload_siblings(procs, index)
                    continue
                code = proc.poll()
                if code is None:
                    continue
                delay = backoff[index].after_death(served=proc.served())
                restart_at[index] = now + delay
                log.error(
                    "worker.died", worker=index, pid=proc.pid, exit_code=code, restart_in_s=delay
                )
            if stopping and all(p.poll() is not None for p in procs.values()):
                break
    failed = [
        i
        for i, p in procs.items()
        if p.returncode not in (0, -signal.SIGTERM) and not (i in restart_at and p.served())
    ]
    log.info("workers.stopped", exit_codes=[p.returncode for p in procs.values()])
    return 1 if failed else 0


_METRICS_PREFIX = "launchgate-metrics-"
_METRICS_LOCK = ".supervisor.lock"  # held (flock) by the supervisor for as long as it runs
_ABANDONED_AFTER_S = 60.0  # a folder younger than this may be a supervisor's still starting


@contextlib.contextmanager
def _held(lock: Path) -> Iterator[None]:
    """Hold an exclusive flock on ``lock`` (created) while the block runs."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _remove_abandoned_metrics() -> None:
    """Remove the metrics folders of supervisors that are gone (one killed with SIGKILL cannot
    remove its own; found by QA). A supervisor holds a lock in its folder while it runs, which
    the kernel lets go however it ends, so a folder whose lock can be taken is abandoned. Not a
    process id: found in review, one in another PID namespace (a container sharing /tmp) looked
    dead, its folder was removed, and its launches failed. Folders without that lock, younger
    than a minute, symlinks or other users' stay; nothing here keeps the supervisor from
    starting (found in review: a folder named with a huge number raised)."""
    try:
        folders = list(Path(tempfile.gettempdir()).glob(f"{_METRICS_PREFIX}*"))
    except OSError:
        return
    for folder in folders:
        try:
            _remove_if_abandoned(folder)
        except Exception as e:  # best effort, never a reason not to serve
            log.warning("workers.metrics_folder_kept", folder=str(folder), error=str(e))


def _remove_if_abandoned(folder: Path) -> None:
    info = folder.lstat()
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != os.getuid():
        return
    if time.time() - info.st_mtime < _ABANDONED_AFTER_S:
        return
    try:  # (not blocking: a FIFO there would hold the open; found in review)
        fd = os.open(
            folder / _METRICS_LOCK, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        )
    except FileNotFoundError:  # not a folder this version made
        return
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # its supervisor runs
            return
        shutil.rmtree(folder)
        log.info("workers.metrics_folder_removed", folder=str(folder))
    finally:
        os.close(fd)
