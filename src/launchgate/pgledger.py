"""The PostgreSQL ledger: one ``Ledger`` shared by every gateway replica, on any host.

Selected by ``[store] url = "postgresql://user@host:5432/db"``. An optional ``?schema=NAME`` puts
the tables in that schema (created when missing) so one database can hold several ledgers; the
tables are named ``launchgate_*`` either way.

Concurrency: a reservation (one call of the ``launchgate_reserve`` function) locks its license row
with the upsert that records the license, until it commits; so reservations from any number of
pools queue per license and the capacity check sees the latest counters and revocation. A
settlement is one ``UPDATE ... WHERE state = 'reserved'``, so each reservation is settled once
however many replicas try.

Durability: a reservation commits without waiting for the WAL flush, so the license row is locked
only while the function runs (not for a disk flush: one license's launches would otherwise queue
behind each other's fsyncs), and is then made durable by a second, synchronous transaction in the
same call (the ``launchgate_reserve_durable`` procedure, ``_RESERVE``) before ``reserve`` returns.
Settlements commit asynchronously (see ``_SETTLE``): losing one in a database crash can only count
a launch as used.

Group commit: the reservations (and, separately, the settlements) that queue up while one call of
their kind is in flight go to the database as one statement (``_Queue``; migration 5), as the
SQLite ledger batches its transactions: one round trip, one commit and one durability barrier for
all, where each launch used to cost two round trips of its own. A batch takes its license rows
first, in byte order of their jti (as the sweeper does), then its idempotency keys in order, so
batches and lone calls of several replicas never wait for each other in a cycle; an error that
rolls a batch back (a decision id already taken; a deadlock all the same) runs its calls again
one by one, so each succeeds or fails as it would have alone.

Availability: every asyncpg, OS and timeout error leaves as ``StoreUnavailable``; connecting,
waiting for a pooled connection and each statement are bounded by ``timeout_s``, and a wait for a
row lock by a quarter of it (``_LOCK_WAIT_SHARE``), which fails that call alone. After a
connection failure the ledger answers ``StoreUnavailable`` at once for ``retry_interval_s``, then
lets one call through as a probe (creating the pool if it never was); calls arriving while the
probe runs fail at once too. A database that is down thus costs callers no waiting beyond one
probe, and the ledger recovers by itself when it is back.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information
import structlog

from launchgate.errors import ConfigError, StoreUnavailable
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
    _redact,
    _reservation,
)

log = structlog.get_logger("launchgate")
_T = TypeVar("_T")

__all__ = ["SCHEMA_VERSION", "PostgresLedger"]

# pg_advisory_xact_lock key ('launchga'): replicas starting together migrate one after another.
_MIGRATION_LOCK: Final = 0x6C61756E63686761


def _span(sql: str, first: str, last: str) -> str:
    """The text of ``sql`` from ``first`` to the end of the ``last`` after it (an edit's old)."""
    start = sql.index(first)
    return sql[start : sql.index(last, start) + len(last)]


def _amended(sql: str, *edits: tuple[str, str]) -> str:
    """``sql`` with each (old, new) edit made; each ``old`` must occur exactly once."""
    for old, new in edits:
        if sql.count(old) != 1:
            raise AssertionError(f"migration text: {old!r} must occur once")
        sql = sql.replace(old, new)
    return sql


# Migration 2's reservation function (described there); migration 4 amends it.
_RESERVE_KEYED_2: Final = """
            CREATE FUNCTION launchgate_reserve_keyed(
                p_jti text, p_account text, p_max bigint, p_expires double precision,
                p_amount bigint, p_decision_id text, p_now double precision,
                p_key text, p_fingerprint text,
                OUT o_outcome text, OUT o_max bigint, OUT o_used bigint, OUT o_reserved bigint,
                OUT o_replay_of text
            ) LANGUAGE plpgsql AS $$
            DECLARE
                is_revoked boolean;
                claimed boolean := false;
                bound_fingerprint text;
                bound_state text;
            BEGIN
                -- As in launchgate_reserve: the caller waits for durability with _DURABLE.
                PERFORM set_config('synchronous_commit', 'off', true);
                INSERT INTO launchgate_licenses AS l
                    (jti, account, max_accelerators, expires, first_seen)
                VALUES (p_jti, p_account, p_max, p_expires, p_now)
                ON CONFLICT (jti) DO UPDATE SET
                    account = COALESCE(l.account, EXCLUDED.account),
                    max_accelerators = COALESCE(l.max_accelerators, EXCLUDED.max_accelerators),
                    expires = COALESCE(l.expires, EXCLUDED.expires),
                    first_seen = COALESCE(l.first_seen, EXCLUDED.first_seen)
                RETURNING l.max_accelerators, l.used, l.reserved, l.revoked
                INTO o_max, o_used, o_reserved, is_revoked;
                IF is_revoked THEN
                    o_outcome := 'revoked';
                    RETURN;
                END IF;
                IF p_key IS NOT NULL THEN
                    -- Claim the key, or lock the row of the reservation that holds it. An
                    -- insert that meets an uncommitted claim waits for it to end, then inserts
                    -- (the claim was withdrawn) or finds the committed row.
                    LOOP
                        INSERT INTO launchgate_idempotency_keys
                            (account, key, fingerprint, decision_id, bound_at)
                        VALUES (p_account, p_key, p_fingerprint, p_decision_id, p_now)
                        ON CONFLICT (account, key) DO NOTHING;
                        IF FOUND THEN
                            claimed := true;
                            EXIT;
                        END IF;
                        SELECT k.fingerprint, k.decision_id, r.state
                        INTO bound_fingerprint, o_replay_of, bound_state
                        FROM launchgate_idempotency_keys AS k
                        LEFT JOIN launchgate_reservations AS r USING (decision_id)
                        WHERE k.account = p_account AND k.key = p_key
                        FOR UPDATE OF k;
                        EXIT WHEN FOUND;
                    END LOOP;
                    IF NOT claimed THEN
                        IF bound_fingerprint <> p_fingerprint THEN
                            o_outcome := 'conflict';
                            RETURN;
                        ELSIF bound_state = 'reserved' THEN
                            o_outcome := 'in_progress';
                            RETURN;
                        ELSIF bound_state IN ('used', 'settled_unknown') THEN
                            o_outcome := 'replayed';
                            RETURN;
                        END IF;
                        -- Released: nothing was counted under the key; reserve anew.
                        o_replay_of := NULL;
                    END IF;
                END IF;
                IF o_used + o_reserved + p_amount > o_max THEN
                    IF claimed THEN  -- only a reservation binds a key
                        DELETE FROM launchgate_idempotency_keys
                        WHERE account = p_account AND key = p_key;
                    END IF;
                    o_outcome := 'exhausted';
                    RETURN;
                END IF;
                INSERT INTO launchgate_reservations
                    (decision_id, jti, amount, state, created_at)
                VALUES (p_decision_id, p_jti, p_amount, 'reserved', p_now);
                UPDATE launchgate_licenses SET reserved = reserved + p_amount WHERE jti = p_jti;
                IF p_key IS NOT NULL AND NOT claimed THEN
                    UPDATE launchgate_idempotency_keys
                    SET decision_id = p_decision_id, bound_at = p_now
                    WHERE account = p_account AND key = p_key;
                END IF;
                o_reserved := o_reserved + p_amount;
                o_outcome := 'reserved';
            END
            $$
            """
# Migration 3's lone reservation procedure (described there); migration 6 amends it.
_RESERVE_DURABLE_3: Final = """
            CREATE PROCEDURE launchgate_reserve_durable(
                p_jti text, p_account text, p_max bigint, p_expires double precision,
                p_amount bigint, p_decision_id text, p_now double precision,
                p_key text, p_fingerprint text,
                INOUT o_outcome text, INOUT o_max bigint, INOUT o_used bigint,
                INOUT o_reserved bigint, INOUT o_replay_of text
            ) LANGUAGE plpgsql AS $$
            BEGIN
                SELECT r.o_outcome, r.o_max, r.o_used, r.o_reserved, r.o_replay_of
                INTO o_outcome, o_max, o_used, o_reserved, o_replay_of
                FROM launchgate_reserve_keyed(
                    p_jti, p_account, p_max, p_expires, p_amount, p_decision_id, p_now,
                    p_key, p_fingerprint
                ) AS r;
                IF o_outcome = 'reserved' THEN
                    -- Asynchronously (launchgate_reserve_keyed turned synchronous_commit off
                    -- for this transaction alone): the license row is unlocked now.
                    COMMIT;
                    -- The barrier, in a transaction of its own that commits, at the end of
                    -- CALL, with the session's synchronous_commit (see _RESERVE).
                    UPDATE launchgate_reservations SET state = state
                    WHERE decision_id = p_decision_id;
                END IF;
            END
            $$
            """
# Migration 4: the same function, refusing a license on record for another account (a second
# token issued under its jti: a jti names one license) instead of spending it.
_RESERVE_KEYED_4: Final = _amended(
    _RESERVE_KEYED_2,
    ("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION"),
    ("is_revoked boolean;\n", "is_revoked boolean;\n                on_record_for text;\n"),
    (
        "l.revoked\n                INTO o_max, o_used, o_reserved, is_revoked;",
        "l.revoked, l.account\n                INTO o_max, o_used, o_reserved, is_revoked,"
        " on_record_for;",
    ),
    (
        "o_outcome := 'revoked';\n                    RETURN;\n                END IF;\n",
        "o_outcome := 'revoked';\n                    RETURN;\n                END IF;\n"
        "                IF on_record_for <> p_account THEN\n"
        "                    o_outcome := 'other_account';\n"
        "                    RETURN;\n"
        "                END IF;\n",
    ),
)
# Migration 5's reservation batch procedure (described there); migration 6 amends it.
_RESERVE_BATCH_5: Final = """
            CREATE PROCEDURE launchgate_reserve_batch(
                p_jti text[], p_account text[], p_max bigint[], p_expires double precision[],
                p_amount bigint[], p_decision_id text[], p_now double precision[],
                p_key text[], p_fingerprint text[],
                INOUT o_outcome text[], INOUT o_max bigint[], INOUT o_used bigint[],
                INOUT o_reserved bigint[], INOUT o_replay_of text[]
            ) LANGUAGE plpgsql AS $$
            DECLARE
                i integer;
                r record;
                locked text;
                barrier text;
            BEGIN
                FOR i IN
                    SELECT t.ord FROM unnest(p_jti) WITH ORDINALITY AS t (jti, ord)
                    ORDER BY t.jti COLLATE "C", t.ord
                LOOP
                    CONTINUE WHEN p_jti[i] = locked;
                    locked := p_jti[i];
                    INSERT INTO launchgate_licenses
                        (jti, account, max_accelerators, expires, first_seen)
                    VALUES (p_jti[i], p_account[i], p_max[i], p_expires[i], p_now[i])
                    ON CONFLICT (jti) DO NOTHING;
                    PERFORM 1 FROM launchgate_licenses WHERE jti = p_jti[i] FOR UPDATE;
                END LOOP;
                FOR i IN
                    SELECT t.ord
                    FROM unnest(p_account, p_key) WITH ORDINALITY AS t (account, key, ord)
                    ORDER BY t.account COLLATE "C", t.key COLLATE "C", t.ord
                LOOP
                    SELECT * INTO r FROM launchgate_reserve_keyed(
                        p_jti[i], p_account[i], p_max[i], p_expires[i], p_amount[i],
                        p_decision_id[i], p_now[i], p_key[i], p_fingerprint[i]
                    );
                    o_outcome[i] := r.o_outcome;
                    o_max[i] := r.o_max;
                    o_used[i] := r.o_used;
                    o_reserved[i] := r.o_reserved;
                    o_replay_of[i] := r.o_replay_of;
                    IF r.o_outcome = 'reserved' THEN
                        barrier := p_decision_id[i];
                    END IF;
                END LOOP;
                IF barrier IS NOT NULL THEN
                    -- As in launchgate_reserve_durable: commit asynchronously (the license rows
                    -- are unlocked now), then a no-op write that commits synchronously at the
                    -- end of CALL flushes the WAL past every reservation of the batch.
                    COMMIT;
                    UPDATE launchgate_reservations SET state = state WHERE decision_id = barrier;
                END IF;
            END
            $$
            """
# Migration 4's upsert of the license row (as migration 2 wrote it, amended), which migration 6
# keeps for a row it cannot use as it is: cut out of migration 4's text, so the two cannot differ.
_UPSERT_AT: Final = _RESERVE_KEYED_4.index("                INSERT INTO launchgate_licenses AS l\n")
_LICENSE_UPSERT_4: Final = _RESERVE_KEYED_4[
    _UPSERT_AT : _RESERVE_KEYED_4.index("on_record_for;\n", _UPSERT_AT) + len("on_record_for;\n")
]
# Migration 6: the same function again, taking the license row with SELECT ... FOR NO KEY UPDATE
# and upserting only a row it cannot use as it is (none yet, or one a revoke made, with its
# account, maximum, expiry or first sighting still NULL). The upsert's DO UPDATE wrote a new
# version of the row on every reservation although it changed nothing once the row was complete;
# the row then carried two versions per reservation (this and the counter's), and every lock and
# read of it walked the chain of dead ones until a prune. Measured in PL/pgSQL, 2,000 reservations
# of one license in a row: 103 -> 68 us each. Locking and the counters read are as before: the
# lock is the one the upsert took (NO KEY UPDATE, which lets another session insert a reservation
# row that refers to the license, as abandon does: FOR UPDATE would make it wait), it waits for a
# concurrent holder, then reads the row's latest version (READ COMMITTED).
_RESERVE_KEYED_6: Final = _amended(
    _RESERVE_KEYED_4,
    (
        _LICENSE_UPSERT_4,
        "".join(
            (
                """\
                SELECT l.max_accelerators, l.used, l.reserved, l.revoked, l.account
                INTO o_max, o_used, o_reserved, is_revoked, on_record_for
                FROM launchgate_licenses AS l
                WHERE l.jti = p_jti AND l.account IS NOT NULL AND l.max_accelerators IS NOT NULL
                    AND l.expires IS NOT NULL AND l.first_seen IS NOT NULL
                FOR NO KEY UPDATE;
                IF NOT FOUND THEN
""",
                textwrap.indent(_LICENSE_UPSERT_4, "    "),
                "                END IF;\n",
            )
        ),
    ),
)
# Migration 10's: a retry counted on an earlier reservation (replayed) marks it replayed_at, so
# staff cannot give it back while the retry may be under way; one given back meanwhile (READ
# COMMITTED re-reads the row for the UPDATE) has the retry reserve anew instead.
_RESERVE_KEYED_10: Final = _amended(
    _RESERVE_KEYED_6,
    (
        """\
                        ELSIF bound_state IN ('used', 'settled_unknown') THEN
                            o_outcome := 'replayed';
                            RETURN;
                        END IF;
""",
        """\
                        ELSIF bound_state IN ('used', 'settled_unknown') THEN
                            UPDATE launchgate_reservations SET replayed_at = p_now
                            WHERE decision_id = o_replay_of
                                AND state IN ('used', 'settled_unknown');
                            IF FOUND THEN
                                o_outcome := 'replayed';
                                RETURN;
                            END IF;
                        END IF;
""",
    ),
)
# Migration 11's: a retry that finds the earlier reservation's row held (staff's give_back, which
# takes that row and then the license's, or a late settlement of it) is told the first attempt is
# in progress rather than waiting: it holds the license row already, so waiting was a deadlock
# that only the lock timeout ended (found by QA: 503, and the license held on that replica).
_RESERVE_KEYED_11: Final = _amended(
    _RESERVE_KEYED_10,
    (
        """\
                        ELSIF bound_state IN ('used', 'settled_unknown') THEN
                            UPDATE launchgate_reservations SET replayed_at = p_now
""",
        """\
                        ELSIF bound_state IN ('used', 'settled_unknown') THEN
                            BEGIN
                                PERFORM 1 FROM launchgate_reservations
                                WHERE decision_id = o_replay_of FOR NO KEY UPDATE NOWAIT;
                            EXCEPTION WHEN lock_not_available THEN
                                o_outcome := 'in_progress';
                                RETURN;
                            END;
                            UPDATE launchgate_reservations SET replayed_at = p_now
""",
    ),
)
# Migration 6's batch procedure: migration 5's, locking each license row of the batch as
# launchgate_reserve_keyed does (NO KEY UPDATE, not FOR UPDATE), and with no lock timeout for the
# durability barrier after COMMIT. So a lock timeout (the sessions' lock_timeout, _LOCK_WAIT_SHARE)
# can only end the batch before its COMMIT, when nothing of it has landed, and the caller runs its
# calls again one by one (only those waiting for the held row fail); the barrier's row is this
# batch's own reservation, which nothing else locks before the launch is answered.
# Migration 6's edit of both reservation procedures: the barrier after COMMIT (a transaction of
# its own) waits out no lock timeout.
_BARRIER_WITHOUT_LOCK_TIMEOUT: Final = (
    "                    COMMIT;\n",
    "                    COMMIT;\n"
    "                    PERFORM set_config('lock_timeout', '0', true);\n",
)
_RESERVE_BATCH_6: Final = _amended(
    _RESERVE_BATCH_5,
    ("CREATE PROCEDURE", "CREATE OR REPLACE PROCEDURE"),
    (
        "WHERE jti = p_jti[i] FOR UPDATE;",
        "WHERE jti = p_jti[i] FOR NO KEY UPDATE;",
    ),
    _BARRIER_WITHOUT_LOCK_TIMEOUT,
)
# Migration 6's lone reservation procedure: migration 3's, with no lock timeout for its barrier
# either. So a reservation that ends on a lock timeout, alone or in a batch, certainly left
# nothing behind: its caller hears so (StoreUnavailable with late=False) and abandons nothing.
_RESERVE_DURABLE_6: Final = _amended(
    _RESERVE_DURABLE_3,
    ("CREATE PROCEDURE", "CREATE OR REPLACE PROCEDURE"),
    _BARRIER_WITHOUT_LOCK_TIMEOUT,
)

# Migration 5's settlement batch (described there); migration 7 amends it.
_SETTLE_BATCH_5: Final = """
            CREATE FUNCTION launchgate_settle_batch(
                p_decision_id text[], p_state text[], p_now double precision[], p_note text[]
            ) RETURNS text[] LANGUAGE plpgsql AS $$
            DECLARE
                moved_id text[];
                moved_jti text[];
                moved_amount bigint[];
                moved_state text[];
                l record;
            BEGIN
                PERFORM set_config('synchronous_commit', 'off', true);
                WITH asked AS (
                    SELECT * FROM unnest(p_decision_id, p_state, p_now, p_note)
                        AS t (decision_id, state, settled_at, note)
                ), settled AS (
                    UPDATE launchgate_reservations AS r
                    SET state = asked.state, settled_at = asked.settled_at, note = asked.note
                    FROM asked
                    WHERE r.decision_id = asked.decision_id AND r.state = 'reserved'
                    RETURNING r.decision_id, r.jti, r.amount, r.state
                )
                SELECT array_agg(decision_id), array_agg(jti), array_agg(amount),
                    array_agg(state)
                INTO moved_id, moved_jti, moved_amount, moved_state
                FROM settled;
                FOR l IN
                    SELECT m.jti, sum(m.amount) AS amount,
                        sum(CASE WHEN m.state = 'released' THEN 0 ELSE m.amount END) AS used
                    FROM unnest(moved_jti, moved_amount, moved_state) AS m (jti, amount, state)
                    GROUP BY m.jti ORDER BY m.jti COLLATE "C"
                LOOP
                    UPDATE launchgate_licenses
                    SET reserved = reserved - l.amount, used = used + l.used
                    WHERE jti = l.jti;
                END LOOP;
                RETURN COALESCE(moved_id, '{}');
            END
            $$
            """
# Migration 7's: each reservation found by its key (described there).
_SETTLE_BATCH_7: Final = _amended(
    _SETTLE_BATCH_5,
    ("CREATE FUNCTION", "CREATE OR REPLACE FUNCTION"),
    *((f"{name} text[];", f"{name} text[] := '{{}}';") for name in ("moved_id", "moved_jti")),
    ("moved_amount bigint[];", "moved_amount bigint[] := '{}';"),
    ("moved_state text[];", "moved_state text[] := '{}';"),
    ("l record;", "r record;\n                l record;"),
    (
        _span(_SETTLE_BATCH_5, "WITH asked AS (", "FROM settled;"),
        """FOR i IN 1 .. coalesce(array_length(p_decision_id, 1), 0) LOOP
                    UPDATE launchgate_reservations
                    SET state = p_state[i], settled_at = p_now[i], note = p_note[i]
                    WHERE decision_id = p_decision_id[i] AND state = 'reserved'
                    RETURNING decision_id, jti, amount, state INTO r;
                    IF FOUND THEN
                        moved_id := moved_id || r.decision_id;
                        moved_jti := moved_jti || r.jti;
                        moved_amount := moved_amount || r.amount;
                        moved_state := moved_state || r.state;
                    END IF;
                END LOOP;""",
    ),
    ("RETURN COALESCE(moved_id, '{}');", "RETURN moved_id;"),
)

_MIGRATIONS: tuple[tuple[int, tuple[str, ...]], ...] = (
    (
        1,
        (
            """
            CREATE TABLE launchgate_licenses (
                jti              text PRIMARY KEY,
                account          text,
                max_accelerators bigint,
                expires          double precision,
                first_seen       double precision,
                used             bigint NOT NULL DEFAULT 0 CHECK (used >= 0),
                reserved         bigint NOT NULL DEFAULT 0 CHECK (reserved >= 0),
                revoked          boolean NOT NULL DEFAULT false,
                revoked_reason   text,
                revoked_at       double precision
            )
            """,
            """
            CREATE TABLE launchgate_reservations (
                decision_id text PRIMARY KEY,
                jti         text NOT NULL REFERENCES launchgate_licenses (jti),
                amount      bigint NOT NULL CHECK (amount >= 0),
                state       text NOT NULL
                            CHECK (state IN ('reserved', 'used', 'released', 'settled_unknown')),
                created_at  double precision NOT NULL,
                settled_at  double precision,
                note        text
            )
            """,
            # The sweeper only looks at open reservations, however many settled ones accumulate.
            "CREATE INDEX launchgate_reservations_open ON launchgate_reservations (created_at)"
            " WHERE state = 'reserved'",
            # A function, so the locked part of a reservation is one round trip instead of four
            # (BEGIN, lock and read, insert, COMMIT): it is the hot path of every licensed launch.
            """
            CREATE FUNCTION launchgate_reserve(
                p_jti text, p_account text, p_max bigint, p_expires double precision,
                p_amount bigint, p_decision_id text, p_now double precision,
                OUT o_outcome text, OUT o_max bigint, OUT o_used bigint, OUT o_reserved bigint
            ) LANGUAGE plpgsql AS $$
            DECLARE
                is_revoked boolean;
            BEGIN
                -- Commit without waiting for the WAL flush, so the license row is locked only
                -- while this runs; the caller then waits for durability with _DURABLE.
                PERFORM set_config('synchronous_commit', 'off', true);
                -- The first sighting fixes account, maximum and expiry; a row made by an earlier
                -- revoke has them NULL and gets them now. ON CONFLICT DO UPDATE locks the row and
                -- returns its latest version: the counters read here hold until COMMIT.
                INSERT INTO launchgate_licenses AS l
                    (jti, account, max_accelerators, expires, first_seen)
                VALUES (p_jti, p_account, p_max, p_expires, p_now)
                ON CONFLICT (jti) DO UPDATE SET
                    account = COALESCE(l.account, EXCLUDED.account),
                    max_accelerators = COALESCE(l.max_accelerators, EXCLUDED.max_accelerators),
                    expires = COALESCE(l.expires, EXCLUDED.expires),
                    first_seen = COALESCE(l.first_seen, EXCLUDED.first_seen)
                RETURNING l.max_accelerators, l.used, l.reserved, l.revoked
                INTO o_max, o_used, o_reserved, is_revoked;
                IF is_revoked THEN
                    o_outcome := 'revoked';
                ELSIF o_used + o_reserved + p_amount > o_max THEN
                    o_outcome := 'exhausted';
                ELSE
                    INSERT INTO launchgate_reservations
                        (decision_id, jti, amount, state, created_at)
                    VALUES (p_decision_id, p_jti, p_amount, 'reserved', p_now);
                    UPDATE launchgate_licenses SET reserved = reserved + p_amount
                    WHERE jti = p_jti;
                    o_reserved := o_reserved + p_amount;
                    o_outcome := 'reserved';
                END IF;
            END
            $$
            """,
        ),
    ),
    (
        2,
        (
            # One row per (account, key): bound to the latest reservation made under the key.
            # The foreign key is checked at commit, so a reservation can claim its key first.
            """
            CREATE TABLE launchgate_idempotency_keys (
                account     text NOT NULL,
                key         text NOT NULL,
                fingerprint text NOT NULL,
                decision_id text NOT NULL REFERENCES launchgate_reservations (decision_id)
                            DEFERRABLE INITIALLY DEFERRED,
                bound_at    double precision NOT NULL,
                PRIMARY KEY (account, key)
            )
            """,
            # launchgate_reserve with an optional idempotency key (see Ledger.reserve). The
            # license row is locked first, then the key row: every caller takes them in this
            # order, so two attempts with one key queue on the key even under two licenses.
            _RESERVE_KEYED_2,
        ),
    ),
    (
        3,
        (
            # launchgate_reserve_keyed and its durability barrier in one round trip (see
            # _RESERVE): a procedure may end transactions, a function may not.
            _RESERVE_DURABLE_3,
        ),
    ),
    (
        4,
        (
            # launchgate_reserve_keyed refuses a license on record for another account (a
            # second token issued under one jti) instead of spending it; otherwise as in 2.
            _RESERVE_KEYED_4,
        ),
    ),
    (
        5,
        (
            # Group commit (see _Queue): the reservations that queued up while one call was in
            # flight, in one round trip and one transaction, with one durability barrier. Each
            # is launchgate_reserve_keyed as alone. Locks are taken as a lone call takes them,
            # license row before key row, and each kind in one order: first every license of
            # the batch in byte order of its jti (made with its first call's values if new),
            # then the calls in order of (account, key). So batches and lone calls of any
            # number of replicas wait for each other but never in a cycle (a lone call holds one
            # license and waits at most for a key; review found a batch that claimed a key,
            # then waited for a license that such a call held). An error rolls the whole batch
            # back (nothing of it committed) and the caller runs its calls again one by one.
            _RESERVE_BATCH_5,
            # The settlements that queued up, in one statement and one (asynchronous, as
            # _SETTLE) commit; returns the decision ids that moved. Reservation rows are
            # locked first (by the UPDATE), then license rows one by one in byte order, as the
            # sweeper and reservation batches take them.
            _SETTLE_BATCH_5,
        ),
    ),
    (
        6,
        (
            # launchgate_reserve_keyed locks a complete license row without writing it (see
            # _RESERVE_KEYED_6); otherwise as in 4. The batch procedure takes its license rows
            # with the same lock (_RESERVE_BATCH_6), and no barrier waits out a lock timeout
            # (_RESERVE_BATCH_6, _RESERVE_DURABLE_6).
            _RESERVE_KEYED_6,
            _RESERVE_BATCH_6,
            _RESERVE_DURABLE_6,
        ),
    ),
    (
        7,
        (
            # The settlements of a batch, each reservation found by its primary key. Migration
            # 5's one UPDATE joined the batch to the reservations, and a plan made while the
            # table was small (a plpgsql function keeps it for its connection's life) read them
            # through launchgate_reservations_open, whose entries for settled reservations stay
            # until a VACUUM: with autovacuum off, or behind, every batch read them all. Found
            # measuring: settlements went from 71 to 190 us each over 110,000 launches, licensed
            # launches on PostgreSQL from 5,100/s to 1,000/s in 150 s; after a VACUUM (which
            # makes the plan again), 6,600/s. A lookup by key, planned with
            # statistics, could still read the table or that index: see migration 8.
            _SETTLE_BATCH_7,
        ),
    ),
    (
        8,
        (
            # The sweeper's index of open reservations, on a predicate that no statement of
            # the launch path states (found in review of migration 7: after an ANALYZE that
            # saw no open reservation, a settlement's "state = 'reserved'" made the planner
            # read launchgate_reservations_open, estimated empty, for the key lookup; it holds
            # an entry for every settled reservation until a VACUUM). Open is exactly "not
            # settled": every change of state sets settled_at (_SETTLE, the batch, _EXPIRE,
            # give_back, abandon, _CONFIRM), and only a reservation is made without it.
            "CREATE INDEX launchgate_reservations_unsettled ON launchgate_reservations"
            " (created_at) WHERE settled_at IS NULL",
            "DROP INDEX launchgate_reservations_open",
        ),
    ),
    (
        9,
        (
            # The keys bound to a reservation, for _ABANDONED's question whether one is (it read
            # the whole table, a row for every keyed launch ever made, holding the reservation's
            # row lock meanwhile).
            "CREATE INDEX launchgate_idempotency_keys_by_decision"
            " ON launchgate_idempotency_keys (decision_id)",
        ),
    ),
    (
        10,
        (
            # When staff gave the reservation back (give_back): a settlement that finds it so
            # counts it again (_COUNT_AGAIN), where one released by its own gateway stays.
            "ALTER TABLE launchgate_reservations ADD COLUMN given_back_at double precision",
            # When a retry was last counted on it (_RESERVE_KEYED_10): give_back refuses it for
            # a while after.
            "ALTER TABLE launchgate_reservations ADD COLUMN replayed_at double precision",
            _RESERVE_KEYED_10,
        ),
    ),
    (11, (_RESERVE_KEYED_11,)),
)
SCHEMA_VERSION: Final = _MIGRATIONS[-1][0]

# A reservation, durable when CALL returns, in one round trip. It commits asynchronously, then a
# second transaction writes a no-op (the durability barrier) and commits synchronously: a
# synchronous commit that wrote WAL flushes the WAL up to its commit record, which lies after the
# reservation's, so once CALL returns the reservation survives a crash. (A transaction that writes
# nothing is not flushed, hence the no-op write.) Any durable decision taken by another replica
# after seeing the reservation lies later in the WAL still, so a crash can lose the reservation
# only together with everything that relied on it. If the barrier fails, the caller hears a store
# error, forwards nothing and abandons the reservation (``abandon``; failing that, the sweeper
# settles it as used after the TTL). (Comments in
# migrations 1 and 2 call this barrier _DURABLE: it was a second round trip until migration 3.)
_RESERVE = (
    "CALL launchgate_reserve_durable($1, $2, $3, $4, $5, $6, $7, $8, $9,"
    " NULL, NULL, NULL, NULL, NULL)"
)
# One statement: a second settlement of the same reservation finds it no longer 'reserved'.
# Committed asynchronously (no wait for the WAL flush, which is on the launch's response path):
# a settlement lost in a database crash leaves the reservation open, and the sweeper then settles
# it as used - the direction that never over-spends. Reservations and revocations stay synchronous.
_SETTLE = """
    WITH async_commit AS MATERIALIZED (
        SELECT set_config('synchronous_commit', 'off', true)
    ), settled AS (
        UPDATE launchgate_reservations SET state = $2, settled_at = $3, note = $4
        WHERE decision_id = $1 AND state = 'reserved'
        RETURNING jti, amount
    )
    UPDATE launchgate_licenses AS l
    SET reserved = l.reserved - settled.amount,
        used = l.used + CASE WHEN $2 = 'released' THEN 0 ELSE settled.amount END
    FROM settled, async_commit WHERE l.jti = settled.jti
"""
# A settlement to used or settled_unknown that found its reservation given back (``give_back``):
# counted as used again (``COUNTED_AGAIN``). Rare, so a statement of its own after _SETTLE or
# the batch, committed synchronously: losing it in a crash would under-count.
_COUNT_AGAIN = """
    WITH counted AS (
        UPDATE launchgate_reservations
        SET state = $2, settled_at = $3, note = concat_ws('; ', note, $4::text)
        WHERE decision_id = $1 AND state = 'released' AND given_back_at IS NOT NULL
        RETURNING jti, amount
    )
    UPDATE launchgate_licenses AS l SET used = l.used + counted.amount
    FROM counted WHERE l.jti = counted.jti
    RETURNING counted.jti, counted.amount
"""
# _RESERVE and _SETTLE for several calls at once (migration 5, group commit: see _Queue).
_RESERVE_BATCH = (
    "CALL launchgate_reserve_batch($1, $2, $3, $4, $5, $6, $7, $8, $9,"
    " NULL, NULL, NULL, NULL, NULL)"
)
_SETTLE_BATCH = "SELECT launchgate_settle_batch($1, $2, $3, $4)"
# Calls in one batch at most: bounds one statement and the license rows it keeps locked.
_MAX_BATCH = 64
# The smallest pool whose connections the two queues lease (see _Lease): they leave one at least
# for everything else (the sweeper, /readyz, abandon, lone calls after a batch rolled back).
_LEASE_MIN_POOL = 3
# How long a queue keeps its connection (see _Lease) with no call: well under the pool's limit for
# an idle connection (asyncpg's max_inactive_connection_lifetime, 300 s).
_LEASE_IDLE_S = 10.0
# A statement waiting for a row lock gives up after this share of ``timeout_s`` (the session's
# lock_timeout), well before the statement timeout: a lock held elsewhere (a stuck transaction of
# another client, a hot license under a pile-up) fails the calls that wait for it, with a
# PostgreSQL error that leaves the store up. Waiting out the statement timeout instead is a
# connection failure, which marks the whole store down for the retry interval: every launch of
# every license would fail for one held row.
_LOCK_WAIT_SHARE = 0.25
# A difference between this host's clock and the database's that store_time leaves alone: well
# under any reservation_ttl_s, and within what two NTP-synchronized hosts can differ by.
_CLOCK_SKEW_IGNORED_S = 1.0
# The server ends a ledger session idle inside a transaction for this many statement timeouts
# (idle_in_transaction_session_timeout), and for no less than the minimum: see _connect.
_IDLE_IN_TRANSACTION_SHARE = 4
_IDLE_IN_TRANSACTION_MIN_S = 2.0
# A license row found held no longer refuses calls once none has found it so for this long
# (_HeldRows; while it stays held and calls come, a lone call finds it so every lock timeout).
_HELD_FORGET_S = 2.0
# The most open reservations whose license a ledger remembers for their settlement (_HeldRows).
_LICENSES_REMEMBERED = 100_000
# What rolls a whole batch back although each call alone would have gone its own way: a decision
# id already taken (that reservation's ValueError), a deadlock between two batches, or a wait for
# a row lock held elsewhere that outlasted the lock timeout (only the calls under that row should
# fail; and since the lock timeout is shorter than PostgreSQL's deadlock_timeout, 1 s by default,
# a deadlock usually ends as one). The batch's calls then run one by one. (A batch of reservations
# can only end so before its COMMIT: see _RESERVE_BATCH_6.)
_ALONE_ERRORS = (
    asyncpg.UniqueViolationError,
    asyncpg.DeadlockDetectedError,
    asyncpg.LockNotAvailableError,
)
# Counters do not change (settled_unknown already counts as used); asynchronous like _SETTLE:
# losing it leaves the reservation settled_unknown, which counts the same.
_CONFIRM = """
    WITH async_commit AS MATERIALIZED (
        SELECT set_config('synchronous_commit', 'off', true)
    )
    UPDATE launchgate_reservations
    SET state = 'used', settled_at = $2, note = COALESCE(note || '; ', '') || $3
    FROM async_commit WHERE decision_id = $1 AND state = 'settled_unknown'
    RETURNING 1
"""
# _CONFIRM for a launch's own 2xx that found its reservation settled as unknown, committed
# synchronously: lost in a crash, it would leave the reservation one that staff can give back.
_CONFIRM_DURABLE = """
    UPDATE launchgate_reservations
    SET state = 'used', settled_at = $2, note = COALESCE(note || '; ', '') || $3
    WHERE decision_id = $1 AND state = 'settled_unknown'
    RETURNING 1
"""
# The sweeper's licenses: those with a reservation open since before $1, in jti order, so
# replicas sweeping at once lock license rows in one order.
_EXPIRED_LICENSES = """
    SELECT DISTINCT jti FROM launchgate_reservations
    WHERE settled_at IS NULL AND state = 'reserved' AND created_at < $1 ORDER BY jti
"""
# One license's expired reservations ($4), settled as used, and its counters, in one statement:
# no lock is held between round trips (found by QA: a sweeper whose COMMIT was lost, again and
# again, kept the license row locked between its two statements each time, and every replica's
# launches under it got 503). SKIP LOCKED: a reservation another replica (or a late commit) is
# settling right now is theirs. Rows are locked as before: the reservations, then the license.
_EXPIRE = """
    WITH expired AS (
        UPDATE launchgate_reservations AS r
        SET state = 'settled_unknown', settled_at = $2, note = $3
        WHERE r.state = 'reserved' AND r.decision_id IN (
            SELECT decision_id FROM launchgate_reservations
            WHERE settled_at IS NULL AND state = 'reserved' AND created_at < $1 AND jti = $4
            FOR UPDATE SKIP LOCKED
        )
        RETURNING r.decision_id, r.amount, r.created_at
    ), counted AS (
        UPDATE launchgate_licenses AS l
        SET reserved = l.reserved - t.amount, used = l.used + t.amount
        FROM (SELECT sum(amount) AS amount FROM expired) AS t
        WHERE l.jti = $4 AND t.amount IS NOT NULL
    )
    SELECT decision_id, amount, created_at FROM expired
"""
_REVOKE = """
    INSERT INTO launchgate_licenses AS l (jti, revoked, revoked_reason, revoked_at)
    VALUES ($1, true, $2, $3)
    ON CONFLICT (jti) DO UPDATE
        SET revoked = true, revoked_reason = EXCLUDED.revoked_reason,
            revoked_at = EXCLUDED.revoked_at
        WHERE NOT l.revoked
    RETURNING 1
"""
# abandon, when no reservation has the decision id: a placeholder takes it, so a reservation
# arriving later fails on the primary key (after this commits, if it was waiting on it).
_PLACEHOLDER = """
    INSERT INTO launchgate_reservations
        (decision_id, jti, amount, state, created_at, settled_at, note)
    VALUES ($1, $2, 0, 'released', $3, $3, $4)
    ON CONFLICT (decision_id) DO NOTHING
    RETURNING 1
"""
# abandon, when one has it: locked, then read. Whether a key is bound to it matters only once
# settled_unknown, so it is looked up only then (by migration 9's index).
_ABANDONED = """
    SELECT r.jti, r.amount, r.state, CASE WHEN r.state = 'settled_unknown' THEN EXISTS (
        SELECT 1 FROM launchgate_idempotency_keys AS k WHERE k.decision_id = r.decision_id
    ) END AS keyed
    FROM launchgate_reservations AS r WHERE r.decision_id = $1
    FOR UPDATE OF r
"""

# Everything asyncpg, the network or a timeout can raise; all of it becomes StoreUnavailable.
_STORE_ERRORS = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    OSError,
    TimeoutError,
)
# The subset that says the database cannot be reached (rather than that one statement failed).
_CONNECTION_ERRORS = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,
    OSError,
    TimeoutError,
)

