"""The SQLite ledger: ``Ledger`` in one SQLite file (WAL) that several processes (gateways, the
``launchgate`` CLI) may share.

Selected by ``[store] url = "sqlite:PATH"``. Every sqlite3 call runs on one dedicated thread, and
calls that queue up behind a busy thread commit together (see ``SqliteLedger``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import structlog

from launchgate.errors import StoreUnavailable
from launchgate.files import FileId, cannot_make, cannot_write, file_id, short_of_space, still_at
from launchgate.jobthread import JobThread
from launchgate.ledger import (
    _KEY_COLUMNS,
    _LICENSE_COLUMNS,
    _RESERVATION_COLUMNS,
    ANSWERED_LATE,
    COUNTED_AGAIN,
    IdempotencyKey,
    LicenseState,
    Reservation,
    ReservationState,
    ReserveOutcome,
    ReserveResult,
    Then,
    ThenGroup,
    _abandoned_from,
    _check_give_back,
    _check_reserve,
    _decision_taken,
    _expiry_note,
    _idempotency_key,
    _license_state,
    _newer_schema,
    _reservation,
)

__all__ = ["SCHEMA_VERSION", "SqliteLedger", "check_ledger_file"]

_T = TypeVar("_T")

_MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        1,
        (
            """
            CREATE TABLE licenses (
                jti              TEXT PRIMARY KEY,
                account          TEXT,
                max_accelerators INTEGER,
                expires          REAL,
                first_seen       REAL,
                used             INTEGER NOT NULL DEFAULT 0 CHECK (used >= 0),
                reserved         INTEGER NOT NULL DEFAULT 0 CHECK (reserved >= 0),
                revoked          INTEGER NOT NULL DEFAULT 0,
                revoked_reason   TEXT,
                revoked_at       REAL
            )
            """,
            """
            CREATE TABLE reservations (
                decision_id TEXT PRIMARY KEY,
                jti         TEXT NOT NULL REFERENCES licenses (jti),
                amount      INTEGER NOT NULL CHECK (amount >= 0),
                state       TEXT NOT NULL
                            CHECK (state IN ('reserved', 'used', 'released', 'settled_unknown')),
                created_at  REAL NOT NULL,
                settled_at  REAL,
                note        TEXT
            )
            """,
            "CREATE INDEX reservations_by_state ON reservations (state, created_at)",
        ),
    ),
    (
        2,
        (
            # One row per (account, key): bound to the latest reservation made under the key.
            """
            CREATE TABLE idempotency_keys (
                account     TEXT NOT NULL,
                key         TEXT NOT NULL,
                fingerprint TEXT NOT NULL,
                decision_id TEXT NOT NULL REFERENCES reservations (decision_id),
                bound_at    REAL NOT NULL,
                PRIMARY KEY (account, key)
            )
            """,
        ),
    ),
    (
        3,
        (
            # The keys bound to a reservation, for abandon's question whether one is (it read
            # the whole table, which holds a row for every keyed launch ever made).
            "CREATE INDEX idempotency_keys_by_decision ON idempotency_keys (decision_id)",
        ),
    ),
    (
        4,
        (
            # When staff gave the reservation back (give_back): a settlement that finds it so
            # counts it again (COUNTED_AGAIN), where one released by its own gateway stays.
            "ALTER TABLE reservations ADD COLUMN given_back_at REAL",
            # When a retry was last counted on it (REPLAYED): give_back refuses it for a while.
            "ALTER TABLE reservations ADD COLUMN replayed_at REAL",
        ),
    ),
)
SCHEMA_VERSION: Final = _MIGRATIONS[-1][0]

log = structlog.get_logger("launchgate")


def _bound_outcome(
    bound_fingerprint: str, bound_state: str | None, fingerprint: str
) -> ReserveOutcome | None:
    """What an idempotency key bound to an earlier reservation decides; None: reserve anew
    (the earlier reservation was released, so nothing was counted under the key)."""
    if bound_fingerprint != fingerprint:
        return ReserveOutcome.CONFLICT
    if bound_state == "reserved":
        return ReserveOutcome.IN_PROGRESS
    if bound_state in ("used", "settled_unknown"):
        return ReserveOutcome.REPLAYED
    return None


@contextmanager
def _write_transaction(conn: sqlite3.Connection) -> Iterator[None]:
    """BEGIN IMMEDIATE: take the write lock up front, so read-then-write cannot race another
    process (a deferred transaction would fail with SQLITE_BUSY on upgrade instead of waiting)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    conn.execute("COMMIT")


# or with others in a batch); none opens or ends one itself.


