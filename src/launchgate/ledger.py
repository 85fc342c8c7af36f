"""The license ledger: accelerators used and reserved under each license, and revocations.

A licensed launch *reserves* its accelerators before it is forwarded; the reservation is then
settled exactly once: ``commit`` (upstream answered 2xx: used), ``release`` (upstream error or
not reached: given back) or ``settle_unknown`` (outcome unknown: counted as used, so a license is
never over-spent). Staff can later ``give_back`` what they have checked was not launched.

``Ledger`` is the storage-neutral interface; ``SqliteLedger`` keeps it in one SQLite file that
several processes (gateways, the ``launchgate`` CLI) may share. ``PostgresLedger``
(``launchgate.pgledger``) keeps it in PostgreSQL for replicas on several hosts.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, cast
from urllib.parse import urlsplit

from launchgate.errors import ConfigError, StoreUnavailable

__all__ = [
    "Ledger",
    "LicenseState",
    "Reservation",
    "ReservationState",
    "ReserveOutcome",
    "ReserveResult",
    "SqliteLedger",
    "migrate_store",
    "open_ledger",
]

_T = TypeVar("_T")

ReservationState = Literal["reserved", "used", "released", "settled_unknown"]


class ReserveOutcome(enum.Enum):
    """What ``Ledger.reserve`` did."""

    RESERVED = "reserved"
    REVOKED = "revoked"
    EXHAUSTED = "exhausted"


@dataclass(frozen=True, slots=True)
class ReserveResult:
    """The answer to one ``reserve`` call, with the license's counters after it."""

    outcome: ReserveOutcome
    max_accelerators: int
    used: int  # committed use, after this call
    reserved: int  # outstanding reservations after this call (including this one if RESERVED)
    requested: int

    @property
    def remaining(self) -> int:
        """Accelerators still available to new reservations."""
        return max(0, self.max_accelerators - self.used - self.reserved)


@dataclass(frozen=True, slots=True)
class LicenseState:
    """One license as the ledger knows it.

    ``account``, ``max_accelerators``, ``expires`` and ``first_seen`` are None for a license
    revoked before any launch presented it.
    """

    jti: str
    account: str | None
    max_accelerators: int | None
    used: int
    reserved: int
    revoked: bool
    revoked_reason: str | None
    revoked_at: float | None
    expires: float | None
    first_seen: float | None

    @property
    def remaining(self) -> int | None:
        """Accelerators still available, or None when the license was never presented."""
        if self.max_accelerators is None:
            return None
        return max(0, self.max_accelerators - self.used - self.reserved)


@dataclass(frozen=True, slots=True)
class Reservation:
    """One launch's claim on a license, identified by the launch's decision id."""

    decision_id: str
    jti: str
    amount: int
    state: ReservationState
    created_at: float
    settled_at: float | None
    note: str | None


class Ledger(Protocol):
    """Storage-neutral license ledger. Every method raises ``StoreUnavailable`` when the store
    cannot be used; no storage-specific exception leaves an implementation."""

    async def open(self) -> None:
        """Connect and create or migrate the schema."""

    async def close(self) -> None:
        """Release the connection; the ledger cannot be used afterwards."""

    async def ping(self) -> None:
        """Return when the store is usable; raise ``StoreUnavailable`` otherwise."""

    async def reserve(
        self,
        *,
        jti: str,
        account: str,
        max_accelerators: int,
        expires: float,
        amount: int,
        decision_id: str,
        now: float,
    ) -> ReserveResult:
        """Atomically check the license and, if it is not revoked and ``amount`` fits, reserve it.

        The first call for a ``jti`` records its account, maximum and expiry; later calls keep
        those. Raises ``ValueError`` for a negative amount or a decision id already used.
        """

    async def commit(self, decision_id: str, now: float) -> None:
        """Reserved -> used (the upstream answered 2xx). No-op unless still reserved."""

    async def release(self, decision_id: str, now: float) -> None:
        """Reserved -> released (the upstream failed or was not reached). No-op unless reserved."""

    async def settle_unknown(self, decision_id: str, now: float, note: str) -> None:
        """Reserved -> settled_unknown, counted as used. No-op unless still reserved."""

    async def expire_reservations(self, *, now: float, ttl_s: float) -> list[str]:
        """Settle as unknown every reservation still reserved and older than ``ttl_s``;
        return their decision ids."""

    async def revoke(self, jti: str, *, reason: str | None, now: float) -> bool:
        """Mark a license revoked (even one never seen); False if it already was."""

    async def license(self, jti: str) -> LicenseState | None:
        """The license ``jti``, or None if the ledger never heard of it."""

    async def licenses(self) -> list[LicenseState]:
        """Every license the ledger knows, ordered by jti."""

    async def reservation(self, decision_id: str) -> Reservation | None:
        """The reservation made for ``decision_id``, or None."""

    async def give_back(self, decision_id: str, *, now: float, note: str | None) -> Reservation:
        """Settled_unknown -> released: its amount leaves ``used``. Returns the updated reservation.

        Raises ``LookupError`` if there is no such reservation, ``ValueError`` if it is in any
        other state.
        """