_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")


def _idle_in_transaction(timeout_s: float) -> str:
    """How long a ledger session may sit idle inside a transaction (a setting's value):
    ``_IDLE_IN_TRANSACTION_SHARE`` statement timeouts, at least ``_IDLE_IN_TRANSACTION_MIN_S``."""
    seconds = max(_IDLE_IN_TRANSACTION_MIN_S, timeout_s * _IDLE_IN_TRANSACTION_SHARE)
    return f"{round(seconds * 1000)}ms"


async def _schema_version(conn: Any) -> int:
    """The ledger's schema version (0 for a table with no row)."""
    return int(
        await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM launchgate_schema_version")
    )


async def _counted_again(conn: Any, decision_id: str, state: str, now: float) -> bool:
    """``_COUNT_AGAIN`` of a reservation given back, settled to ``state``; whether it was."""
    row = await conn.fetchrow(_COUNT_AGAIN, decision_id, state, now, COUNTED_AGAIN)
    if row is None:
        return False
    log.error(
        "reservation.counted_again", decision_id=decision_id, jti=row["jti"], amount=row["amount"]
    )
    return True


def _split_url(url: str) -> tuple[str, str | None]:
    """The DSN for asyncpg and the schema named by ``?schema=``; ConfigError for a bad schema."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    schemas = [value for key, value in query if key == "schema"]
    if not schemas:
        return url, None
    if len(schemas) > 1 or not _SCHEMA_NAME.fullmatch(schemas[0]):
        raise ConfigError(
            f"[store] url {_redact(url)!r}: 'schema' must be one lower-case SQL name"
            " ([a-z_][a-z0-9_]*, at most 63 characters)"
        )
    rest = [(key, value) for key, value in query if key != "schema"]
    return parts._replace(query=urlencode(rest)).geturl(), schemas[0]


def _license_reserved(call: _Call[ReserveResult]) -> str:
    """The license a reservation is made under (its first argument: see PostgresLedger.reserve)."""
    return str(call.args[0])


def _got_through(future: asyncio.Future[Any]) -> bool:
    """Whether a lone call under a held license got past the row's lock: a reservation
    answered (whatever its outcome; a decision id found taken comes after the lock too), or a
    settlement that moved its reservation. One that failed otherwise, or found its reservation
    settled already (it never asked for the row), says nothing (found in review)."""
    if not future.done() or future.cancelled():
        return False
    error = future.exception()
    if error is not None:
        return isinstance(error, ValueError)
    return future.result() is not False


def _lock_timed_out(future: asyncio.Future[Any]) -> StoreUnavailable | None:
    """The error of a call answered with a lock timeout (a row held elsewhere), else None."""
    if not future.done() or future.cancelled():
        return None
    error = future.exception()
    if isinstance(error, StoreUnavailable) and isinstance(
        error.__cause__, asyncpg.LockNotAvailableError
    ):
        return error
    return None


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__


async def _keep_session(conn: object) -> None:
    """Pool reset hook. This module leaves no session state behind (settings are only ever
    transaction-local; no LISTEN, cursors or session locks; asyncpg still rolls back an open
    transaction), so the default reset query would only cost a round trip per call."""


@dataclass(frozen=True, slots=True)
class _Call(Generic[_T]):
    """A reservation or settlement waiting for its batch."""

    decision_id: str
    args: tuple[Any, ...]
    future: asyncio.Future[_T]
    then: Callable[[_T], None] | None


@dataclass(slots=True)
class _Held:
    at: float  # time.monotonic() when a call under the license last waited out the lock timeout
    probing: bool = False  # a call under it is on its way alone


class _HeldRows:
    """License rows found held by another session: a call under one waited out the lock
    timeout (a stuck transaction elsewhere holds it). Calls under such a license then go
    alone, outside the queues, one at a time (``admit`` says "probe"), and the others fail at
    once, unsent, while one is on its way: none waits in a batch, holding up every other
    license's calls behind it (found by QA: with one batch in flight per queue, a held row cut
    licensed launches under every license from 1,250/s to 30/s, and the settlements on which
    each launch's answer waits likewise). The lone call waits in the row's lock queue, so it is
    the first to have the row once it is let go; the row counts as free again when a call gets
    past its lock. One that no call has found held for ``_HELD_FORGET_S`` still sends its next
    call alone, but refuses none (see ``admit``). A settlement's license is the one its
    reservation was made under, when this process made it (``reserved``)."""

    def __init__(self) -> None:
        self._held: dict[str, _Held] = {}
        self._license_of: dict[str, str] = {}  # decision id -> jti, open reservations

    def __bool__(self) -> bool:
        """Whether any license is marked (found held, recently or not)."""
        return bool(self._held)

    def marked(self, jti: str) -> bool:
        return jti in self._held

    def is_held(self, jti: str) -> bool:
        """Whether ``jti`` was found held recently (within ``_HELD_FORGET_S``)."""
        held = self._held.get(jti)
        return held is not None and time.monotonic() - held.at <= _HELD_FORGET_S

    def admit(self, jti: str, *, room: bool) -> str:
        """How a call under ``jti``, which is ``marked``, goes: "probe" alone, unless a call
        under it is on its way alone already (or there is no ``room`` for another); then
        "refuse" while the mark is recent, else "batch". A mark no call has renewed for
        ``_HELD_FORGET_S`` is not dropped (found in review: a call coming later then went into
        a batch, waited out the lock timeout there and stalled every license again), but no
        longer refuses: a burst long after the row was let go is not refused for it."""
        held = self._held[jti]
        if held.probing or not room:
            return "refuse" if time.monotonic() - held.at <= _HELD_FORGET_S else "batch"
        held.probing = True
        return "probe"

    def mark(self, jti: str | None) -> None:
        """A call under ``jti`` waited out the lock timeout (a lone call on its way stays the
        only one: found in review, marking anew let a second one start)."""
        if jti is None:
            return
        held = self._held.get(jti)
        if held is None:
            self._held[jti] = _Held(time.monotonic())
        else:
            held.at = time.monotonic()

    def probed(self, jti: str, *, through: bool) -> None:
        """The lone call under ``jti`` came back, having got past the row's lock or not."""
        if through:
            self._held.pop(jti, None)
        else:
            held = self._held.get(jti)
            if held is not None:
                held.probing = False

    def forget(self) -> None:
        """The store failed: what was found held before may not be so any more."""
        self._held.clear()

    def reserved(self, decision_id: str, jti: str) -> None:
        if len(self._license_of) >= _LICENSES_REMEMBERED:  # the oldest (never settled here)
            del self._license_of[next(iter(self._license_of))]
        self._license_of[decision_id] = jti

    def settled(self, decision_id: str) -> None:
        self._license_of.pop(decision_id, None)

    def license_of(self, decision_id: str) -> str | None:
        return self._license_of.get(decision_id)


