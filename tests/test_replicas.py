"""Several gateways, one PostgreSQL ledger: quantities hold across replicas, revocation
reaches every replica, unknown outcomes are settled as used, and a store outage fails
closed and heals by itself (issue 3). Real `launchgate serve` processes throughout."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information
import pytest

from conftest import H100_SKU, RESTRICTED, UNRESTRICTED, Keys, MakeToken, write_config
from test_ledger import postgres_schema
from test_pgledger import Forwarder, postgres_dsn
from test_pgledger import forwarder as forwarder  # a fixture, used by name
from test_serve import LAUNCHGATE, Process, free_port, spawn, start_serve


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A PostgreSQL store url on a fresh schema (skips without LAUNCHGATE_TEST_POSTGRES_DSN)."""
    async with postgres_schema() as url:
        yield url


@dataclass
class Replica:
    url: str
    admin: str
    config: Path
    process: Process


async def launch(
    url: str, account: str, token: str | None = None, count: int = 1
) -> tuple[int, dict[str, Any]]:
    headers = {"X-Account-Id": account}
    if token:
        headers["License-Token"] = token
    body = {"instance_type": H100_SKU, "count": count, "region": "us-east-1"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{url}/v1/instances", json=body, headers=headers) as r,
    ):
        return r.status, await r.json(content_type=None)


@pytest.fixture
async def stub_url() -> AsyncIterator[str]:
    stub = await spawn("stub-backend", "--listen", "127.0.0.1:0")
    yield (await stub.wait_for_line("listening on")).rsplit(" ", 1)[-1]
    await stub.stop()


@pytest.fixture
async def start_replica(tmp_path: Path, keys: Keys, stub_url: str) -> AsyncIterator[Any]:
    """Start `launchgate serve` replicas sharing one store and one decision log."""
    replicas: list[Replica] = []

    async def start(store_url: str, name: str, **sections: dict[str, Any]) -> Replica:
        folder = tmp_path / name
        folder.mkdir(exist_ok=True)
        listen, admin = free_port(), free_port()
        sections.setdefault("store", {})["url"] = store_url
        config = write_config(
            folder,
            stub_url,
            keys,
            None,
            server={"listen": f"127.0.0.1:{listen}", "admin_listen": f"127.0.0.1:{admin}"},
            audit={"path": str(tmp_path / "decisions.jsonl")},
            **sections,
        )
        replica = Replica(
            f"http://127.0.0.1:{listen}",
            f"http://127.0.0.1:{admin}",
            config,
            await start_serve(config, f"http://127.0.0.1:{admin}"),
        )
        replicas.append(replica)
        return replica

    yield start
    for replica in replicas:
        await replica.process.stop(within_s=30)


