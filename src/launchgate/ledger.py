"""The license ledger: accelerators used and reserved under each license, and revocations.

A licensed launch *reserves* its accelerators before it is forwarded; the reservation is then
settled exactly once: ``commit`` (upstream answered 2xx: used), ``release`` (upstream error or
not reached: given back) or ``settle_unknown`` (outcome unknown: counted as used, so a license is
never over-spent). Staff can later ``give_back`` what they have checked was not launched.

A launch may carry an *idempotency key* (scoped per account): ``reserve`` binds the key to the
reservation it makes, and a retry of the same request under the same key is then counted once
(``REPLAYED``) instead of reserving again; the same key on another request is a ``CONFLICT``.

This module is the storage-neutral part: the ``Ledger`` interface, its data types, ``open_ledger``
and the checks and row conversions both stores share. ``SqliteLedger``
(``launchgate.sqliteledger``) keeps the ledger in one SQLite file that several processes
(gateways, the ``launchgate`` CLI) may share; ``PostgresLedger`` (``launchgate.pgledger``) keeps
it in PostgreSQL for replicas on several hosts.
"""

from __future__ import annotations

import enum
from collections.abc import Awaitable, Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, Protocol, cast
from urllib.parse import urlsplit

from launchgate.errors import ConfigError, StoreUnavailable

__all__ = [
    "IdempotencyKey",
    "Ledger",
    "LicenseState",
    "Reservation",
    "ReservationState",
    "ReserveOutcome",
    "ReserveResult",
    "migrate_store",
    "open_ledger",
]

ReservationState = Literal["reserved", "used", "released", "settled_unknown"]


class ReserveOutcome(enum.Enum):
    """What ``Ledger.reserve`` did. Only RESERVED reserves anything."""

    RESERVED = "reserved"
    REVOKED = "revoked"
    EXHAUSTED = "exhausted"
    # The idempotency key is bound to an earlier reservation that was counted (used, or
    # settled as used): this is a retry of that launch, allowed without reserving again.
    REPLAYED = "replayed"
    # The idempotency key is bound to an earlier reservation for a different request.
    CONFLICT = "conflict"
    # The idempotency key is bound to an earlier reservation still reserved: its first attempt
    # has not completed, so whether to count this one is not yet known.
    IN_PROGRESS = "in_progress"
    # The license is on record for another account: a second token was issued under its jti
    # (a jti names one license). Nothing is reserved; neither account's quantity is touched.
    OTHER_ACCOUNT = "other_account"


@dataclass(frozen=True, slots=True)
class ReserveResult:
    """The answer to one ``reserve`` call, with the license's counters after it."""

    outcome: ReserveOutcome
    max_accelerators: int
    used: int  # committed use, after this call
    reserved: int  # outstanding reservations after this call (including this one if RESERVED)
    requested: int
    # The earlier decision the idempotency key is bound to (REPLAYED, CONFLICT, IN_PROGRESS).
    replay_of: str | None = None

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


@dataclass(frozen=True, slots=True)
class IdempotencyKey:
    """An idempotency key as the ledger remembers it: bound to the latest reservation made under
    it, with the fingerprint of the request that made the first one."""

    account: str
    key: str
    fingerprint: str
    decision_id: str
    bound_at: float


# What to do once a write has committed, off the event loop and before the call returns (the
# proxy writes the launch's record with it): called only when the write succeeded, with its
# result; it must not raise. A store with its own thread runs it there, saving a thread hop.
Then = Callable[[bool], None]
# Around the ``then`` callbacks of writes that committed together (see ``Ledger.group_thens``).
ThenGroup = Callable[[], AbstractContextManager[None]]