class _Lease:
    """A pooled connection that a queue keeps from one batch to the next, sparing the pool's
    acquire and release per batch (with its task, its shield and its reset: about 100-140 µs
    of the event loop's CPU each, measured on this 2-core machine, where a statement costs
    about 160)."""

    __slots__ = ("conn", "generation", "pool")

    def __init__(self) -> None:
        self.conn: Any = None  # the connection, while no batch is using it
        self.pool: Any = None  # the pool it came from
        self.generation = -1  # PostgresLedger._generation when it was taken

    async def end(self) -> None:
        """Give the connection back to the pool."""
        conn, self.conn = self.conn, None
        if conn is not None:
            with contextlib.suppress(*_STORE_ERRORS):  # the pool drops one it cannot reset
                await self.pool.release(conn)

    def drop(self) -> None:
        """Close the connection at once (it may lead to a database that no longer answers: a
        graceful close would wait for it) and give its place back to the pool."""
        conn, self.conn = self.conn, None
        if conn is not None and _open(conn):
            conn.terminate()  # the pool's slot is free again; a release after it is a no-op

    def take(self) -> Any:
        """The connection, unless asyncpg has seen it close meanwhile (the server ended it: it
        is back in the pool already); then None."""
        if self.conn is not None and not _open(self.conn):
            self.conn = None
        return self.conn