# Takes ``amount`` (?2) from license ?1 if its row is complete, is on record for account ?3, is
# not revoked and has room; returns the counters after. fetchall(): a RETURNING statement must
# finish before COMMIT.
_TAKE: Final = (
    "UPDATE licenses SET reserved = reserved + ?2"
    " WHERE jti = ?1 AND revoked = 0 AND account = ?3 AND expires IS NOT NULL"
    " AND first_seen IS NOT NULL AND used + reserved + ?2 <= max_accelerators"
    " RETURNING max_accelerators, used, reserved"
)
_LICENSE_ROW: Final = (
    "SELECT max_accelerators, used, reserved, revoked, account, expires, first_seen"
    " FROM licenses WHERE jti = ?"
)


def _reserve(
    conn: sqlite3.Connection,
    *,
    jti: str,
    account: str,
    max_accelerators: int,
    expires: float,
    amount: int,
    decision_id: str,
    now: float,
    idempotency_key: str | None,
    fingerprint: str | None,
) -> ReserveResult:
    if idempotency_key is None:
        # The usual launch, in one statement: a complete, unrevoked license row with room for
        # ``amount`` takes it. Anything else (first sighting, revoked, another account's,
        # exhausted) goes the long way below, which tells them apart.
        taken = conn.execute(_TAKE, (jti, amount, account)).fetchall()
        if taken:
            _insert_reservation(conn, decision_id, jti, amount, now)
            [(max_acc, used, reserved)] = taken
            return ReserveResult(ReserveOutcome.RESERVED, max_acc, used, reserved, amount)
    # Read inside the write transaction: a revoke committed by another process before this lock
    # was taken is seen here, and so is a reservation made under the same idempotency key.
    row = conn.execute(_LICENSE_ROW, (jti,)).fetchone()
    if row is None or None in (row[0], *row[4:]):  # max, account, expires, first seen
        # The first sighting fixes account, maximum and expiry (a jti is unique); a row made
        # by an earlier revoke has them NULL and gets them now. A complete row is left alone.
        conn.execute(
            "INSERT INTO licenses (jti, account, max_accelerators, expires, first_seen)"
            " VALUES (?, ?, ?, ?, ?)"
            " ON CONFLICT (jti) DO UPDATE SET"
            "  account = COALESCE(account, excluded.account),"
            "  max_accelerators = COALESCE(max_accelerators, excluded.max_accelerators),"
            "  expires = COALESCE(expires, excluded.expires),"
            "  first_seen = COALESCE(first_seen, excluded.first_seen)",
            (jti, account, max_accelerators, expires, now),
        )
        row = conn.execute(_LICENSE_ROW, (jti,)).fetchone()
    max_acc, used, reserved, revoked = row[:4]
    outcome: ReserveOutcome | None = None
    bound: str | None = None
    if revoked:
        outcome = ReserveOutcome.REVOKED
    elif row[4] != account:
        outcome = ReserveOutcome.OTHER_ACCOUNT
    elif idempotency_key is not None and fingerprint is not None:
        row = conn.execute(
            "SELECT k.fingerprint, k.decision_id, r.state FROM idempotency_keys AS k"
            " LEFT JOIN reservations AS r ON r.decision_id = k.decision_id"
            " WHERE k.account = ? AND k.key = ?",
            (account, idempotency_key),
        ).fetchone()
        if row is not None:
            bound_fingerprint, bound, bound_state = row
            outcome = _bound_outcome(bound_fingerprint, bound_state, fingerprint)
            if outcome is ReserveOutcome.REPLAYED:  # staff cannot give it back for a while
                conn.execute(
                    "UPDATE reservations SET replayed_at = ? WHERE decision_id = ?", (now, bound)
                )
    if outcome is None and used + reserved + amount > max_acc:
        outcome = ReserveOutcome.EXHAUSTED
    if outcome is None:
        _insert_reservation(conn, decision_id, jti, amount, now)
        conn.execute("UPDATE licenses SET reserved = reserved + ? WHERE jti = ?", (amount, jti))
        if idempotency_key is not None:
            conn.execute(
                f"INSERT INTO idempotency_keys ({_KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?)"  # noqa: S608 - constant column list
                " ON CONFLICT (account, key) DO UPDATE SET"
                "  decision_id = excluded.decision_id, bound_at = excluded.bound_at",
                (account, idempotency_key, fingerprint, decision_id, now),
            )
        outcome = ReserveOutcome.RESERVED
        reserved += amount
    keyed = outcome in (
        ReserveOutcome.REPLAYED,
        ReserveOutcome.CONFLICT,
        ReserveOutcome.IN_PROGRESS,
    )
    return ReserveResult(
        outcome=outcome,
        max_accelerators=max_acc,
        used=used,
        reserved=reserved,
        requested=amount,
        replay_of=bound if keyed else None,
    )