class Ledger(Protocol):
    """Storage-neutral license ledger. Every method raises ``StoreUnavailable`` when the store
    cannot be used; no storage-specific exception leaves an implementation."""

    async def open(self) -> None:
        """Connect and create or migrate the schema."""

    async def close(self) -> None:
        """Release the connection; the ledger cannot be used afterwards."""

    async def ping(self) -> None:
        """Return when the store is usable; raise ``StoreUnavailable`` otherwise."""

    def group_thens(self, group: ThenGroup) -> None:
        """Run the ``then`` callbacks of writes that committed together inside one
        ``group()`` (the gateway passes the decision log's, so that the records they write go
        to the file in one write). A store that commits each write alone may ignore it."""

    # The calls on a launch's path are awaitables rather than coroutine functions, so that a
    # store may hand back its own future (the SQLite ledger does: shielding it makes no task).

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
    ) -> Awaitable[ReserveResult]:
        """Atomically check the license and, if it is not revoked and ``amount`` fits, reserve it.

        The first call for a ``jti`` records its account, maximum and expiry; later calls keep
        those. Raises ``ValueError`` for a negative amount, a decision id already used, or an
        ``idempotency_key`` without a ``fingerprint`` (or the other way round).

        With an ``idempotency_key`` (scoped to ``account``), after the revocation check and in
        the same transaction: a key never seen reserves as usual and is bound to this decision
        (only when RESERVED); a key bound to another ``fingerprint`` is CONFLICT; a key bound to
        a reservation still reserved is IN_PROGRESS; to one used or settled_unknown, REPLAYED
        (counted once: nothing reserved, capacity not checked); to one released, this call
        reserves anew and the key moves to ``decision_id``. Two calls with one key never both
        reserve, whichever licenses they present.
        """

    def commit(self, decision_id: str, now: float, then: Then | None = None) -> Awaitable[bool]:
        """Reserved -> used (the upstream answered 2xx). Settled as unknown meanwhile (the
        sweeper's): used, as ``confirm`` has it (``ANSWERED_LATE``). Given back meanwhile
        (``give_back``): counted as used again (``COUNTED_AGAIN``). A no-op otherwise. Each of
        the three settlements answers whether it settled (False: no longer reserved)."""

    def release(self, decision_id: str, now: float, then: Then | None = None) -> Awaitable[bool]:
        """Reserved -> released (the upstream failed or was not reached). No-op unless reserved."""

    def settle_unknown(
        self, decision_id: str, now: float, note: str, then: Then | None = None
    ) -> Awaitable[bool]:
        """Reserved -> settled_unknown, counted as used. No-op unless still reserved, or given
        back (as ``commit``)."""

    async def confirm(self, decision_id: str, now: float, note: str) -> bool:
        """Settled_unknown -> used (a retry of the launch got a 2xx: it was spent), ``note``
        appended; counters do not change. Given back meanwhile (``give_back``): used, counted
        again (``COUNTED_AGAIN``). False, and a no-op, in any other state."""

    def store_time(self, now: float) -> float:
        """``now``, a time of this host's clock, on the clock the store's times are kept in
        (every ``now`` given to the ledger is taken so): the database server's for a store
        several hosts share, this host's for one only it uses."""

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

    async def idempotency_key(self, account: str, key: str) -> IdempotencyKey | None:
        """The idempotency ``key`` of ``account``, or None if no reservation was made under it."""

    async def give_back(
        self, decision_id: str, *, now: float, note: str | None, replays_within_s: float = 0.0
    ) -> Reservation:
        """Settled_unknown -> released: its amount leaves ``used``. Returns the updated reservation.

        Raises ``LookupError`` if there is no such reservation, ``ValueError`` if it is in any
        other state, or if a retry was counted on it (REPLAYED) less than ``replays_within_s``
        ago: that retry may be under way, and would launch what was given back.
        """

    async def abandon(self, decision_id: str, jti: str, *, now: float, note: str) -> None:
        """The reservation call for ``decision_id`` (under license ``jti``) failed and the launch
        was not forwarded: make sure no reservation under that decision id holds or ever takes
        units, whether or not the call still reaches the store (a stalled connection can deliver
        it late). In one transaction:

        - reserved -> released (its amount leaves ``reserved``), ``note`` appended;
        - settled_unknown (the sweeper came first) -> released (its amount leaves ``used``: the
          outcome is known, nothing was forwarded), ``note`` appended, unless an idempotency
          key is bound to it: a retry may then have been counted on it (REPLAYED) and
          forwarded, so it stays counted;
        - used or released: unchanged;
        - no reservation yet: a placeholder (amount 0, released, ``note``) takes the decision
          id, so a reservation arriving later under it is refused (``reserve`` raises
          ``ValueError``) and reserves nothing. A license never seen gets a row (as
          ``revoke`` makes one) for it to refer to.
        """


def open_ledger(url: str, base_dir: Path, *, create: bool = True, pool_size: int = 10) -> Ledger:
    """Build the ledger named by ``[store] url``; does not connect (call ``open()``).

    ``sqlite:PATH`` (relative to ``base_dir``, the config file's folder, unless absolute) and
    ``sqlite:///abs/path`` select SQLite; ``postgresql://...`` (or ``postgres://``, optionally
    with ``?schema=NAME``) selects PostgreSQL. Raises ``ConfigError`` for anything else.
    Without ``create``, a SQLite ledger file that is not there is StoreUnavailable, not made.
    ``pool_size``: PostgreSQL connections at most (SQLite uses one).
    """
    scheme, sep, rest = url.partition(":")
    scheme = scheme.lower()
    if sep and scheme == "sqlite":
        # Imported here: each store module imports this one for the types it implements.
        from launchgate.sqliteledger import SqliteLedger

        return SqliteLedger(_sqlite_path(url, rest, base_dir), create=create)
    if sep and scheme in ("postgresql", "postgres"):
        # Imported here: asyncpg is loaded only where a PostgreSQL store is configured.
        from launchgate.pgledger import PostgresLedger

        return PostgresLedger(url, max_size=pool_size)
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
        from launchgate.pgledger import PostgresLedger
        from launchgate.sqliteledger import SCHEMA_VERSION, SqliteLedger

        if isinstance(store, SqliteLedger):
            return SCHEMA_VERSION

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