def open_ledger(url: str, base_dir: Path) -> Ledger:
    """Build the ledger named by ``[store] url``; does not connect (call ``open()``).

    ``sqlite:PATH`` (relative to ``base_dir``, the config file's folder, unless absolute) and
    ``sqlite:///abs/path`` select SQLite; ``postgresql://...`` (or ``postgres://``, optionally
    with ``?schema=NAME``) selects PostgreSQL. Raises ``ConfigError`` for anything else.
    """
    scheme, sep, rest = url.partition(":")
    scheme = scheme.lower()
    if sep and scheme == "sqlite":
        return SqliteLedger(_sqlite_path(url, rest, base_dir))
    if sep and scheme in ("postgresql", "postgres"):
        # Imported here: asyncpg is loaded only where a PostgreSQL store is configured.
        from launchgate.pgledger import PostgresLedger

        return PostgresLedger(url)
    raise ConfigError(
        f"[store] url {_redact(url)!r}: unsupported store; expected 'sqlite:PATH'"
        " or 'postgresql://...'"
    )


async def migrate_store(url: str, base_dir: Path) -> int:
    """Create or upgrade the schema of the ledger named by ``[store] url``; return its version.

    Safe while gateways run and from several hosts at once. Raises ``ConfigError`` for a bad url
    and ``StoreUnavailable`` when the store cannot be used or has a newer schema.
    """
    store = open_ledger(url, base_dir)
    try:
        await store.open()  # migrates to the latest version, or raises
        if isinstance(store, SqliteLedger):
            return _SCHEMA_VERSION
        from launchgate.pgledger import PostgresLedger

        return await cast(PostgresLedger, store).migrate()
    finally:
        await store.close()


def _sqlite_path(url: str, rest: str, base_dir: Path) -> Path:
    if rest.startswith("//"):
        # URL form: 'sqlite:///abs/path' has an empty authority; a host makes no sense for a file.
        rest = rest[2:]
        if not rest.startswith("/"):
            raise ConfigError(
                f"[store] url {url!r}: a SQLite url names a file, not a host;"
                " use 'sqlite:relative/path' or 'sqlite:///absolute/path'"
            )
    if not rest:
        raise ConfigError(f"[store] url {url!r}: no database file given")
    if rest == ":memory:":
        # An in-memory ledger is not shared with the CLI (revoke, release) nor kept over restarts.
        raise ConfigError(f"[store] url {url!r}: an in-memory ledger is not supported")
    path = Path(rest)
    return path if path.is_absolute() else base_dir / path