async def cli(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(
        *LAUNCHGATE, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


async def test_replicas_never_overspend_and_revocation_reaches_both(
    pg_url: str,
    start_replica: Any,
    make_token: MakeToken,
    stub_url: str,
) -> None:
    """Two replicas hammered at once admit exactly the license's quantity; a revoke is enforced by both within 1 s."""
    a = await start_replica(pg_url, "a")
    b = await start_replica(pg_url, "b")
    token = make_token(jti="lic-shared-64", max_accelerators=64)
    results = await asyncio.gather(
        *(launch((a, b)[i % 2].url, RESTRICTED, token) for i in range(40))
    )
    statuses = [status for status, _ in results]
    assert statuses.count(201) == 8  # 8 instances x 8 H100 = 64
    assert {body["reason"] for status, body in results if status != 201} == {"license_exhausted"}
    code, out = await cli("licenses", "list", "--config", str(a.config), "--json")
    assert code == 0, out
    row = next(r for r in json.loads(out) if r["jti"] == "lic-shared-64")
    assert (row["used"], row["remaining"]) == (64, 0)

    fresh = make_token(jti="lic-to-revoke", max_accelerators=800)
    assert (await launch(a.url, RESTRICTED, fresh))[0] == 201
    assert (await launch(b.url, RESTRICTED, fresh))[0] == 201
    code, out = await cli(
        "token", "revoke", "--config", str(b.config), "lic-to-revoke", "--reason", "test"
    )
    assert code == 0, out
    revoked_at = time.monotonic()
    for replica in (a, b):
        while True:
            status, body = await launch(replica.url, RESTRICTED, fresh)
            if status == 403 and body["reason"] == "license_revoked":
                break
            assert time.monotonic() - revoked_at < 1.0, "revocation not enforced within 1 s"
            await asyncio.sleep(0.05)


async def test_sigkill_mid_launch_is_settled_as_used_then_given_back(
    pg_url: str,
    start_replica: Any,
    make_token: MakeToken,
    stub_url: str,
    tmp_path: Path,
) -> None:
    """A gateway killed mid-launch leaves its reservation; after the TTL another replica
    settles it as used (never silently released), and `licenses release` gives it back."""
    killed = await start_replica(pg_url, "killed")
    survivor = await start_replica(pg_url, "survivor", store={"reservation_ttl_s": 1})
    token = make_token(jti="lic-killed", max_accelerators=16)
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{stub_url}/_stub/fail", json={"delay_s": 30, "times": 1}) as r,
    ):
        assert r.status == 200
    in_flight = asyncio.create_task(launch(killed.url, RESTRICTED, token))
    await killed.process.wait_for_line('"reason":"licensed"')
    killed.process.proc.kill()
    with pytest.raises(aiohttp.ClientError):
        await in_flight
    log = tmp_path / "decisions.jsonl"
    decision_id = next(
        json.loads(line)["decision_id"]
        for line in log.read_text().splitlines()
        if '"reason":"licensed"' in line
    )
    # Before the TTL the units are held; after it the survivor settles them as used.
    deadline = time.monotonic() + 10
    while True:
        settled = [
            json.loads(x) for x in log.read_text().splitlines() if '"reservation.settled"' in x
        ]
        if settled:
            break
        assert time.monotonic() < deadline, "the reservation was never settled"
        await asyncio.sleep(0.2)
    assert settled[0]["decision_id"] == decision_id
    code, out = await cli("licenses", "list", "--config", str(survivor.config), "--json")
    row = next(r for r in json.loads(out) if r["jti"] == "lic-killed")
    assert (row["used"], row["reserved"]) == (8, 0)
    status, body = await launch(survivor.url, RESTRICTED, token, count=2)
    assert (status, body["reason"]) == (403, "license_exhausted")  # 8 used + 16 > 16

    code, out = await cli(
        "licenses",
        "release",
        "--config",
        str(survivor.config),
        "--decision",
        decision_id,
        "--note",
        "checked: nothing launched",
    )
    assert code == 0, out
    assert (await launch(survivor.url, RESTRICTED, token, count=2))[0] == 201
    released = [json.loads(x) for x in log.read_text().splitlines() if '"license.released"' in x]
    assert [r["decision_id"] for r in released] == [decision_id]
    code, out = await cli("audit", "verify", str(log))
    assert code == 0, out


async def test_store_outage_fails_closed_and_heals(
    pg_url: str,
    start_replica: Any,
    make_token: MakeToken,
    forwarder: Forwarder,
) -> None:
    """PostgreSQL away: licensed launches get a quick 503, others pass, /readyz says 503;
    back: the same gateway recovers without a restart. Also when it starts without it."""
    await forwarder.stop()
    replica = await start_replica(forwarder.url(pg_url), "r")  # the store is down at start
    token = make_token(jti="lic-outage")
    async with aiohttp.ClientSession() as session:

        async def ready() -> int:
            async with session.get(f"{replica.admin}/readyz") as r:
                return r.status

        assert await ready() == 503
        started = time.monotonic()
        status, body = await launch(replica.url, RESTRICTED, token)
        assert (status, body["reason"]) == (503, "store_unavailable")
        assert time.monotonic() - started < 3.5
        assert (await launch(replica.url, UNRESTRICTED))[0] == 201

        await forwarder.start()
        deadline = time.monotonic() + 10
        while (await launch(replica.url, RESTRICTED, token))[0] != 201:
            assert time.monotonic() < deadline, "the gateway did not recover"
            await asyncio.sleep(0.2)
        assert await ready() == 200

        await forwarder.stop()
        results = await asyncio.gather(*(launch(replica.url, RESTRICTED, token) for _ in range(20)))
        assert {status for status, _ in results} == {503}
        assert await ready() == 503
        await forwarder.start()
        deadline = time.monotonic() + 10
        while await ready() != 200:
            assert time.monotonic() < deadline, "/readyz did not recover"
            await asyncio.sleep(0.2)


async def test_a_license_row_held_elsewhere_fails_only_its_launches(
    pg_url: str,
    start_replica: Any,
    make_token: MakeToken,
) -> None:
    """A stuck transaction elsewhere holds one license's row: launches under that license get
    503 store_unavailable after the lock timeout (0.5 s), not the statement timeout; launches
    under another license and /readyz go on as if nothing were wrong; nothing is left behind
    for the refused ones (no abandon: they certainly reserved nothing); once the row is let
    go, the license launches again."""
    replica = await start_replica(pg_url, "r")
    held, free = make_token(jti="lic-held"), make_token(jti="lic-free")
    assert (await launch(replica.url, RESTRICTED, held))[0] == 201  # the license on record
    schema = pg_url.rpartition("schema=")[2]
    conn = await asyncpg.connect(postgres_dsn(), timeout=5, server_settings={"search_path": schema})
    try:
        async with aiohttp.ClientSession() as session:
            async with conn.transaction():
                await conn.execute(
                    "SELECT 1 FROM launchgate_licenses WHERE jti = 'lic-held' FOR UPDATE"
                )
                started = time.monotonic()
                results = await asyncio.gather(
                    *(launch(replica.url, RESTRICTED, held) for _ in range(12)),
                    launch(replica.url, RESTRICTED, free),
                )
                assert time.monotonic() - started < 1.8
                assert {(s, b["reason"]) for s, b in results[:-1]} == {(503, "store_unavailable")}
                assert results[-1][0] == 201
                started = time.monotonic()
                assert (await launch(replica.url, RESTRICTED, free))[0] == 201
                assert time.monotonic() - started < 0.5  # the store was never marked down

                async def timed(token: str) -> tuple[int, float]:
                    began = time.monotonic()
                    status, _ = await launch(replica.url, RESTRICTED, token)
                    return status, time.monotonic() - began

                # Known held now: one launch under it waits alone, the rest fail at once, and
                # nobody else waits for any of them (found by QA: every batch did, for 1 s).
                again = await asyncio.gather(
                    *(timed(held) for _ in range(12)), timed(free), timed(free)
                )
                assert {status for status, _ in again[:12]} == {503}
                assert sum(took < 0.3 for _, took in again[:12]) >= 11
                assert [(status, took < 0.3) for status, took in again[12:]] == [(201, True)] * 2
                async with session.get(f"{replica.admin}/readyz") as r:
                    assert r.status == 200
            assert (await launch(replica.url, RESTRICTED, held))[0] == 201
            placeholders = await conn.fetchval(
                "SELECT count(*) FROM launchgate_reservations WHERE state <> 'reserved'"
                " AND amount = 0"
            )
            assert placeholders == 0
    finally:
        await conn.close()


async def test_store_migrate_command(pg_url: str, tmp_path: Path, keys: Keys) -> None:
    """`launchgate store migrate` creates the schema on PostgreSQL and SQLite, and is idempotent."""
    for name, url in (("pg", pg_url), ("sqlite", f"sqlite:{tmp_path / 'ledger.sqlite3'}")):
        folder = tmp_path / name
        folder.mkdir()
        config = write_config(folder, "http://127.0.0.1:9", keys, None, store={"url": url})
        outputs = []
        for _ in range(2):
            code, out = await cli("store", "migrate", "--config", str(config))
            assert code == 0, out
            outputs.append(out.strip())
        assert outputs[0] == outputs[1] and outputs[0].startswith("ok schema version "), outputs
