"""The license ledger: reservation lifecycle, revocation, concurrency, and store failures.

Tests that take the ``ledger`` or ``ledger_pair`` fixture are conformance tests, run against
SQLite and against PostgreSQL (``LAUNCHGATE_TEST_POSTGRES_DSN``; skipped without it). Tests of
SQLite files stay here; PostgreSQL-only tests live in test_pgledger.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information
import pytest
import structlog

from launchgate.errors import ConfigError, StoreUnavailable
from launchgate.ledger import (
    ANSWERED_LATE,
    COUNTED_AGAIN,
    IdempotencyKey,
    Ledger,
    LicenseState,
    Reservation,
    ReserveOutcome,
    ReserveResult,
    migrate_store,
    open_ledger,
)
from launchgate.pgledger import _MIGRATIONS as pg_migrations
from launchgate.pgledger import PostgresLedger
from launchgate.sqliteledger import _ABANDONED as SQLITE_ABANDONED
from launchgate.sqliteledger import _MIGRATIONS as sqlite_migrations
from launchgate.sqliteledger import SqliteLedger

T0 = 1_800_000_000.0
EXPIRES = T0 + 90 * 86400
POSTGRES_DSN_VAR = "LAUNCHGATE_TEST_POSTGRES_DSN"
SQLITE_SCHEMA_VERSION = 4


@contextlib.asynccontextmanager
async def postgres_schema() -> AsyncIterator[str]:
    """A store url on a fresh schema of the test database (skips without one); dropped after."""
    dsn = os.environ.get(POSTGRES_DSN_VAR)
    if not dsn:
        pytest.skip(f"set {POSTGRES_DSN_VAR} to run the PostgreSQL ledger tests")
    schema = f"lg_test_{secrets.token_hex(6)}"
    try:
        yield f"{dsn}{'&' if '?' in dsn else '?'}schema={schema}"
    finally:
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await conn.close()


@contextlib.asynccontextmanager
async def open_stores(*stores: Ledger) -> AsyncIterator[None]:
    """Open every store, and close them all afterwards."""
    try:
        for store in stores:
            await store.open()
        yield
    finally:
        for store in stores:
            await store.close()


@pytest.fixture(params=["sqlite", "postgresql"])
async def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Ledger]:
    """An open, empty ledger of each implementation."""
    if request.param == "sqlite":
        store = SqliteLedger(tmp_path / "data" / "ledger.sqlite3")
        async with open_stores(store):
            yield store
        return
    async with postgres_schema() as url:
        pg = PostgresLedger(url)
        async with open_stores(pg):
            yield pg


@pytest.fixture(params=["sqlite", "postgresql"])
async def ledger_pair(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[tuple[Ledger, Ledger]]:
    """Two ledgers on one store, standing in for two processes (a gateway and the CLI, or two
    replicas): two connections to one SQLite file, or two PostgreSQL pools."""
    if request.param == "sqlite":
        path = tmp_path / "ledger.sqlite3"
        first, second = SqliteLedger(path), SqliteLedger(path)
        async with open_stores(first, second):
            yield first, second
        return
    async with postgres_schema() as url:
        pg_first, pg_second = PostgresLedger(url), PostgresLedger(url)
        async with open_stores(pg_first, pg_second):
            yield pg_first, pg_second


async def reserve(
    ledger: Ledger,
    decision_id: str,
    amount: int,
    *,
    jti: str = "lic-42",
    max_accelerators: int = 64,
    now: float = T0,
    then: Callable[[ReserveResult], None] | None = None,
    account: str = "acct-2001",
) -> ReserveResult:
    return await ledger.reserve(
        jti=jti,
        account=account,
        max_accelerators=max_accelerators,
        expires=EXPIRES,
        amount=amount,
        decision_id=decision_id,
        now=now,
        then=then,
    )


# --- reserve ------------------------------------------------------------------------------


async def test_first_reserve_records_the_license(ledger: Ledger) -> None:
    """The first reservation stores account, maximum, expiry and first sighting, and reserves."""
    result = await reserve(ledger, "d1", 16)
    assert result == ReserveResult(ReserveOutcome.RESERVED, 64, used=0, reserved=16, requested=16)
    assert result.remaining == 48
    state = await ledger.license("lic-42")
    assert state is not None
    assert (state.account, state.max_accelerators, state.expires, state.first_seen) == (
        "acct-2001",
        64,
        EXPIRES,
        T0,
    )
    assert (state.used, state.reserved, state.remaining, state.revoked) == (0, 16, 48, False)
    reservation = await ledger.reservation("d1")
    assert reservation is not None
    assert (reservation.jti, reservation.amount, reservation.state) == ("lic-42", 16, "reserved")
    assert reservation.created_at == T0
    assert reservation.settled_at is None


async def test_later_sightings_keep_the_first_maximum(ledger: Ledger) -> None:
    """A jti is unique: a later reserve with another maximum does not change the stored one."""
    await reserve(ledger, "d1", 8, max_accelerators=64)
    result = await reserve(ledger, "d2", 8, max_accelerators=1000, now=T0 + 5)
    assert result.max_accelerators == 64
    state = await ledger.license("lic-42")
    assert state is not None
    assert (state.max_accelerators, state.first_seen, state.reserved) == (64, T0, 16)


@pytest.mark.parametrize(
    ("already", "amount", "outcome", "reserved_after"),
    [
        (56, 8, ReserveOutcome.RESERVED, 64),  # exactly fits
        (56, 16, ReserveOutcome.EXHAUSTED, 56),  # one unit over is refused whole
        (64, 1, ReserveOutcome.EXHAUSTED, 64),
        (64, 0, ReserveOutcome.RESERVED, 64),  # a template (count 0) always fits
        (0, 65, ReserveOutcome.EXHAUSTED, 0),
    ],
)
async def test_reserve_against_capacity(
    ledger: Ledger, already: int, amount: int, outcome: ReserveOutcome, reserved_after: int
) -> None:
    """used + reserved + amount > max is exhausted and reserves nothing; otherwise it reserves."""
    if already:
        await reserve(ledger, "d0", already)
    result = await reserve(ledger, "d1", amount)
    assert (result.outcome, result.reserved, result.requested) == (outcome, reserved_after, amount)
    state = await ledger.license("lic-42")
    assert state is not None
    assert state.reserved == reserved_after
    reservation = await ledger.reservation("d1")
    assert (reservation is not None) == (outcome is ReserveOutcome.RESERVED)


async def test_committed_use_counts_against_capacity(ledger: Ledger) -> None:
    """Accelerators already used are not available again."""
    await reserve(ledger, "d1", 60)
    await ledger.commit("d1", T0 + 1)
    result = await reserve(ledger, "d2", 8)
    assert (result.outcome, result.used, result.reserved, result.remaining) == (
        ReserveOutcome.EXHAUSTED,
        60,
        0,
        4,
    )


async def test_negative_amount_is_refused(ledger: Ledger) -> None:
    """A negative reservation would mint capacity; it is a programming error."""
    with pytest.raises(ValueError, match="negative"):
        await reserve(ledger, "d1", -8)


async def test_reusing_a_decision_id_is_refused_and_reserves_nothing(ledger: Ledger) -> None:
    """One decision, one reservation: a second reserve under the same id raises, unchanged."""
    await reserve(ledger, "d1", 8)
    with pytest.raises(ValueError, match="d1"):
        await reserve(ledger, "d1", 8)
    state = await ledger.license("lic-42")
    assert state is not None
    assert state.reserved == 8


# --- settlement ---------------------------------------------------------------------------


def _settle(ledger: Ledger, how: str, decision_id: str) -> Awaitable[bool]:
    if how == "commit":
        return ledger.commit(decision_id, T0 + 10)
    if how == "release":
        return ledger.release(decision_id, T0 + 10)
    return ledger.settle_unknown(decision_id, T0 + 10, "upstream timed out")


SETTLED_STATE = {"commit": "used", "release": "released", "settle_unknown": "settled_unknown"}


class ThenProbe:
    """A ``then`` that records what it was given, on which thread, and what the store had
    committed by then (read through a second connection, so only committed state shows)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self.calls: list[Any] = []
        self.threads: list[int] = []
        self.seen: list[tuple[Any, ...] | None] = []

    def __call__(self, value: Any) -> None:
        self.calls.append(value)
        self.threads.append(threading.get_ident())
        if self.path is not None:
            with contextlib.closing(sqlite3.connect(self.path)) as conn:
                self.seen.append(
                    conn.execute(
                        "SELECT state FROM reservations WHERE decision_id = 'd1'"
                    ).fetchone()
                )


def _sqlite_path(ledger: Ledger) -> Path | None:
    return ledger.path if isinstance(ledger, SqliteLedger) else None


async def test_then_runs_off_the_loop_after_the_reservation_commits(ledger: Ledger) -> None:
    """``then`` gets the reserve's result, once, off the event loop's thread, with the
    reservation already committed (a record written there may say it is reserved)."""
    probe = ThenProbe(_sqlite_path(ledger))
    result = await reserve(ledger, "d1", 8, then=probe)
    assert probe.calls == [result]
    assert probe.threads[0] != threading.get_ident()
    if probe.path is not None:
        assert probe.seen == [("reserved",)]


@pytest.mark.parametrize("how", ["commit", "release", "settle_unknown"])
async def test_then_runs_after_a_settlement_commits(ledger: Ledger, how: str) -> None:
    await reserve(ledger, "d1", 8)
    probe = ThenProbe(_sqlite_path(ledger))
    if how == "commit":
        await ledger.commit("d1", T0 + 10, then=probe)
    elif how == "release":
        await ledger.release("d1", T0 + 10, then=probe)
    else:
        await ledger.settle_unknown("d1", T0 + 10, "upstream timed out", then=probe)
    assert probe.calls == [True]
    assert probe.threads[0] != threading.get_ident()
    if probe.path is not None:
        assert probe.seen == [(SETTLED_STATE[how],)]