def _insert_reservation(
    conn: sqlite3.Connection, decision_id: str, jti: str, amount: int, now: float
) -> None:
    try:  # (the decision id is the key: a second reservation under it cannot be made)
        conn.execute(
            f"INSERT INTO reservations ({_RESERVATION_COLUMNS})"  # noqa: S608 - constant column list
            " VALUES (?, ?, ?, 'reserved', ?, NULL, NULL)",
            (decision_id, jti, amount, now),
        )
    except sqlite3.IntegrityError as e:
        raise _decision_taken(decision_id) from e


def _settle(
    conn: sqlite3.Connection, decision_id: str, to: ReservationState, now: float, note: str | None
) -> bool:
    """Move a reservation out of 'reserved'; a no-op for any other state, so a late commit after
    TTL settlement never counts the same accelerators twice. Whether it moved it."""
    # fetchall(), not fetchone(): a RETURNING statement must run to completion before COMMIT.
    rows = conn.execute(
        "UPDATE reservations SET state = ?, settled_at = ?, note = ?"
        " WHERE decision_id = ? AND state = 'reserved' RETURNING jti, amount",
        (to, now, note, decision_id),
    ).fetchall()
    if not rows:
        if to == "used":  # a 2xx after the sweeper (or staff) came first
            return _confirm(conn, decision_id, now, ANSWERED_LATE)
        return to == "settled_unknown" and _count_again(conn, decision_id, to, now)
    [(jti, amount)] = rows
    used_delta = 0 if to == "released" else amount
    conn.execute(
        "UPDATE licenses SET reserved = reserved - ?, used = used + ? WHERE jti = ?",
        (amount, used_delta, jti),
    )
    return True


def _count_again(
    conn: sqlite3.Connection, decision_id: str, to: ReservationState, now: float
) -> bool:
    """A launch that answered 2xx (``to`` used) or went unanswered (settled_unknown) after its
    reservation was given back (see ``COUNTED_AGAIN``): counted as used again. Whether it was."""
    rows = conn.execute(
        "UPDATE reservations SET state = ?, settled_at = ?, note = COALESCE(note || '; ', '') || ?"
        " WHERE decision_id = ? AND state = 'released' AND given_back_at IS NOT NULL"
        " RETURNING jti, amount",
        (to, now, COUNTED_AGAIN, decision_id),
    ).fetchall()
    if not rows:
        return False
    [(jti, amount)] = rows
    conn.execute("UPDATE licenses SET used = used + ? WHERE jti = ?", (amount, jti))
    log.error("reservation.counted_again", decision_id=decision_id, jti=jti, amount=amount)
    return True


def _confirm(conn: sqlite3.Connection, decision_id: str, now: float, note: str) -> bool:
    # Counters stay: settled_unknown already counts as used.
    cursor = conn.execute(
        "UPDATE reservations SET state = 'used', settled_at = ?,"
        " note = COALESCE(note || '; ', '') || ?"
        " WHERE decision_id = ? AND state = 'settled_unknown'",
        (now, note, decision_id),
    )
    return cursor.rowcount == 1 or _count_again(conn, decision_id, "used", now)


def _expire(conn: sqlite3.Connection, now: float, ttl_s: float) -> list[str]:
    note = _expiry_note(ttl_s)
    rows = conn.execute(
        "SELECT decision_id FROM reservations"
        " WHERE state = 'reserved' AND created_at < ? ORDER BY created_at",
        (now - ttl_s,),
    ).fetchall()
    expired = [decision_id for (decision_id,) in rows]
    for decision_id in expired:
        _settle(conn, decision_id, "settled_unknown", now, note)
    return expired


def _revoke(conn: sqlite3.Connection, jti: str, reason: str | None, now: float) -> bool:
    # A jti never seen gets a row now, so it is denied when it first shows up.
    conn.execute("INSERT INTO licenses (jti) VALUES (?) ON CONFLICT DO NOTHING", (jti,))
    cursor = conn.execute(
        "UPDATE licenses SET revoked = 1, revoked_reason = ?, revoked_at = ?"
        " WHERE jti = ? AND revoked = 0",
        (reason, now, jti),
    )
    return cursor.rowcount == 1