# --- shared by the stores -------------------------------------------------------------------

# Column orders the row conversions below expect; each store selects them in this order.
_LICENSE_COLUMNS = (
    "jti, account, max_accelerators, used, reserved, revoked, revoked_reason, revoked_at,"
    " expires, first_seen"
)
_RESERVATION_COLUMNS = "decision_id, jti, amount, state, created_at, settled_at, note"
_KEY_COLUMNS = "account, key, fingerprint, decision_id, bound_at"


def _check_reserve(amount: int, idempotency_key: str | None, fingerprint: str | None) -> None:
    """The argument checks of ``Ledger.reserve``, made before the store is touched."""
    if amount < 0:
        raise ValueError(f"reservation amount must not be negative, got {amount}")
    if (idempotency_key is None) != (fingerprint is None):
        raise ValueError("an idempotency key and a request fingerprint go together")


def _decision_taken(decision_id: str) -> ValueError:
    """The error ``reserve`` raises for a decision id that already has a reservation."""
    return ValueError(f"decision {decision_id} already has a reservation")


# The note of a reservation given back (``give_back``) whose launch then answered 2xx, or went
# unanswered, after all: counted as used again. Staff give back what they found did not launch;
# a launch still under way, or a retry of it counted on the reservation (REPLAYED), can answer
# later (found by QA: a release while the retry was in flight, or once a CLI with a shorter
# reservation_ttl_s had settled a launch still in flight, and the 2xx that followed counted
# nothing; the license launched twice its quantity). The ledger keeps when it was given back
# (given_back_at): a reservation its own gateway released stays released whatever follows.
COUNTED_AGAIN: Final = "counted again: the upstream answered after it was given back"


# The note of a reservation settled as unknown (the sweeper's, once reservation_ttl_s had
# passed) whose launch then answered 2xx: used, as a retry's 2xx confirms it. Left settled as
# unknown, staff could give it back and the license launch again (found by QA).
ANSWERED_LATE: Final = "the upstream answered 2xx after it was settled as unknown"


def _check_give_back(
    decision_id: str, state: str | None, replayed_at: float | None, since: float
) -> None:
    """Raise as ``Ledger.give_back`` does unless the reservation's ``state`` (None: there is no
    such reservation) is 'settled_unknown' and no retry was counted on it (``replayed_at``)
    after ``since``."""
    if state is None:
        raise LookupError(f"no reservation for decision {decision_id}")
    if state != "settled_unknown":
        raise ValueError(
            f"reservation for decision {decision_id} is {state!r}; only one settled as used"
            " because its outcome was unknown ('settled_unknown') can be given back"
        )
    if replayed_at is not None and replayed_at > since:
        # Found by QA: given back while a retry counted on it was under way, its units went to
        # another launch, and the retry launched too.
        raise ValueError(
            f"a retry of decision {decision_id} was counted on its reservation recently: it may"
            " still be under way; try again once it cannot be"
        )


def _abandoned_from(state: str, keyed: bool) -> Literal["reserved", "used"] | None:
    """The license counter that ``abandon`` takes back a reservation's amount from, given the
    reservation's ``state`` and whether an idempotency key is bound to it; None: leave it."""
    if state == "reserved":
        return "reserved"
    if state == "settled_unknown" and not keyed:
        return "used"
    return None


def _expiry_note(ttl_s: float) -> str:
    """The note ``expire_reservations`` leaves on each reservation it settles."""
    return f"outcome unknown: still reserved after {ttl_s:g} s"


def _newer_schema(name: object, current: int, known: int) -> StoreUnavailable:
    """The error for a store whose schema is newer than this launchgate knows."""
    return StoreUnavailable(
        f"ledger {name} has schema version {current}; this launchgate knows up to {known}",
        late=False,
    )


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


def _idempotency_key(row: Any) -> IdempotencyKey:
    account, key, fingerprint, decision_id, bound_at = row
    return IdempotencyKey(account, key, fingerprint, decision_id, bound_at)


# Operations on the ledger thread. A write runs inside a transaction opened by its caller (alone,