async def test_then_is_not_called_when_the_write_fails(ledger: Ledger) -> None:
    """A refused reserve (a decision id used twice) runs no ``then``."""
    await reserve(ledger, "d1", 8)
    probe = ThenProbe(None)
    with pytest.raises(ValueError, match="d1"):
        await reserve(ledger, "d1", 8, then=probe)
    assert probe.calls == []


async def test_a_then_that_raises_leaves_the_store_working(ledger: Ledger) -> None:
    """A ``then`` must not raise; if one does anyway, the reservation stands and later
    calls (and their ``then``) still run."""

    def broken(_: object) -> None:
        raise RuntimeError("a bug in a then")

    await reserve(ledger, "d1", 8, then=broken)
    probe = ThenProbe(None)
    await ledger.commit("d1", T0 + 1, then=probe)
    assert probe.calls == [True]
    state = await ledger.license("lic-42")
    assert state is not None and state.used == 8


async def test_thens_of_a_batch_run_inside_one_group(tmp_path: Path) -> None:
    """The SQLite ledger runs the ``then`` callbacks of writes that committed together inside
    one ``group()`` (the gateway's writes their records in one go): every ``then`` runs in a
    group, and concurrent writes share groups."""
    ledger = SqliteLedger(tmp_path / "ledger.sqlite3")
    groups: list[list[object]] = []
    open_group: list[object] | None = None

    @contextlib.contextmanager
    def group() -> Iterator[None]:
        nonlocal open_group
        open_group = []
        try:
            yield
        finally:
            groups.append(open_group)
            open_group = None

    def then(value: object) -> None:
        assert open_group is not None, "a then ran outside a group"
        open_group.append(value)

    ledger.group_thens(group)
    await ledger.open()
    try:
        results = await asyncio.gather(*(reserve(ledger, f"d{i}", 1, then=then) for i in range(20)))
    finally:
        await ledger.close()
    assert sorted(id(v) for g in groups for v in g) == sorted(id(r) for r in results)
    assert len(groups) < 20


async def test_thens_of_a_batch_each_see_their_own_result(ledger: Ledger) -> None:
    """Concurrent reserves (one batch on SQLite) each get their own result in their ``then``."""
    probes = [ThenProbe(None) for _ in range(20)]
    results = await asyncio.gather(
        *(reserve(ledger, f"d{i}", 8, then=probe) for i, probe in enumerate(probes))
    )
    assert [p.calls for p in probes] == [[r] for r in results]


@pytest.mark.parametrize(
    ("how", "state", "used"),
    [
        ("commit", "used", 16),
        ("release", "released", 0),
        ("settle_unknown", "settled_unknown", 16),
    ],
)
async def test_settlement_moves_the_reservation(
    ledger: Ledger, how: str, state: str, used: int
) -> None:
    """commit and settle_unknown turn the reservation into use; release gives it back."""
    await reserve(ledger, "d1", 16)
    await _settle(ledger, how, "d1")
    license_state = await ledger.license("lic-42")
    assert license_state is not None
    assert (license_state.used, license_state.reserved) == (used, 0)
    assert license_state.remaining == 64 - used
    reservation = await ledger.reservation("d1")
    assert reservation is not None
    assert (reservation.state, reservation.settled_at) == (state, T0 + 10)
    if how == "settle_unknown":
        assert reservation.note == "upstream timed out"


@pytest.mark.parametrize(
    ("first", "then"),
    [
        (first, then)
        for first in ("commit", "release", "settle_unknown")
        for then in ("commit", "release", "settle_unknown")
        # (a 2xx confirms a reservation settled as unknown: see the test below)
        if (first, then) != ("settle_unknown", "commit")
    ],
)
async def test_a_settled_reservation_is_never_settled_again(
    ledger: Ledger, first: str, then: str
) -> None:
    """Only a 'reserved' reservation moves: a second settlement of any kind is a no-op (but a
    2xx after the sweeper's settlement, below)."""
    await reserve(ledger, "d1", 16)
    assert await _settle(ledger, first, "d1") is True
    before = await ledger.license("lic-42")
    assert await _settle(ledger, then, "d1") is False  # it says so: nothing moved
    assert await ledger.license("lic-42") == before
    reservation = await ledger.reservation("d1")
    assert reservation is not None
    assert reservation.state == SETTLED_STATE[first]


async def test_a_2xx_after_the_sweeper_s_settlement_makes_it_used(ledger: Ledger) -> None:
    """Found by QA: the sweeper settled a launch still under way as unknown (a short
    reservation_ttl_s, or a store outage longer than it), its 2xx then left it so, and staff
    could give it back: the license launched twice its quantity. The 2xx makes it used (the
    counters stay: unknown counts as used), and used is not given back."""
    await reserve(ledger, "d1", 16)
    assert await ledger.expire_reservations(now=T0 + 400, ttl_s=300) == ["d1"]
    assert await ledger.commit("d1", T0 + 401) is True
    reservation = await ledger.reservation("d1")
    assert reservation is not None and reservation.state == "used"
    assert reservation.note is not None and reservation.note.endswith(ANSWERED_LATE)
    assert await counters(ledger) == (16, 0)
    with pytest.raises(ValueError, match="'used'"):
        await ledger.give_back("d1", now=T0 + 500, note=None)
    assert await ledger.commit("d1", T0 + 402) is False
    assert await counters(ledger) == (16, 0)


@pytest.mark.parametrize("how", ["commit", "release", "settle_unknown"])
async def test_settling_an_unknown_decision_is_a_no_op(ledger: Ledger, how: str) -> None:
    """Settling a decision that reserved nothing (e.g. an exhausted one) changes nothing."""
    await reserve(ledger, "d1", 8)
    assert await _settle(ledger, how, "never-reserved") is False
    state = await ledger.license("lic-42")
    assert state is not None
    assert (state.used, state.reserved) == (0, 8)


async def test_expire_settles_old_reservations_as_used_and_keeps_young_ones(
    ledger: Ledger,
) -> None:
    """A reservation older than the TTL is settled_unknown and counted as used; a younger one
    stays reserved; settled ones are left alone."""
    await reserve(ledger, "old", 8, now=T0)
    await reserve(ledger, "young", 16, now=T0 + 250)
    await reserve(ledger, "done", 4, now=T0)
    await ledger.commit("done", T0 + 1)

    expired = await ledger.expire_reservations(now=T0 + 301, ttl_s=300)

    assert expired == ["old"]
    old = await ledger.reservation("old")
    young = await ledger.reservation("young")
    assert old is not None
    assert young is not None
    assert (old.state, old.settled_at) == ("settled_unknown", T0 + 301)
    assert old.note is not None
    assert young.state == "reserved"
    state = await ledger.license("lic-42")
    assert state is not None
    assert (state.used, state.reserved) == (8 + 4, 16)
    assert await ledger.expire_reservations(now=T0 + 301, ttl_s=300) == []


async def test_late_commit_after_expiry_does_not_double_count(ledger: Ledger) -> None:
    """A gateway that answers after its reservation was expired does not count it twice (it
    is confirmed used: below)."""
    await reserve(ledger, "d1", 16)
    await ledger.expire_reservations(now=T0 + 1000, ttl_s=300)
    await ledger.commit("d1", T0 + 1001)
    state = await ledger.license("lic-42")
    assert state is not None
    assert (state.used, state.reserved) == (16, 0)
    reservation = await ledger.reservation("d1")
    assert reservation is not None
    assert reservation.state == "used"


# --- give back (licenses release) -----------------------------------------------------------


async def test_give_back_returns_a_settled_unknown_reservation(ledger: Ledger) -> None:
    """Staff give back an unknown outcome: it becomes released and leaves `used`."""
    await reserve(ledger, "d1", 16)
    await reserve(ledger, "d2", 8)
    await ledger.commit("d2", T0 + 1)
    await ledger.settle_unknown("d1", T0 + 1, "upstream timed out")

    given = await ledger.give_back("d1", now=T0 + 3600, note="checked: nothing launched")

    assert (given.decision_id, given.amount, given.state) == ("d1", 16, "released")
    assert (given.settled_at, given.note) == (T0 + 3600, "checked: nothing launched")
    assert await ledger.reservation("d1") == given
    state = await ledger.license("lic-42")
    assert state is not None
    assert (state.used, state.reserved, state.remaining) == (8, 0, 56)


async def test_give_back_without_note_keeps_the_settlement_note(ledger: Ledger) -> None:
    """note=None leaves the note recorded when the reservation was settled."""
    await reserve(ledger, "d1", 16)
    await ledger.settle_unknown("d1", T0 + 1, "upstream timed out")
    given = await ledger.give_back("d1", now=T0 + 2, note=None)
    assert given.note == "upstream timed out"


@pytest.mark.parametrize(
    ("settle", "state"),
    [(None, "reserved"), ("commit", "used"), ("release", "released")],
)
async def test_give_back_refuses_any_other_state(
    ledger: Ledger, settle: str | None, state: str
) -> None:
    """Only settled_unknown can be given back; the error names the reservation's state."""
    await reserve(ledger, "d1", 16)
    if settle:
        await _settle(ledger, settle, "d1")
    before = await ledger.license("lic-42")
    with pytest.raises(ValueError, match=f"'{state}'"):
        await ledger.give_back("d1", now=T0 + 5, note=None)
    assert await ledger.license("lic-42") == before


async def test_give_back_twice_is_refused(ledger: Ledger) -> None:
    """A given-back reservation is released; giving it back again cannot lower `used` twice."""
    await reserve(ledger, "d1", 16)
    await ledger.settle_unknown("d1", T0 + 1, "timeout")
    await ledger.give_back("d1", now=T0 + 2, note=None)
    with pytest.raises(ValueError, match="'released'"):
        await ledger.give_back("d1", now=T0 + 3, note=None)
    state = await ledger.license("lic-42")
    assert state is not None
    assert state.used == 0