def _redact(url: str) -> str:
    """The url without a password, so a database secret never reaches an error message."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rpartition("@")[2]
        user = parts.username or ""
        return parts._replace(netloc=f"{user}:***@{netloc}").geturl()
    except ValueError:
        return "<unparseable url>"


# --- SQLite ---------------------------------------------------------------------------------

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
)
_SCHEMA_VERSION = _MIGRATIONS[-1][0]

_LICENSE_COLUMNS = (
    "jti, account, max_accelerators, used, reserved, revoked, revoked_reason, revoked_at,"
    " expires, first_seen"
)
_RESERVATION_COLUMNS = "decision_id, jti, amount, state, created_at, settled_at, note"


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


def _license_state(row: Any) -> LicenseState:
    jti, account, max_acc, used, reserved, revoked, reason, revoked_at, expires, seen = row
    return LicenseState(
        jti=jti,
        account=account,
        max_accelerators=max_acc,
        used=used,
        reserved=reserved,
        revoked=bool(revoked),
        revoked_reason=reason,
        revoked_at=revoked_at,
        expires=expires,
        first_seen=seen,
    )


def _reservation(row: Any) -> Reservation:
    decision_id, jti, amount, state, created_at, settled_at, note = row
    return Reservation(
        decision_id=decision_id,
        jti=jti,
        amount=amount,
        state=cast(ReservationState, state),
        created_at=created_at,
        settled_at=settled_at,
        note=note,
    )


class SqliteLedger:
    """``Ledger`` in one SQLite file (WAL), safe to share between processes.

    Every sqlite3 call runs on one dedicated thread that owns the connection, so the event loop
    never blocks on the database. If the caller is cancelled mid-call, the call still completes on
    that thread: a reservation may then exist that nobody settles, and ``expire_reservations``
    settles it as used - the safe direction.
    """

    def __init__(self, path: Path, *, busy_timeout_s: float = 5.0) -> None:
        self._path = path
        self._busy_timeout_s = busy_timeout_s
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ledger")
        self._conn: sqlite3.Connection | None = None  # touched only on the executor thread
        self._closed = False

    @property
    def path(self) -> Path:
        """The database file."""
        return self._path

    # -- lifecycle --

    async def open(self) -> None:
        await self._call(lambda conn: None)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._disconnect)
        self._executor.shutdown(wait=False)

    async def ping(self) -> None:
        await self._call(lambda conn: conn.execute("SELECT 1").fetchone())

    # -- the reservation lifecycle --

    async def reserve(
        self,
        *,
        jti: str,
        account: str,
        max_accelerators: int,
        expires: float,
        amount: int,
        decision_id: str,
        now: float,
    ) -> ReserveResult:
        if amount < 0:
            raise ValueError(f"reservation amount must not be negative, got {amount}")

        def run(conn: sqlite3.Connection) -> ReserveResult:
            with _write_transaction(conn):
                # The first sighting fixes account, maximum and expiry (a jti is unique); a row
                # created by an earlier revoke has them NULL and gets them now.
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
                # Read inside the write transaction: a revoke committed by another process
                # before this lock was taken is seen here.
                max_acc, used, reserved, revoked = conn.execute(
                    "SELECT max_accelerators, used, reserved, revoked FROM licenses WHERE jti = ?",
                    (jti,),
                ).fetchone()
                if revoked:
                    outcome = ReserveOutcome.REVOKED
                elif used + reserved + amount > max_acc:
                    outcome = ReserveOutcome.EXHAUSTED
                else:
                    taken = conn.execute(
                        "SELECT 1 FROM reservations WHERE decision_id = ?", (decision_id,)
                    ).fetchone()
                    if taken:
                        raise ValueError(f"decision {decision_id} already has a reservation")
                    conn.execute(
                        f"INSERT INTO reservations ({_RESERVATION_COLUMNS})"  # noqa: S608 - constant column list
                        " VALUES (?, ?, ?, 'reserved', ?, NULL, NULL)",
                        (decision_id, jti, amount, now),
                    )
                    conn.execute(
                        "UPDATE licenses SET reserved = reserved + ? WHERE jti = ?", (amount, jti)
                    )
                    outcome = ReserveOutcome.RESERVED
                    reserved += amount
                return ReserveResult(
                    outcome=outcome,
                    max_accelerators=max_acc,
                    used=used,
                    reserved=reserved,
                    requested=amount,
                )

        return await self._call(run)

    async def commit(self, decision_id: str, now: float) -> None:
        await self._call(lambda conn: self._settle(conn, decision_id, "used", now, None))

    async def release(self, decision_id: str, now: float) -> None:
        await self._call(lambda conn: self._settle(conn, decision_id, "released", now, None))

    async def settle_unknown(self, decision_id: str, now: float, note: str) -> None:
        await self._call(lambda conn: self._settle(conn, decision_id, "settled_unknown", now, note))

    async def expire_reservations(self, *, now: float, ttl_s: float) -> list[str]:
        note = f"outcome unknown: still reserved after {ttl_s:g} s"

        def run(conn: sqlite3.Connection) -> list[str]:
            with _write_transaction(conn):
                rows = conn.execute(
                    "SELECT decision_id FROM reservations"
                    " WHERE state = 'reserved' AND created_at < ? ORDER BY created_at",
                    (now - ttl_s,),
                ).fetchall()
                expired = [decision_id for (decision_id,) in rows]
                for decision_id in expired:
                    self._settle_in_transaction(conn, decision_id, "settled_unknown", now, note)
                return expired

        return await self._call(run)

    @staticmethod
    def _settle(
        conn: sqlite3.Connection,
        decision_id: str,
        to: ReservationState,
        now: float,
        note: str | None,
    ) -> None:
        with _write_transaction(conn):
            SqliteLedger._settle_in_transaction(conn, decision_id, to, now, note)

    @staticmethod
    def _settle_in_transaction(
        conn: sqlite3.Connection,
        decision_id: str,
        to: ReservationState,
        now: float,
        note: str | None,
    ) -> None:
        """Move a reservation out of 'reserved'; a no-op for any other state, so a late commit
        after TTL settlement never counts the same accelerators twice."""
        # fetchall(), not fetchone(): a RETURNING statement must run to completion before COMMIT.
        rows = conn.execute(
            "UPDATE reservations SET state = ?, settled_at = ?, note = ?"
            " WHERE decision_id = ? AND state = 'reserved' RETURNING jti, amount",
            (to, now, note, decision_id),
        ).fetchall()
        if not rows:
            return
        [(jti, amount)] = rows
        used_delta = 0 if to == "released" else amount
        conn.execute(
            "UPDATE licenses SET reserved = reserved - ?, used = used + ? WHERE jti = ?",
            (amount, used_delta, jti),
        )

    # -- staff operations --

    async def revoke(self, jti: str, *, reason: str | None, now: float) -> bool:
        def run(conn: sqlite3.Connection) -> bool:
            with _write_transaction(conn):
                # A jti never seen gets a row now, so it is denied when it first shows up.
                conn.execute("INSERT INTO licenses (jti) VALUES (?) ON CONFLICT DO NOTHING", (jti,))
                cursor = conn.execute(
                    "UPDATE licenses SET revoked = 1, revoked_reason = ?, revoked_at = ?"
                    " WHERE jti = ? AND revoked = 0",
                    (reason, now, jti),
                )
                return cursor.rowcount == 1

        return await self._call(run)

    async def give_back(self, decision_id: str, *, now: float, note: str | None) -> Reservation:
        def run(conn: sqlite3.Connection) -> Reservation:
            with _write_transaction(conn):
                row = conn.execute(
                    "SELECT state FROM reservations WHERE decision_id = ?", (decision_id,)
                ).fetchone()
                if row is None:
                    raise LookupError(f"no reservation for decision {decision_id}")
                if row[0] != "settled_unknown":
                    raise ValueError(
                        f"reservation for decision {decision_id} is {row[0]!r}; only one settled"
                        " as used because its outcome was unknown ('settled_unknown') can be"
                        " given back"
                    )
                [updated] = conn.execute(
                    "UPDATE reservations SET state = 'released', settled_at = ?,"  # noqa: S608 - constant column list
                    " note = COALESCE(?, note) WHERE decision_id = ?"
                    f" RETURNING {_RESERVATION_COLUMNS}",
                    (now, note, decision_id),
                ).fetchall()
                reservation = _reservation(updated)
                conn.execute(
                    "UPDATE licenses SET used = used - ? WHERE jti = ?",
                    (reservation.amount, reservation.jti),
                )
                return reservation

        return await self._call(run)

    # -- reads --

    async def license(self, jti: str) -> LicenseState | None:
        def run(conn: sqlite3.Connection) -> LicenseState | None:
            row = conn.execute(
                f"SELECT {_LICENSE_COLUMNS} FROM licenses WHERE jti = ?",  # noqa: S608 - constant column list
                (jti,),
            ).fetchone()
            return None if row is None else _license_state(row)

        return await self._call(run)

    async def licenses(self) -> list[LicenseState]:
        def run(conn: sqlite3.Connection) -> list[LicenseState]:
            rows = conn.execute(
                f"SELECT {_LICENSE_COLUMNS} FROM licenses ORDER BY jti"  # noqa: S608 - constant column list
            ).fetchall()
            return [_license_state(row) for row in rows]

        return await self._call(run)

    async def reservation(self, decision_id: str) -> Reservation | None:
        def run(conn: sqlite3.Connection) -> Reservation | None:
            row = conn.execute(
                f"SELECT {_RESERVATION_COLUMNS} FROM reservations WHERE decision_id = ?",  # noqa: S608 - constant column list
                (decision_id,),
            ).fetchone()
            return None if row is None else _reservation(row)

        return await self._call(run)

    # -- the database thread --

    async def _call(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        if self._closed:
            raise StoreUnavailable(f"ledger {self._path} is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._run, fn)

    def _run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        """On the ledger thread: (re)connect if needed, run ``fn``, turn store errors into
        ``StoreUnavailable``. Reconnecting lazily lets a store that was briefly unusable at
        start-up recover without a restart."""
        try:
            return fn(self._connection())
        except sqlite3.Error as e:
            self._recover()
            raise StoreUnavailable(f"ledger {self._path}: {e}") from e
        except OSError as e:  # creating the folder, or a file where a folder should be
            raise StoreUnavailable(f"ledger {self._path}: {e}") from e

    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        self._path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(
            self._path,
            timeout=self._busy_timeout_s,
            isolation_level=None,  # autocommit: transactions are explicit BEGIN IMMEDIATE/COMMIT
            check_same_thread=False,  # only the ledger thread ever uses it
        )
        try:
            conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_s * 1000)}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = NORMAL")
            conn.execute("PRAGMA foreign_keys = ON")
            self._migrate(conn)
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
            if current > _SCHEMA_VERSION:
                raise StoreUnavailable(
                    f"ledger {self._path} has schema version {current}; this launchgate"
                    f" knows up to {_SCHEMA_VERSION}"
                )
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