def _give_back(
    conn: sqlite3.Connection, decision_id: str, now: float, note: str | None, replays_s: float
) -> Reservation:
    row = conn.execute(
        "SELECT state, replayed_at FROM reservations WHERE decision_id = ?", (decision_id,)
    ).fetchone()
    state, replayed_at = (None, None) if row is None else row
    _check_give_back(decision_id, state, replayed_at, now - replays_s)
    [updated] = conn.execute(
        "UPDATE reservations SET state = 'released', settled_at = ?, given_back_at = ?,"  # noqa: S608 - constant column list
        f" note = COALESCE(?, note) WHERE decision_id = ? RETURNING {_RESERVATION_COLUMNS}",
        (now, now, note, decision_id),
    ).fetchall()
    reservation = _reservation(updated)
    conn.execute(
        "UPDATE licenses SET used = used - ? WHERE jti = ?", (reservation.amount, reservation.jti)
    )
    return reservation


# abandon's reservation. Whether a key is bound to it matters only once settled_unknown, so it
# is looked up only then (by migration 3's index).
_ABANDONED: Final = (
    "SELECT r.jti, r.amount, r.state, CASE WHEN r.state = 'settled_unknown' THEN EXISTS"
    " (SELECT 1 FROM idempotency_keys AS k WHERE k.decision_id = r.decision_id) END"
    " FROM reservations AS r WHERE r.decision_id = ?"
)


def _abandon(conn: sqlite3.Connection, decision_id: str, jti: str, now: float, note: str) -> None:
    row = conn.execute(_ABANDONED, (decision_id,)).fetchone()
    if row is None:
        # The placeholder holds the decision id: a reserve arriving later fails on the key.
        conn.execute("INSERT INTO licenses (jti) VALUES (?) ON CONFLICT DO NOTHING", (jti,))
        conn.execute(
            f"INSERT INTO reservations ({_RESERVATION_COLUMNS})"  # noqa: S608 - constant column list
            " VALUES (?, ?, 0, 'released', ?, ?, ?)",
            (decision_id, jti, now, now, note),
        )
        return
    held_by, amount, state, keyed = row
    counter = _abandoned_from(state, bool(keyed))
    if counter is None:
        return
    conn.execute(
        "UPDATE reservations SET state = 'released', settled_at = ?,"
        " note = COALESCE(note || '; ', '') || ? WHERE decision_id = ?",
        (now, note, decision_id),
    )
    conn.execute(
        f"UPDATE licenses SET {counter} = {counter} - ? WHERE jti = ?",  # noqa: S608 - a column name of _abandoned_from's
        (amount, held_by),
    )


def _one(
    query: str, params: tuple[object, ...], row_to: Callable[[Any], _T]
) -> Callable[[sqlite3.Connection], _T | None]:
    def read(conn: sqlite3.Connection) -> _T | None:
        row = conn.execute(query, params).fetchone()
        return None if row is None else row_to(row)

    return read


# --- the ledger thread and group commit -------------------------------------------------------

# The most operations one transaction takes: bounds how long the write lock is held at a time.
_MAX_BATCH = 128
# How long a ping waits for the write lock: far longer than any batch holds it.
_PING_WAIT_MS = 250
# /readyz: less room than this on the ledger's filesystem takes no more than a few batches
# (each commit appends a few 4 KiB pages to the write-ahead log).
_LOW_SPACE_BYTES: Final = 256 * 1024
# How long writes fail at once after one waited out the busy timeout, before one tries again.
_LOCKED_RETRY_S = 1.0


_SQLITE_HEADER: Final = b"SQLite format 3\x00"


def check_ledger_file(path: Path) -> str | None:
    """Why the file at ``path`` cannot be the ledger a gateway would open, or None: it is not
    there yet (a gateway makes it), or it is a SQLite database whose schema this launchgate
    knows. Only reads; a database it cannot read for now (locked) is not held against it."""
    if not path.exists():
        return cannot_make(path)
    if not path.is_file():
        return f"{path} is not a file"
    if why := cannot_write(path):  # written in place, with its write-ahead log beside it
        return why
    try:
        with path.open("rb") as f:
            header = f.read(len(_SQLITE_HEADER))
    except OSError as e:
        return f"{path}: {e.strerror or e}"
    if header and header != _SQLITE_HEADER:  # (an empty file is an empty database)
        return f"{path} is not a SQLite database"
    # Read in place: without a write-ahead log beside it, as "immutable", which makes none
    # (found in review: `check` left -wal and -shm files behind).
    wal = path.with_name(path.name + "-wal").exists()
    uri = f"{path.absolute().as_uri()}?mode=ro" + ("" if wal else "&immutable=1")
    try:
        conn = sqlite3.connect(uri, uri=True)
    except sqlite3.Error:
        return None
    try:
        (current,) = conn.execute("SELECT COALESCE(MAX(version), 0) FROM schema_version").fetchone()
    except sqlite3.DatabaseError as e:
        if "no such table" in str(e) or "locked" in str(e) or "unable to open" in str(e):
            return None  # a new file, or one in use: the gateway decides at start
        return f"{path}: {e}"
    finally:
        conn.close()
    if isinstance(current, int) and current > SCHEMA_VERSION:
        return f"{path} has schema version {current}; this launchgate knows up to {SCHEMA_VERSION}"
    return None