@pytest.mark.parametrize(("settle", "state"), [("commit", "used"), ("settle_unknown", None)])
async def test_a_launch_that_answers_after_its_give_back_is_counted_again(
    ledger: Ledger, settle: str, state: str | None
) -> None:
    """Found by QA: staff gave back a launch still under way (swept as unknown early, by a CLI
    with a shorter reservation_ttl_s), and its 2xx then counted nothing: the license launched
    twice its quantity. A 2xx, or no answer, after a give-back counts it as used again."""
    await reserve(ledger, "d1", 16)
    await ledger.settle_unknown("d1", T0 + 1, "still reserved after 3 s")
    await ledger.give_back("d1", now=T0 + 2, note="checked: nothing launched")
    assert await counters(ledger) == (0, 0)

    assert await _settle(ledger, settle, "d1") is True
    reservation = await ledger.reservation("d1")
    assert reservation is not None
    assert reservation.state == (state or "settled_unknown")
    assert reservation.note is not None and reservation.note.endswith(COUNTED_AGAIN)
    assert await counters(ledger) == (16, 0)
    # Once: a second settlement finds it counted
    assert await _settle(ledger, settle, "d1") is False
    assert await counters(ledger) == (16, 0)


async def test_a_failed_launch_after_its_give_back_stays_given_back(ledger: Ledger) -> None:
    await reserve(ledger, "d1", 16)
    await ledger.settle_unknown("d1", T0 + 1, "timeout")
    await ledger.give_back("d1", now=T0 + 2, note=None)
    assert await ledger.release("d1", T0 + 3) is False
    assert await counters(ledger) == (0, 0)


async def test_settlements_in_one_batch_count_a_given_back_launch_again(ledger: Ledger) -> None:
    """As above, with the settlements that queue up together (one statement on PostgreSQL)."""
    for n in range(1, 6):
        await reserve(ledger, f"d{n}", 8)
    for n in (1, 2):
        await ledger.settle_unknown(f"d{n}", T0 + 1, "timeout")
        await ledger.give_back(f"d{n}", now=T0 + 2, note=None)
    moved = await asyncio.gather(
        ledger.commit("d1", T0 + 3),
        ledger.release("d2", T0 + 3),
        ledger.commit("d3", T0 + 3),
        ledger.release("d4", T0 + 3),
        ledger.settle_unknown("d5", T0 + 3, "timeout"),
    )
    assert list(moved) == [True, False, True, True, True]
    assert await counters(ledger) == (24, 0)


async def test_a_retry_s_2xx_after_a_give_back_counts_it_again(ledger: Ledger) -> None:
    """Found by QA: a retry counted on a reservation settled as unknown (REPLAYED) was under way
    when staff gave that reservation back; its 2xx confirmed nothing, and the launch went
    uncounted. Confirmed, it is counted as used again."""
    await reserve_keyed(ledger, "d1", 8)
    await ledger.settle_unknown("d1", T0 + 1, "timeout")
    retry = await reserve_keyed(ledger, "d2", 8, now=T0 + 2)
    assert (retry.outcome, retry.replay_of) == (ReserveOutcome.REPLAYED, "d1")
    await ledger.give_back("d1", now=T0 + 3, note="checked: nothing launched")
    assert await counters(ledger) == (0, 0)

    assert await ledger.confirm("d1", now=T0 + 4, note="confirmed by retry d2") is True
    reservation = await ledger.reservation("d1")
    assert reservation is not None and reservation.state == "used"
    assert await counters(ledger) == (8, 0)
    assert await ledger.confirm("d1", now=T0 + 5, note="confirmed by retry d3") is False
    assert await counters(ledger) == (8, 0)


async def test_give_back_of_an_unknown_decision_raises_lookup_error(ledger: Ledger) -> None:
    """A decision id with no reservation is a LookupError."""
    with pytest.raises(LookupError, match="nope"):
        await ledger.give_back("nope", now=T0, note=None)


# --- revocation ---------------------------------------------------------------------------


async def test_revoke_before_first_sight_denies_the_license_when_it_shows_up(
    ledger: Ledger,
) -> None:
    """A jti revoked before any launch used it is recorded, then refused at first sight."""
    assert await ledger.revoke("lic-42", reason="issued in error", now=T0) is True
    state = await ledger.license("lic-42")
    assert state is not None
    assert (state.revoked, state.revoked_reason, state.revoked_at) == (True, "issued in error", T0)
    assert (state.account, state.max_accelerators, state.remaining, state.first_seen) == (
        None,
        None,
        None,
        None,
    )

    result = await reserve(ledger, "d1", 8, now=T0 + 10)

    assert (result.outcome, result.reserved, result.max_accelerators) == (
        ReserveOutcome.REVOKED,
        0,
        64,
    )
    assert await ledger.reservation("d1") is None
    state = await ledger.license("lic-42")
    assert state is not None
    assert (state.account, state.max_accelerators, state.first_seen) == ("acct-2001", 64, T0 + 10)
    assert state.revoked


async def test_revoke_after_use_denies_further_launches(ledger: Ledger) -> None:
    """After revocation nothing more is reserved, not even a zero-accelerator item."""
    await reserve(ledger, "d1", 8)
    await ledger.commit("d1", T0 + 1)
    assert await ledger.revoke("lic-42", reason=None, now=T0 + 2) is True
    for decision_id, amount in [("d2", 8), ("d3", 0)]:
        result = await reserve(ledger, decision_id, amount, now=T0 + 3)
        assert result.outcome is ReserveOutcome.REVOKED
        assert (result.used, result.reserved) == (8, 0)


async def test_a_license_on_record_for_another_account_is_not_spent(ledger: Ledger) -> None:
    """A jti names one license: the account of its first sighting holds it. A reservation for
    another account under that jti (a second token issued in error) is OTHER_ACCOUNT, on the
    fast path and with an idempotency key alike, and changes nothing."""
    await reserve(ledger, "d1", 8)
    for result in (
        await reserve(ledger, "d-other-None", 8, account="acct-2002", now=T0 + 1),
        await reserve_keyed(ledger, "d-other-key-1", 8, account="acct-2002", now=T0 + 1),
    ):
        assert (result.outcome, result.used, result.reserved) == (
            ReserveOutcome.OTHER_ACCOUNT,
            0,
            8,
        )
    for decision_id in ("d-other-None", "d-other-key-1"):
        assert await ledger.reservation(decision_id) is None
    assert await ledger.idempotency_key("acct-2002", "key-1") is None
    state = await ledger.license("lic-42")
    assert state is not None
    assert (state.account, state.used, state.reserved) == ("acct-2001", 0, 8)


async def test_a_license_revoked_before_first_sight_is_refused_as_revoked_for_any_account(
    ledger: Ledger,
) -> None:
    """Revocation comes first: a jti revoked before any launch takes no account, and stays
    refused as revoked whoever presents it."""
    await ledger.revoke("lic-42", reason=None, now=T0)
    assert (await reserve(ledger, "d1", 8)).outcome is ReserveOutcome.REVOKED
    other = await reserve(ledger, "d2", 8, account="acct-2002", now=T0 + 1)
    assert other.outcome is ReserveOutcome.REVOKED


async def test_revoking_twice_reports_false_and_keeps_the_first_reason(ledger: Ledger) -> None:
    """revoke is idempotent: the second call returns False and changes nothing."""
    assert await ledger.revoke("lic-42", reason="first", now=T0) is True
    assert await ledger.revoke("lic-42", reason="second", now=T0 + 1) is False
    state = await ledger.license("lic-42")
    assert state is not None
    assert (state.revoked_reason, state.revoked_at) == ("first", T0)


async def test_licenses_lists_every_license_seen(ledger: Ledger) -> None:
    """licenses() returns every license, seen or only revoked, ordered by jti."""
    await reserve(ledger, "d1", 8, jti="lic-b")
    await reserve(ledger, "d2", 4, jti="lic-a", max_accelerators=8)
    await ledger.revoke("lic-c", reason=None, now=T0)
    listed = await ledger.licenses()
    assert [(s.jti, s.reserved, s.remaining, s.revoked) for s in listed] == [
        ("lic-a", 4, 4, False),
        ("lic-b", 8, 56, False),
        ("lic-c", 0, None, True),
    ]
    assert await ledger.license("lic-unknown") is None


async def test_licenses_are_listed_in_byte_order(ledger: Ledger) -> None:
    """Ordering by jti compares bytes, as SQLite does, whatever a database's locale says."""
    for jti in ["lic-b", "LIC-Z", "lic-a", "lic_a", "lic-A"]:
        await ledger.revoke(jti, reason=None, now=T0)
    assert [s.jti for s in await ledger.licenses()] == ["LIC-Z", "lic-A", "lic-a", "lic-b", "lic_a"]


# --- concurrency --------------------------------------------------------------------------


async def test_concurrent_reserves_never_overspend(ledger: Ledger) -> None:
    """200 concurrent launches of 8 against a license of 64: exactly 8 win."""
    results = await asyncio.gather(*(reserve(ledger, f"d{i}", 8) for i in range(200)))
    outcomes = [r.outcome for r in results]
    assert outcomes.count(ReserveOutcome.RESERVED) == 8
    assert outcomes.count(ReserveOutcome.EXHAUSTED) == 192
    state = await ledger.license("lic-42")
    assert state is not None
    assert (state.reserved, state.remaining) == (64, 0)


async def test_two_processes_racing_never_overspend(ledger_pair: tuple[Ledger, Ledger]) -> None:
    """Two ledgers on one store (two processes) racing 100 launches each: exactly 8 win."""
    first, second = ledger_pair
    results = await asyncio.gather(
        *(reserve(first, f"a{i}", 8) for i in range(100)),
        *(reserve(second, f"b{i}", 8) for i in range(100)),
    )
    assert [r.outcome for r in results].count(ReserveOutcome.RESERVED) == 8
    for store in ledger_pair:
        state = await store.license("lic-42")
        assert state is not None
        assert state.reserved == 64


