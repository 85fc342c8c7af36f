"""structlog configuration: JSON lines on stdout (ConsoleRenderer on a TTY when asked)."""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

import structlog

from launchgate.audit import utc_timestamp


def _timestamp(_: object, __: str, event: structlog.types.EventDict) -> structlog.types.EventDict:
    """Stamp events that carry no timestamp; a decision record keeps its own."""
    if "timestamp" not in event:
        event["timestamp"] = utc_timestamp(time.time())
    return event


PRERENDERED = "_prerendered"


class _Renderer:
    """JSON rendering, except for events that carry their own rendered JSON line.

    A decision record is already canonical JSON in the decision log; echoing that exact
    line keeps stdout and the file byte-identical and renders each record once.
    """

    def __init__(self, inner: structlog.types.Processor) -> None:
        self.inner = inner

    def __call__(self, logger: object, name: str, event: structlog.types.EventDict) -> Any:
        line = event.get(PRERENDERED)
        return line if line is not None else self.inner(logger, name, event)


class LineLogger:
    """structlog's ``PrintLogger``, but each line leaves in one ``write``, newline included.

    ``print()`` writes a line and its newline apart; with unbuffered output (PYTHONUNBUFFERED)
    another process on the same stdout (``serve --workers N``) could put its line between
    them. One write of at most PIPE_BUF bytes to a pipe is never split. Writes to whatever
    ``sys.stdout`` is at the time (tests swap it)."""

    _lock = threading.Lock()  # one line at a time, from every thread

    def msg(self, message: str) -> None:
        out = sys.stdout
        with self._lock:
            out.write(message + "\n")
            out.flush()

    log = debug = info = warn = warning = msg
    fatal = failure = err = error = critical = exception = msg


_LEVELS: Final = (logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR, logging.CRITICAL)


class _FromLibraries(logging.Handler):
    """What libraries log through the standard ``logging`` module (asyncpg, aiohttp), as one
    JSON line each like every other event (found by QA: asyncpg's multi-line tracebacks on
    stderr during a database outage)."""

    def emit(self, record: logging.LogRecord) -> None:
        # structlog knows the five standard levels only: a library's own (35, say) goes as the
        # standard one below it (found in review: a KeyError, and the record lost).
        level = max((n for n in _LEVELS if n <= record.levelno), default=logging.DEBUG)
        try:
            structlog.get_logger("launchgate").log(
                level,
                "library.log",
                logger=record.name,
                message=record.getMessage(),
                exc_info=record.exc_info or False,
            )
        except Exception:  # a log line must never take the gateway down
            self.handleError(record)


def configure_logging(*, json: bool = True, level: int = logging.INFO) -> None:
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            _timestamp,
            structlog.processors.format_exc_info,
            _Renderer(renderer),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=lambda *_: LineLogger(),
        cache_logger_on_first_use=True,
    )
    root = logging.getLogger()
    root.handlers[:] = [_FromLibraries()]
    root.setLevel(logging.WARNING)  # libraries' warnings and errors; not aiohttp's access log


_quiet = False  # set by quiet_logs, read by _dropped_while_quiet on any thread


def _dropped_while_quiet(
    _: object, __: str, event: structlog.types.EventDict
) -> structlog.types.EventDict:
    if _quiet:
        raise structlog.DropEvent
    return event


@contextmanager
def quiet_logs() -> Iterator[None]:
    """No structlog lines while a one-shot command runs: what it has to say is its output and,
    on failure, its one line on stderr (found by QA: a failing ledger's store.failing went to
    stdout, before that line, where it would also break ``licenses list --json``).

    A flag, read by a processor put first in the chain, rather than a chain that drops all: a
    logger bound while it is set (structlog may cache it so) logs again once it is cleared
    (found in review). The ledger logs from its own thread, hence a plain flag, not a context
    variable."""
    global _quiet
    before = structlog.get_config()
    if _dropped_while_quiet not in before["processors"]:
        structlog.configure(processors=[_dropped_while_quiet, *before["processors"]])
    _quiet = True
    try:
        yield
    finally:
        _quiet = False