def _busy(error: object) -> bool:
    """Whether ``error`` is a StoreUnavailable for a database another connection kept locked."""
    cause = getattr(error, "__cause__", None)
    code = getattr(cause, "sqlite_errorcode", None)
    return isinstance(error, StoreUnavailable) and code in (
        sqlite3.SQLITE_BUSY,
        sqlite3.SQLITE_LOCKED,
    )


_Outcome = tuple[bool, Any]  # (True, result) or (False, exception)


@dataclass(frozen=True, slots=True)
class _Op:
    """A call waiting for the ledger thread. The thread reads ``fn`` and ``write`` only; the
    future belongs to the event loop."""

    fn: Callable[[sqlite3.Connection], Any]
    write: bool
    future: asyncio.Future[Any]
    then: Callable[[Any], None] | None = None


class SqliteLedger:
    """``Ledger`` in one SQLite file (WAL), safe to share between processes.

    Every sqlite3 call runs on one dedicated thread that owns the connection, so the event loop
    never blocks on the database.

    Group commit: calls that arrive while the thread is busy queue up, and then run together in
    arrival order in one transaction (at most ``_MAX_BATCH``); every caller gets its own result,
    after the transaction has committed. An operation that raises (its own refusal, such as
    ``ValueError`` or ``LookupError``, or a store error) rolls the batch back whole, and its
    operations run again one by one, so each succeeds or fails as it would have alone; a
    transaction that cannot begin or commit fails every operation in it with
    ``StoreUnavailable``. An idle ledger takes the calls made in one turn of the event loop
    as one batch (sent when the turn ends).

    A caller cancelled before its batch starts is never run; one cancelled later still completes
    on the thread: a reservation may then exist that nobody settles, and ``expire_reservations``
    settles it as used - the safe direction.
    """

    def __init__(self, path: Path, *, busy_timeout_s: float = 1.0, create: bool = True) -> None:
        self._path = path
        self._busy_timeout_s = busy_timeout_s
        self._create = create  # False: a ledger not there is unavailable, never made anew
        self._thread = JobThread("launchgate-ledger")
        self._conn: sqlite3.Connection | None = None  # touched only on the ledger thread
        # The file held open from the first connection to close(), whatever connections come
        # and go: the ledger this process uses. Its inode cannot be freed and given to another
        # file that would then pass for it (an empty ledger made at the same path reused it).
        self._pin = -1
        self._pin_id: FileId = (-1, -1)
        self._then_group: ThenGroup = contextlib.nullcontext
        self._closed = False
        self._failing = False  # on the ledger thread: whether store.failing was logged last
        # On the event loop only:
        self._queue: list[_Op] = []
        self._busy = False  # a batch is on the ledger thread
        self._idle: asyncio.Future[None] | None = None  # close() waiting for the queue to drain
        # After a write waited out the busy timeout (another process holds the lock): writes
        # fail at once until this time, then one batch tries again (no pile-up behind it).
        self._locked_until: float | None = None
        self._probing = False

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    # -- lifecycle --

    async def open(self) -> None:
        await self._call(lambda conn: None, write=False)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        if self._busy:  # what was asked before close still runs, then the connection goes
            self._idle = loop.create_future()
            await self._idle
        await self._thread.call(self._disconnect)
        self._thread.stop(wait=False)
        if self._pin >= 0:
            os.close(self._pin)
            self._pin = -1

    async def ping(self) -> None:
        """Take the write lock and let it go, waiting at most ``_PING_WAIT_MS``: a ledger whose
        lock another process holds can still be read, but takes no reservation (/readyz)."""
        wait = int(self._busy_timeout_s * 1000)

        def can_write(conn: sqlite3.Connection) -> None:
            if conn.in_transaction:  # batched with writes: this batch holds the lock already
                return
            conn.execute(f"PRAGMA busy_timeout = {min(wait, _PING_WAIT_MS)}")
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("ROLLBACK")
            finally:
                conn.execute(f"PRAGMA busy_timeout = {wait}")
            # Taking the lock writes nothing: a ledger whose files refuse writes (the immutable
            # flag, a read-only mount) passed, while every reservation failed (found by QA).
            for name in (self._path, *(Path(f"{self._path}{s}") for s in ("-wal", "-shm"))):
                if name.exists() and not os.access(name, os.W_OK):
                    raise sqlite3.OperationalError(f"{name} is not writable")
            # Nor does it need room: a full filesystem passed while every reservation failed
            # "database or disk is full" (found by QA).
            if short_of_space(self._path, _LOW_SPACE_BYTES):
                raise sqlite3.OperationalError(
                    f"less than {_LOW_SPACE_BYTES // 1024} KiB free on {self._path}'s filesystem"
                )

        await self._call(can_write, write=False)

    def group_thens(self, group: ThenGroup) -> None:
        self._then_group = group

    # -- the reservation lifecycle --

    # The four calls of a launch's path return the ledger's own future (no coroutine, so no
    # task when the proxy shields one): awaited like the ``async`` methods of ``Ledger``.

    def reserve(
        self,
        *,
        jti: str,
        account: str,
        max_accelerators: int,
        expires: float,
        amount: int,
        decision_id: str,
        now: float,
        idempotency_key: str | None = None,
        fingerprint: str | None = None,
        then: Callable[[ReserveResult], None] | None = None,
    ) -> asyncio.Future[ReserveResult]:
        _check_reserve(amount, idempotency_key, fingerprint)
        return self._submit(
            lambda conn: _reserve(
                conn,
                jti=jti,
                account=account,
                max_accelerators=max_accelerators,
                expires=expires,
                amount=amount,
                decision_id=decision_id,
                now=now,
                idempotency_key=idempotency_key,
                fingerprint=fingerprint,
            ),
            then=then,
        )

    def commit(
        self, decision_id: str, now: float, then: Then | None = None
    ) -> asyncio.Future[bool]:
        return self._submit(lambda conn: _settle(conn, decision_id, "used", now, None), then=then)

    def release(
        self, decision_id: str, now: float, then: Then | None = None
    ) -> asyncio.Future[bool]:
        return self._submit(
            lambda conn: _settle(conn, decision_id, "released", now, None), then=then
        )

    def settle_unknown(
        self, decision_id: str, now: float, note: str, then: Then | None = None
    ) -> asyncio.Future[bool]:
        return self._submit(
            lambda conn: _settle(conn, decision_id, "settled_unknown", now, note), then=then
        )

    async def confirm(self, decision_id: str, now: float, note: str) -> bool:
        return await self._call(lambda conn: _confirm(conn, decision_id, now, note))

    def store_time(self, now: float) -> float:
        return now  # (one host's file: its clock)

    async def expire_reservations(self, *, now: float, ttl_s: float) -> list[str]:
        return await self._call(lambda conn: _expire(conn, now, ttl_s))

    # -- staff operations --

    async def revoke(self, jti: str, *, reason: str | None, now: float) -> bool:
        return await self._call(lambda conn: _revoke(conn, jti, reason, now))

    async def give_back(
        self, decision_id: str, *, now: float, note: str | None, replays_within_s: float = 0.0
    ) -> Reservation:
        return await self._call(
            lambda conn: _give_back(conn, decision_id, now, note, replays_within_s)
        )

    async def abandon(self, decision_id: str, jti: str, *, now: float, note: str) -> None:
        await self._call(lambda conn: _abandon(conn, decision_id, jti, now, note))

    # -- reads --

    async def license(self, jti: str) -> LicenseState | None:
        query = f"SELECT {_LICENSE_COLUMNS} FROM licenses WHERE jti = ?"  # noqa: S608 - constant column list
        return await self._call(_one(query, (jti,), _license_state), write=False)

    async def licenses(self) -> list[LicenseState]:
        query = f"SELECT {_LICENSE_COLUMNS} FROM licenses ORDER BY jti"  # noqa: S608 - constant column list
        return await self._call(
            lambda conn: [_license_state(row) for row in conn.execute(query).fetchall()],
            write=False,
        )

    async def reservation(self, decision_id: str) -> Reservation | None:
        query = f"SELECT {_RESERVATION_COLUMNS} FROM reservations WHERE decision_id = ?"  # noqa: S608 - constant column list
        return await self._call(_one(query, (decision_id,), _reservation), write=False)

    async def idempotency_key(self, account: str, key: str) -> IdempotencyKey | None:
        query = f"SELECT {_KEY_COLUMNS} FROM idempotency_keys WHERE account = ? AND key = ?"  # noqa: S608 - constant column list
        return await self._call(_one(query, (account, key), _idempotency_key), write=False)

    # -- on the event loop: queueing and batches --

    async def _call(
        self,
        fn: Callable[[sqlite3.Connection], _T],
        *,
        write: bool = True,
        then: Callable[[_T], None] | None = None,
    ) -> _T:
        return await self._submit(fn, write=write, then=then)

    def _submit(
        self,
        fn: Callable[[sqlite3.Connection], _T],
        *,
        write: bool = True,
        then: Callable[[_T], None] | None = None,
    ) -> asyncio.Future[_T]:
        """Run ``fn`` on the ledger thread, inside a write transaction when ``write``; then,
        once that transaction has committed and on the same thread, ``then(result)``. The
        future says how it went (``StoreUnavailable`` at once once the ledger is closed)."""
        future: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
        if self._closed:
            future.set_exception(StoreUnavailable(f"ledger {self._path} is closed", late=False))
            return future
        if write and self._locked_until is not None:
            if self._probing or time.monotonic() < self._locked_until:
                future.set_exception(self._locked())
                return future
            self._probing = True  # this call tries again; the others fail at once meanwhile
        self._queue.append(_Op(fn, write, future, then))
        if not self._busy:
            # Sent at the end of this turn of the loop, with every call made in it: one batch,
            # one wake-up of the thread, however many launches the turn handled.
            self._busy = True
            future.get_loop().call_soon(self._dispatch)
        return future

    def _dispatch(self) -> None:
        """Send what has queued up to the ledger thread as one batch, or note that it is idle."""
        if self._locked_until is not None and time.monotonic() < self._locked_until:
            # The writes that queued up while a batch waited out the lock fail with it, not
            # after a wait of their own (found by QA: a burst of 50 took 5 s for the first,
            # then 10 s for the other 49).
            for op in self._queue:
                if op.write and not op.future.done():
                    op.future.set_exception(self._locked())
            self._queue = [op for op in self._queue if not op.write]
        while self._queue:
            batch, self._queue = self._queue[:_MAX_BATCH], self._queue[_MAX_BATCH:]
            # A caller cancelled before its batch starts is never run, as with run_in_executor.
            batch = [op for op in batch if not op.future.cancelled()]
            if batch:
                self._busy = True
                self._thread.submit(
                    functools.partial(self._work, batch[0].future.get_loop(), batch)
                )
                return
        self._busy = False
        if self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    def _work(self, loop: asyncio.AbstractEventLoop, batch: list[_Op]) -> None:
        """On the ledger thread: run the batch, then deliver its outcomes on the event loop."""
        try:
            outcomes = self._run_batch(batch)
        except BaseException as e:  # the thread itself failed: every caller hears of it
            outcomes = [(False, e)] * len(batch)
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(self._deliver, batch, outcomes)

    def _locked(self) -> StoreUnavailable:
        return StoreUnavailable(
            f"ledger {self._path} is locked by another process; retrying shortly", late=False
        )

    def _deliver(self, batch: list[_Op], outcomes: list[_Outcome]) -> None:
        self._note_lock(batch, outcomes)
        for op, (ok, value) in zip(batch, outcomes, strict=True):
            if op.future.done():  # its caller was cancelled meanwhile
                continue
            if ok:
                op.future.set_result(value)
            else:
                op.future.set_exception(value)
        self._dispatch()

    def _note_lock(self, batch: list[_Op], outcomes: list[_Outcome]) -> None:
        """Fail fast for ``_LOCKED_RETRY_S`` after a write that waited out the busy timeout;
        stop once a write gets through."""
        writes = [outcome for op, outcome in zip(batch, outcomes, strict=True) if op.write]
        if any(ok for ok, _ in writes):
            self._locked_until, self._probing = None, False
        elif any(_busy(value) for _, value in writes):
            self._locked_until, self._probing = time.monotonic() + _LOCKED_RETRY_S, False
        elif writes:
            self._probing = False

    # -- on the ledger thread --

    def _run_batch(self, batch: list[_Op]) -> list[_Outcome]:
        outcomes = None
        if len(batch) > 1 and any(op.write for op in batch):
            outcomes = self._run_together(batch)
        if outcomes is None:
            outcomes = [self._run_alone(op) for op in batch]
        self._note_health(batch, outcomes)
        thens = [
            (op.then, value)
            for op, (ok, value) in zip(batch, outcomes, strict=True)
            if ok and op.then
        ]
        if thens:
            with self._then_group():
                for then, value in thens:
                    try:
                        then(value)
                    except Exception:  # ``then`` reports its own failures; this is a bug
                        log.exception("ledger.then_failed")
        return outcomes

    def _note_health(self, batch: list[_Op], outcomes: list[_Outcome]) -> None:
        """Log why the ledger fails when it starts to, and when writes get through again (found
        by QA: launches got 503 store_unavailable and nothing said why)."""
        failed = [v for ok, v in outcomes if not ok and isinstance(v, StoreUnavailable)]
        if failed and not self._failing:
            self._failing = True
            log.error("store.failing", path=str(self._path), error=str(failed[0]))
        elif self._failing and any(
            ok and op.write for op, (ok, _) in zip(batch, outcomes, strict=True)
        ):
            self._failing = False
            log.info("store.recovered", path=str(self._path))

    def _run_alone(self, op: _Op) -> _Outcome:
        try:
            conn = self._connection()
            if not op.write:
                return True, op.fn(conn)
            with _write_transaction(conn):
                return True, op.fn(conn)
        except (sqlite3.Error, OSError) as e:
            return False, self._unavailable(e)
        except Exception as e:  # the operation's own refusal (ValueError, LookupError, ...)
            return False, e

    def _run_together(self, batch: list[_Op]) -> list[_Outcome] | None:
        """The batch in one transaction; None when an operation raised (a store error, or its
        own refusal: there is no undoing one operation's writes alone) and the transaction was
        rolled back whole: each then runs alone, as it would have in the first place."""
        try:
            conn = self._connection()
            conn.execute("BEGIN IMMEDIATE")
        except (sqlite3.Error, OSError, StoreUnavailable) as e:
            return [(False, self._unavailable(e)) for _ in batch]
        outcomes: list[_Outcome] = []
        try:
            for op in batch:
                outcomes.append((True, op.fn(conn)))
        except Exception:  # rare: a refusal (a decision id used twice), or a store error
            self._recover()
            return None
        try:
            conn.execute("COMMIT")
        except sqlite3.Error as e:
            return [(False, self._unavailable(e)) for _ in batch]
        return outcomes

    def _unavailable(self, error: Exception) -> Exception:
        """``StoreUnavailable`` for a store error, chained to it, after making sure no transaction
        is left open. Reconnecting lazily lets a store that was briefly unusable at start-up
        recover without a restart."""
        if isinstance(error, StoreUnavailable):  # a schema newer than this launchgate
            return error
        if isinstance(error, sqlite3.Error):
            self._recover()
        # The thread's transaction failed or was rolled back: nothing of it lands later.
        unavailable = StoreUnavailable(f"ledger {self._path}: {error}", late=False)
        unavailable.__cause__ = error
        return unavailable

    def _connection(self) -> sqlite3.Connection:
        if self._pin >= 0 and not still_at(self._path, self._pin_id):
            # Removed or replaced under us. Writes to the old file would count against a ledger
            # nobody reads any more (a license spent twice over), and whatever is at the path
            # now (nothing, an empty ledger another process made, a copy with an old WAL beside
            # it) may not know what every license has spent: only a restart takes it up.
            if self._conn is not None:
                log.error("store.ledger_file_changed", path=str(self._path))
                self._disconnect()
            raise StoreUnavailable(
                f"ledger {self._path} was removed or replaced while in use; restart the"
                " gateway to use what is at that path now",
                late=False,
            )
        if self._conn is not None:
            return self._conn
        if self._pin < 0 and self._create:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            target, uri = str(self._path), False
        elif not self._path.exists():
            raise StoreUnavailable(
                f"ledger {self._path} is not there, and this process does not create one",
                late=False,
            )
        else:
            target, uri = f"{self._path.absolute().as_uri()}?mode=rw", True
        conn = sqlite3.connect(
            target,
            timeout=self._busy_timeout_s,
            isolation_level=None,  # autocommit: transactions are explicit BEGIN IMMEDIATE/COMMIT
            check_same_thread=False,  # only the ledger thread ever uses it
            uri=uri,
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_s * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            self._migrate(conn)
            if self._pin < 0:
                self._pin = os.open(self._path, os.O_RDONLY)
                self._pin_id = file_id(self._pin)
        except BaseException:
            conn.close()
            raise
        self._conn = conn
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        with _write_transaction(conn):
            conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            (current,) = conn.execute(
                "SELECT COALESCE(MAX(version), 0) FROM schema_version"
            ).fetchone()
            if current > SCHEMA_VERSION:
                raise _newer_schema(self._path, current, SCHEMA_VERSION)
            for version, statements in _MIGRATIONS:
                if version <= current:
                    continue
                for statement in statements:
                    conn.execute(statement)
                conn.execute("DELETE FROM schema_version")
                conn.execute("INSERT INTO schema_version (version) VALUES (?)", (version,))

    def _recover(self) -> None:
        """After an error, leave no transaction open; drop a connection that cannot even roll
        back, so the next call reconnects."""
        conn = self._conn
        if conn is None or not conn.in_transaction:
            return
        try:
            conn.execute("ROLLBACK")
        except sqlite3.Error:
            self._disconnect()

    def _disconnect(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            # Closing is best effort: the connection is being abandoned either way.
            with contextlib.suppress(sqlite3.Error):
                conn.close()