async def test_revoke_from_another_process_is_seen_by_the_next_reserve(
    ledger_pair: tuple[Ledger, Ledger],
) -> None:
    """`launchgate token revoke` writing through its own connection stops the gateway's next
    reservation."""
    gateway, cli = ledger_pair
    assert (await reserve(gateway, "d1", 8)).outcome is ReserveOutcome.RESERVED
    assert await cli.revoke("lic-42", reason="compliance hold", now=T0 + 1) is True
    assert (await reserve(gateway, "d2", 8)).outcome is ReserveOutcome.REVOKED


async def test_give_back_from_another_process_frees_capacity(
    ledger_pair: tuple[Ledger, Ledger],
) -> None:
    """`launchgate licenses release` in another process makes the units available again."""
    gateway, cli = ledger_pair
    await reserve(gateway, "d1", 64)
    await gateway.settle_unknown("d1", T0 + 1, "timeout")
    assert (await reserve(gateway, "d2", 8)).outcome is ReserveOutcome.EXHAUSTED
    await cli.give_back("d1", now=T0 + 2, note=None)
    assert (await reserve(gateway, "d3", 8)).outcome is ReserveOutcome.RESERVED


async def test_a_ledger_file_removed_while_in_use_is_unavailable_until_a_restart(
    tmp_path: Path,
) -> None:
    """Deleting the ledger's folder under a running gateway let it go on writing to the unlinked
    file, and a license was spent twice over. Now every call fails closed and no empty ledger
    takes the old one's place: not one this process would make, nor one another process made
    meanwhile (found by review: `licenses list` made one), nor a copy put back. A restart
    (a new ledger object) uses what is at the path."""
    folder = tmp_path / "data"
    path = folder / "ledger.sqlite3"
    store = SqliteLedger(path)
    try:
        assert (await reserve(store, "d1", 8)).outcome is ReserveOutcome.RESERVED
        await store.commit("d1", now=T0 + 1)
        await store.close()  # a consistent copy to put back later
        backup = tmp_path / "backup.sqlite3"
        shutil.copy(path, backup)
        store = SqliteLedger(path)
        assert (await reserve(store, "d2", 8)).reserved == 8

        shutil.rmtree(folder)
        for call in (lambda: reserve(store, "d3", 8), store.ping, store.licenses):
            with pytest.raises(StoreUnavailable, match="removed or replaced while in use"):
                await call()
        assert not folder.exists()

        other = SqliteLedger(path)  # a CLI command, say: it makes an empty ledger
        await other.open()
        await other.close()
        with pytest.raises(StoreUnavailable, match="removed or replaced while in use"):
            await reserve(store, "d4", 8)

        shutil.copy(backup, path)  # put back, as it was after d1
        with pytest.raises(StoreUnavailable, match="removed or replaced while in use"):
            await reserve(store, "d5", 8)
        await store.close()
        store = SqliteLedger(path)  # restarted
        result = await reserve(store, "d6", 8)
        assert (result.outcome, result.used, result.reserved) == (ReserveOutcome.RESERVED, 8, 8)
    finally:
        await store.close()


async def test_a_ledger_file_replaced_while_in_use_is_not_taken_up(tmp_path: Path) -> None:
    """A file renamed over the ledger is not used before a restart (beside it may lie the old
    file's WAL, which SQLite would apply to it); the old file is not written to either."""
    path = tmp_path / "ledger.sqlite3"
    store, other = SqliteLedger(path), SqliteLedger(tmp_path / "restored.sqlite3")
    try:
        await reserve(store, "d1", 8)
        await reserve(other, "r1", 40)
        await other.close()
        os.replace(tmp_path / "restored.sqlite3", path)
        with pytest.raises(StoreUnavailable, match="removed or replaced while in use"):
            await reserve(store, "d2", 8)
    finally:
        await store.close()


async def test_a_ledger_that_may_not_create_finds_none_unavailable(tmp_path: Path) -> None:
    """A worker started again after one died opens the ledger without creating it: none there
    is StoreUnavailable, and stays not there; one there is used."""
    path = tmp_path / "data" / "ledger.sqlite3"
    store = SqliteLedger(path, create=False)
    try:
        with pytest.raises(StoreUnavailable, match="does not create one"):
            await store.open()
        assert not path.exists()
        await SqliteLedger(path).open()  # the first worker's
        assert (await reserve(store, "d1", 8)).outcome is ReserveOutcome.RESERVED
    finally:
        await store.close()


@contextlib.asynccontextmanager
async def another_connection_beside(
    path: Path, **options: Any
) -> AsyncIterator[tuple[SqliteLedger, sqlite3.Connection]]:
    """An open SQLite ledger at ``path``, and a connection of another's to it (to hold its
    write lock as another process would)."""
    store = SqliteLedger(path, **options)
    await store.open()
    other = sqlite3.connect(path, isolation_level=None)
    try:
        yield store, other
    finally:
        other.close()
        await store.close()


async def test_ping_fails_while_the_ledger_s_filesystem_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """/readyz said 200 while every reservation failed "database or disk is full" (found by
    QA): taking the write lock needs no room. A ping now also looks at the free space."""
    store = SqliteLedger(tmp_path / "ledger.sqlite3")
    await store.open()
    try:

        def free(blocks: int, total: int = 1 << 20) -> Any:
            space = {"f_bavail": blocks, "f_blocks": total, "f_frsize": 4096}
            return lambda path: type("Space", (), space)()

        monkeypatch.setattr("launchgate.files.os.statvfs", free(16))
        with pytest.raises(StoreUnavailable, match="KiB free"):
            await store.ping()
        monkeypatch.setattr("launchgate.files.os.statvfs", free(2048))  # 8 MB
        await store.ping()
        # ramfs, tmpfs with size=0: no blocks at all means no limit, not full (review)
        monkeypatch.setattr("launchgate.files.os.statvfs", free(0, total=0))
        await store.ping()
    finally:
        monkeypatch.undo()
        await store.close()


async def test_ping_fails_while_another_process_holds_the_write_lock(tmp_path: Path) -> None:
    """/readyz said 200 while a lock held elsewhere made every reservation wait out its busy
    timeout and fail: a ping now takes the write lock, waiting a quarter second at most."""
    async with another_connection_beside(tmp_path / "ledger.sqlite3") as (store, other):
        other.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="locked"):
            await store.ping()
        assert time.monotonic() - started < 1.0
        other.execute("COMMIT")
        await store.ping()
        # A reservation still waits its whole busy timeout, not the ping's quarter second.
        other.execute("BEGIN IMMEDIATE")
        pending = asyncio.create_task(reserve(store, "d1", 8))
        await asyncio.sleep(0.6)
        other.execute("COMMIT")
        assert (await pending).outcome is ReserveOutcome.RESERVED


async def test_a_failing_ledger_says_why_once_and_says_when_it_recovers(tmp_path: Path) -> None:
    """Found by QA: launches got 503 store_unavailable and no log line said why. The ledger logs
    store.failing with the error when writes start to fail, once however many fail, and
    store.recovered when one gets through again."""
    async with another_connection_beside(tmp_path / "ledger.sqlite3", busy_timeout_s=0.1) as (
        store,
        other,
    ):
        with structlog.testing.capture_logs() as logs:
            other.execute("BEGIN IMMEDIATE")
            for decision_id in ("d1", "d2", "d3"):
                with pytest.raises(StoreUnavailable):
                    await reserve(store, decision_id, 8)
            other.execute("COMMIT")
            await asyncio.sleep(1.1)  # past the second in which writes fail at once
            assert (await reserve(store, "d4", 8)).outcome is ReserveOutcome.RESERVED
            await reserve(store, "d5", 8)
        events = [e for e in logs if e["event"].startswith("store.")]
        assert [e["event"] for e in events] == ["store.failing", "store.recovered"]
        assert "locked" in events[0]["error"]


async def test_a_lock_held_elsewhere_fails_writes_at_once_after_the_first_waits_it_out(
    tmp_path: Path,
) -> None:
    """QA: with the write lock held by another process, every licensed launch waited the whole
    busy timeout for its 503. After one write has waited it out, writes fail at once for a
    second, then one tries again (alone: the rest still fail at once), and all is well again
    once it gets through."""
    async with another_connection_beside(tmp_path / "ledger.sqlite3", busy_timeout_s=0.3) as (
        store,
        other,
    ):
        other.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="locked"):
            await reserve(store, "d1", 8)
        assert time.monotonic() - started >= 0.25  # waited out the busy timeout
        started = time.monotonic()
        results = await asyncio.gather(
            *(reserve(store, f"d{i}", 8) for i in range(2, 12)), return_exceptions=True
        )
        assert all(isinstance(r, StoreUnavailable) for r in results)
        assert time.monotonic() - started < 0.1  # at once, not ten waits
        await store.license("lic-42")  # reads still go through

        await asyncio.sleep(1.0)
        probe = asyncio.create_task(reserve(store, "d12", 8))
        await asyncio.sleep(0.05)
        with pytest.raises(StoreUnavailable, match="retrying shortly"):
            await reserve(store, "d13", 8)  # while the one trying again waits
        other.execute("COMMIT")
        assert (await probe).outcome is ReserveOutcome.RESERVED
        assert (await reserve(store, "d14", 8)).outcome is ReserveOutcome.RESERVED


