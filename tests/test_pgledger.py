"""The PostgreSQL ledger beyond the conformance suite: schema migrations, several replicas at once,
an unreachable database, and recovery without a restart.

Needs ``LAUNCHGATE_TEST_POSTGRES_DSN`` (a TCP url on 127.0.0.1); every test here that touches a
database skips without it. Each test works in a fresh schema that is dropped afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information
import pytest
import structlog

from launchgate.errors import StoreUnavailable
from launchgate.ledger import ReserveOutcome, ReserveResult, migrate_store, open_ledger
from launchgate.pgledger import SCHEMA_VERSION, PostgresLedger, _open
from test_ledger import (
    POSTGRES_DSN_VAR,
    T0,
    counters,
    open_stores,
    postgres_schema,
    reserve,
    reserve_keyed,
)


@pytest.fixture
async def url() -> AsyncIterator[str]:
    """A store url on a fresh, not yet created schema of the test database."""
    async with postgres_schema() as schema_url:
        yield schema_url


def postgres_dsn() -> str:
    """The test database's url; skips the test without one."""
    dsn = os.environ.get(POSTGRES_DSN_VAR)
    if not dsn:
        pytest.skip(f"set {POSTGRES_DSN_VAR} to run the PostgreSQL ledger tests")
    return dsn


