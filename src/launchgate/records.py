"""Decision records (CONTRACT section 5): what each launch decision writes, and where.

``Recorder.write`` appends a record to the hash-chained decision log (in the file before
it returns) and emits the same event as structlog JSON on stdout.
"""

from __future__ import annotations

import select
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import structlog

from launchgate.audit import AuditLog, Done, utc_timestamp
from launchgate.logsetup import PRERENDERED
from launchgate.policy import Decision

# The most bytes one write to a pipe carries whole (POSIX guarantees 512; Linux gives 4096).
_PIPE_BUF: Final = getattr(select, "PIPE_BUF", 512)


def decision_record(
    decision: Decision,
    *,
    decision_id: str,
    mode: str,
    enforced: bool,
    method: str | None,
    path: str | None,
    now: float,
) -> dict[str, Any]:
    """The ``launch.decision`` record; fields that do not apply are null, never missing."""
    item = decision.deciding
    ref = decision.license_ref
    return {
        "event": "launch.decision",
        "timestamp": utc_timestamp(now),
        "decision_id": decision_id,
        "outcome": decision.outcome,
        "reason": decision.reason,
        "status": decision.status,
        "detail": decision.detail,
        "enforced": enforced,
        "mode": mode,
        "account": decision.account,
        "restricted": decision.restricted,
        "sku": item.sku if item else None,
        "count": item.count if item else None,
        "accelerator": item.accelerator if item else None,
        "accelerators": item.accelerators if item else None,
        "eccn": item.eccn if item else None,
        "controlled": item.controlled if item else None,
        "region": decision.region,
        "license": None if ref is None else {"jti": ref.jti, "kid": ref.kid, "iss": ref.iss},
        "reserved": decision.reserve if decision.reason == "licensed" else None,
        "items": [i.as_record() for i in decision.items],
        "method": method,
        "path": path,
    }


class Recorder:
    """Writes records to the decision log and the same events to the structured log.

    The structured-log line is the very line written to the file, emitted on the log's
    writer thread once it is in the file, so the event loop renders each record once.
    """

    def __init__(self, path: Path) -> None:
        self.log = structlog.get_logger("launchgate")
        self.audit = AuditLog.open(path, on_written=self._echo)

    def _echo(self, records: list[dict[str, Any]], lines: list[bytes]) -> None:
        # A log call for as many lines as fit in PIPE_BUF bytes: the logger writes them in one
        # go, which a pipe never splits, so the lines of several workers sharing stdout never
        # mix (a line longer than that goes alone, as any long line would).
        chunk: list[bytes] = []
        size, event = 0, ""
        for record, line in zip(records, lines, strict=True):
            if chunk and size + len(line) > _PIPE_BUF:
                self._log_lines(event, chunk)
                chunk, size = [], 0
            if not chunk:
                event = record["event"]
            chunk.append(line)
            size += len(line)
        self._log_lines(event, chunk)

    def _log_lines(self, event: str, lines: list[bytes]) -> None:
        # The lines end in newlines; the logger adds the last one.
        self.log.info(event, **{PRERENDERED: b"".join(lines).decode().removesuffix("\n")})

    async def write(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Append ``record`` to the chain (in the file before this returns) and log it."""
        return await self.audit.append(record)

    def write_later(self, record: Mapping[str, Any], done: Done) -> None:
        """``write`` on the calling thread, which must not be the event loop's, reporting
        the written record or the error through ``done``: at once, or inside
        ``audit.group()`` with the rest of the group when it ends."""
        self.audit.append_later(record, done)

    async def event(self, event: str, **fields: Any) -> dict[str, Any]:
        """Write a record of ``event`` stamped with the current time."""
        return await self.write({"event": event, "timestamp": utc_timestamp(time.time()), **fields})

    async def aclose(self) -> None:
        await self.audit.aclose()