async def test_writes_queued_behind_one_waiting_out_a_lock_fail_with_it(tmp_path: Path) -> None:
    """Found by QA: with the lock held elsewhere, the launches that arrived while the first one
    waited out the busy timeout then waited it out again themselves (a burst of 50: one 503
    after 5 s, 49 after 10 s). They fail together with the first; reads still go through."""
    async with another_connection_beside(tmp_path / "ledger.sqlite3", busy_timeout_s=0.4) as (
        store,
        other,
    ):
        other.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        first = asyncio.create_task(reserve(store, "d1", 8))
        await asyncio.sleep(0.1)  # the first batch is waiting for the lock
        later = [asyncio.create_task(reserve(store, f"d{i}", 8)) for i in range(2, 12)]
        reading = asyncio.create_task(store.license("lic-42"))
        results = await asyncio.gather(first, *later, return_exceptions=True)
        assert all(isinstance(r, StoreUnavailable) for r in results), results
        assert time.monotonic() - started < 0.7  # one wait of 0.4 s, not two
        await reading
        other.execute("COMMIT")


async def test_the_default_wait_for_a_lock_is_a_second(tmp_path: Path) -> None:
    """The ledger's own batches hold the write lock for milliseconds: a launch waits a second
    at most for one held elsewhere before its 503 (it was 5 s; found by QA)."""
    async with another_connection_beside(tmp_path / "ledger.sqlite3") as (store, other):
        other.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        with pytest.raises(StoreUnavailable, match="locked"):
            await reserve(store, "d1", 8)
        assert 0.9 <= time.monotonic() - started < 2.0
        other.execute("COMMIT")


async def test_waiting_for_a_lock_does_not_block_the_event_loop(tmp_path: Path) -> None:
    """While another process holds the write lock, reserve waits off the loop, then succeeds."""
    async with another_connection_beside(tmp_path / "ledger.sqlite3") as (store, other):
        other.execute("BEGIN IMMEDIATE")
        pending = asyncio.create_task(reserve(store, "d1", 8))
        started = time.monotonic()
        await asyncio.sleep(0.2)
        assert time.monotonic() - started < 0.5  # the loop kept turning
        assert not pending.done()
        other.execute("COMMIT")
        assert (await pending).outcome is ReserveOutcome.RESERVED


# --- idempotency keys -----------------------------------------------------------------------


async def reserve_keyed(
    ledger: Ledger,
    decision_id: str,
    amount: int = 8,
    *,
    key: str = "key-1",
    fingerprint: str = "fp-a",
    account: str = "acct-2001",
    jti: str = "lic-42",
    max_accelerators: int = 64,
    now: float = T0,
) -> ReserveResult:
    return await ledger.reserve(
        jti=jti,
        account=account,
        max_accelerators=max_accelerators,
        expires=EXPIRES,
        amount=amount,
        decision_id=decision_id,
        now=now,
        idempotency_key=key,
        fingerprint=fingerprint,
    )


async def counters(ledger: Ledger, jti: str = "lic-42") -> tuple[int, int]:
    state = await ledger.license(jti)
    assert state is not None
    return state.used, state.reserved


async def test_a_new_key_reserves_and_is_bound_to_the_reservation(ledger: Ledger) -> None:
    """A key never seen reserves as usual and remembers (account, key) -> fingerprint, decision."""
    result = await reserve_keyed(ledger, "d1", 16)
    assert result == ReserveResult(ReserveOutcome.RESERVED, 64, used=0, reserved=16, requested=16)
    assert await ledger.idempotency_key("acct-2001", "key-1") == IdempotencyKey(
        "acct-2001", "key-1", "fp-a", "d1", T0
    )
    assert await ledger.idempotency_key("acct-2001", "key-2") is None


@pytest.mark.parametrize(
    ("first", "outcome", "used", "reserved"),
    [
        (None, ReserveOutcome.IN_PROGRESS, 0, 8),  # the first attempt is still in flight
        ("commit", ReserveOutcome.REPLAYED, 8, 0),  # retried after a 2xx
        ("settle_unknown", ReserveOutcome.REPLAYED, 8, 0),  # retried after a timeout
    ],
)
async def test_a_retry_with_the_same_request_is_never_counted_twice(
    ledger: Ledger, first: str | None, outcome: ReserveOutcome, used: int, reserved: int
) -> None:
    """Same key, same fingerprint: nothing is reserved again, and the answer names the first
    decision; the key stays bound to it."""
    await reserve_keyed(ledger, "d1", 8)
    if first:
        await _settle(ledger, first, "d1")
    result = await reserve_keyed(ledger, "d2", 8, now=T0 + 20)
    assert (result.outcome, result.replay_of) == (outcome, "d1")
    assert (result.used, result.reserved) == (used, reserved)
    assert await counters(ledger) == (used, reserved)
    assert await ledger.reservation("d2") is None
    bound = await ledger.idempotency_key("acct-2001", "key-1")
    assert bound is not None
    assert (bound.decision_id, bound.bound_at) == ("d1", T0)


async def test_a_retry_after_a_release_reserves_anew_and_moves_the_key(ledger: Ledger) -> None:
    """The first attempt failed upstream (released, nothing counted): the retry reserves, and
    the key points at it, so the retry's own retry replays the retry."""
    await reserve_keyed(ledger, "d1", 8)
    await ledger.release("d1", T0 + 1)
    result = await reserve_keyed(ledger, "d2", 8, now=T0 + 20)
    assert (result.outcome, result.replay_of, result.reserved) == (ReserveOutcome.RESERVED, None, 8)
    assert await ledger.idempotency_key("acct-2001", "key-1") == IdempotencyKey(
        "acct-2001", "key-1", "fp-a", "d2", T0 + 20
    )
    await ledger.commit("d2", T0 + 21)
    again = await reserve_keyed(ledger, "d3", 8, now=T0 + 30)
    assert (again.outcome, again.replay_of) == (ReserveOutcome.REPLAYED, "d2")
    assert await counters(ledger) == (8, 0)


async def test_give_back_refuses_a_reservation_a_retry_was_counted_on_recently(
    ledger: Ledger,
) -> None:
    """Found by QA: staff gave back a reservation while a retry counted on it (REPLAYED) was
    under way; its units went to another launch at once, and the retry launched too (2 of 1).
    A retry marks the reservation; give_back refuses it within ``replays_within_s`` of that."""
    await reserve_keyed(ledger, "d1", 8)
    await ledger.settle_unknown("d1", T0 + 1, "timeout")
    retry = await reserve_keyed(ledger, "d2", 8, now=T0 + 2)
    assert retry.outcome is ReserveOutcome.REPLAYED
    with pytest.raises(ValueError, match="retry of decision d1 was counted on"):
        await ledger.give_back("d1", now=T0 + 30, note=None, replays_within_s=60)
    assert await counters(ledger) == (8, 0)
    given = await ledger.give_back("d1", now=T0 + 63, note=None, replays_within_s=60)
    assert given.state == "released"
    assert await counters(ledger) == (0, 0)


async def test_a_retry_after_give_back_reserves_anew(ledger: Ledger) -> None:
    """Staff gave back an unknown outcome (nothing launched): a retry is a new launch."""
    await reserve_keyed(ledger, "d1", 8)
    await ledger.settle_unknown("d1", T0 + 1, "timeout")
    await ledger.give_back("d1", now=T0 + 2, note=None)
    result = await reserve_keyed(ledger, "d2", 8, now=T0 + 3)
    assert result.outcome is ReserveOutcome.RESERVED
    assert await counters(ledger) == (0, 8)


@pytest.mark.parametrize("first", [None, "commit", "release", "settle_unknown"])
async def test_the_same_key_on_another_request_is_a_conflict(
    ledger: Ledger, first: str | None
) -> None:
    """Same key, different fingerprint: CONFLICT whatever became of the first reservation;
    nothing reserved, the key keeps its binding."""
    await reserve_keyed(ledger, "d1", 8)
    if first:
        await _settle(ledger, first, "d1")
    before = await counters(ledger)
    result = await reserve_keyed(ledger, "d2", 8, fingerprint="fp-b", now=T0 + 20)
    assert (result.outcome, result.replay_of) == (ReserveOutcome.CONFLICT, "d1")
    assert await counters(ledger) == before
    assert await ledger.reservation("d2") is None
    bound = await ledger.idempotency_key("acct-2001", "key-1")
    assert bound is not None
    assert (bound.fingerprint, bound.decision_id) == ("fp-a", "d1")


async def test_a_replay_needs_no_capacity(ledger: Ledger) -> None:
    """The retry of a launch that used the last units is allowed: it was counted already."""
    await reserve_keyed(ledger, "d1", 64)
    await ledger.settle_unknown("d1", T0 + 1, "timeout")
    result = await reserve_keyed(ledger, "d2", 64, now=T0 + 2)
    assert (result.outcome, result.remaining) == (ReserveOutcome.REPLAYED, 0)


async def test_revocation_denies_a_replay_too(ledger: Ledger) -> None:
    """A revoked license is revoked for retries as well; the key is left as it was."""
    await reserve_keyed(ledger, "d1", 8)
    await ledger.commit("d1", T0 + 1)
    await ledger.revoke("lic-42", reason=None, now=T0 + 2)
    result = await reserve_keyed(ledger, "d2", 8, now=T0 + 3)
    assert (result.outcome, result.replay_of) == (ReserveOutcome.REVOKED, None)


async def test_an_exhausted_launch_binds_no_key(ledger: Ledger) -> None:
    """Only a reservation binds a key: after an exhausted attempt, the key is free for any
    request."""
    await reserve(ledger, "d0", 64)
    result = await reserve_keyed(ledger, "d1", 8)
    assert (result.outcome, result.replay_of) == (ReserveOutcome.EXHAUSTED, None)
    assert await ledger.idempotency_key("acct-2001", "key-1") is None
    await ledger.release("d0", T0 + 1)
    other = await reserve_keyed(ledger, "d2", 8, fingerprint="fp-b", now=T0 + 2)
    assert other.outcome is ReserveOutcome.RESERVED