def _open(conn: Any) -> bool:
    """Whether a pooled connection is still open and ours: asyncpg hands one whose connection
    closed back to the pool itself, and then refuses every call on it."""
    try:
        return not conn.is_closed()
    except asyncpg.InterfaceError:  # "connection has been released back to the pool"
        return False


class _Queue(Generic[_T]):
    """Group commit for one kind of call (reservations or settlements).

    The calls made in one turn of the event loop, and those made while the previous batch of
    their kind is in flight, go to the database as one batch (at most ``_MAX_BATCH``, one call
    per decision id; the rest wait for the next). One batch is in flight at a time, so the busier
    the gateway, the larger the batches, and an idle one sends a lone call at once. A call
    cancelled before its batch starts is never sent; one cancelled later still completes. ``run``
    settles the future of every call it is given; one it leaves unsettled (a bug) fails with
    ``StoreUnavailable`` rather than hanging its launch. The batches go on one connection
    (``_Lease``), given back to the pool once no call has come for ``_LEASE_IDLE_S``.
    """

    def __init__(
        self, run: Callable[[list[_Call[_T]], _Lease], Awaitable[None]], name: str
    ) -> None:
        self._run = run
        self._name = name
        self._waiting: list[_Call[_T]] = []
        self._batch: asyncio.Future[None] | None = None
        self._scheduled = False
        self._lease = _Lease()
        self._idle: asyncio.TimerHandle | None = None  # ends the lease when it fires

    def submit(
        self, decision_id: str, args: tuple[Any, ...], then: Callable[[_T], None] | None
    ) -> asyncio.Future[_T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        self._waiting.append(_Call(decision_id, args, future, then))
        if self._batch is None and not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._start)
        return future

    @property
    def idle(self) -> bool:
        """No call waiting or in flight, and no connection kept."""
        return self._batch is None and not self._waiting and self._lease.conn is None

    def drop_lease(self) -> None:
        """Close the kept connection now, unless a batch is using it (see ``_Lease.drop``)."""
        self._lease.drop()

    async def drain(self) -> None:
        """Return once every call submitted so far has been answered, and give the lease back."""
        while self._batch is not None or self._waiting:
            if self._batch is None:
                self._start()
            if self._batch is not None:
                await asyncio.wait([self._batch])
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        await self._lease.end()

    def _start(self) -> None:
        self._scheduled = False
        if self._batch is not None:
            return
        batch = self._take()
        if batch:
            if self._idle is not None:
                self._idle.cancel()
                self._idle = None
            self._batch = asyncio.ensure_future(self._drive(batch))
            self._batch.add_done_callback(self._finished)

    def _take(self) -> list[_Call[_T]]:
        """The next batch, taken from the calls waiting."""
        batch: list[_Call[_T]] = []
        later: list[_Call[_T]] = []
        taken: set[str] = set()
        for call in self._waiting:
            if call.future.cancelled():  # nobody waits for it: never sent (as on SQLite)
                continue
            if len(batch) < _MAX_BATCH and call.decision_id not in taken:
                taken.add(call.decision_id)
                batch.append(call)
            else:
                later.append(call)
        self._waiting = later
        return batch

    async def _drive(self, batch: list[_Call[_T]]) -> None:
        """Run ``batch``, then each batch that queued up meanwhile, until none is waiting."""
        while batch:
            await self._run_answering(batch, self._lease)
            batch = self._take()

    async def _run_answering(self, batch: list[_Call[_T]], lease: _Lease) -> None:
        """``run`` the batch; a call it left unanswered fails rather than hangs."""
        try:
            await self._run(batch, lease)
        finally:
            for call in batch:
                if not call.future.done():
                    call.future.set_exception(
                        StoreUnavailable(f"{self._name}: the batch ended without an answer")
                    )

    def _finished(self, batch: asyncio.Future[None]) -> None:
        self._batch = None
        error = None if batch.cancelled() else batch.exception()
        if error is not None:  # a bug: its calls were answered with StoreUnavailable
            log.error("ledger.batch_failed", store=self._name, error=_describe(error))
        self._start()
        if self._batch is None and self._lease.conn is not None:
            self._idle = asyncio.get_running_loop().call_later(_LEASE_IDLE_S, self._end_lease)

    def _end_lease(self) -> None:
        self._idle = None
        if self._batch is None:  # a batch starting now takes the lease on
            self._batch = asyncio.ensure_future(self._lease.end())
            self._batch.add_done_callback(self._finished)