@contextlib.asynccontextmanager
async def connect(url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to the test database in ``url``'s schema, to look behind the ledger's
    back."""
    conn = await asyncpg.connect(
        postgres_dsn(), timeout=5, server_settings={"search_path": schema_of(url)}
    )
    try:
        yield conn
    finally:
        await conn.close()


async def hold_row(conn: asyncpg.Connection, jti: str = "lic-42") -> None:
    """Lock a license row as a stuck transaction elsewhere would (inside a transaction)."""
    await conn.execute("SELECT 1 FROM launchgate_licenses WHERE jti = $1 FOR UPDATE", jti)


@contextlib.asynccontextmanager
async def two_licenses(url: str) -> AsyncIterator[tuple[PostgresLedger, asyncpg.Connection]]:
    """A ledger (2 s timeout) with one reservation under lic-42 (a0) and one under lic-43 (b0),
    and another session's connection to hold a license row with (``hold_row``)."""
    store = PostgresLedger(url, timeout_s=2.0)
    async with open_stores(store), connect(url) as conn:
        await reserve(store, "a0", 1)
        await reserve(store, "b0", 1, jti="lic-43")
        yield store, conn


def schema_of(url: str) -> str:
    return url.rpartition("schema=")[2]


# --- migrations -----------------------------------------------------------------------------


async def test_open_creates_the_schema_and_its_tables(url: str) -> None:
    """open() creates the ?schema= schema and the launchgate_* tables in it, at the latest
    version; nothing lands in the default schema."""
    store = PostgresLedger(url)
    async with open_stores(store), connect(url) as conn:
        tables = await conn.fetch(
            "SELECT table_schema, table_name FROM information_schema.tables"
            " WHERE table_name LIKE 'launchgate%' AND table_schema = $1 ORDER BY table_name",
            schema_of(url),
        )
        assert [row["table_name"] for row in tables] == [
            "launchgate_idempotency_keys",
            "launchgate_licenses",
            "launchgate_reservations",
            "launchgate_schema_version",
        ]
        version = await conn.fetch("SELECT version FROM launchgate_schema_version")
        assert [row["version"] for row in version] == [SCHEMA_VERSION]


async def test_migrate_is_idempotent(url: str) -> None:
    """migrate() on a migrated store changes nothing and reports the same version."""
    store = PostgresLedger(url)
    async with open_stores(store):
        await reserve(store, "d1", 8)
        assert await store.migrate() == SCHEMA_VERSION
        assert await store.migrate() == SCHEMA_VERSION
        reservation = await store.reservation("d1")
        assert reservation is not None
        assert reservation.state == "reserved"


async def test_replicas_migrating_at_once_all_succeed(url: str) -> None:
    """Five replicas starting together on an empty database: each migrates (in turn), none
    fails, and the schema is recorded once."""
    replicas = [PostgresLedger(url) for _ in range(5)]
    try:
        versions = await asyncio.gather(*(replica.migrate() for replica in replicas))
        assert versions == [SCHEMA_VERSION] * 5
    finally:
        for replica in replicas:
            await replica.close()
    async with connect(url) as conn:
        rows = await conn.fetch("SELECT version FROM launchgate_schema_version")
        assert [row["version"] for row in rows] == [SCHEMA_VERSION]


async def test_migrate_store_migrates_a_postgresql_store(url: str, tmp_path: Path) -> None:
    """`launchgate store migrate` on a PostgreSQL url creates the schema, and again is a no-op."""
    assert await migrate_store(url, tmp_path) == SCHEMA_VERSION
    assert await migrate_store(url, tmp_path) == SCHEMA_VERSION
    async with connect(url) as conn:
        found = await conn.fetchval(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = $1",
            schema_of(url),
        )
        assert found == 4


async def test_a_version_2_store_is_upgraded_and_keeps_its_reservations(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A ledger made before migration 3 (reservations took a second round trip then) is
    upgraded at open: what it holds stays, and reserving works on the new procedure."""
    from launchgate import pgledger

    monkeypatch.setattr(pgledger, "_MIGRATIONS", pgledger._MIGRATIONS[:2])
    monkeypatch.setattr(pgledger, "SCHEMA_VERSION", 2)
    old = PostgresLedger(url)
    async with open_stores(old), connect(url) as conn:
        # What a gateway before migration 3 ran for a reservation.
        await conn.fetchrow(
            "SELECT * FROM launchgate_reserve_keyed($1, $2, $3, $4, $5, $6, $7, NULL, NULL)",
            *("lic-42", "acct-2001", 64, T0 + 86400, 8, "before", T0),
        )
    monkeypatch.undo()
    store = PostgresLedger(url)
    async with open_stores(store), connect(url) as conn:
        assert (
            await conn.fetchval("SELECT version FROM launchgate_schema_version") == SCHEMA_VERSION
        )
        result = await reserve(store, "after", 16)
        assert (result.outcome, result.reserved) == (ReserveOutcome.RESERVED, 24)
        before = await store.reservation("before")
        assert before is not None and before.state == "reserved"


async def test_a_reservation_is_one_round_trip(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The reservation and its durability barrier are one statement (one round trip); a refusal
    writes no barrier."""
    store = PostgresLedger(url)
    async with open_stores(store):
        sent: list[str] = []
        real = asyncpg.Connection._do_execute  # white-box: every statement asyncpg sends

        def counting(self: object, query: str, *args: object, **kwargs: object) -> object:
            sent.append(query)
            return real(self, query, *args, **kwargs)

        monkeypatch.setattr(asyncpg.Connection, "_do_execute", counting)
        assert (await reserve(store, "d1", 64)).outcome is ReserveOutcome.RESERVED
        assert (await reserve(store, "d2", 8)).outcome is ReserveOutcome.EXHAUSTED
        assert len(sent) == 2 and all(q.startswith("CALL launchgate_reserve_durable") for q in sent)


async def test_a_reservation_writes_its_license_row_once(url: str) -> None:
    """A reservation of a license already on record writes the row once (its counter); taking
    the row's lock writes nothing (migration 6: the upsert wrote a second version each time)."""
    store = PostgresLedger(url)
    async with open_stores(store), connect(url) as conn:
        await reserve(store, "first", 8)  # puts the license on record
        async with conn.transaction():
            for n in range(3):
                await conn.fetchrow(
                    "SELECT * FROM launchgate_reserve_keyed($1, $2, $3, $4, $5, $6, $7, NULL, NULL)",
                    *("lic-42", "acct-2001", 64, T0 + 86400, 8, f"d{n}", T0),
                )
            # This transaction's own row writes so far (inserts, updates), per table.
            written = await conn.fetchval(
                "SELECT n_tup_upd FROM pg_stat_xact_user_tables"
                " WHERE relname = 'launchgate_licenses' AND schemaname = $1",
                schema_of(url),
            )
        assert written == 3
        state = await store.license("lic-42")
        assert state is not None and state.reserved == 32


async def test_a_newer_schema_is_refused(url: str) -> None:
    """A ledger written by a newer launchgate is not used blindly."""
    store = PostgresLedger(url)
    async with open_stores(store), connect(url) as conn:
        await conn.execute("UPDATE launchgate_schema_version SET version = 99")
    newer = PostgresLedger(url)
    try:
        with pytest.raises(StoreUnavailable, match="schema version 99"):
            await newer.open()
        with pytest.raises(StoreUnavailable):
            await newer.ping()
    finally:
        await newer.close()


async def test_a_replica_running_when_the_schema_is_migrated_past_it_refuses_it(
    url: str,
) -> None:
    """Found by QA: a replica already running when a newer launchgate migrated the schema kept
    serving on the old rules (one started after refuses at once). Its next sweep finds the
    newer version, and from then on every call is StoreUnavailable (fail closed)."""
    store = PostgresLedger(url)
    async with open_stores(store), connect(url) as conn:
        await reserve(store, "d1", 8, now=T0)
        await conn.execute("UPDATE launchgate_schema_version SET version = 99")
        await reserve(store, "d2", 8, now=T0)  # not known yet
        with pytest.raises(StoreUnavailable, match="schema version 99"):
            await store.expire_reservations(now=T0 + 1, ttl_s=300)
        with pytest.raises(StoreUnavailable, match="schema version 99"):
            await reserve(store, "d3", 8, now=T0)
        with pytest.raises(StoreUnavailable, match="schema version 99"):
            await store.commit("d1", T0 + 2)
        with pytest.raises(StoreUnavailable):
            await store.ping()
        await conn.execute("UPDATE launchgate_schema_version SET version = $1", SCHEMA_VERSION)


async def test_data_survives_reopening(url: str) -> None:
    """A restarted gateway finds its ledger as it left it."""
    store = PostgresLedger(url)
    async with open_stores(store):
        await reserve(store, "d1", 8)
    again = PostgresLedger(url)
    async with open_stores(again):
        reservation = await again.reservation("d1")
        assert reservation is not None
        assert (reservation.state, reservation.amount) == ("reserved", 8)


async def test_a_closed_ledger_is_unavailable(url: str) -> None:
    """After close() every call raises StoreUnavailable; close() twice is harmless."""
    store = PostgresLedger(url)
    await store.open()
    await store.close()
    await store.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        await store.ping()
    with pytest.raises(StoreUnavailable, match="closed"):
        await store.open()


async def test_asynchronous_commits_do_not_leak_into_the_session(url: str) -> None:
    """A reservation and a settlement commit without waiting for the WAL flush, but only their
    own transactions: the pooled connection goes on committing synchronously (a revoke after
    them is durable)."""
    store = PostgresLedger(url, min_size=1, max_size=1)
    async with open_stores(store):
        await reserve(store, "d1", 8)
        await store.commit("d1", T0 + 1)
        # White-box: the one pooled connection that ran both.
        async with store._connection() as conn:
            assert await conn.fetchval("SHOW synchronous_commit") == "on"


async def test_the_pool_size_bounds_the_connections_a_ledger_opens(
    url: str, tmp_path: Path
) -> None:
    """[store] pool_size: 40 launches at once through a ledger of 3 connections use 3 sessions
    of the database at most, and all of them are served."""
    store = open_ledger(url, tmp_path, pool_size=3)
    async with open_stores(store):
        pids: set[int] = set()

        async def launch(i: int) -> None:
            assert (await reserve(store, f"d{i}", 1)).outcome is ReserveOutcome.RESERVED
            async with store._connection() as pooled:  # type: ignore[attr-defined]  # white-box
                pids.add(await pooled.fetchval("SELECT pg_backend_pid()"))

        await asyncio.gather(*(launch(i) for i in range(40)))
        assert 1 <= len(pids) <= 3
        state = await store.license("lic-42")
        assert state is not None and state.reserved == 40


# --- group commit -------------------------------------------------------------------------


@pytest.fixture
def sent(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The start of every statement of the ledger's that asyncpg sends from now on (white-box:
    its ``_do_execute``); not asyncpg's own (type introspection on a first use)."""
    statements: list[str] = []
    real = asyncpg.Connection._do_execute

    def counting(self: object, query: str, *args: object, **kwargs: object) -> object:
        if "launchgate" in query:
            statements.append(query.split("(")[0].strip())
        return real(self, query, *args, **kwargs)

    monkeypatch.setattr(asyncpg.Connection, "_do_execute", counting)
    return statements


async def test_reservations_asked_together_are_one_batch(url: str, sent: list[str]) -> None:
    """Twenty reservations of 8 asked in one turn against a license of 64 (and three more under
    a second license): one statement for all, and exactly eight winners on the first license."""
    store = PostgresLedger(url)
    async with open_stores(store):
        sent.clear()
        results = await asyncio.gather(
            *(reserve(store, f"d{i}", 8) for i in range(20)),
            *(reserve(store, f"e{i}", 1, jti="lic-7", max_accelerators=2) for i in range(3)),
        )
        assert sent == ["CALL launchgate_reserve_batch"]
        outcomes = [r.outcome for r in results]
        assert outcomes[:20].count(ReserveOutcome.RESERVED) == 8
        assert outcomes[:20].count(ReserveOutcome.EXHAUSTED) == 12
        assert outcomes[20:] == [ReserveOutcome.RESERVED] * 2 + [ReserveOutcome.EXHAUSTED]
        # Each answer carries the counters as its own reservation left them.
        reserved = sorted(r.reserved for r in results[:20] if r.outcome is ReserveOutcome.RESERVED)
        assert reserved == [8, 16, 24, 32, 40, 48, 56, 64]
        first, second = await store.license("lic-42"), await store.license("lic-7")
        assert first is not None and second is not None
        assert (first.reserved, second.reserved) == (64, 2)


async def test_a_batch_with_a_taken_decision_id_runs_one_by_one(url: str, sent: list[str]) -> None:
    """A batch that rolls back on one reservation's error (its decision id is taken) runs again
    call by call: that one raises ValueError, the others reserve once."""
    store = PostgresLedger(url)
    async with open_stores(store):
        await reserve(store, "d0", 8)
        sent.clear()
        results = await asyncio.gather(
            *(reserve(store, f"d{i}", 8) for i in range(4)), return_exceptions=True
        )
        assert isinstance(results[0], ValueError)
        assert [r.outcome for r in results[1:]] == [ReserveOutcome.RESERVED] * 3  # type: ignore[union-attr]
        assert sent[0] == "CALL launchgate_reserve_batch"
        assert sent[1:] == ["CALL launchgate_reserve_durable"] * 4
        state = await store.license("lic-42")
        assert state is not None and state.reserved == 32


async def test_a_deadlocked_batch_runs_one_by_one(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """PostgreSQL ending a batch as a deadlock victim (two batches locking in different orders)
    costs no call: reservations and settlements run again one by one."""
    from launchgate import pgledger

    store = PostgresLedger(url)
    async with open_stores(store), connect(url) as conn:
        await conn.execute(
            "CREATE FUNCTION deadlock_victim() RETURNS text[]"
            " LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'victim' USING ERRCODE = '40P01';"
            " END $$"
        )
        monkeypatch.setattr(
            pgledger,
            "_RESERVE_BATCH",
            "SELECT deadlock_victim(), $1::text[], $2::text[], $3::bigint[], $4::float8[],"
            " $5::bigint[], $6::text[], $7::float8[], $8::text[], $9::text[]",
        )
        monkeypatch.setattr(
            pgledger,
            "_SETTLE_BATCH",
            "SELECT deadlock_victim(), $1::text[], $2::text[], $3::float8[], $4::text[]",
        )
        results = await asyncio.gather(*(reserve(store, f"d{i}", 8) for i in range(3)))
        assert [r.outcome for r in results] == [ReserveOutcome.RESERVED] * 3
        settled = await asyncio.gather(
            store.commit("d0", T0), store.release("d1", T0), store.commit("d2", T0)
        )
        assert list(settled) == [True, True, True]
        state = await store.license("lic-42")
        assert state is not None and (state.used, state.reserved) == (16, 0)


async def test_a_key_used_twice_in_one_batch_counts_once(url: str, sent: list[str]) -> None:
    """Two attempts under one idempotency key in one batch: as one after the other, the first
    reserves and the second finds it in progress; another request under a key is a conflict."""
    store = PostgresLedger(url)
    async with open_stores(store):
        sent.clear()
        first, second, other = await asyncio.gather(
            reserve_keyed(store, "d1", key="k"),
            reserve_keyed(store, "d2", key="k"),
            reserve_keyed(store, "d3", key="k", fingerprint="fp-b"),
        )
        assert sent == ["CALL launchgate_reserve_batch"]
        assert first.outcome is ReserveOutcome.RESERVED
        assert (second.outcome, second.replay_of) == (ReserveOutcome.IN_PROGRESS, "d1")
        assert (other.outcome, other.replay_of) == (ReserveOutcome.CONFLICT, "d1")
        state = await store.license("lic-42")
        assert state is not None and state.reserved == 8


async def test_settlements_asked_together_are_one_batch(url: str, sent: list[str]) -> None:
    """Settlements of one turn across two licenses: one statement; each answers whether it
    moved its reservation, and both licenses' counters end right. A second settlement of one
    decision in the same turn goes in the next batch and finds it settled."""
    store = PostgresLedger(url)
    async with open_stores(store):
        for i in range(3):
            await reserve(store, f"a{i}", 4, jti="lic-a")
            await reserve(store, f"b{i}", 2, jti="lic-b")
        assert await store.commit("b2", T0)
        sent.clear()
        settled = await asyncio.gather(
            store.commit("a0", T0 + 1),
            store.release("a1", T0 + 1),
            store.settle_unknown("a2", T0 + 1, "upstream outcome unknown"),
            store.commit("b0", T0 + 1),
            store.release("b2", T0 + 1),  # committed already
            store.release("b0", T0 + 1),  # the same turn's second settlement of b0
            store.commit("nobody", T0 + 1),
        )
        assert settled == [True, True, True, True, False, False, False]
        # (A commit that moved nothing is asked whether it was settled as unknown, then given
        # back: "nobody")
        assert [" ".join(statement.split())[:30] for statement in sent] == [
            "SELECT launchgate_settle_batch",
            "UPDATE launchgate_reservations",  # _CONFIRM_DURABLE
            "WITH counted AS",
            "WITH async_commit AS MATERIALI",
        ]
        a, b = await store.license("lic-a"), await store.license("lic-b")
        assert a is not None and b is not None
        assert (a.used, a.reserved) == (8, 0)
        assert (b.used, b.reserved) == (4, 2)
        states = {d: await store.reservation(d) for d in ("a0", "a1", "a2", "b0", "b2")}
        assert {d: r.state for d, r in states.items() if r is not None} == {
            "a0": "used",
            "a1": "released",
            "a2": "settled_unknown",
            "b0": "used",
            "b2": "used",
        }
        assert states["a2"] is not None and states["a2"].note == "upstream outcome unknown"
        assert states["a0"] is not None and states["a0"].settled_at == T0 + 1


@pytest.mark.parametrize("analyzed", [False, True])
async def test_settlements_find_reservations_by_key_however_the_table_grew(
    url: str, analyzed: bool
) -> None:
    """Found measuring: a batch of settlements read every entry of the index of open
    reservations, settled ones included until a VACUUM (a plan the function made while the
    table was small), and each cost more with every launch: 71 to 190 us over 110,000 launches,
    PostgreSQL launches down from 5,100/s to 1,000/s with autovacuum off. Found in review of the
    fix: after an ANALYZE of the small table, each settlement read the whole table, or (with no
    open reservation in the sample) that index again. Settlements, lone or batched, now find
    each reservation by its key, whatever the statistics, and reservations never scan either."""
    scans = (
        "SELECT seq_scan FROM pg_stat_user_tables"
        " WHERE schemaname = $1 AND relname = 'launchgate_reservations'"
    )
    migrating = PostgresLedger(url)
    assert await migrating.migrate() == SCHEMA_VERSION
    await migrating.close()
    async with connect(url) as conn:  # the migrations' own reads, once their counts are in
        before = -1
        while (now := await conn.fetchval(scans, schema_of(url))) != before:
            before = now
            await asyncio.sleep(0.3)
    store = PostgresLedger(url)
    async with open_stores(store):
        for round_ in range(20):  # planned while the table is small, then grown
            ids = [f"r{round_}-{i}" for i in range(8)]
            results = await asyncio.gather(
                *(reserve(store, d, 1, max_accelerators=10**6) for d in ids)
            )
            assert all(r.outcome is ReserveOutcome.RESERVED for r in results), results
            assert await asyncio.gather(*(store.commit(d, T0) for d in ids)) == [True] * 8
            assert await store.release(f"lone-{round_}", T0) is False  # a lone settlement
            if round_ == 1 and analyzed:
                async with connect(url) as conn:
                    await conn.execute("ANALYZE launchgate_reservations")
    async with connect(url) as conn:  # (the store's connections closed: their counts are in)
        for _ in range(50):
            pkey, others = await conn.fetchrow(
                "SELECT sum(idx_scan) FILTER (WHERE indexrelname LIKE '%pkey'),"
                " sum(idx_scan) FILTER (WHERE indexrelname NOT LIKE '%pkey')"
                " FROM pg_stat_user_indexes"
                " WHERE schemaname = $1 AND relname = 'launchgate_reservations'",
                schema_of(url),
            )
            if pkey >= 180:  # (each closed connection's counts arrive when it has ended)
                break
            await asyncio.sleep(0.1)
        assert pkey >= 180  # each settlement found by its key
        assert others == 0
        assert await conn.fetchval(scans, schema_of(url)) == before


async def test_abandon_finds_a_reservation_s_keys_by_index(url: str) -> None:
    """Whether a key is bound to a reservation settled as unknown was read from the whole keys
    table, a row for every keyed launch ever made, holding the reservation's row lock the
    while. Abandon now reads migration 9's index, and the table never whole."""
    keys_read = (
        "SELECT t.seq_scan, i.idx_scan FROM pg_stat_user_tables AS t"
        " JOIN pg_stat_user_indexes AS i USING (relid)"
        " WHERE t.schemaname = $1 AND t.relname = 'launchgate_idempotency_keys'"
        " AND i.indexrelname = 'launchgate_idempotency_keys_by_decision'"
    )

    async def settled_counts() -> tuple[int, int]:
        async with connect(url) as conn:  # (a closed connection's counts arrive after it)
            before = None
            while (now := tuple(await conn.fetchrow(keys_read, schema_of(url)))) != before:
                before = now
                await asyncio.sleep(0.3)
            return now

    store = PostgresLedger(url)
    async with open_stores(store):
        for i in range(20):
            await reserve_keyed(store, f"d{i}", 1, key=f"key-{i}")
        assert len(await store.expire_reservations(now=T0 + 400, ttl_s=300)) == 20
    scans, index_reads = await settled_counts()
    store = PostgresLedger(url)
    async with open_stores(store):
        await store.abandon("d3", "lic-42", now=T0 + 401, note="the call failed")
        reservation = await store.reservation("d3")
        assert reservation is not None and reservation.state == "settled_unknown"  # keyed: kept
    assert await settled_counts() == (scans, index_reads + 1)


async def test_the_ledger_s_statements_are_not_compiled(url: str) -> None:
    """Found in review: with seq scans off, a statement that can only scan (the schema version's
    one row, read at every pool's start) costs 1e10 in the planner's units, past the JIT
    thresholds, and was compiled at each run: 23-95 ms where 3 ms did."""
    store = PostgresLedger(url)
    async with open_stores(store), store._pool.acquire() as conn:
        plan = await conn.fetch(
            "EXPLAIN (ANALYZE) SELECT COALESCE(MAX(version), 0) FROM launchgate_schema_version"
        )
    assert any("Seq Scan" in row[0] for row in plan)  # (it can only scan)
    assert not any("JIT" in row[0] for row in plan), plan


async def test_the_thens_of_a_batch_run_in_one_group(url: str) -> None:
    """The ``then`` of each call in a batch runs once with its own result, off the event loop,
    all inside one ``group_thens`` group (one write to the decision log)."""
    store = PostgresLedger(url)
    groups: list[list[object]] = []
    ran: list[object] = []
    loop_thread = threading.get_ident()

    @contextlib.contextmanager
    def group() -> Iterator[None]:
        ran.clear()
        yield
        groups.append(list(ran))

    def then(value: object) -> None:
        assert threading.get_ident() != loop_thread
        ran.append(value)

    store.group_thens(group)
    async with open_stores(store):
        results = await asyncio.gather(*(reserve(store, f"d{i}", 8, then=then) for i in range(9)))
        assert groups == [list(results)] and len(results) == 9
        settled = await asyncio.gather(*(store.commit(f"d{i}", T0, then=then) for i in range(9)))
        assert groups[1] == settled == [True] * 8 + [False]


async def test_calls_made_before_close_are_answered(url: str) -> None:
    """close() right after a turn's calls: they still reach the database and are answered."""
    store = PostgresLedger(url)
    await store.open()
    await asyncio.gather(*(reserve(store, f"d{i}", 8) for i in range(3)))
    reserving = [asyncio.ensure_future(reserve(store, f"d{i}", 8)) for i in range(3, 5)]
    committing = store.commit("d0", T0)
    await asyncio.sleep(0)  # the reservations' task starts; its call reaches the queue
    await store.close()
    assert [r.result().outcome for r in reserving] == [ReserveOutcome.RESERVED] * 2
    assert committing.result() is True
    reopened = PostgresLedger(url)
    async with open_stores(reopened):
        state = await reopened.license("lic-42")
        assert state is not None and (state.used, state.reserved) == (8, 32)


async def test_a_call_cancelled_before_its_batch_is_never_sent(url: str) -> None:
    """A reservation cancelled while it waits for the batch in flight reserves nothing; one
    cancelled once its batch has started still completes (the sweeper settles it)."""
    store = PostgresLedger(url)

    def ask(decision_id: str, amount: int) -> asyncio.Future[ReserveResult]:
        return store.reserve(
            jti="lic-42",
            account="acct-2001",
            max_accelerators=64,
            expires=T0 + 86400,
            amount=amount,
            decision_id=decision_id,
            now=T0,
        )

    async with open_stores(store):
        started = ask("d1", 8)
        await asyncio.sleep(0)  # its batch is on its way
        waiting = ask("d2", 8)
        started.cancel()
        waiting.cancel()
        await ask("d3", 1)
        assert await store.reservation("d2") is None
        first = await store.reservation("d1")
        assert first is not None and first.state == "reserved"


@pytest.fixture
def acquired(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """Every connection asyncpg's pools hand out from now on (white-box: ``Pool.acquire``)."""
    taken: list[object] = []
    real = asyncpg.Pool.acquire

    def counting(self: object, *args: object, **kwargs: object) -> object:
        taken.append(self)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(asyncpg.Pool, "acquire", counting)
    return taken


@pytest.mark.parametrize("pool_size", [10, 2])
async def test_the_queues_keep_their_connection_between_batches(
    url: str, pool_size: int, acquired: list[object], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ten launches one after another take one pooled connection for their reservations and
    one for their settlements, kept between batches and given back once idle; with a pool too
    small to spare two, every batch takes one from the pool and gives it back."""
    from launchgate import pgledger

    monkeypatch.setattr(pgledger, "_LEASE_IDLE_S", 0.2)
    store = PostgresLedger(url, max_size=pool_size)
    async with open_stores(store):
        acquired.clear()
        for i in range(10):
            assert (await reserve(store, f"d{i}", 1)).outcome is ReserveOutcome.RESERVED
            assert await store.commit(f"d{i}", T0)
        assert len(acquired) == (2 if pool_size == 10 else 20)
        pool = store._pool  # white-box: how many connections the pool has out
        busy = pool.get_size() - pool.get_idle_size()
        assert busy == (2 if pool_size == 10 else 0)
        await asyncio.sleep(0.5)
        assert pool.get_size() - pool.get_idle_size() == 0
        assert (await reserve(store, "d10", 1)).outcome is ReserveOutcome.RESERVED
        assert len(acquired) == (3 if pool_size == 10 else 21)
        state = await store.license("lic-42")
        assert state is not None and (state.used, state.reserved) == (10, 1)


async def test_a_kept_connection_the_server_ended_costs_no_launch(url: str) -> None:
    """The database ends every connection (a restart, an administrator): the queues notice that
    the ones they keep are gone and take fresh ones, and no launch fails on them."""
    store = PostgresLedger(url, retry_interval_s=0.1)
    async with open_stores(store), connect(url) as admin:
        await reserve(store, "d0", 1)
        assert await store.commit("d0", T0)
        dropped = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
            " WHERE application_name = 'launchgate' AND datname = current_database()"
        )
        assert dropped >= 2  # the two kept, and any idle in the pool
        await asyncio.sleep(0.3)  # the client reads that they ended
        assert (await reserve(store, "d1", 1)).outcome is ReserveOutcome.RESERVED
        assert await store.commit("d1", T0)


async def test_a_store_failure_lets_go_of_the_kept_connections(
    forwarder: Forwarder, url: str
) -> None:
    """A partition: once a call finds the database gone, the queues close the connections they
    keep to it at once (they might never answer again) and take fresh ones when it is back."""
    store = PostgresLedger(forwarder.url(url), timeout_s=0.5, retry_interval_s=0.2)
    try:
        await reserve(store, "d0", 1)
        assert await store.commit("d0", T0)
        kept = [store._reserving._lease.conn, store._settling._lease.conn]  # white-box
        assert None not in kept
        forwarder.freeze()
        with pytest.raises(StoreUnavailable):
            await store.ping()
        assert store._reserving._lease.conn is None and store._settling._lease.conn is None
        assert not any(_open(conn) for conn in kept)
        await forwarder.stop()  # the partition heals: the frozen connections are cut
        forwarder.frozen, forwarder.mode = False, "forward"
        await forwarder.start()
        await asyncio.sleep(0.3)  # past the retry interval
        assert (await reserve(store, "d1", 1)).outcome is ReserveOutcome.RESERVED
        assert await store.commit("d1", T0)
    finally:
        await store.close()


async def test_a_batch_against_a_closed_port_fails_every_call() -> None:
    """Every call of a batch that cannot reach the database raises its own StoreUnavailable."""
    store = PostgresLedger("postgresql://postgres@127.0.0.1:1/test")
    try:
        results = await asyncio.gather(
            *(reserve(store, f"d{i}", 8) for i in range(4)),
            *(store.commit(f"d{i}", T0) for i in range(4)),
            return_exceptions=True,
        )
    finally:
        await store.close()
    assert all(isinstance(r, StoreUnavailable) for r in results)
    assert len({id(r) for r in results}) == len(results)


async def waiting_on_a_lock(conn: asyncpg.Connection) -> None:
    """Return once a ledger connection waits for a row lock."""
    for _ in range(500):
        # Inside a transaction, PostgreSQL shows the activity it saw first until told to look again.
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        waiting = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'launchgate'"
            " AND wait_event_type = 'Lock'"
        )
        if waiting:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("no ledger connection waited for a lock")


@pytest.mark.parametrize("kind", ["reserve", "settle"])
async def test_a_batch_locks_licenses_in_byte_order(url: str, kind: str) -> None:
    """A batch asking for 'lic-b' before 'lic-a' locks 'lic-a' first: with 'lic-b' held
    elsewhere, the batch waits holding 'lic-a'. (Every batch, and the sweeper, taking license
    rows in one order is what keeps replicas' batches from deadlocking.)"""
    store = PostgresLedger(url)
    async with open_stores(store), connect(url) as other:
        for jti in ("lic-a", "lic-b"):
            await reserve(store, f"{jti}-0", 1, jti=jti)
            await reserve(store, f"{jti}-1", 1, jti=jti)
        async with other.transaction():
            await other.execute("SELECT 1 FROM launchgate_licenses WHERE jti = 'lic-b' FOR UPDATE")
            batch: asyncio.Future[list[object]] = asyncio.gather(
                *(
                    (reserve(store, "b", 1, jti="lic-b"), reserve(store, "a", 1, jti="lic-a"))
                    if kind == "reserve"
                    else (store.commit("lic-b-0", T0), store.commit("lic-a-0", T0))
                )
            )
            await waiting_on_a_lock(other)
            with pytest.raises(asyncpg.LockNotAvailableError):
                await other.execute(
                    "SELECT 1 FROM launchgate_licenses WHERE jti = 'lic-a' FOR UPDATE NOWAIT"
                )
        results = await batch
        if kind == "reserve":
            assert [getattr(r, "outcome", r) for r in results] == [ReserveOutcome.RESERVED] * 2
        else:
            assert results == [True, True]


async def test_a_batch_takes_its_licenses_before_any_key(url: str) -> None:
    """A batch whose first call claims a key and whose later calls wait for a license must not
    hold the key meanwhile: a lone call of another replica holding a later license and asking
    for that key would close a cycle (found in review: PostgreSQL broke it after 1 s by failing
    the lone launch with a store error). The batch takes every license first, then the keys."""
    batching, alone = PostgresLedger(url), PostgresLedger(url)
    async with open_stores(batching, alone), connect(url) as other:
        for jti in ("lic-a", "lic-b", "lic-c"):
            await reserve(batching, f"{jti}-0", 1, jti=jti)
        async with other.transaction():
            await other.execute("SELECT 1 FROM launchgate_licenses WHERE jti = 'lic-b' FOR UPDATE")
            batch = asyncio.gather(
                reserve_keyed(batching, "x1", 1, key="k", jti="lic-a"),
                reserve(batching, "x2", 1, jti="lic-b"),
                reserve(batching, "x3", 1, jti="lic-c"),
            )
            await waiting_on_a_lock(other)  # the batch, on lic-b
            lone = await reserve_keyed(alone, "z1", 1, key="k", jti="lic-c")
            assert lone.outcome is ReserveOutcome.RESERVED  # k was free: the batch had no key yet
        keyed, *others = await batch
        assert (keyed.outcome, keyed.replay_of) == (ReserveOutcome.IN_PROGRESS, "z1")
        assert [r.outcome for r in others] == [ReserveOutcome.RESERVED] * 2


async def test_replicas_batching_across_licenses_never_over_spend(url: str) -> None:
    """Four replicas, each asking 60 reservations of one accelerator at once across five licenses
    of 30, in shuffled orders, then settling them (half used, half released) at once: each
    license hands out exactly its 30, and every settlement counts once."""
    replicas = [PostgresLedger(url) for _ in range(4)]
    rng = random.Random(7)
    async with open_stores(*replicas):
        asks = []
        for n, replica in enumerate(replicas):
            order = [(f"r{n}-{i}", f"lic-{i % 5}") for i in range(60)]
            rng.shuffle(order)
            asks += [(replica, d, jti) for d, jti in order]
        results = await asyncio.gather(
            *(reserve(r, d, 1, jti=jti, max_accelerators=30) for r, d, jti in asks)
        )
        won = [
            (r, d)
            for (r, d, _), res in zip(asks, results, strict=True)
            if res.outcome is ReserveOutcome.RESERVED
        ]
        assert len(won) == 150
        settled = await asyncio.gather(
            *((r.commit if i % 2 else r.release)(d, T0) for i, (r, d) in enumerate(won))
        )
        assert all(settled)
        for i in range(5):
            state = await replicas[0].license(f"lic-{i}")
            assert state is not None and state.reserved == 0
        total_used = sum(s.used for s in await replicas[0].licenses())
        assert total_used == 75


# --- several replicas ---------------------------------------------------------------------


async def test_replicas_racing_alone_for_the_last_units_never_over_spend(url: str) -> None:
    """Six replicas each asking one reservation at a time (each a lone call, not a batch) for
    the 3 units of a fresh license, 30 times over: exactly 3 win every time. (Suggested in
    review: without the license row's lock, the first run over-spent.)"""
    replicas = [PostgresLedger(url) for _ in range(6)]
    async with open_stores(*replicas):
        for round_ in range(30):
            jti = f"lic-race-{round_}"
            results = await asyncio.gather(
                *(
                    reserve(r, f"r{round_}-{n}", 1, jti=jti, max_accelerators=3)
                    for n, r in enumerate(replicas)
                )
            )
            won = [res for res in results if res.outcome is ReserveOutcome.RESERVED]
            assert len(won) == 3, round_
            state = await replicas[0].license(jti)
            assert state is not None and state.reserved == 3


async def test_replicas_sweeping_at_once_settle_each_reservation_once(url: str) -> None:
    """Three replicas expiring the same 60 reservations concurrently: each is settled exactly
    once and counted as used exactly once."""
    replicas = [PostgresLedger(url) for _ in range(3)]
    async with open_stores(*replicas):
        first = replicas[0]
        for i in range(60):
            await reserve(first, f"d{i}", 1 + i % 3, jti=f"lic-{i % 6}", now=T0 + i)
        swept = await asyncio.gather(
            *(r.expire_reservations(now=T0 + 1000, ttl_s=300) for r in replicas * 2)
        )
        settled = [decision_id for batch in swept for decision_id in batch]
        assert sorted(settled) == sorted(f"d{i}" for i in range(60))
        for n in range(6):
            state = await first.license(f"lic-{n}")
            assert state is not None
            assert (state.reserved, state.used) == (0, sum(1 + i % 3 for i in range(n, 60, 6)))


async def test_a_commit_racing_the_sweep_counts_once(url: str) -> None:
    """A late commit and another replica's sweep on the same reservations: each ends either used
    or settled_unknown, and the license counts every accelerator once."""
    gateway, sweeper = PostgresLedger(url), PostgresLedger(url)
    async with open_stores(gateway, sweeper):
        for i in range(40):
            await reserve(gateway, f"d{i}", 1, now=T0)
        await asyncio.gather(
            *(gateway.commit(f"d{i}", T0 + 400) for i in range(40)),
            sweeper.expire_reservations(now=T0 + 400, ttl_s=300),
        )
        state = await gateway.license("lic-42")
        assert state is not None
        assert (state.reserved, state.used) == (0, 40)
        for i in range(40):
            reservation = await gateway.reservation(f"d{i}")
            assert reservation is not None
            assert reservation.state in ("used", "settled_unknown")


async def test_a_held_license_row_holds_up_no_other_license_s_sweep(url: str) -> None:
    """The sweeper settles each license's expired reservations in a transaction of its own: a
    license row held elsewhere (a stuck transaction) leaves that license's reservations open
    for a later sweep, and every other license's are settled as used now. (In one transaction
    for all, the held row's lock timeout rolled back the whole sweep, every sweep, for as long
    as it was held.)"""
    store = PostgresLedger(url, timeout_s=2.0)
    async with open_stores(store), connect(url) as conn:
        for n, jti in enumerate(("lic-41", "lic-42", "lic-43")):
            await reserve(store, f"d{n}", 8, jti=jti, now=T0)
        async with conn.transaction():
            await hold_row(conn, "lic-42")
            started = time.monotonic()
            swept = await store.expire_reservations(now=T0 + 400, ttl_s=300)
            assert time.monotonic() - started < 1.5  # one lock timeout, not the statement's
            assert swept == ["d0", "d2"]
        for jti, used in (("lic-41", 8), ("lic-42", 0), ("lic-43", 8)):
            state = await store.license(jti)
            assert state is not None and (state.used, state.reserved) == (used, 8 - used), jti
        # Let go, it is swept like the others.
        assert await store.expire_reservations(now=T0 + 400, ttl_s=300) == ["d1"]
        state = await store.license("lic-42")
        assert state is not None and (state.used, state.reserved) == (8, 0)


# --- an unreachable database --------------------------------------------------------------


@pytest.mark.parametrize("call", ["open", "ping", "reserve", "revoke", "licenses"])
async def test_a_closed_port_is_store_unavailable_at_once(call: str) -> None:
    """Nothing listening: every call raises StoreUnavailable (caused by the OSError) quickly,
    and the password in the url never shows."""
    store = PostgresLedger("postgresql://postgres:s3cret@127.0.0.1:1/test")
    calls = {
        "open": store.open,
        "ping": store.ping,
        "reserve": lambda: reserve(store, "d1", 8),
        "revoke": lambda: store.revoke("lic-42", reason=None, now=T0),
        "licenses": store.licenses,
    }
    started = time.monotonic()
    try:
        with pytest.raises(StoreUnavailable) as caught:
            await calls[call]()
    finally:
        await store.close()
    assert time.monotonic() - started < 1.0
    assert isinstance(caught.value.__cause__, OSError)
    assert "s3cret" not in str(caught.value)


async def test_a_database_that_is_not_there_is_store_unavailable() -> None:
    """A server that refuses the connection (no such database) is StoreUnavailable too."""
    store = PostgresLedger(
        urlsplit(postgres_dsn())._replace(path="/launchgate_no_such_db").geturl()
    )
    try:
        with pytest.raises(StoreUnavailable, match="launchgate_no_such_db") as caught:
            await store.open()
    finally:
        await store.close()
    assert isinstance(caught.value.__cause__, asyncpg.PostgresError)


@dataclass(eq=False)
class Link:
    """One forwarded connection, as a stall (``Forwarder.hold``) sees it."""

    stall: asyncio.Event | None = None  # set when the stall it was caught in ends
    heard: bytearray = field(default_factory=bytearray)  # what the server sent once it was
    closed: asyncio.Event = field(default_factory=asyncio.Event)  # both ways are done


class Forwarder:
    """A TCP forwarder on 127.0.0.1 standing in front of PostgreSQL, to take it away and bring it
    back. ``mode`` "reject" closes each connection at once; "silent" accepts and never answers.
    ``freeze`` loses what open connections carry, ``hold`` only delays it."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.mode: Literal["forward", "reject", "silent"] = "forward"
        self.port = 0
        self.accepted = 0
        self.frozen = False  # a partition: bytes on open connections vanish
        self.stalled: list[Link] = []  # the connections caught in a stall (``hold``)
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._links: set[Link] = set()

    async def start(self) -> None:
        """Listen (again, on the same port once it has one)."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    def freeze(self) -> None:
        """A partition: open connections stay open but carry nothing, new ones go silent."""
        self.frozen = True
        self.mode = "silent"

    def hold(self) -> None:
        """A stall on the connections open now: what their clients send is kept, in order, and
        reaches the server on ``thaw``; a client that gave up meanwhile is then seen to close
        after it, as TCP delivers what was sent before a FIN. New connections pass as usual."""
        stall = asyncio.Event()
        for link in self._links:
            link.stall = stall
            self.stalled.append(link)

    def thaw(self) -> None:
        """End every stall: what was kept goes on to the server."""
        for link in self.stalled:
            if link.stall is not None:
                link.stall.set()

    async def stop(self) -> None:
        """Stop listening and cut every connection, as a database that went away."""
        self.thaw()
        if self._server is not None:
            self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def url(self, url: str) -> str:
        """``url`` pointed at this forwarder instead of the database."""
        parts = urlsplit(url)
        user = parts.netloc.rpartition("@")[0]
        return parts._replace(
            netloc=f"{user}@127.0.0.1:{self.port}" if user else f"127.0.0.1:{self.port}"
        ).geturl()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self._writers.add(writer)
        try:
            if self.mode == "reject":
                return
            if self.mode == "silent":
                while await reader.read(65536):
                    pass
                return
            up_reader, up_writer = await asyncio.open_connection(*self.target)
            self._writers.add(up_writer)
            link = Link()
            self._links.add(link)
            frozen = lambda: self.frozen  # noqa: E731 - read at every chunk
            try:
                await asyncio.gather(
                    _pipe(reader, up_writer, frozen, stalls=link),
                    _pipe(up_reader, writer, frozen, heard_on=link),
                )
            finally:
                up_writer.transport.abort()
                self._links.discard(link)
                link.closed.set()
        except OSError:
            pass
        finally:
            writer.transport.abort()
            self._writers.discard(writer)


async def _pipe(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    frozen: Callable[[], bool],
    *,
    stalls: Link | None = None,
    heard_on: Link | None = None,
) -> None:
    """Copy ``reader`` to ``writer``. ``stalls`` (client to server): wait out that link's
    stall before each write, and after one end with a FIN rather than a reset. ``heard_on``
    (server to client): once that link has stalled, keep what the server says in ``heard``
    and read it to the end, whether or not the client is still there to take it."""
    try:
        while data := await reader.read(65536):
            if frozen():
                continue
            if stalls is not None and stalls.stall is not None:
                await stalls.stall.wait()
            writer.write(data)  # to a client that has gone: dropped
            if heard_on is not None and heard_on.stall is not None:
                heard_on.heard += data
            else:
                await writer.drain()
    except OSError:
        pass
    finally:
        if stalls is not None and stalls.stall is not None:
            await stalls.stall.wait()  # a client that left during the stall: its bytes still go
            with contextlib.suppress(OSError):
                writer.write_eof()
        else:
            writer.transport.abort()


@pytest.fixture
async def forwarder() -> AsyncIterator[Forwarder]:
    """A running forwarder in front of the test database."""
    parts = urlsplit(postgres_dsn())
    proxy = Forwarder((parts.hostname or "127.0.0.1", parts.port or 5432))
    await proxy.start()
    yield proxy
    await proxy.stop()


async def until_available(store: PostgresLedger, *, within_s: float) -> float:
    """Ping until the store answers; how long that took. Fails the test after ``within_s``."""
    started = time.monotonic()
    while True:
        try:
            await store.ping()
            return time.monotonic() - started
        except StoreUnavailable:
            assert time.monotonic() - started < within_s, "the ledger did not recover"
            await asyncio.sleep(0.05)


async def test_the_ledger_check_is_bounded_when_the_database_stops_answering(
    forwarder: Forwarder, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A database that stops answering once the connection is made: the check for a ledger
    (the first thing staff commands ask) is StoreUnavailable within its timeout, query and
    goodbye included (found by QA: ``licenses list``, ``token revoke`` hung forever)."""
    connect = asyncpg.connect

    async def connect_then_go_quiet(*args: object, **kwargs: object) -> asyncpg.Connection:
        conn = await connect(*args, **kwargs)
        forwarder.freeze()
        return conn

    monkeypatch.setattr(asyncpg, "connect", connect_then_go_quiet)
    store = PostgresLedger(forwarder.url(url), timeout_s=0.5)
    started = time.monotonic()
    checking = asyncio.ensure_future(store.exists())
    done, _ = await asyncio.wait({checking}, timeout=5)
    if not done:  # (cancelling would hang too: asyncpg's goodbye waits for an answer)
        await forwarder.stop()  # cuts the connection, which ends the check
        with contextlib.suppress(Exception):
            await checking
        pytest.fail("the ledger check did not end within 5 s")
    with pytest.raises(StoreUnavailable):
        checking.result()
    assert time.monotonic() - started < 3


async def test_a_silent_server_is_store_unavailable_within_the_connect_timeout(
    forwarder: Forwarder, url: str
) -> None:
    """A database that accepts but never answers: open() gives up after the 2 s connect
    timeout, then calls fail at once instead of piling up behind it."""
    forwarder.mode = "silent"
    store = PostgresLedger(forwarder.url(url))
    try:
        started = time.monotonic()
        with pytest.raises(StoreUnavailable) as caught:
            await store.open()
        assert 1.5 < time.monotonic() - started < 3.0
        assert isinstance(caught.value.__cause__, TimeoutError)

        started = time.monotonic()
        results = await asyncio.gather(
            *(reserve(store, f"d{i}", 8) for i in range(50)), return_exceptions=True
        )
        assert all(isinstance(r, StoreUnavailable) for r in results)
        assert time.monotonic() - started < 0.5  # not 50 waits of 2 s
    finally:
        await store.close()


async def test_a_database_that_freezes_under_pooled_connections_fails_within_the_timeout(
    forwarder: Forwarder, url: str
) -> None:
    """A partition with connections already pooled: the call in flight fails after one
    timeout, not after a second one spent waiting to cancel its statement, and the calls
    after it fail at once."""
    store = PostgresLedger(forwarder.url(url), timeout_s=0.5, retry_interval_s=5)
    try:
        await reserve(store, "d1", 8)
        forwarder.freeze()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await reserve(store, "d2", 8)
        assert time.monotonic() - started < 0.8  # one timeout of 0.5 s
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await reserve(store, "d3", 8)
        assert time.monotonic() - started < 0.1
    finally:
        await store.close()


@pytest.mark.parametrize("first", ["late_reservation", "abandon", "together"])
async def test_a_reservation_delivered_after_its_timeout_is_abandoned(
    forwarder: Forwarder, url: str, first: str
) -> None:
    """A stall holds a reservation's CALL past the timeout (StoreUnavailable: the launch is not
    forwarded), then delivers it. Abandoned, it holds nothing, whichever reaches the server
    first: a late CALL after the abandon fails on the reservations' primary key and commits
    nothing (found by black-box QA: a license ended with 24 used for 16 launched)."""
    store = PostgresLedger(forwarder.url(url), timeout_s=0.5, min_size=1, max_size=1)
    async with open_stores(store), connect(url) as conn:
        await reserve(store, "d0", 8)  # the pooled connection has the CALL prepared
        await store.release("d0", T0 + 1)
        forwarder.hold()
        with pytest.raises(StoreUnavailable):
            await reserve(store, "d1", 16)
        [link] = forwarder.stalled
        await until_available(store, within_s=3.0)  # on a new connection
        await asyncio.sleep(0.2)  # asyncpg's cancel of the timed-out call has come and gone

        async def delivered() -> None:
            forwarder.thaw()
            await asyncio.wait_for(link.closed.wait(), 5)

        async def abandon() -> None:
            note = "the reservation call failed; nothing was forwarded"
            await store.abandon("d1", "lic-42", now=T0 + 5, note=note)

        state_of_d1 = "SELECT state FROM launchgate_reservations WHERE decision_id = 'd1'"
        if first == "late_reservation":
            await delivered()
            assert await conn.fetchval(state_of_d1) == "reserved"
            await abandon()
        elif first == "abandon":
            await abandon()
            await delivered()
            assert b"C23505\x00" in link.heard  # unique_violation
            assert b"launchgate_reservations_pkey" in link.heard
        else:
            await asyncio.gather(delivered(), abandon())
        state = await store.license("lic-42")
        assert state is not None
        assert (state.used, state.reserved) == (0, 0)
        assert await conn.fetchval(state_of_d1) == "released"


async def test_a_lock_held_elsewhere_fails_only_the_calls_that_wait_for_it(url: str) -> None:
    """A license row another session holds locked (a stuck transaction) fails the reservations
    that wait for it after the lock wait bound (a quarter of the timeout), and the store stays
    up: a launch under another license goes through at once, and once the lock is gone so does
    one under this license. (Waiting out the statement timeout tripped the whole store.)"""
    store = PostgresLedger(url, timeout_s=2.0)
    async with open_stores(store), connect(url) as conn:
        await reserve(store, "d0", 8)  # the license on record
        async with conn.transaction():
            await hold_row(conn)
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="lock timeout") as refused:
                await reserve(store, "d1", 8)
            assert time.monotonic() - started < 1.5
            assert refused.value.late is False  # rolled back whole: nothing for abandon to do
            other = await reserve(store, "d2", 8, jti="lic-43")
            assert other.outcome is ReserveOutcome.RESERVED
        again = await reserve(store, "d3", 8)
        assert (again.outcome, again.reserved) == (ReserveOutcome.RESERVED, 16)


async def test_a_lock_held_elsewhere_fails_only_its_calls_in_a_batch(
    url: str, sent: list[str]
) -> None:
    """Batches too: 30 reservations under a held license and one under a free license asked
    together. The batch waits out the lock timeout and runs again one by one: only the calls
    under the held license fail (found in review: the whole batch failed), the first of them
    after one more lock timeout and the others at once, unsent (found in review: all at once,
    each holding a pool connection for the lock timeout, ran the pool of 10 dry, and the wait
    for a connection marked the whole store down)."""
    store = PostgresLedger(url, timeout_s=2.0)
    async with open_stores(store), connect(url) as conn:
        await reserve(store, "a0", 1)
        async with conn.transaction():
            await hold_row(conn)
            sent.clear()
            started = time.monotonic()
            *held, free = await asyncio.gather(
                *(reserve(store, f"h{n}", 1) for n in range(30)),
                reserve(store, "b1", 1, jti="lic-43"),
                return_exceptions=True,
            )
            assert time.monotonic() - started < 1.8  # two lock timeouts, not thirty
            assert sent[:2] == ["CALL launchgate_reserve_batch", "CALL launchgate_reserve_durable"]
            assert sent.count("CALL launchgate_reserve_durable") == 2  # one per license
            assert all(isinstance(e, StoreUnavailable) and e.late is False for e in held)
            assert isinstance(free, ReserveResult) and free.outcome is ReserveOutcome.RESERVED
            started = time.monotonic()  # the store is up: no retry interval to wait out
            after = await reserve(store, "b2", 1, jti="lic-43")
            assert after.outcome is ReserveOutcome.RESERVED
            assert time.monotonic() - started < 0.4
        state = await store.license("lic-43")
        assert state is not None and state.reserved == 2


async def test_a_lock_held_elsewhere_fails_only_its_settlements_in_a_batch(
    url: str, sent: list[str]
) -> None:
    """Settlements likewise: 20 under a held license and one under a free license asked
    together run again one by one, license by license; only those under the held license
    fail, the first after one more lock timeout and the others at once."""
    store = PostgresLedger(url, timeout_s=2.0)
    async with open_stores(store), connect(url) as conn:
        for n in range(20):
            await reserve(store, f"a{n}", 1)
        await reserve(store, "b0", 1, jti="lic-43")
        async with conn.transaction():
            await hold_row(conn)
            sent.clear()
            started = time.monotonic()
            *waited, settled = await asyncio.gather(
                *(store.commit(f"a{n}", T0 + 1) for n in range(20)),
                store.commit("b0", T0 + 1),
                return_exceptions=True,
            )
            assert time.monotonic() - started < 1.8
            assert sent[0] == "SELECT launchgate_settle_batch"
            assert len(sent) == 3  # the batch, then one settlement per license
            assert all(isinstance(e, StoreUnavailable) for e in waited) and settled is True
        state = await store.license("lic-43")
        assert state is not None and (state.used, state.reserved) == (1, 0)
        assert (await store.commit("a0", T0 + 2)) is True  # the held license, once let go


async def test_a_held_row_holds_up_no_other_license(url: str, sent: list[str]) -> None:
    """Once a call under a license has waited out the lock timeout, the next call under it goes
    alone, outside the queues, and the others fail at once, unsent, while it waits: launches
    and settlements under other licenses go on as fast as ever (found by QA: every batch that
    held a call under the held license waited out the lock timeout, and every other license's
    calls waited behind it, for as long as the row was held). The lone call is first in line
    for the row: once it is let go, it gets through and the license goes back to batches."""
    async with two_licenses(url) as (store, conn):
        async with conn.transaction():
            await hold_row(conn)
            with pytest.raises(StoreUnavailable):
                await reserve(store, "a1", 1)  # finds the row held
            sent.clear()
            started = time.monotonic()
            alone = asyncio.ensure_future(reserve(store, "a2", 1))  # goes alone, and waits
            await asyncio.sleep(0)
            *refused, free, settled_elsewhere = await asyncio.gather(
                reserve(store, "a3", 1),
                store.commit("a0", T0 + 1),  # its license is known: a0 was reserved here
                reserve(store, "b1", 1, jti="lic-43"),
                store.commit("b0", T0 + 1),
                return_exceptions=True,
            )
            assert time.monotonic() - started < 0.3
            assert all(
                isinstance(e, StoreUnavailable) and "held by another session" in str(e)
                for e in refused
            )
            assert isinstance(free, ReserveResult) and free.outcome is ReserveOutcome.RESERVED
            assert settled_elsewhere is True
            assert not alone.done()
            with pytest.raises(StoreUnavailable, match="lock timeout"):
                await alone
            alone = asyncio.ensure_future(reserve(store, "a4", 1))  # the next one goes alone
            await asyncio.sleep(0.1)
        got = await alone  # first in line when the row is let go
        assert got.outcome is ReserveOutcome.RESERVED
        sent.clear()
        assert (await reserve(store, "a5", 1)).outcome is ReserveOutcome.RESERVED
        assert (await store.commit("a0", T0 + 2)) is True
        assert sent == ["CALL launchgate_reserve_durable", "WITH async_commit AS MATERIALIZED"]


async def test_calls_queued_before_a_row_was_found_held_do_not_wait_for_it(
    url: str, sent: list[str]
) -> None:
    """Calls under a held license that were queued before it was found held fail at once when
    their batch starts, unsent: a batch of them would wait out the lock timeout again, and
    every call behind it with it (found by QA: the first 2-3.5 s of a hold stalled every
    license)."""
    async with two_licenses(url) as (store, conn), conn.transaction():
        await hold_row(conn)
        started = time.monotonic()
        first = asyncio.gather(
            reserve(store, "a1", 1),
            reserve(store, "b1", 1, jti="lic-43"),
            return_exceptions=True,
        )
        await asyncio.sleep(0.1)  # that batch is in flight: these queue behind it
        second = asyncio.gather(
            reserve(store, "a2", 1),
            reserve(store, "b2", 1, jti="lic-43"),
            return_exceptions=True,
        )
        (held1, free1), (held2, free2) = await first, await second
        assert time.monotonic() - started < 1.4  # one batch and one call waited, no more
        assert "lock timeout" in str(held1) and "held by another session" in str(held2)
        assert [free1.outcome, free2.outcome] == [ReserveOutcome.RESERVED] * 2  # type: ignore[union-attr]
        assert sent.count("CALL launchgate_reserve_batch") == 1


async def test_one_call_at_a_time_goes_alone_under_a_held_row(url: str) -> None:
    """Under steady calls (one every 2 ms for 2.5 s) at a license found held, one call at a
    time goes alone (found in review: marking the row held again as a lone call came back let
    a second one start, and more, each holding a connection)."""
    store = PostgresLedger(url, timeout_s=2.0)
    async with open_stores(store), connect(url) as conn:
        await reserve(store, "a0", 1)
        async with conn.transaction():
            await hold_row(conn)
            with pytest.raises(StoreUnavailable):
                await reserve(store, "a1", 1)
            asked: list[asyncio.Future[ReserveResult]] = []
            most = 0
            ends = time.monotonic() + 2.5
            while time.monotonic() < ends:
                asked.append(asyncio.ensure_future(reserve(store, f"a{len(asked) + 2}", 1)))
                await asyncio.sleep(0.002)
                most = max(most, len(store._probes))  # white-box: the calls on their way alone
            answers = await asyncio.gather(*asked, return_exceptions=True)
        assert most == 1
        assert all(isinstance(a, StoreUnavailable) for a in answers)
        assert 3 <= sum("lock timeout" in str(a) for a in answers) <= 6  # one per 0.5 s


async def test_a_row_counts_as_free_only_once_a_call_gets_past_it(url: str) -> None:
    """A lone call that never asked for the row says nothing about it: a settlement of a
    reservation settled elsewhere already (found in review: it counted as getting through, and
    the next batch under the held license stalled every license again). A row not found held
    for 2 s counts as free again, and so does every row after a store failure."""
    store, other = PostgresLedger(url, timeout_s=2.0), PostgresLedger(url, timeout_s=2.0)
    async with open_stores(store, other), connect(url) as conn:
        await reserve(store, "a0", 1)
        assert await other.commit("a0", T0 + 1)  # the sweeper, say, or another replica
        async with conn.transaction():
            await hold_row(conn)
            with pytest.raises(StoreUnavailable):
                await reserve(store, "a1", 1)
            assert (await store.commit("a0", T0 + 2)) is False  # goes alone, asks for no row
            started = time.monotonic()
            alone = asyncio.ensure_future(reserve(store, "a2", 1))  # still known held: alone
            await asyncio.sleep(0)
            with pytest.raises(StoreUnavailable, match="held by another session"):
                await reserve(store, "a3", 1)
            free = await reserve(store, "b1", 1, jti="lic-43")
            assert free.outcome is ReserveOutcome.RESERVED
            assert time.monotonic() - started < 0.3  # no batch waited for the held row
            with pytest.raises(StoreUnavailable, match="lock timeout"):
                await alone
        await asyncio.sleep(2.1)
        started = time.monotonic()
        assert [
            r.outcome
            for r in await asyncio.gather(reserve(store, "a4", 1), reserve(store, "a5", 1))
        ] == [ReserveOutcome.RESERVED] * 2  # both at once, neither refused
        assert time.monotonic() - started < 0.3
        store._rows.mark("lic-42")  # white-box: found held, then the store fails
        await store._trip(OSError("a test"))
        assert not store._rows.is_held("lic-42")


async def test_a_batch_run_again_sends_nothing_under_a_row_found_held_meanwhile(
    url: str,
) -> None:
    """A settlement batch in flight when its license's row is found held (by the reservation
    queue, here marked by hand) runs again one by one without that license's calls: they fail
    at once instead of waiting out the lock timeout a second time (found by QA: launches
    settling when a hold began held up every license for 2 s, not 1)."""
    async with two_licenses(url) as (store, conn), conn.transaction():
        await hold_row(conn)
        started = time.monotonic()
        settling = asyncio.gather(
            store.commit("a0", T0 + 1), store.commit("b0", T0 + 1), return_exceptions=True
        )
        await asyncio.sleep(0.2)
        store._rows.mark("lic-42")  # white-box: as the reservation queue would
        held, free = await settling
        assert time.monotonic() - started < 0.85  # one lock timeout, not two
        assert "held by another session" in str(held) and free is True


async def test_a_call_long_after_a_row_was_found_held_still_goes_alone(url: str) -> None:
    """A row found held, then no call for 2 s, while it stays held: the next call under it
    goes alone, not into a batch, so calls under other licenses do not wait for it (found in
    review: the mark was dropped after 2 s, and a client backing off longer than that stalled
    every license for 1 s at each retry)."""
    async with two_licenses(url) as (store, conn), conn.transaction():
        await hold_row(conn)
        with pytest.raises(StoreUnavailable):
            await reserve(store, "a1", 1)
        await asyncio.sleep(2.1)
        alone = asyncio.ensure_future(reserve(store, "a2", 1))
        first = asyncio.ensure_future(reserve(store, "b1", 1, jti="lic-43"))
        await asyncio.sleep(0)
        started = time.monotonic()
        assert (await reserve(store, "b2", 1, jti="lic-43")).outcome is ReserveOutcome.RESERVED
        assert time.monotonic() - started < 0.3
        assert (await first).outcome is ReserveOutcome.RESERVED
        with pytest.raises(StoreUnavailable, match="lock timeout"):
            await alone


async def test_a_barrier_waits_out_no_lock_timeout(url: str) -> None:
    """The durability barrier after a reservation's COMMIT (alone, or a batch's) waits for a
    lock as long as the statement may take: a lock timeout there would come after the
    reservations landed, which the caller could no longer tell from one before (late=False,
    and a batch run again would find its own decision ids taken). Suggested in review: a
    trigger makes the barrier's update wait 0.8 s for an advisory lock another session holds."""
    store = PostgresLedger(url, timeout_s=2.0)
    async with open_stores(store), connect(url) as conn, connect(url) as other:
        await conn.execute(
            """
            CREATE FUNCTION wait_for_4242() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM pg_advisory_xact_lock(4242); RETURN NEW; END $$;
            CREATE TRIGGER wait_for_4242 BEFORE UPDATE ON launchgate_reservations
                FOR EACH ROW EXECUTE FUNCTION wait_for_4242();
            """
        )
        for calls in (1, 2):
            async with other.transaction():
                await other.execute("SELECT pg_advisory_xact_lock(4242)")
                asked = asyncio.gather(
                    *(reserve(store, f"d{calls}-{n}", 1) for n in range(calls)),
                    return_exceptions=True,
                )
                await asyncio.sleep(0.8)
            results = await asked
            assert [getattr(r, "outcome", r) for r in results] == [ReserveOutcome.RESERVED] * calls


@pytest.mark.parametrize("holder", ["reservation", "batch"])
async def test_a_reservation_in_flight_lets_an_abandon_of_its_license_through(
    url: str, holder: str
) -> None:
    """A reservation holding its license row (alone, or in a batch) locks it as an update that
    changes no key does, so another session can still insert a row that refers to the license:
    abandon's placeholder goes in at once. (Found in review: SELECT ... FOR UPDATE made it wait,
    and a late reservation waiting for its key behind such a lock could deadlock with it.)"""
    store = PostgresLedger(url, timeout_s=2.0)
    async with open_stores(store), connect(url) as conn:
        await reserve(store, "d0", 8)
        async with conn.transaction():
            # Each refused for want of room: the license row locked, nothing written yet (as
            # while a reservation waits for its idempotency key).
            if holder == "reservation":
                await conn.fetchrow(
                    "SELECT * FROM launchgate_reserve_keyed($1, $2, $3, $4, $5, $6, $7, NULL, NULL)",
                    *("lic-42", "acct-2001", 64, T0 + 86400, 99, "d1", T0),
                )
            else:  # a batch refused whole keeps its transaction open too (no COMMIT in it)
                await conn.execute(
                    "CALL launchgate_reserve_batch($1, $2, $3, $4, $5, $6, $7, $8, $9,"
                    " NULL, NULL, NULL, NULL, NULL)",
                    *(["lic-42"] * 2, ["acct-2001"] * 2, [64] * 2, [T0 + 86400] * 2, [99] * 2),
                    *(["e1", "e2"], [T0] * 2, [None] * 2, [None] * 2),
                )
            started = time.monotonic()
            await store.abandon("d9", "lic-42", now=T0 + 1, note="abandoned in a test")
            assert time.monotonic() - started < 0.4  # not the 0.5 s lock timeout
        placeholder = await store.reservation("d9")
        assert placeholder is not None and placeholder.state == "released"


async def test_only_one_call_probes_a_database_that_is_down(forwarder: Forwarder, url: str) -> None:
    """After the retry interval one call tries the database while the others fail at once."""
    forwarder.mode = "silent"
    store = PostgresLedger(forwarder.url(url), timeout_s=1.0, retry_interval_s=0.2)
    try:
        with pytest.raises(StoreUnavailable):
            await store.open()
        await asyncio.sleep(0.3)
        started = time.monotonic()

        async def timed_ping() -> float:
            with pytest.raises(StoreUnavailable):
                await store.ping()
            return time.monotonic() - started

        took = sorted(await asyncio.gather(*(timed_ping() for _ in range(20))))
        assert took[-2] < 0.3  # 19 answered without trying
        assert 0.9 < took[-1] < 2.0  # the probe waited for the connect timeout
    finally:
        await store.close()


async def test_reconnect_attempts_are_spaced_by_the_retry_interval(
    forwarder: Forwarder, url: str
) -> None:
    """Hammered while the database turns every connection away, the ledger tries to connect
    about once per retry interval, not once per call."""
    forwarder.mode = "reject"
    store = PostgresLedger(forwarder.url(url), retry_interval_s=0.5)
    calls = 0
    try:
        deadline = time.monotonic() + 1.2
        while time.monotonic() < deadline:
            calls += 1
            with pytest.raises(StoreUnavailable):
                await reserve(store, f"d{calls}", 8)
            await asyncio.sleep(0.005)
    finally:
        await store.close()
    assert calls > 100
    # Attempts at about 0, 0.5 and 1.0 s (asyncpg may retry once without TLS within one).
    assert 2 <= forwarder.accepted <= 6


async def test_recovers_when_the_database_comes_back(forwarder: Forwarder, url: str) -> None:
    """Database gone: reservations fail closed at once. Back: the same ledger works again
    within about the retry interval, on fresh connections, without being reopened. It says
    why it fails once (store.failing, found by QA: nothing said why), and that it recovered."""
    store = PostgresLedger(forwarder.url(url))
    async with open_stores(store):
        assert (await reserve(store, "d1", 8)).outcome is ReserveOutcome.RESERVED

        with structlog.testing.capture_logs() as logs:
            await forwarder.stop()
            started = time.monotonic()
            for call in (lambda: reserve(store, "d2", 8), store.ping, store.licenses):
                with pytest.raises(StoreUnavailable):
                    await call()
            assert time.monotonic() - started < 1.0

            await forwarder.start()
            assert await until_available(store, within_s=3.0) < 1.5
        said = [e for e in logs if e["event"].startswith("store.")]
        assert [e["event"] for e in said] == ["store.failing", "store.recovered"]
        assert said[0]["store"] == store.name  # the url without its password
        assert (await reserve(store, "d3", 8)).outcome is ReserveOutcome.RESERVED
        state = await store.license("lic-42")
        assert state is not None
        assert state.reserved == 16  # d1 and d3; d2 never reached the database
        assert await store.reservation("d2") is None


async def test_a_database_down_at_start_is_used_once_it_is_up(
    forwarder: Forwarder, url: str
) -> None:
    """open() fails while the database is away, the ledger stays usable, and once the database
    is there the next calls create the pool and the schema by themselves."""
    await forwarder.stop()
    store = PostgresLedger(forwarder.url(url))
    try:
        with pytest.raises(StoreUnavailable):
            await store.open()
        with pytest.raises(StoreUnavailable):
            await reserve(store, "d1", 8)
        await forwarder.start()
        assert await until_available(store, within_s=3.0) < 1.5
        assert (await reserve(store, "d1", 8)).outcome is ReserveOutcome.RESERVED
    finally:
        await store.close()


# --- the connections the queues keep (found in review) ------------------------------------


async def test_a_batch_run_again_one_by_one_gives_its_kept_connection_back(url: str) -> None:
    """With a pool of 3, both queues keeping one and the third busy elsewhere, a batch rolled
    back by a taken decision id runs its calls one by one on connections from the pool: its
    own kept one goes back first (the calls waited for the pool, timed out and tripped the
    store, failing every one)."""
    store = PostgresLedger(url, timeout_s=1.0, max_size=3)
    async with open_stores(store):
        await reserve(store, "taken", 1)
        assert await store.commit("taken", T0)  # the settlements' queue keeps one
        busy = await store._pool.acquire()  # white-box: the sweeper, say, holds the third
        try:
            results = await asyncio.gather(
                *(reserve(store, d, 1, jti="lic-7") for d in ("taken", "n1", "n2", "n3")),
                return_exceptions=True,
            )
        finally:
            await store._pool.release(busy)
        assert isinstance(results[0], ValueError)
        assert [getattr(r, "outcome", r) for r in results[1:]] == [ReserveOutcome.RESERVED] * 3


async def test_a_probe_does_not_wait_on_a_kept_connection_to_a_frozen_database(
    forwarder: Forwarder, url: str
) -> None:
    """The database stops answering (a partition) while the settlements' queue keeps a
    connection to it. Once a reservation has found out, the next settlement fails at once
    within the retry interval, and after it (as the probe) within one timeout: a graceful
    close of the kept connection would first wait a timeout for an answer that never comes."""
    store = PostgresLedger(forwarder.url(url), timeout_s=1.0, retry_interval_s=0.5)
    try:
        await reserve(store, "d1", 8)
        assert await store.commit("d1", T0)  # kept by the settlements' queue
        forwarder.freeze()
        with pytest.raises(StoreUnavailable):
            await reserve(store, "d2", 8)  # times out after 1 s: the store is failing
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.release("d1", T0)
        assert time.monotonic() - started < 0.2
        await asyncio.sleep(0.6)  # past the retry interval: the next call probes
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.release("d1", T0)
        assert time.monotonic() - started < 1.5  # one timeout, not two
    finally:
        await store.close()


async def test_letting_an_idle_connection_go_does_not_hold_up_a_failing_queue(
    forwarder: Forwarder, url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The settlements' queue lets its idle connection go while the database is known to be
    gone: a settlement asked meanwhile fails at once instead of waiting behind a graceful close
    of that connection."""
    from launchgate import pgledger

    monkeypatch.setattr(pgledger, "_LEASE_IDLE_S", 1.5)
    store = PostgresLedger(forwarder.url(url), timeout_s=1.0, retry_interval_s=30)
    try:
        await reserve(store, "d1", 8)
        assert await store.commit("d1", T0)  # kept; let go 1.5 s from now
        forwarder.freeze()
        with pytest.raises(StoreUnavailable):
            await reserve(store, "d2", 8)  # times out after 1 s: the store is failing
        await asyncio.sleep(0.6)  # the settlements' queue lets its connection go
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.release("d1", T0)
        assert time.monotonic() - started < 0.2
    finally:
        await store.close()


async def test_close_lets_no_kept_connection_outlive_it(url: str) -> None:
    """A reservation asked while close() drains the settlements still completes, and close()
    returns with no connection kept and no timer left to fire."""
    store = PostgresLedger(url)
    await store.open()
    await reserve(store, "d0", 1)
    settling = store.commit("d0", T0)
    closing = asyncio.ensure_future(store.close())
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    late = asyncio.ensure_future(reserve(store, "d1", 1))
    await closing
    assert await settling
    assert (await late).outcome is ReserveOutcome.RESERVED
    assert store._reserving.idle and store._settling.idle
    assert store._reserving._idle is None and store._settling._idle is None


async def test_a_session_gone_quiet_in_its_transaction_lets_its_license_go(url: str) -> None:
    """Found by QA: a replica lost mid-transaction (its sweeper had updated a license row, then
    the network parted) kept the row locked until the server noticed the dead connection, hours
    by TCP's defaults; every replica's launches under that license got 503 meanwhile. The
    server ends a ledger session idle in its transaction after 4 statement timeouts (2 s at
    least), and the license is free again."""
    lost = PostgresLedger(url, timeout_s=0.5)
    healthy = PostgresLedger(url, timeout_s=0.5, retry_interval_s=0.1)
    async with open_stores(lost, healthy):
        await reserve(healthy, "a0", 1)
        conn = await lost._pool.acquire()  # a session of the lost replica's pool
        try:
            assert await conn.fetchval("SHOW idle_in_transaction_session_timeout") == "2s"
            transaction = conn.transaction()
            await transaction.start()
            await hold_row(conn)  # ... then nothing more: its host is gone
            started = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await reserve(healthy, "a1", 1)  # the row is held
            while True:
                try:
                    await reserve(healthy, "a2", 1)
                    break
                except StoreUnavailable:
                    assert time.monotonic() - started < 6, "the license stayed held"
                    await asyncio.sleep(0.2)
            assert 1.5 < time.monotonic() - started < 6
        finally:  # (the server has ended the session: the pool may have let it go already)
            with contextlib.suppress(asyncpg.InterfaceError):
                await lost._pool.release(conn)


async def test_replicas_whose_clocks_disagree_keep_time_by_the_database_s(url: str) -> None:
    """Found by QA: a replica whose clock ran 400 s ahead swept another's launch 0.5 s after it
    was reserved ("still reserved after 300 s"), so its upstream's 500 released nothing. Each
    ledger measures the database server's clock, and keeps and compares every time on it; a
    skew within a second is left alone."""
    ahead = PostgresLedger(url, clock=lambda: time.time() + 400)
    on_time = PostgresLedger(url)
    async with open_stores(ahead, on_time):
        assert ahead.store_time(1000.0) == pytest.approx(600.0, abs=0.5)
        assert on_time.store_time(1000.0) == 1000.0
        await reserve(on_time, "d1", 8, now=time.time())
        # The replica ahead sweeps with its own clock's now, as its gateway does
        assert await ahead.expire_reservations(now=time.time() + 400, ttl_s=300) == []
        assert await on_time.release("d1", time.time()) is True
        await reserve(ahead, "d2", 8, now=time.time() + 400)
        reservation = await on_time.reservation("d2")
        assert reservation is not None
        assert reservation.created_at == pytest.approx(time.time(), abs=5)
        assert await on_time.expire_reservations(now=time.time(), ttl_s=300) == []
        assert await on_time.expire_reservations(now=time.time() + 301, ttl_s=300) == ["d2"]


async def test_a_sweep_settles_each_license_in_one_statement(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by QA: a sweep whose connection kept losing its COMMIT held the license row between
    its two statements every time, and every replica's launches under it got 503 most of the
    time. Each license's expired reservations and its counters are now one statement, outside
    any transaction of the ledger's own: no lock waits on a round trip."""
    store = PostgresLedger(url)
    async with open_stores(store):
        await reserve(store, "d1", 8)
        await reserve(store, "d2", 4)
        await reserve(store, "e1", 1, jti="lic-43")
        statements: list[str] = []
        real = asyncpg.Connection._do_execute

        def seen(self: object, query: str, *args: object, **kwargs: object) -> object:
            statements.append(" ".join(query.split())[:24])
            return real(self, query, *args, **kwargs)

        monkeypatch.setattr(asyncpg.Connection, "_do_execute", seen)
        swept = await store.expire_reservations(now=T0 + 400, ttl_s=300)
        assert sorted(swept) == ["d1", "d2", "e1"]
        assert [s for s in statements if not s.startswith("SELECT extract")] == [
            "SELECT COALESCE(MAX(vers",  # (the schema's version: _check_schema)
            "SELECT DISTINCT jti FROM",
            "WITH expired AS ( UPDATE",
            "WITH expired AS ( UPDATE",
        ]
        state = await store.license("lic-42")
        assert state is not None and (state.used, state.reserved) == (12, 0)


async def test_a_2xx_whose_late_confirmation_fails_is_a_store_error_to_settle_again(
    url: str,
) -> None:
    """Found by QA: staff's give_back held the reservation's row past the lock timeout while a
    late 2xx's confirmation waited for it; the failure answered "nothing moved", and the launch
    went uncounted for good. It is a store error now, which the gateway settles again later."""
    store = PostgresLedger(url, timeout_s=0.5)
    async with open_stores(store), connect(url) as staff:
        await reserve(store, "d1", 8, now=T0)
        assert await store.expire_reservations(now=T0 + 400, ttl_s=300) == ["d1"]
        held = staff.transaction()
        await held.start()  # (as give_back holds it, between its statements)
        await staff.execute(
            "SELECT 1 FROM launchgate_reservations WHERE decision_id = 'd1' FOR UPDATE"
        )
        try:
            with pytest.raises(StoreUnavailable, match="lock timeout"):
                await store.commit("d1", T0 + 401)
        finally:
            await held.rollback()
        assert await store.commit("d1", T0 + 402) is True  # settled again: confirmed
        reservation = await store.reservation("d1")
        assert reservation is not None and reservation.state == "used"


async def test_without_a_schema_the_ledger_is_public_s_not_the_role_s(url: str) -> None:
    """Found by QA: with PostgreSQL's default search_path ("$user", public), a schema named
    after the login role, made later in the same database (a staging ledger with ?schema= that
    role), took the ledger over: a license exhausted in public launched again. Without
    ?schema= the ledger is public's, always."""
    dsn = postgres_dsn()
    name = f"lg_search_path_{os.getpid()}_{random.randrange(1 << 30)}"
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        parts = urlsplit(dsn)
        own = parts._replace(path=f"/{name}").geturl()
        conn = await asyncpg.connect(own)
        try:
            role = await conn.fetchval("SELECT current_user")
            await conn.execute(f'CREATE SCHEMA "{role}"')
            await conn.execute(
                f'CREATE TABLE "{role}".launchgate_schema_version (version integer NOT NULL)'
            )
            await conn.execute(f'INSERT INTO "{role}".launchgate_schema_version VALUES (99)')  # noqa: S608 - the test's own role name
        finally:
            await conn.close()
        # A ledger there too makes the store ambiguous: refused until the url says which
        with pytest.raises(StoreUnavailable, match=f"a ledger in schema '{role}'"):
            await PostgresLedger(own).migrate()
        conn = await asyncpg.connect(own)
        try:
            await conn.execute(f'DROP SCHEMA "{role}" CASCADE')
            await conn.execute(f'CREATE SCHEMA "{role}"')  # the role's schema, no ledger in it
        finally:
            await conn.close()
        store = PostgresLedger(own)
        async with open_stores(store):
            await reserve(store, "d1", 8, now=T0)
            assert await store.exists()
        conn = await asyncpg.connect(own)
        try:
            found = await conn.fetchval("SELECT to_regclass('public.launchgate_licenses')")
            assert found is not None
            role_s = await conn.fetchval(f"SELECT to_regclass('\"{role}\".launchgate_licenses')")
            assert role_s is None
        finally:
            await conn.close()
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def test_a_retry_meeting_a_give_back_under_way_is_in_progress_not_a_deadlock(
    url: str,
) -> None:
    """Found by QA: a retry counted on a reservation (REPLAYED) holds the license row, then marks
    the reservation; staff's give_back holds the reservation's row, then the license's. The two
    deadlocked until the retry's lock timeout (503 store_unavailable). A retry that finds the
    reservation's row held is told the first attempt is in progress (409) at once, and the
    give_back goes on without waiting for it."""
    store = PostgresLedger(url, timeout_s=2.0)
    async with open_stores(store), connect(url) as staff:
        await reserve_keyed(store, "d1", 8)
        assert await store.expire_reservations(now=T0 + 400, ttl_s=300) == ["d1"]
        held = staff.transaction()
        await held.start()  # give_back, between its two statements
        await staff.execute(
            "SELECT 1 FROM launchgate_reservations WHERE decision_id = 'd1' FOR UPDATE"
        )
        try:
            started = time.monotonic()
            retry = await reserve_keyed(store, "d2", 8, now=T0 + 401)
            assert retry.outcome is ReserveOutcome.IN_PROGRESS
            assert retry.replay_of == "d1"
            assert time.monotonic() - started < 0.4  # the lock timeout is 0.5 s
            # The license row is free: give_back's second statement does not wait.
            await asyncio.wait_for(
                staff.execute(
                    "UPDATE launchgate_licenses SET used = used - 8 WHERE jti = 'lic-42'"
                ),
                timeout=0.4,
            )
        finally:
            await held.rollback()
        retry = await reserve_keyed(store, "d3", 8, now=T0 + 402)
        assert retry.outcome is ReserveOutcome.REPLAYED  # once the row is free, as before
        assert await counters(store) == (8, 0)