async def test_an_exhausted_retry_after_a_release_keeps_the_old_binding(ledger: Ledger) -> None:
    """A retry that finds no capacity leaves the key on the released reservation."""
    await reserve_keyed(ledger, "d1", 8)
    await ledger.release("d1", T0 + 1)
    await reserve(ledger, "d0", 64)
    result = await reserve_keyed(ledger, "d2", 8, now=T0 + 2)
    assert result.outcome is ReserveOutcome.EXHAUSTED
    bound = await ledger.idempotency_key("acct-2001", "key-1")
    assert bound is not None
    assert bound.decision_id == "d1"


async def test_keys_are_scoped_per_account(ledger: Ledger) -> None:
    """Two accounts may use one key string: each reserves, each has its own binding."""
    first = await reserve_keyed(ledger, "d1", 8, account="acct-2001", jti="lic-a")
    second = await reserve_keyed(
        ledger, "d2", 8, account="acct-2002", jti="lic-b", fingerprint="fp-b"
    )
    assert (first.outcome, second.outcome) == (ReserveOutcome.RESERVED, ReserveOutcome.RESERVED)
    bound_a = await ledger.idempotency_key("acct-2001", "key-1")
    bound_b = await ledger.idempotency_key("acct-2002", "key-1")
    assert bound_a is not None
    assert bound_b is not None
    assert (bound_a.decision_id, bound_b.decision_id) == ("d1", "d2")


async def test_a_key_without_a_fingerprint_is_refused(ledger: Ledger) -> None:
    """A key is only meaningful with the request it names; one without the other is a bug."""
    with pytest.raises(ValueError, match="fingerprint"):
        await ledger.reserve(
            jti="lic-42",
            account="acct-2001",
            max_accelerators=64,
            expires=EXPIRES,
            amount=8,
            decision_id="d1",
            now=T0,
            idempotency_key="key-1",
        )
    assert await ledger.license("lic-42") is None


async def test_a_reused_decision_id_binds_no_key(ledger: Ledger) -> None:
    """A reserve that fails on a reused decision id leaves no key behind."""
    await reserve(ledger, "d1", 8)
    with pytest.raises(ValueError, match="d1"):
        await reserve_keyed(ledger, "d1", 8, key="key-2")
    assert await ledger.idempotency_key("acct-2001", "key-2") is None


async def test_concurrent_attempts_with_one_key_reserve_once(ledger: Ledger) -> None:
    """50 concurrent attempts with one key: exactly one reserves; the rest are told the first
    is in progress, naming it."""
    results = await asyncio.gather(*(reserve_keyed(ledger, f"d{i}", 8) for i in range(50)))
    winners = [f"d{i}" for i, r in enumerate(results) if r.outcome is ReserveOutcome.RESERVED]
    assert len(winners) == 1
    losers = [r for r in results if r.outcome is not ReserveOutcome.RESERVED]
    assert {(r.outcome, r.replay_of) for r in losers} == {(ReserveOutcome.IN_PROGRESS, winners[0])}
    assert await counters(ledger) == (0, 8)


async def test_concurrent_attempts_with_one_key_under_two_licenses_reserve_once(
    ledger: Ledger,
) -> None:
    """Retries presenting different licenses still share the key: one reservation in all."""
    results = await asyncio.gather(
        *(reserve_keyed(ledger, f"d{i}", 8, jti="lic-a" if i % 2 else "lic-b") for i in range(40))
    )
    assert [r.outcome for r in results].count(ReserveOutcome.RESERVED) == 1
    totals = [await counters(ledger, jti) for jti in ("lic-a", "lic-b")]
    assert sorted(totals) == [(0, 0), (0, 8)]


async def test_two_processes_racing_with_one_key_reserve_once(
    ledger_pair: tuple[Ledger, Ledger],
) -> None:
    """Two replicas receiving the same retried launch at once: one reservation."""
    first, second = ledger_pair
    results = await asyncio.gather(
        *(reserve_keyed(first, f"a{i}", 8) for i in range(25)),
        *(reserve_keyed(second, f"b{i}", 8) for i in range(25)),
    )
    assert [r.outcome for r in results].count(ReserveOutcome.RESERVED) == 1
    assert await counters(first) == (0, 8)


async def test_confirm_turns_an_unknown_outcome_into_use(ledger: Ledger) -> None:
    """A retry's 2xx confirms a settled_unknown reservation as used; counters do not move and
    it can no longer be given back."""
    await reserve_keyed(ledger, "d1", 8)
    await ledger.settle_unknown("d1", T0 + 1, "upstream timed out")
    assert await ledger.confirm("d1", T0 + 5, "confirmed by retry d2") is True
    reservation = await ledger.reservation("d1")
    assert reservation is not None
    assert (reservation.state, reservation.settled_at, reservation.note) == (
        "used",
        T0 + 5,
        "upstream timed out; confirmed by retry d2",
    )
    assert await counters(ledger) == (8, 0)
    assert await ledger.confirm("d1", T0 + 6, "again") is False
    with pytest.raises(ValueError, match="'used'"):
        await ledger.give_back("d1", now=T0 + 7, note=None)


@pytest.mark.parametrize("settle", [None, "commit", "release"])
async def test_confirm_changes_nothing_else(ledger: Ledger, settle: str | None) -> None:
    """Only settled_unknown is confirmed: reserved, used and released stay as they are."""
    await reserve_keyed(ledger, "d1", 8)
    if settle:
        await _settle(ledger, settle, "d1")
    before = (await ledger.reservation("d1"), await ledger.license("lic-42"))
    assert await ledger.confirm("d1", T0 + 50, "confirmed") is False
    assert await ledger.confirm("never-reserved", T0 + 50, "confirmed") is False
    assert (await ledger.reservation("d1"), await ledger.license("lic-42")) == before


# --- abandon (the reservation call failed; nothing was forwarded) ----------------------------

ABANDON_NOTE = "the reservation call failed; nothing was forwarded"


async def abandon(
    ledger: Ledger, decision_id: str, *, jti: str = "lic-42", now: float = T0 + 10
) -> None:
    await ledger.abandon(decision_id, jti, now=now, note=ABANDON_NOTE)


async def test_abandon_releases_what_the_failed_call_reserved(ledger: Ledger) -> None:
    """The call reserved but its answer was lost: abandon releases it (the units are back,
    the note says why); abandoning it again changes nothing."""
    await reserve(ledger, "d0", 8)
    await reserve(ledger, "d1", 16)
    await abandon(ledger, "d1")
    assert await counters(ledger) == (0, 8)
    abandoned = await ledger.reservation("d1")
    assert abandoned == Reservation("d1", "lic-42", 16, "released", T0, T0 + 10, ABANDON_NOTE)
    await abandon(ledger, "d1", now=T0 + 20)
    assert await ledger.reservation("d1") == abandoned
    assert await counters(ledger) == (0, 8)


@pytest.mark.parametrize("keyed", [False, True], ids=["plain", "keyed"])
async def test_a_reservation_arriving_after_abandon_is_refused_and_reserves_nothing(
    ledger: Ledger, keyed: bool
) -> None:
    """The call was still on its way when abandon ran: a placeholder takes the decision id,
    and the late reserve is refused as a reused decision id is, reserving nothing and binding
    no idempotency key."""
    await reserve(ledger, "d0", 8)
    await abandon(ledger, "d1")
    placeholder = Reservation("d1", "lic-42", 0, "released", T0 + 10, T0 + 10, ABANDON_NOTE)
    assert await ledger.reservation("d1") == placeholder
    with pytest.raises(ValueError, match="d1"):
        await (reserve_keyed(ledger, "d1", 16) if keyed else reserve(ledger, "d1", 16))
    assert await counters(ledger) == (0, 8)
    assert await ledger.reservation("d1") == placeholder
    assert await ledger.idempotency_key("acct-2001", "key-1") is None


async def test_abandon_under_a_license_never_seen(ledger: Ledger) -> None:
    """A license the ledger never heard of gets a row without account, maximum or expiry (as
    an early revoke makes); the late reserve completes nothing, the license's first real
    reservation completes it."""
    await abandon(ledger, "d1", jti="lic-new")
    state = await ledger.license("lic-new")
    assert state == LicenseState(
        jti="lic-new",
        account=None,
        max_accelerators=None,
        used=0,
        reserved=0,
        revoked=False,
        revoked_reason=None,
        revoked_at=None,
        expires=None,
        first_seen=None,
    )
    with pytest.raises(ValueError, match="d1"):
        await reserve(ledger, "d1", 8, jti="lic-new")
    assert await ledger.license("lic-new") == state
    result = await reserve(ledger, "d2", 8, jti="lic-new", now=T0 + 20)
    assert (result.outcome, result.reserved) == (ReserveOutcome.RESERVED, 8)
    completed = await ledger.license("lic-new")
    assert completed is not None
    assert (completed.account, completed.max_accelerators, completed.first_seen) == (
        "acct-2001",
        64,
        T0 + 20,
    )


async def test_abandon_gives_back_what_the_sweeper_counted_as_used(ledger: Ledger) -> None:
    """The late reservation outlived the TTL and was settled as used: abandon knows nothing
    was forwarded, so it is released and leaves ``used``."""
    await reserve(ledger, "d1", 16)
    assert await ledger.expire_reservations(now=T0 + 400, ttl_s=300) == ["d1"]
    assert await counters(ledger) == (16, 0)
    await abandon(ledger, "d1", now=T0 + 401)
    assert await counters(ledger) == (0, 0)
    reservation = await ledger.reservation("d1")
    assert reservation is not None
    assert (reservation.state, reservation.settled_at, reservation.note) == (
        "released",
        T0 + 401,
        f"outcome unknown: still reserved after 300 s; {ABANDON_NOTE}",
    )