def _reserve_result(call: _Call[ReserveResult], answer: Sequence[Any]) -> ReserveResult:
    """The result of reservation ``call`` from what the database answered for it: (outcome,
    maximum, used, reserved, replay_of)."""
    outcome, max_accelerators, used, reserved, replay_of = answer
    return ReserveResult(
        outcome=ReserveOutcome(outcome),
        max_accelerators=max_accelerators,
        used=used,
        reserved=reserved,
        requested=call.args[4],  # the amount (see PostgresLedger.reserve)
        replay_of=replay_of,
    )


def _columns(batch: list[_Call[_T]]) -> list[list[Any]]:
    """The arguments of ``batch``'s calls, as one array per parameter."""
    return [list(column) for column in zip(*(call.args for call in batch), strict=True)]


class PostgresLedger:
    """``Ledger`` in PostgreSQL through an asyncpg pool, shared by any number of replicas.

    Raises ``ConfigError`` at construction for a malformed ``?schema=``; does not connect.
    """

    def __init__(
        self,
        url: str,
        *,
        timeout_s: float = 2.0,
        retry_interval_s: float = 0.5,
        min_size: int = 1,
        max_size: int = 10,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """``clock``: this host's, for measuring how far the database's is from it."""
        self._dsn, self._schema = _split_url(url)
        self._name = _redact(url)
        self._timeout_s = timeout_s
        self._retry_interval_s = retry_interval_s
        self._min_size = min_size
        self._max_size = max_size
        self._pool: Any = None  # asyncpg.Pool once connected and migrated
        self._connecting = asyncio.Lock()
        self._closed = False
        self._failure: BaseException | None = None  # why the store is down, until a probe works
        self._retry_at = 0.0  # time.monotonic() before which calls fail without trying
        self._probing = False
        self._generation = 0  # counts failures (``_trip``): a lease taken before one is let go
        # ``then`` callbacks run here, one at a time (no pool of threads fighting over the log).
        self._thens = JobThread("launchgate-ledger-then")
        self._then_group: ThenGroup = contextlib.nullcontext
        self._reserving = _Queue[ReserveResult](self._reserve_queued, self._name)
        self._settling = _Queue[bool](self._settle_queued, self._name)
        self._rows = _HeldRows()
        self._probes: set[asyncio.Future[None]] = set()  # lone calls under held rows
        self._clock = clock
        self._outdated: int | None = None  # a schema version newer than this code's, once seen
        self._skew = 0.0  # the database's clock minus this host's, when it matters (store_time)

    @property
    def name(self) -> str:
        """The store's url without its password."""
        return self._name

    async def exists(self) -> bool:
        """Whether the database (in the url's schema) holds a ledger, asked without making one;
        ``StoreUnavailable`` when it cannot be asked."""
        # (In public without ?schema=, as _connect sets search_path: not "$user"'s.)
        table = f'"{self._schema or "public"}".launchgate_schema_version'
        try:
            # Every step bounded, the query and the goodbye too (found by QA: a database that
            # stopped answering after the connection was made held staff commands forever).
            conn = await asyncpg.connect(
                self._dsn, timeout=self._timeout_s, command_timeout=self._timeout_s
            )
            try:
                return await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table) is True
            finally:
                try:
                    await conn.close(timeout=self._timeout_s)
                except _STORE_ERRORS:
                    conn.terminate()
        except _STORE_ERRORS as e:
            raise StoreUnavailable(f"ledger {self._name}: {_describe(e)}") from e

    @property
    def schema(self) -> str | None:
        """The schema named by the url's ``?schema=``, or None for the connection's default."""
        return self._schema

    # -- lifecycle --

    async def open(self) -> None:
        """Connect and migrate now, whatever the retry interval; on failure the ledger stays
        usable and later calls retry."""
        async with self._connection(force=True):
            pass

    async def close(self) -> None:
        # What was asked before close still goes to the database (or fails as it would).
        # A reservation asked while the settlements drain (or the other way round) goes too.
        while not (self._reserving.idle and self._settling.idle and not self._probes):
            await self._reserving.drain()
            await self._settling.drain()
            if self._probes:
                await asyncio.wait(self._probes)
        self._closed = True
        pool, self._pool = self._pool, None
        if pool is not None:
            try:
                await asyncio.wait_for(pool.close(), self._timeout_s)
            except _STORE_ERRORS:
                pool.terminate()  # abandoning the pool either way; do not wait on a dead server
        # After the pool: a call finishing during pool.close() still runs its ``then`` (and the
        # gateway closes the decision log only after this).
        await asyncio.to_thread(self._thens.stop, wait=True)

    async def ping(self) -> None:
        async with self._connection() as conn:
            await conn.fetchval("SELECT 1")

    def group_thens(self, group: ThenGroup) -> None:
        self._then_group = group

    def store_time(self, now: float) -> float:
        """``now`` (a time of this host's clock) on the database server's clock, the one every
        replica's times are stored and compared in: replicas whose clocks disagree would
        otherwise settle each other's launches under way as used, ``reservation_ttl_s`` early
        or late (found by QA: a replica 400 s ahead swept a launch 0.5 s old; its upstream's
        500 then released nothing). A skew within ``_CLOCK_SKEW_IGNORED_S`` is left alone."""
        return now + self._skew

    async def _check_schema(self, conn: Any) -> None:
        """Refuse the store from now on if another replica has migrated it past what this
        launchgate knows (found by QA: a replica already running when a newer one migrated
        kept serving on the old rules; one started after refuses at once)."""
        current = await _schema_version(conn)
        if current > SCHEMA_VERSION:
            self._outdated = current
            log.error("store.schema_newer", store=self._name, version=current)
            raise _newer_schema(self._name, current, SCHEMA_VERSION)

    async def _measure_clock(self, conn: Any) -> None:
        """How far the database's clock is from this host's, measured on ``conn``: at start,
        then at each sweep."""
        before = self._clock()
        at_server = float(await conn.fetchval("SELECT extract(epoch FROM clock_timestamp())"))
        skew = at_server - (before + self._clock()) / 2
        skew = round(skew, 3) if abs(skew) > _CLOCK_SKEW_IGNORED_S else 0.0
        if skew != self._skew:
            log.warning(
                "store.clock_skew",
                store=self._name,
                skew_s=skew,
                ignored_within_s=_CLOCK_SKEW_IGNORED_S,
            )
        self._skew = skew

    async def migrate(self) -> int:
        """Apply pending migrations (safe from several replicas at once); return the version.

        Raises ``StoreUnavailable`` when the schema is newer than this launchgate knows.
        """
        async with self._connection(force=True) as conn:
            return await self._migrate(conn)

    # -- the reservation lifecycle --

    # The four calls of a launch's path return a future of their batch (see _Queue): no
    # coroutine, so no task when the proxy shields one.

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
        args = (
            jti,
            account,
            max_accelerators,
            expires,
            amount,
            decision_id,
            self.store_time(now),
            idempotency_key,
            fingerprint,
        )
        return self._route(self._reserving, self._reserve_batch, jti, decision_id, args, then)

    def commit(
        self, decision_id: str, now: float, then: Then | None = None
    ) -> asyncio.Future[bool]:
        return self._settle(decision_id, (decision_id, "used", self.store_time(now), None), then)

    def release(
        self, decision_id: str, now: float, then: Then | None = None
    ) -> asyncio.Future[bool]:
        return self._settle(
            decision_id, (decision_id, "released", self.store_time(now), None), then
        )

    def settle_unknown(
        self, decision_id: str, now: float, note: str, then: Then | None = None
    ) -> asyncio.Future[bool]:
        return self._settle(
            decision_id, (decision_id, "settled_unknown", self.store_time(now), note), then
        )

    def _settle(
        self, decision_id: str, args: tuple[Any, ...], then: Then | None
    ) -> asyncio.Future[bool]:
        jti = self._rows.license_of(decision_id)
        return self._route(self._settling, self._settle_batch, jti, decision_id, args, then)

    def _route(
        self,
        queue: _Queue[_T],
        alone: Callable[[list[_Call[_T]]], Awaitable[None]],
        jti: str | None,
        decision_id: str,
        args: tuple[Any, ...],
        then: Callable[[_T], None] | None,
    ) -> asyncio.Future[_T]:
        """Submit a call to ``queue``, unless its license's row is held (``_HeldRows``): then it
        goes alone (``alone([call])``), or fails at once while another does. Lone calls are
        bounded (at most about half the pool), so many held licenses cannot take every
        connection."""
        if jti is None or not self._rows.marked(jti):
            return queue.submit(decision_id, args, then)
        how = self._rows.admit(jti, room=len(self._probes) < max(1, self._max_size // 2 - 1))
        if how == "batch":
            return queue.submit(decision_id, args, then)
        future: asyncio.Future[_T] = asyncio.get_running_loop().create_future()
        if how == "refuse":
            future.set_exception(self._held_error(jti))
            return future
        call = _Call(decision_id, args, future, then)
        probe = asyncio.ensure_future(self._probe(alone, call, jti))
        self._probes.add(probe)
        probe.add_done_callback(self._probes.discard)
        return future

    def _license_settled(self, call: _Call[bool]) -> str | None:
        """The license of a settlement, when this process made its reservation."""
        return self._rows.license_of(call.decision_id)

    def _held_error(self, jti: str) -> StoreUnavailable:
        return StoreUnavailable(
            f"ledger {self._name}: the row of license {jti} is held by another session"
            " (a wait for it timed out); retrying shortly",
            late=False,
        )

    async def _reserve_queued(self, batch: list[_Call[ReserveResult]], lease: _Lease) -> None:
        """A batch the reservation queue took (see ``_unheld``)."""
        batch = self._unheld(batch, _license_reserved)
        if batch:
            await self._reserve_batch(batch, lease)

    async def _settle_queued(self, batch: list[_Call[bool]], lease: _Lease) -> None:
        """A batch the settlement queue took (see ``_unheld``)."""
        batch = self._unheld(batch, self._license_settled)
        if batch:
            await self._settle_batch(batch, lease)

    def _unheld(
        self, calls: list[_Call[_T]], license_of: Callable[[_Call[_T]], str | None]
    ) -> list[_Call[_T]]:
        """The calls of a batch about to start that are not under a license found held since
        they were made (``_route`` looked when each was made); those fail at once. Found by QA:
        the calls queued before a row was found held each cost their batch the lock timeout
        again, and every other license's calls waited behind it (3.5 s in all)."""
        if not self._rows:
            return calls
        batch: list[_Call[_T]] = []
        for call in calls:
            jti = license_of(call)
            if jti is not None and self._rows.is_held(jti):
                if not call.future.done():
                    call.future.set_exception(self._held_error(jti))
            else:
                batch.append(call)
        return batch

    async def _probe(
        self, alone: Callable[[list[_Call[_T]]], Awaitable[None]], call: _Call[_T], jti: str
    ) -> None:
        try:
            await alone([call])
        finally:
            if not call.future.done():  # (a bug) rather than a launch hanging
                call.future.set_exception(StoreUnavailable(f"ledger {self._name}: no answer"))
            self._rows.probed(jti, through=_got_through(call.future))

    def _note_reserved(
        self, batch: list[_Call[ReserveResult]], results: Sequence[ReserveResult | BaseException]
    ) -> None:
        """Remember the license of each reservation made, for its settlement (``_HeldRows``)."""
        for call, result in zip(batch, results, strict=True):
            if isinstance(result, ReserveResult) and result.outcome is ReserveOutcome.RESERVED:
                self._rows.reserved(call.decision_id, _license_reserved(call))

    async def _reserve_batch(
        self, batch: list[_Call[ReserveResult]], lease: _Lease | None = None
    ) -> None:
        """Make the reservations of ``batch``: alone (``_RESERVE``) when it is one, otherwise in
        one call (``_RESERVE_BATCH``), falling back to one by one when that rolled back."""
        if len(batch) == 1:
            alone = [await self._reserve_alone(batch[0], lease)]
            self._note_reserved(batch, alone)
            await self._answer(batch, alone)
            return
        try:
            async with self._connection(lease=lease) as conn:
                try:
                    columns = _columns(batch)
                    row = await conn.fetchrow(_RESERVE_BATCH, *columns)
                except _ALONE_ERRORS:
                    row = None
        except StoreUnavailable as e:
            self._fail(batch, e)
            return
        if row is None:
            if lease is not None:  # the calls alone take their own connections from the pool
                await lease.end()
            await self._again_alone(batch, self._reserve_batch, _license_reserved)
            return
        # One array per output column, in the batch's order.
        answers = zip(*row, strict=True)
        results = [
            _reserve_result(call, answer) for call, answer in zip(batch, answers, strict=True)
        ]
        self._note_reserved(batch, results)
        await self._answer(batch, results)

    async def _reserve_alone(
        self, call: _Call[ReserveResult], lease: _Lease | None
    ) -> ReserveResult | BaseException:
        try:
            async with self._connection(lease=lease) as conn:
                try:
                    row = await conn.fetchrow(_RESERVE, *call.args)
                except asyncpg.UniqueViolationError as e:
                    raise _decision_taken(call.decision_id) from e
                except asyncpg.LockNotAvailableError as e:
                    self._rows.mark(_license_reserved(call))
                    # Rolled back before its COMMIT (_RESERVE_DURABLE_6): nothing to abandon.
                    raise StoreUnavailable(
                        f"ledger {self._name}: {_describe(e)}", late=False
                    ) from e
        except (StoreUnavailable, ValueError) as e:
            return e
        return _reserve_result(call, row)

    async def _settle_batch(self, batch: list[_Call[bool]], lease: _Lease | None = None) -> None:
        """Settle the reservations of ``batch``: alone (``_SETTLE``) when it is one, otherwise
        in one call (``_SETTLE_BATCH``), falling back to one by one when that rolled back."""
        try:
            async with self._connection(lease=lease) as conn:
                try:
                    if len(batch) == 1:
                        status = await conn.execute(_SETTLE, *batch[0].args)
                        # The license row of a reservation that moved was updated.
                        moved = {batch[0].decision_id} if status == "UPDATE 1" else set()
                    else:
                        columns = _columns(batch)
                        moved = set(await conn.fetchval(_SETTLE_BATCH, *columns))
                except _ALONE_ERRORS as e:
                    if len(batch) == 1:
                        if isinstance(e, asyncpg.LockNotAvailableError):
                            self._rows.mark(self._license_settled(batch[0]))
                        raise
                    moved = None
        except StoreUnavailable as e:
            self._fail(batch, e)
            return
        if moved is None:
            if lease is not None:  # as in _reserve_batch
                await lease.end()
            # By license where this process made the reservation, else each alone.
            await self._again_alone(
                batch,
                self._settle_batch,
                lambda call: self._license_settled(call) or call.decision_id,
            )
            return
        for call in batch:  # settled (or found settled already): forget its license
            self._rows.settled(call.decision_id)
        results: list[bool | BaseException] = []
        for call in batch:
            if call.decision_id in moved or call.args[1] == "released":
                results.append(call.decision_id in moved)
                continue
            try:
                results.append(await self._count_again(call))
            except StoreUnavailable as e:
                # Failed as the settlement itself would have: its caller settles again later
                # (found by QA: a give_back holding the row past the lock timeout made this
                # answer False, and the 2xx went uncounted for good).
                log.error("store.count_again_failed", decision_id=call.decision_id, error=str(e))
                results.append(e)
        await self._answer(batch, results)

    async def _count_again(self, call: _Call[bool]) -> bool:
        """For a settlement to used or settled_unknown that moved nothing: a 2xx confirms a
        reservation the sweeper settled as unknown meanwhile (``_CONFIRM_DURABLE``,
        ``ANSWERED_LATE``); one given back is counted again (``_COUNT_AGAIN``). Whether either
        moved it."""
        decision_id, state, now, _ = call.args
        async with self._connection() as conn:
            if state == "used" and await conn.fetchval(
                _CONFIRM_DURABLE, decision_id, now, ANSWERED_LATE
            ):
                return True
            return await _counted_again(conn, decision_id, state, now)

    async def _again_alone(
        self,
        batch: list[_Call[_T]],
        alone: Callable[[list[_Call[_T]]], Awaitable[None]],
        group: Callable[[_Call[_T]], object],
    ) -> None:
        """Run the calls of a batch that rolled back again one by one (``alone([call])``
        answers each): the calls of one group (a license) in turn, and a bounded number of
        groups at a time, each call on a pool connection of its own. A call that waits for a
        row held elsewhere keeps its connection for the whole lock timeout, so all of them at
        once ran the pool dry; the wait for a connection then timed out, which marks the store
        down (found in review). Once a call of a group ends on the lock timeout, the group's
        later calls fail with it, unsent (their row is held: each would wait as long)."""
        # A connection left for the other queue, and one spare.
        at_once = asyncio.Semaphore(max(1, self._max_size - 2))
        groups: dict[object, list[_Call[_T]]] = {}
        for call in batch:
            groups.setdefault(group(call), []).append(call)

        async def in_turn(key: object, calls: list[_Call[_T]]) -> None:
            async with at_once:
                for n, call in enumerate(calls):
                    if isinstance(key, str) and self._rows.is_held(key):
                        # Found held meanwhile (by the other queue, say: found by QA, a
                        # settlement batch then waited out the lock timeout once more).
                        self._fail(calls[n:], self._held_error(key))
                        return
                    await alone([call])
                    held = _lock_timed_out(call.future)
                    if held is not None:
                        self._fail(calls[n + 1 :], held)
                        return

        await asyncio.gather(*(in_turn(key, calls) for key, calls in groups.items()))

    def _fail(self, batch: list[_Call[_T]], error: StoreUnavailable) -> None:
        """Answer every call of ``batch`` with ``error`` (each its own copy: exceptions raised in
        several tasks must not share a traceback)."""
        for call in batch:
            if not call.future.done():
                copy = StoreUnavailable(str(error), late=error.late)
                copy.__cause__ = error.__cause__
                call.future.set_exception(copy)

    async def _answer(self, batch: list[_Call[_T]], results: Sequence[_T | BaseException]) -> None:
        """Run the ``then`` of each call that succeeded (on the then-thread, in one group),
        then answer every call with its result or error."""
        thens = [
            functools.partial(call.then, result)
            for call, result in zip(batch, results, strict=True)
            if call.then is not None and not isinstance(result, BaseException)
        ]
        if thens:
            try:
                await self._thens.call(functools.partial(self._run_thens, thens))
            except Exception:
                log.exception("ledger.then_failed")
        for call, result in zip(batch, results, strict=True):
            if call.future.done():  # the caller was cancelled
                continue
            if isinstance(result, BaseException):
                call.future.set_exception(result)
            else:
                call.future.set_result(result)

    def _run_thens(self, thens: Sequence[Callable[[], None]]) -> None:
        """On the then-thread: each ``then``, together in the gateway's group; one that raises
        is a bug, logged."""
        with self._then_group():
            for then in thens:
                try:
                    then()
                except Exception:
                    log.exception("ledger.then_failed")

    async def confirm(self, decision_id: str, now: float, note: str) -> bool:
        now = self.store_time(now)
        async with self._connection() as conn:
            if await conn.fetchval(_CONFIRM, decision_id, now, note) is not None:
                return True
            return await _counted_again(conn, decision_id, "used", now)

    async def expire_reservations(self, *, now: float, ttl_s: float) -> list[str]:
        """Each license's expired reservations in a transaction of its own: a license row held
        elsewhere (a stuck transaction) fails only its own after the lock timeout, and they
        wait for a later sweep (found in review: in one transaction for all, it rolled back
        every sweep, for every license, for as long as it was held)."""
        note = _expiry_note(ttl_s)
        swept: list[Any] = []
        held: list[str] = []
        async with self._connection() as conn:
            await self._check_schema(conn)  # (the sweep runs every few seconds)
            await self._measure_clock(conn)
            now = self.store_time(now)
            for (jti,) in await conn.fetch(_EXPIRED_LICENSES, now - ttl_s):
                try:
                    rows = await conn.fetch(_EXPIRE, now - ttl_s, now, note, jti)
                except asyncpg.LockNotAvailableError:  # rolled back: the next sweep tries again
                    held.append(jti)
                    continue
                swept.extend(rows)
        if held:
            log.warning("store.sweep_deferred", store=self._name, licenses=held, reason="row held")
        swept.sort(key=lambda row: (row["created_at"], row["decision_id"]))
        return [str(row["decision_id"]) for row in swept]

    # -- staff operations --

    async def revoke(self, jti: str, *, reason: str | None, now: float) -> bool:
        now = self.store_time(now)
        async with self._connection() as conn:
            return await conn.fetchval(_REVOKE, jti, reason, now) is not None

    async def give_back(
        self, decision_id: str, *, now: float, note: str | None, replays_within_s: float = 0.0
    ) -> Reservation:
        now = self.store_time(now)
        async with self._connection() as conn, conn.transaction():
            row = await conn.fetchrow(
                "SELECT state, replayed_at FROM launchgate_reservations"
                " WHERE decision_id = $1 FOR UPDATE",
                decision_id,
            )
            state, replayed_at = (None, None) if row is None else row
            _check_give_back(decision_id, state, replayed_at, now - replays_within_s)
            reservation = _reservation(
                await conn.fetchrow(
                    "UPDATE launchgate_reservations SET state = 'released', settled_at = $2,"  # noqa: S608 - constant column list
                    " given_back_at = $2, note = COALESCE($3, note) WHERE decision_id = $1"
                    f" RETURNING {_RESERVATION_COLUMNS}",
                    decision_id,
                    now,
                    note,
                )
            )
            await conn.execute(
                "UPDATE launchgate_licenses SET used = used - $2 WHERE jti = $1",
                reservation.jti,
                reservation.amount,
            )
        return reservation

    async def abandon(self, decision_id: str, jti: str, *, now: float, note: str) -> None:
        now = self.store_time(now)
        # Committed synchronously: a placeholder lost in a crash would let a late reservation in.
        # Statement by statement (READ COMMITTED), each seeing what committed before it: the
        # placeholder's insert waits for a reservation under the same id still in flight, and
        # then finds it. Locks are taken as settlements take them: the reservation's row, then
        # its license's (the license insert locks nothing unless it makes the row, when no
        # reservation can refer to it yet).
        async with self._connection() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO launchgate_licenses (jti) VALUES ($1) ON CONFLICT DO NOTHING", jti
            )
            if await conn.fetchval(_PLACEHOLDER, decision_id, jti, now, note) is not None:
                return
            held_by, amount, state, keyed = await conn.fetchrow(_ABANDONED, decision_id)
            counter = _abandoned_from(state, bool(keyed))
            if counter is None:
                return
            await conn.execute(
                "UPDATE launchgate_reservations SET state = 'released', settled_at = $2,"
                " note = COALESCE(note || '; ', '') || $3 WHERE decision_id = $1",
                decision_id,
                now,
                note,
            )
            await conn.execute(
                f"UPDATE launchgate_licenses SET {counter} = {counter} - $2 WHERE jti = $1",  # noqa: S608 - a column name of _abandoned_from's
                held_by,
                amount,
            )

    # -- reads --

    async def license(self, jti: str) -> LicenseState | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {_LICENSE_COLUMNS} FROM launchgate_licenses WHERE jti = $1",  # noqa: S608 - constant column list
                jti,
            )
        return None if row is None else _license_state(row)

    async def licenses(self) -> list[LicenseState]:
        async with self._connection() as conn:
            # COLLATE "C": byte order, as SQLite sorts, whatever the database's locale.
            rows = await conn.fetch(
                f'SELECT {_LICENSE_COLUMNS} FROM launchgate_licenses ORDER BY jti COLLATE "C"'  # noqa: S608 - constant column list
            )
        return [_license_state(row) for row in rows]

    async def reservation(self, decision_id: str) -> Reservation | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {_RESERVATION_COLUMNS} FROM launchgate_reservations"  # noqa: S608 - constant column list
                " WHERE decision_id = $1",
                decision_id,
            )
        return None if row is None else _reservation(row)

    async def idempotency_key(self, account: str, key: str) -> IdempotencyKey | None:
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"SELECT {_KEY_COLUMNS} FROM launchgate_idempotency_keys"  # noqa: S608 - constant column list
                " WHERE account = $1 AND key = $2",
                account,
                key,
            )
        return None if row is None else _idempotency_key(row)

    # -- connections, failure and recovery --

    @contextlib.asynccontextmanager
    async def _connection(
        self, *, force: bool = False, lease: _Lease | None = None
    ) -> AsyncIterator[Any]:
        """A pooled connection, creating the pool on first use; every store error leaves as
        ``StoreUnavailable``. ``force`` ignores the retry interval (open, migrate). With a
        ``lease``, the connection it holds, or one kept in it afterwards (see ``_leased``)."""
        if self._outdated is not None:
            raise _newer_schema(self._name, self._outdated, SCHEMA_VERSION)
        probe = self._admit(force=force)
        try:
            async with self._leased(lease) as conn:
                if probe:
                    if self._failure is not None:
                        log.info("store.recovered", store=self._name)
                    self._failure, self._probing, probe = None, False, False
                try:
                    yield conn
                except _CONNECTION_ERRORS:
                    # The statement may still be running, or the server gone: asyncpg's release
                    # would wait up to another timeout for its cancellation. Drop it instead.
                    conn.terminate()
                    raise
        except _STORE_ERRORS as e:
            if probe or isinstance(e, _CONNECTION_ERRORS):
                await self._trip(e)
            raise StoreUnavailable(f"ledger {self._name}: {_describe(e)}") from e
        except StoreUnavailable as e:  # a newer schema, closed meanwhile, a lock timeout
            if probe:
                await self._trip(e)
            raise
        finally:
            if probe:  # cancelled before a verdict: the next call probes again
                self._probing = False

    @contextlib.asynccontextmanager
    async def _leased(self, lease: _Lease | None) -> AsyncIterator[Any]:
        """A connection for ``_connection``: ``lease``'s when it holds one taken since the last
        failure (``_trip``), else one from the pool. A leased one (only with room in the pool
        for the two queues and everything else) is kept in ``lease`` when the caller is done,
        given back to the pool when the caller raised, and closed at once when the store
        failed meanwhile."""
        if lease is None or self._max_size < _LEASE_MIN_POOL:
            pool = self._pool if self._pool is not None else await self._connect()
            async with pool.acquire(timeout=self._timeout_s) as conn:
                yield conn
            return
        if lease.generation != self._generation:
            lease.drop()  # taken before a failure (and in use then, or _trip dropped it)
        conn = lease.take()
        if conn is None:
            pool = self._pool if self._pool is not None else await self._connect()
            conn = await pool.acquire(timeout=self._timeout_s)
            lease.pool, lease.generation = pool, self._generation
        lease.conn = None  # in use
        failed = True
        try:
            yield conn
            failed = False
        finally:
            lease.conn = conn
            if lease.generation != self._generation:  # the store failed meanwhile
                lease.drop()
            elif failed:
                await lease.end()

    def _admit(self, *, force: bool) -> bool:
        """Whether this call is the probe; raise ``StoreUnavailable`` if it must not try."""
        if self._closed:
            raise StoreUnavailable(f"ledger {self._name} is closed", late=False)
        if self._pool is not None and self._failure is None:
            return False
        if not force and (self._probing or time.monotonic() < self._retry_at):
            raise StoreUnavailable(
                f"ledger {self._name} is unavailable; retrying shortly", late=False
            ) from self._failure
        self._probing = True
        return True

    async def _trip(self, error: BaseException) -> None:
        """Remember the failure, fail fast until the retry time, and have stale pooled
        connections replaced (one that outlived a restart would fail one call after another)."""
        if self._failure is None:  # says why once, not at every probe
            log.error("store.failing", store=self._name, error=_describe(error))
        self._failure = error
        self._generation += 1  # connections leased before now are not used again
        self._rows.forget()
        self._retry_at = time.monotonic() + self._retry_interval_s
        self._probing = False
        if self._pool is not None:
            await self._pool.expire_connections()
        # Connections the queues keep may lead to a database that no longer answers.
        self._reserving.drop_lease()
        self._settling.drop_lease()

    async def _connect(self) -> Any:
        """Create the pool and migrate the schema; one caller at a time."""
        async with self._connecting:
            if self._pool is not None:
                return self._pool
            settings = {
                "application_name": "launchgate",
                # Every statement of the ledger finds its rows by a key or an index. A plan made
                # while a table was small, or from statistics of then, would read it whole as it
                # grows, and PL/pgSQL keeps a function's plans for its connection's life (found
                # in review: after an ANALYZE at 100 rows, each settlement read the whole table,
                # 458 -> 2,346 us over 23,632 launches). Off only discourages: a statement with
                # no other way still scans.
                "enable_seqscan": "off",
                # Which adds a cost of 1e10 to a plan that can only scan (the schema version's
                # one row): past the JIT thresholds, compiled at each run, 23-95 ms (found in
                # review). The ledger's statements are all short; none gains from JIT.
                "jit": "off",
                "lock_timeout": f"{max(1, round(self._timeout_s * _LOCK_WAIT_SHARE * 1000))}ms",
                # A transaction of several statements (the sweeper's, give_back's, abandon's)
                # whose client is gone mid-way (its host lost, a network partition) would keep
                # its license row locked until the server noticed the dead connection: hours, by
                # TCP's defaults, while every replica's launches under that license got 503
                # (found by QA). The server ends such a session once idle in its transaction
                # for this long: none of ours waits between its statements.
                "idle_in_transaction_session_timeout": _idle_in_transaction(self._timeout_s),
            }
            # Always named: PostgreSQL's default ("$user", public) would let a schema named after
            # the login role, made later in the same database (a staging ledger with ?schema=
            # that role), take the ledger over on the next connection (found by QA: a license
            # exhausted in public launched again from that schema's rows).
            settings["search_path"] = self._schema if self._schema is not None else "public"
            pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self._min_size,
                max_size=self._max_size,
                timeout=self._timeout_s,
                command_timeout=self._timeout_s,
                server_settings=settings,
                reset=_keep_session,
            )
            try:
                async with pool.acquire(timeout=self._timeout_s) as conn:
                    await self._migrate(conn)
                    await self._measure_clock(conn)
                if self._closed:
                    raise StoreUnavailable(f"ledger {self._name} is closed")
            except BaseException:
                pool.terminate()
                raise
            self._pool = pool
            return pool

    async def _refuse_a_role_s_ledger(self, conn: Any) -> None:
        """Without ?schema= the ledger is public's; a ledger in the schema named after the login
        role (where PostgreSQL's default search_path, and launchgate before it named public,
        would have put it) makes the store ambiguous: refused, rather than one of them counted
        and the other forgotten."""
        role = await conn.fetchval(
            "SELECT current_user FROM pg_namespace"
            " WHERE nspname = current_user AND current_user <> 'public'"
            " AND to_regclass(quote_ident(current_user) || '.launchgate_schema_version')"
            " IS NOT NULL"
        )
        if role is not None:
            raise StoreUnavailable(
                f"ledger {self._name}: the database holds a ledger in schema {role!r} (the login"
                f" role's) too; add ?schema=public or ?schema={role} to the url to say which",
                late=False,
            )

    async def _migrate(self, conn: Any) -> int:
        async with conn.transaction():
            # Replicas starting together wait here for each other's migration, bounded by the
            # statement timeout alone.
            await conn.execute("SET LOCAL lock_timeout = 0")
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _MIGRATION_LOCK)
            if self._schema is None:
                await self._refuse_a_role_s_ledger(conn)
            else:
                # Only when missing: CREATE SCHEMA IF NOT EXISTS would still need CREATE rights.
                found = await conn.fetchval(
                    "SELECT 1 FROM pg_namespace WHERE nspname = $1", self._schema
                )
                if found is None:
                    await conn.execute(f'CREATE SCHEMA "{self._schema}"')
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS launchgate_schema_version (version integer NOT NULL)"
            )
            current = await _schema_version(conn)
            if current > SCHEMA_VERSION:
                raise _newer_schema(self._name, current, SCHEMA_VERSION)
            for version, statements in _MIGRATIONS:
                if version <= current:
                    continue
                for statement in statements:
                    await conn.execute(statement)
                await conn.execute("DELETE FROM launchgate_schema_version")
                await conn.execute(
                    "INSERT INTO launchgate_schema_version (version) VALUES ($1)", version
                )
        return SCHEMA_VERSION
