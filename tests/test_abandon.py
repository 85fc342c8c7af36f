"""A licensed launch whose ledger call fails: a launch not forwarded leaves nothing reserved,
and a settlement the store refused is made later, as the upstream's answer said (CONTRACT
section 3: a licence is never over-spent, and only an unknown outcome is counted as used)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp.test_utils import TestServer

from conftest import H100_SKU, RESTRICTED, Harness, Keys, MakeToken, StartGateway, write_config
from launchgate.audit import verify_file
from launchgate.config import load_config
from launchgate.errors import StoreUnavailable
from launchgate.gateway import Gateway
from launchgate.ledger import Ledger, Reservation, ReserveResult, Then
from launchgate.proxy import create_app


def lose_reserve_answers(monkeypatch: pytest.MonkeyPatch, ledger: Ledger) -> None:
    """``ledger.reserve`` reserves, then fails as a call whose answer a stall held past its
    timeout does: the reservation is made, the gateway hears StoreUnavailable."""
    real = ledger.reserve

    async def reserve_and_lose_the_answer(**kwargs: Any) -> ReserveResult:
        await real(**{**kwargs, "then": None})  # the answer, and what it would have written
        raise StoreUnavailable("the answer was held up past the timeout")

    monkeypatch.setattr(ledger, "reserve", reserve_and_lose_the_answer)


def refusing_first(
    settle: Callable[[str, float, Then | None], Awaitable[bool]], times: int
) -> Callable[[str, float, Then | None], Awaitable[bool]]:
    """``settle`` (a ledger's commit or release), refused by a store away for its first
    ``times`` calls."""
    refusals = times

    async def refused_at_first(decision_id: str, now: float, then: Then | None = None) -> bool:
        nonlocal refusals
        if refusals:
            refusals -= 1
            raise StoreUnavailable("the store is away for a moment")
        return bool(await settle(decision_id, now, then))

    return refused_at_first


async def once_settled(gw: Harness, decision_id: str, within_s: float = 5.0) -> Reservation:
    """The reservation of ``decision_id`` once it is no longer reserved; fails the test if it
    still is after ``within_s``."""
    deadline = time.monotonic() + within_s
    while True:
        reservation = await gw.gateway.ledger.reservation(decision_id)
        if reservation is not None and reservation.state != "reserved":
            return reservation
        assert time.monotonic() < deadline, f"still {reservation}"
        await asyncio.sleep(0.02)


async def test_a_refusal_that_sent_nothing_abandons_nothing(
    start_gateway: StartGateway, make_token: MakeToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store known to be down refuses at once and sends nothing (``late=False``): nothing can
    land later, so no background abandon is started (an outage would start one per 503)."""
    gw = await start_gateway()
    ledger = gw.gateway.ledger

    async def refuse(**kwargs: Any) -> ReserveResult:
        raise StoreUnavailable("the ledger is down; retrying shortly", late=False)

    abandoned: list[str] = []

    async def abandon(decision_id: str, jti: str, *, now: float, note: str) -> None:
        abandoned.append(decision_id)

    monkeypatch.setattr(ledger, "reserve", refuse)
    monkeypatch.setattr(ledger, "abandon", abandon)
    status, body, _ = await gw.launch(token=make_token())
    await asyncio.sleep(0.1)
    assert (status, body["reason"]) == (503, "store_unavailable")
    assert abandoned == []


async def test_shadow_mode_forwards_so_abandons_nothing(
    start_gateway: StartGateway, make_token: MakeToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by review: in shadow mode a store_unavailable launch is forwarded anyway, so a
    reservation that lands late may stand for a real launch; it must not be released as
    "nothing was forwarded" (the sweeper counts it as used)."""
    gw = await start_gateway(server={"mode": "shadow"})
    ledger = gw.gateway.ledger
    lose_reserve_answers(monkeypatch, ledger)
    abandoned: list[str] = []

    async def abandon(decision_id: str, jti: str, *, now: float, note: str) -> None:
        abandoned.append(decision_id)

    monkeypatch.setattr(ledger, "abandon", abandon)
    status, _, headers = await gw.launch(token=make_token(jti="lic-shadow", max_accelerators=8))
    await asyncio.sleep(0.1)
    assert status == 201  # forwarded, as shadow mode does whatever the outcome
    assert abandoned == []
    reservation = await ledger.reservation(headers["Launchgate-Decision-Id"])
    assert reservation is not None and reservation.state == "reserved"  # the sweeper's


async def test_a_reservation_whose_answer_was_lost_is_abandoned(
    start_gateway: StartGateway, make_token: MakeToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reserve call failed (503, nothing forwarded) but did reserve: the gateway abandons
    it in the background, again after a store error, and the units are back."""
    gw = await start_gateway()
    ledger = gw.gateway.ledger
    lose_reserve_answers(monkeypatch, ledger)
    real_abandon = ledger.abandon
    failures = [StoreUnavailable("the store is still away")]

    async def abandon(decision_id: str, jti: str, *, now: float, note: str) -> None:
        if failures:
            raise failures.pop()
        await real_abandon(decision_id, jti, now=now, note=note)

    monkeypatch.setattr(ledger, "abandon", abandon)
    with structlog.testing.capture_logs() as logs:
        status, body, _ = await gw.launch(token=make_token(jti="lic-lost", max_accelerators=8))
        assert (status, body["reason"]) == (503, "store_unavailable")
        reservation = await once_settled(gw, body["decision_id"])
    assert [r for r in await gw.stub_requests() if r["method"] == "POST"] == []
    assert (reservation.state, reservation.amount) == ("released", 8)
    assert reservation.note == "the reservation call failed; nothing was forwarded"
    state = await gw.license("lic-lost")
    assert (state.used, state.reserved) == (0, 0)
    assert {
        "event": "store.reservation_abandoned",
        "decision_id": body["decision_id"],
        "attempts": 2,
        "log_level": "info",
    } in logs
    monkeypatch.undo()  # the store answers again: the license's 8 units are there to use
    assert (await gw.launch(token=make_token(jti="lic-lost", max_accelerators=8)))[0] == 201


@pytest.mark.parametrize(
    ("upstream_status", "how", "state", "counted"),
    [(201, "commit", "used", (8, 0)), (500, "release", "released", (0, 0))],
)
async def test_a_settlement_the_store_refused_is_made_later(
    start_gateway: StartGateway,
    make_token: MakeToken,
    monkeypatch: pytest.MonkeyPatch,
    upstream_status: int,
    how: str,
    state: str,
    counted: tuple[int, int],
) -> None:
    """The store fails the settlement once: the answer is relayed and its completion says
    'pending'; settled again in the background, the reservation ends as the upstream's answer
    said, not left for the sweeper to count as used."""
    gw = await start_gateway()
    if upstream_status != 201:
        await gw.stub_fail(status=upstream_status, times=1)
    settle = refusing_first(getattr(gw.gateway.ledger, how), 1)
    monkeypatch.setattr(gw.gateway.ledger, how, settle)
    with structlog.testing.capture_logs() as logs:
        status, _, headers = await gw.launch(token=make_token(jti="lic-settle"))
        assert status == upstream_status
        decision_id = headers["Launchgate-Decision-Id"]
        reservation = await once_settled(gw, decision_id)
        for _ in range(250):  # the retry's record and log line follow the settlement
            if any(e["event"] == "store.settled_on_retry" for e in logs):
                break
            await asyncio.sleep(0.02)
    assert reservation.state == state
    license_state = await gw.license("lic-settle")
    assert (license_state.used, license_state.reserved) == counted
    [completed] = [r for r in gw.records() if r["event"] == "launch.completed"]
    assert completed["settlement"] == "pending"
    assert [e["event"] for e in logs if e.get("decision_id") == decision_id] == [
        "store.settle_failed",
        "store.settled_on_retry",
    ]
    # ... and the decision log says how it ended (found by QA: only stdout did).
    [settled] = [r for r in gw.records() if r["event"] == "reservation.settled"]
    assert (settled["decision_id"], settled["settlement"]) == (decision_id, state)
    assert verify_file(gw.config.audit_path).ok


async def test_a_settlement_refused_for_longer_than_the_ttl_is_not_swept_as_unknown(
    start_gateway: StartGateway, make_token: MakeToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The store refuses a commit for longer than ``reservation_ttl_s`` (found by QA: the
    retries gave up at the TTL, and the sweeper then settled the launches as "outcome
    unknown"): the gateway's sweeper waits for its own retries, which keep trying, and the
    reservation ends as the upstream's answer said."""
    gw = await start_gateway(store={"reservation_ttl_s": 1})
    # Refused at 0, 0.5 and 1.5 s: the fourth attempt, at 3.5 s, is well past the TTL.
    monkeypatch.setattr(gw.gateway.ledger, "commit", refusing_first(gw.gateway.ledger.commit, 3))
    with structlog.testing.capture_logs() as logs:
        status, _, headers = await gw.launch(token=make_token(jti="lic-outage"))
        assert status == 201
        decision_id = headers["Launchgate-Decision-Id"]
        reservation = await once_settled(gw, decision_id, within_s=8)
        await asyncio.sleep(1)  # sweeps that come after find nothing to settle
    assert (reservation.state, reservation.note) == ("used", None)
    assert [e["event"] for e in logs if e.get("decision_id") == decision_id] == [
        "store.settle_failed",
        "store.settled_on_retry",
    ]
    assert [r["settlement"] for r in gw.records() if r["event"] == "reservation.settled"] == [
        "used"
    ]


async def test_a_retried_settlement_that_finds_it_settled_records_nothing(
    start_gateway: StartGateway, make_token: MakeToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: a settlement retried after the sweeper had counted the reservation as
    used wrote "released" to the decision log all the same (after the sweeper's "used"). The
    retry now records only a settlement it made."""
    gw = await start_gateway()
    await gw.stub_fail(status=500, times=1)
    real = gw.gateway.ledger.release
    sweep_first = [True]

    async def release(decision_id: str, now: float, then: Then | None = None) -> bool:
        if sweep_first:
            sweep_first.pop()
            # The sweeper gets there before the retry does.
            await gw.gateway.ledger.settle_unknown(decision_id, now, "swept")
            raise StoreUnavailable("the store is away for a moment")
        return bool(await real(decision_id, now, then))

    monkeypatch.setattr(gw.gateway.ledger, "release", release)
    with structlog.testing.capture_logs() as logs:
        status, _, headers = await gw.launch(token=make_token(jti="lic-swept"))
        assert status == 500
        decision_id = headers["Launchgate-Decision-Id"]
        for _ in range(250):
            if any(e["event"] == "store.settled_on_retry" for e in logs):
                break
            await asyncio.sleep(0.02)
    assert "store.settled_elsewhere" in [e["event"] for e in logs]
    assert [r for r in gw.records() if r["event"] == "reservation.settled"] == []
    reservation = await gw.gateway.ledger.reservation(decision_id)
    assert reservation is not None and reservation.state == "settled_unknown"


async def test_stopping_does_not_wait_out_the_retries(
    tmp_path: Path,
    keys: Keys,
    stub_server: TestServer,
    aiohttp_server: Any,
    make_token: MakeToken,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A gateway told to stop while an abandon keeps failing stops at once: the retry makes
    one last attempt and gives up (logged), instead of retrying for reservation_ttl_s."""
    path = write_config(tmp_path, str(stub_server.make_url("")).rstrip("/"), keys)
    gateway = Gateway(load_config(path))
    server: TestServer = await aiohttp_server(create_app(gateway))
    lose_reserve_answers(monkeypatch, gateway.ledger)
    attempts = 0
    retried = asyncio.Event()

    async def abandon(decision_id: str, jti: str, *, now: float, note: str) -> None:
        nonlocal attempts
        attempts += 1
        if attempts == 2:
            retried.set()
        raise StoreUnavailable("the store is away")

    monkeypatch.setattr(gateway.ledger, "abandon", abandon)
    body = {"instance_type": H100_SKU, "count": 1, "region": "us-east-1"}
    headers = {"X-Account-Id": RESTRICTED, "License-Token": make_token()}
    async with (
        aiohttp.ClientSession() as session,
        session.post(server.make_url("/v1/instances"), json=body, headers=headers) as r,
    ):
        assert r.status == 503
    await asyncio.wait_for(retried.wait(), 5)  # the first retry, 0.5 s after the attempt
    with structlog.testing.capture_logs() as logs:
        started = time.monotonic()
        await server.close()  # the app's cleanup stops the gateway
        assert time.monotonic() - started < 0.5  # the retry was to pause for 1 s
    assert attempts == 3
    assert [e["event"] for e in logs if e["event"].startswith("store.")] == ["store.abandon_failed"]


async def test_background_retries_are_bounded(
    start_gateway: StartGateway, make_token: MakeToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by review: a store that fails each statement (never tripping the fail-fast) made
    one retry task per failed launch, each living up to reservation_ttl_s. Past the bound a
    failed write is left to the sweeper (counted as used: the safe side) and logged."""
    monkeypatch.setattr("launchgate.proxy._MAX_RETRYING", 2)
    gw = await start_gateway()
    ledger = gw.gateway.ledger

    async def fail(**kwargs: Any) -> ReserveResult:
        raise StoreUnavailable("statement failed")

    async def abandon(decision_id: str, jti: str, *, now: float, note: str) -> None:
        raise StoreUnavailable("statement failed")

    monkeypatch.setattr(ledger, "reserve", fail)
    monkeypatch.setattr(ledger, "abandon", abandon)
    with structlog.testing.capture_logs() as logs:
        for _ in range(5):
            assert (await gw.launch(token=make_token()))[0] == 503
        await asyncio.sleep(0.05)
        assert gw.gateway.retrying == 2
    skipped = [e for e in logs if e["event"] == "store.abandon_failed"]
    assert len(skipped) == 3 and all(e["attempts"] == 0 for e in skipped)
    started = time.monotonic()
    await gw.gateway.stop()  # the pauses end at once, not after their 0.5 s
    assert time.monotonic() - started < 0.4
    assert gw.gateway.retrying == 0