async def test_abandon_keeps_counted_what_a_retry_replayed(ledger: Ledger) -> None:
    """Settled as used and bound to an idempotency key: a retry under the key may have been
    counted on it (REPLAYED) and forwarded, so it stays counted."""
    await reserve_keyed(ledger, "d1", 8)
    await ledger.expire_reservations(now=T0 + 400, ttl_s=300)
    assert (await reserve_keyed(ledger, "d2", 8, now=T0 + 401)).outcome is ReserveOutcome.REPLAYED
    before = await ledger.reservation("d1")
    await abandon(ledger, "d1", now=T0 + 402)
    assert await ledger.reservation("d1") == before
    assert await counters(ledger) == (8, 0)


async def test_abandon_finds_a_reservation_s_keys_by_index(tmp_path: Path) -> None:
    """Whether a key is bound to a reservation was read from the whole keys table (a row
    for every keyed launch ever made); SQLite's plan for abandon's query now searches an index."""
    path = tmp_path / "ledger.sqlite3"
    store = SqliteLedger(path)
    await store.open()
    try:
        for i in range(20):
            await reserve_keyed(store, f"d{i}", 1, key=f"key-{i}")
    finally:
        await store.close()
    with contextlib.closing(sqlite3.connect(path)) as conn:
        plan = [row[3] for row in conn.execute("EXPLAIN QUERY PLAN " + SQLITE_ABANDONED, ("d3",))]
    assert any("idempotency_keys_by_decision" in step for step in plan), plan
    assert not any(step.startswith("SCAN") for step in plan), plan


@pytest.mark.parametrize("settle", ["commit", "release"])
async def test_abandon_leaves_a_used_or_released_reservation(ledger: Ledger, settle: str) -> None:
    """A reservation already used or released stays as it is, note and counters too."""
    await reserve(ledger, "d1", 16)
    await _settle(ledger, settle, "d1")
    before = (await ledger.reservation("d1"), await ledger.license("lic-42"))
    await abandon(ledger, "d1", now=T0 + 50)
    assert (await ledger.reservation("d1"), await ledger.license("lic-42")) == before


async def test_abandon_racing_the_late_reservation_leaves_nothing_held(
    ledger_pair: tuple[Ledger, Ledger],
) -> None:
    """Late reservations and their abandons reach the store at once from two processes:
    whichever comes first, every one ends released and the license holds nothing."""
    late, gateway = ledger_pair
    results = await asyncio.gather(
        *(
            call
            for i in range(30)
            for call in (
                reserve(late, f"d{i}", 1, now=T0 + i),
                abandon(gateway, f"d{i}", now=T0 + 100),
            )
        ),
        return_exceptions=True,
    )
    for result in results:
        assert result is None or isinstance(result, ReserveResult | ValueError), result
    assert await counters(late) == (0, 0)
    for i in range(30):
        reservation = await late.reservation(f"d{i}")
        assert reservation is not None
        assert reservation.state == "released"


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_a_version_1_store_is_upgraded_in_place(tmp_path: Path, store: str) -> None:
    """A ledger written before idempotency keys is migrated on open, keeping its data."""
    if store == "sqlite":
        path = tmp_path / "ledger.sqlite3"
        with sqlite3.connect(path) as conn:
            for statement in sqlite_migrations[0][1]:
                conn.execute(statement)
            conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
            conn.execute("INSERT INTO schema_version (version) VALUES (1)")
            for statement in V1_ROWS:
                conn.execute(statement.replace("launchgate_", ""))
        conn.close()
        await _reserve_then_upgrade(SqliteLedger(path))
        return
    async with postgres_schema() as url:
        dsn = os.environ[POSTGRES_DSN_VAR]
        schema = url.rpartition("schema=")[2]
        conn = await asyncpg.connect(dsn, timeout=5)
        try:
            await conn.execute(f'CREATE SCHEMA "{schema}"')
            await conn.execute(f'SET search_path = "{schema}"')
            for statement in pg_migrations[0][1]:
                await conn.execute(statement)
            await conn.execute("CREATE TABLE launchgate_schema_version (version integer NOT NULL)")
            await conn.execute("INSERT INTO launchgate_schema_version (version) VALUES (1)")
            for statement in V1_ROWS:
                await conn.execute(statement)
        finally:
            await conn.close()
        await _reserve_then_upgrade(PostgresLedger(url))


# A license with one used reservation, as a version 1 store holds it (times are T0, EXPIRES).
V1_ROWS = (
    "INSERT INTO launchgate_licenses (jti, account, max_accelerators, expires, first_seen, used)"
    " VALUES ('lic-42', 'acct-2001', 64, 1807776000.0, 1800000000.0, 8)",
    "INSERT INTO launchgate_reservations (decision_id, jti, amount, state, created_at)"
    " VALUES ('d0', 'lic-42', 8, 'used', 1800000000.0)",
)


async def _reserve_then_upgrade(store: Ledger) -> None:
    async with open_stores(store):
        old = await store.reservation("d0")
        assert old is not None
        assert (old.amount, old.state) == (8, "used")
        await reserve_keyed(store, "d1", 8)
        await store.commit("d1", T0 + 1)
        replay = await reserve_keyed(store, "d2", 8, now=T0 + 2)
        assert (replay.outcome, replay.replay_of) == (ReserveOutcome.REPLAYED, "d1")
        assert await counters(store) == (16, 0)


# --- SQLite group commit --------------------------------------------------------------------


@contextlib.asynccontextmanager
async def held_ledger_thread(
    store: SqliteLedger, path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[list[int]]:
    """Keep the ledger thread busy (a first reserve waiting for a write lock held by another
    process) while the body queues calls; release on exit. Yields the sizes of the batches that
    then run together."""
    sizes: list[int] = []
    run_together = store._run_together

    def spy(batch: list[Any]) -> Any:
        sizes.append(len(batch))
        return run_together(batch)

    monkeypatch.setattr(store, "_run_together", spy)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        first = asyncio.create_task(reserve(store, "first", 8))
        await asyncio.sleep(0.1)  # the first call is on the thread, waiting for the lock
        yield sizes
        await asyncio.sleep(0)  # let the body's tasks queue their calls
        other.execute("COMMIT")
        assert (await first).outcome is ReserveOutcome.RESERVED
    finally:
        other.close()


@pytest.fixture
async def sqlite_store(tmp_path: Path) -> AsyncIterator[SqliteLedger]:
    store = SqliteLedger(tmp_path / "ledger.sqlite3")
    async with open_stores(store):
        yield store


async def _when_started(fn: Callable[..., Awaitable[Any]], *args: Any) -> Any:
    """A coroutine that calls ``fn`` only once its task starts, in the order tasks start."""
    return await fn(*args)


async def test_calls_queued_behind_a_busy_thread_run_as_one_batch_each_with_its_own_answer(
    sqlite_store: SqliteLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Queued calls run together in arrival order; when one is refused (ValueError,
    LookupError), the batch is rolled back and each runs again alone: the refused one's writes
    are undone, and each caller gets the result or exception it would have got alone."""

    def revoke_then_refuse(conn: sqlite3.Connection) -> None:
        conn.execute("UPDATE licenses SET revoked = 1")
        raise ValueError("refused after writing")

    async with held_ledger_thread(sqlite_store, sqlite_store.path, monkeypatch) as sizes:
        calls = [
            reserve(sqlite_store, "a", 48),
            sqlite_store._call(revoke_then_refuse),  # its write is undone with it
            reserve(sqlite_store, "a", 8),  # decision id reused: ValueError, nothing reserved
            reserve(sqlite_store, "b", 8),  # fits exactly after 'first' (8) and 'a' (48)
            sqlite_store.give_back("nope", now=T0, note=None),  # LookupError
            reserve(sqlite_store, "c", 1),  # the license is full by now
            _when_started(sqlite_store.commit, "b", T0 + 1),  # (submits when it is called)
            sqlite_store.license("lic-42"),
        ]
        tasks = [asyncio.create_task(call) for call in calls]
    a, refused, a_again, b, nope, c, _, state = await asyncio.gather(*tasks, return_exceptions=True)
    assert sizes == [len(calls)]
    assert isinstance(refused, ValueError)
    assert isinstance(a, ReserveResult)
    assert isinstance(b, ReserveResult)
    assert isinstance(c, ReserveResult)
    assert (a.outcome, b.outcome, c.outcome) == (
        ReserveOutcome.RESERVED,
        ReserveOutcome.RESERVED,
        ReserveOutcome.EXHAUSTED,
    )
    assert isinstance(a_again, ValueError)
    assert isinstance(nope, LookupError)
    assert isinstance(state, LicenseState)
    assert (state.used, state.reserved) == (8, 56)  # the read saw the batch's earlier writes
    assert await counters(sqlite_store) == (8, 56)


async def test_a_store_error_in_one_batched_call_leaves_the_others_their_answers(
    sqlite_store: SqliteLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sqlite3 error inside one call rolls the batch back; every call then runs alone, so
    only the failing one is StoreUnavailable."""
    broken = sqlite_store._call(lambda conn: conn.execute("SELECT * FROM no_such_table"))
    async with held_ledger_thread(sqlite_store, sqlite_store.path, monkeypatch) as sizes:
        tasks = [
            asyncio.create_task(reserve(sqlite_store, "a", 8)),
            asyncio.create_task(broken),
            asyncio.create_task(reserve(sqlite_store, "b", 8)),
        ]
    a, error, b = await asyncio.gather(*tasks, return_exceptions=True)
    assert sizes == [3]
    assert isinstance(error, StoreUnavailable)
    assert isinstance(error.__cause__, sqlite3.Error)
    assert isinstance(a, ReserveResult)
    assert isinstance(b, ReserveResult)
    assert (a.outcome, b.outcome) == (ReserveOutcome.RESERVED, ReserveOutcome.RESERVED)
    assert await counters(sqlite_store) == (0, 24)


async def test_a_caller_cancelled_before_its_batch_is_never_run(
    sqlite_store: SqliteLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """As with a thread pool: a call cancelled while it waits for the thread does nothing."""
    async with held_ledger_thread(sqlite_store, sqlite_store.path, monkeypatch):
        gone = asyncio.create_task(reserve(sqlite_store, "gone", 8))
        kept = asyncio.create_task(reserve(sqlite_store, "kept", 8))
        await asyncio.sleep(0)
        gone.cancel()
    assert (await kept).outcome is ReserveOutcome.RESERVED
    assert gone.cancelled()
    assert await sqlite_store.reservation("gone") is None


async def test_close_lets_queued_calls_finish(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """close() while calls wait for the thread: they complete, then the ledger is closed."""
    store = SqliteLedger(tmp_path / "ledger.sqlite3")
    await store.open()
    async with held_ledger_thread(store, store.path, monkeypatch):
        queued = asyncio.create_task(reserve(store, "queued", 8))
        await asyncio.sleep(0)
        closing = asyncio.create_task(store.close())
    await closing
    assert (await queued).outcome is ReserveOutcome.RESERVED
    with pytest.raises(StoreUnavailable, match="closed"):
        await store.ping()
    again = SqliteLedger(store.path)
    async with open_stores(again):
        assert await again.reservation("queued") is not None


async def test_a_batch_that_cannot_begin_fails_at_once(tmp_path: Path) -> None:
    """A write lock held past the busy timeout fails a whole batch after one wait, not one wait
    per call."""
    path = tmp_path / "ledger.sqlite3"
    store = SqliteLedger(path, busy_timeout_s=0.2)
    await store.open()
    other = sqlite3.connect(path, isolation_level=None)
    try:
        other.execute("BEGIN IMMEDIATE")
        started = time.monotonic()
        results = await asyncio.gather(
            *(reserve(store, f"d{i}", 8) for i in range(20)), return_exceptions=True
        )
        elapsed = time.monotonic() - started
        assert all(isinstance(r, StoreUnavailable) for r in results)
        assert elapsed < 2.0  # one call alone, then one batch; 20 waits would take 4 s
    finally:
        other.close()
        await store.close()


# --- store failures -----------------------------------------------------------------------


async def test_a_lock_held_past_the_busy_timeout_is_store_unavailable(tmp_path: Path) -> None:
    """A write lock that is not released in time fails closed as StoreUnavailable."""
    async with another_connection_beside(tmp_path / "ledger.sqlite3", busy_timeout_s=0.2) as (
        store,
        other,
    ):
        other.execute("BEGIN IMMEDIATE")
        with pytest.raises(StoreUnavailable) as caught:
            await reserve(store, "d1", 8)
        assert isinstance(caught.value.__cause__, sqlite3.Error)
        other.execute("ROLLBACK")
        # Once the lock is gone the same ledger works again, from its next try on (a second on).
        await asyncio.sleep(1.0)
        assert (await reserve(store, "d1", 8)).outcome is ReserveOutcome.RESERVED


def _directory_in_place_of_the_file(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.sqlite3"
    path.mkdir()
    return path


def _file_in_place_of_the_folder(tmp_path: Path) -> Path:
    (tmp_path / "data").write_text("not a folder")
    return tmp_path / "data" / "ledger.sqlite3"


def _not_a_database(tmp_path: Path) -> Path:
    path = tmp_path / "ledger.sqlite3"
    path.write_bytes(b"this is not an SQLite database, just some bytes " * 100)
    return path


_CALLS: dict[str, Callable[[SqliteLedger], Awaitable[object]]] = {
    "open": lambda store: store.open(),
    "ping": lambda store: store.ping(),
    "reserve": lambda store: reserve(store, "d1", 8),
    "revoke": lambda store: store.revoke("lic-42", reason=None, now=T0),
    "licenses": lambda store: store.licenses(),
}


@pytest.mark.parametrize(
    "make_path", [_directory_in_place_of_the_file, _file_in_place_of_the_folder, _not_a_database]
)
@pytest.mark.parametrize("call", sorted(_CALLS))
async def test_an_unusable_path_raises_store_unavailable(
    tmp_path: Path, make_path: Callable[[Path], Path], call: str
) -> None:
    """Whatever makes the file unusable, every call raises StoreUnavailable, never sqlite3."""
    store = SqliteLedger(make_path(tmp_path))
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await _CALLS[call](store)
        assert isinstance(caught.value.__cause__, (sqlite3.Error, OSError))
    finally:
        await store.close()


async def test_a_closed_ledger_is_unavailable(tmp_path: Path) -> None:
    """After close() every call raises StoreUnavailable; close() twice is harmless."""
    store = SqliteLedger(tmp_path / "ledger.sqlite3")
    await store.open()
    await store.close()
    await store.close()
    with pytest.raises(StoreUnavailable):
        await store.ping()


async def test_data_survives_reopening(tmp_path: Path) -> None:
    """A restarted gateway finds its ledger as it left it; open() on an existing schema is safe."""
    path = tmp_path / "ledger.sqlite3"
    store = SqliteLedger(path)
    await store.open()
    await reserve(store, "d1", 8)
    await store.close()
    again = SqliteLedger(path)
    await again.open()
    try:
        reservation = await again.reservation("d1")
        assert reservation is not None
        assert reservation.state == "reserved"
    finally:
        await again.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [
            (SQLITE_SCHEMA_VERSION,)
        ]
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    conn.close()


async def test_a_newer_schema_is_refused(tmp_path: Path) -> None:
    """A ledger written by a newer launchgate is not used blindly."""
    path = tmp_path / "ledger.sqlite3"
    store = SqliteLedger(path)
    await store.open()
    await store.close()
    with sqlite3.connect(path) as conn:
        conn.execute("UPDATE schema_version SET version = 99")
    conn.close()
    newer = SqliteLedger(path)
    try:
        with pytest.raises(StoreUnavailable, match="schema version 99"):
            await newer.open()
    finally:
        await newer.close()


# --- open_ledger --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("sqlite:data/ledger.sqlite3", "BASE/data/ledger.sqlite3"),
        ("sqlite:ledger.db", "BASE/ledger.db"),
        ("sqlite:/var/lib/launchgate/ledger.db", "/var/lib/launchgate/ledger.db"),
        ("sqlite:///var/lib/launchgate/ledger.db", "/var/lib/launchgate/ledger.db"),
        ("SQLite:data/ledger.sqlite3", "BASE/data/ledger.sqlite3"),
    ],
)
def test_open_ledger_resolves_sqlite_paths(tmp_path: Path, url: str, expected: str) -> None:
    """A sqlite url is relative to the config file's folder unless absolute."""
    store = open_ledger(url, tmp_path)
    assert isinstance(store, SqliteLedger)
    assert store.path == Path(expected.replace("BASE", str(tmp_path)))
    assert not store.path.exists()  # open_ledger does not connect


@pytest.mark.parametrize(
    ("url", "schema"),
    [
        ("postgresql://gate@db:5432/launchgate", None),
        ("postgres://gate:pw@db/launchgate?sslmode=disable", None),
        ("PostgreSQL://gate@db/launchgate?schema=gate_ledger", "gate_ledger"),
        ("postgresql:///launchgate?host=/run/postgresql&schema=_x1", "_x1"),
    ],
)
def test_open_ledger_selects_postgresql(tmp_path: Path, url: str, schema: str | None) -> None:
    """A postgresql:// or postgres:// url selects PostgreSQL, with its ?schema=; no connection."""
    store = open_ledger(url, tmp_path)
    assert isinstance(store, PostgresLedger)
    assert store.schema == schema


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("postgresql://gate@db/launchgate?schema=Ledger", "'schema' must be one lower-case"),
        ("postgresql://gate@db/launchgate?schema=a;b", "'schema' must be one lower-case"),
        ("postgresql://gate@db/launchgate?schema=", "'schema' must be one lower-case"),
        ("postgresql://gate@db/launchgate?schema=a&schema=b", "'schema' must be one lower-case"),
        ("redis://localhost/0", "'redis://localhost/0'"),
        ("ledger.sqlite3", "'ledger.sqlite3'"),
        ("sqlite:", "no database file"),
        ("sqlite://host/ledger.db", "not a host"),
        ("sqlite::memory:", "in-memory"),
    ],
)
def test_open_ledger_rejects_other_urls(tmp_path: Path, url: str, message: str) -> None:
    """Unsupported or malformed store urls are a ConfigError naming the url."""
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        open_ledger(url, tmp_path)


def test_open_ledger_never_shows_a_database_password(tmp_path: Path) -> None:
    """A password in a PostgreSQL url does not reach the error message."""
    with pytest.raises(ConfigError) as caught:
        open_ledger("postgresql://gate:s3cret@db:5432/launchgate?schema=Bad", tmp_path)
    assert "s3cret" not in str(caught.value)
    assert "gate:***@db:5432" in str(caught.value)


# --- migrate_store (launchgate store migrate) ------------------------------------------------


async def test_migrate_store_creates_a_sqlite_ledger(tmp_path: Path) -> None:
    """Migrating a SQLite store creates the file at the latest schema; again is a no-op."""
    assert await migrate_store("sqlite:data/ledger.sqlite3", tmp_path) == SQLITE_SCHEMA_VERSION
    assert await migrate_store("sqlite:data/ledger.sqlite3", tmp_path) == SQLITE_SCHEMA_VERSION
    with sqlite3.connect(tmp_path / "data" / "ledger.sqlite3") as conn:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [
            (SQLITE_SCHEMA_VERSION,)
        ]
    conn.close()


async def test_migrate_store_reports_an_unusable_store(tmp_path: Path) -> None:
    """A store that cannot be opened is StoreUnavailable; a bad url is a ConfigError."""
    (tmp_path / "ledger.sqlite3").mkdir()
    with pytest.raises(StoreUnavailable):
        await migrate_store("sqlite:ledger.sqlite3", tmp_path)
    with pytest.raises(ConfigError):
        await migrate_store("redis://localhost/0", tmp_path)
