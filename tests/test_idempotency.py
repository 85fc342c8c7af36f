"""Idempotent retries end to end: a launch retried under one idempotency key is counted once.

Gateway tests run the real app in front of the stub backend, on SQLite and on PostgreSQL
(``LAUNCHGATE_TEST_POSTGRES_DSN``; skipped without it). The key is the ``Idempotency-Key``
header, else the dialect's own client token (EC2 ``ClientToken``, GCE ``requestId``).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from conftest import CPU_SKU, RESTRICTED, UNRESTRICTED, Harness, MakeToken, StartGateway
from launchgate.dialects import Launch, LaunchRequest
from launchgate.dialects.aws_ec2 import build as build_ec2
from launchgate.dialects.gcp_compute import build as build_gcp
from launchgate.idempotency import fingerprint, idempotency_key
from launchgate.strict import MalformedLaunch
from test_ledger import postgres_schema

JTI = "lic-idem"
KEY = {"Idempotency-Key": "retry-7f3a"}
# An upstream that deduplicates launches on the Idempotency-Key header.
DEDUPLICATES = {"deduplicates_idempotency_key": True}


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest) -> AsyncIterator[dict[str, Any]]:
    """The ``[store]`` section: the default SQLite file, or a fresh PostgreSQL schema."""
    if request.param == "sqlite":
        yield {}
        return
    async with postgres_schema() as url:
        yield {"url": url}


async def used_and_reserved(gw: Harness, jti: str = JTI) -> tuple[int, int]:
    state = await gw.license(jti)
    assert state is not None
    return state.used, state.reserved


def completed(gw: Harness, decision_id: str) -> dict[str, Any]:
    [record] = [
        r
        for r in gw.records()
        if r["event"] == "launch.completed" and r["decision_id"] == decision_id
    ]
    return record


async def launches_received(gw: Harness) -> int:
    return sum(1 for r in await gw.stub_requests() if r["path"] == "/v1/instances")


# --- the gateway ----------------------------------------------------------------------------


async def test_a_retry_after_a_timeout_is_counted_once_and_its_2xx_confirms(
    store: dict[str, Any], start_gateway: StartGateway, make_token: MakeToken
) -> None:
    """The first attempt times out (504, settled as used); to an upstream that deduplicates on
    the key, its retry is forwarded without reserving again, and its 201 confirms the first
    reservation as used."""
    gw = await start_gateway(store=store, upstream={"timeout_s": 0.3, **DEDUPLICATES})
    token = make_token(jti=JTI)
    await gw.stub_fail(delay_s=1.0, times=1)
    status, problem, _ = await gw.launch(token=token, headers=KEY)
    assert (status, problem["reason"]) == (504, "upstream_timeout")
    first = problem["decision_id"]
    assert await used_and_reserved(gw) == (8, 0)

    status, body, headers = await gw.launch(token=token, headers=KEY)

    assert status == 201, body
    retry = gw.decisions()[-1]
    assert headers["Launchgate-Decision-Id"] == retry["decision_id"] != first
    assert (retry["outcome"], retry["reason"], retry["reserved"]) == ("allow", "licensed", 0)
    assert retry["replay_of"] == first
    assert await used_and_reserved(gw) == (8, 0)
    reservation = await gw.gateway.ledger.reservation(first)
    assert reservation is not None
    assert reservation.state == "used"
    assert f"confirmed by retry {retry['decision_id']}" in (reservation.note or "")
    assert completed(gw, retry["decision_id"])["settlement"] == "confirmed"
    assert await gw.gateway.ledger.reservation(retry["decision_id"]) is None
    assert await launches_received(gw) == 2


async def test_a_retry_after_a_201_is_counted_once(
    store: dict[str, Any], start_gateway: StartGateway, make_token: MakeToken
) -> None:
    """The client lost the first answer and retries: forwarded (the upstream deduplicates),
    counted once; the first decision's record has no replay_of."""
    gw = await start_gateway(store=store, upstream=DEDUPLICATES)
    token = make_token(jti=JTI)
    first_status, _, first_headers = await gw.launch(token=token, headers=KEY)
    status, _, _ = await gw.launch(token=token, headers=KEY)
    assert (first_status, status) == (201, 201)
    first, retry = gw.decisions()
    assert "replay_of" not in first
    assert (first["reserved"], retry["reserved"]) == (8, 0)
    assert retry["replay_of"] == first_headers["Launchgate-Decision-Id"] == first["decision_id"]
    assert await used_and_reserved(gw) == (8, 0)
    assert completed(gw, retry["decision_id"])["settlement"] is None  # nothing to confirm
    assert await launches_received(gw) == 2


async def test_a_retry_past_the_upstreams_window_is_not_sent_again(
    store: dict[str, Any], start_gateway: StartGateway, make_token: MakeToken
) -> None:
    """An upstream deduplicates an Idempotency-Key only for a while
    (``idempotency_key_window_s``): a retry later than that would launch again, uncounted,
    so it is refused (409) and not forwarded (found by QA: it was sent on however late)."""
    window_s = 0.5
    gw = await start_gateway(
        store=store, upstream={**DEDUPLICATES, "idempotency_key_window_s": window_s}
    )
    token = make_token(jti=JTI)
    status, _, first_headers = await gw.launch(token=token, headers=KEY)
    assert status == 201
    assert (await gw.launch(token=token, headers=KEY))[0] == 201  # within it: sent on
    await asyncio.sleep(window_s + 0.1)
    status, problem, _ = await gw.launch(token=token, headers=KEY)
    assert (status, problem["reason"]) == (409, "idempotency_conflict")
    assert "not sent again" in problem["detail"]
    first = first_headers["Launchgate-Decision-Id"]
    assert [r["replay_of"] for r in gw.decisions()[1:]] == [first, first]
    assert await used_and_reserved(gw) == (8, 0)
    assert await launches_received(gw) == 2


@pytest.mark.parametrize("first_answer", ["201", "timeout"])
async def test_a_retry_is_not_sent_again_to_an_upstream_that_ignores_the_key(
    store: dict[str, Any], start_gateway: StartGateway, make_token: MakeToken, first_answer: str
) -> None:
    """By default the upstream is not taken to deduplicate on Idempotency-Key: a retry sent on
    would launch again, uncounted (the stub, like most APIs, does not know the header). It is
    counted once and refused: 409 idempotency_conflict naming the first decision, recorded,
    not forwarded."""
    gw = await start_gateway(store=store, upstream={"timeout_s": 0.3})
    token = make_token(jti=JTI)
    if first_answer == "timeout":
        await gw.stub_fail(delay_s=1.0, times=1)
    status, _, first_headers = await gw.launch(token=token, headers=KEY)
    assert status == (201 if first_answer == "201" else 504)
    first = first_headers["Launchgate-Decision-Id"]
    for _ in range(3):
        status, problem, _ = await gw.launch(token=token, headers=KEY)
        assert (status, problem["reason"]) == (409, "idempotency_conflict")
        assert first in problem["detail"] and "not sent again" in problem["detail"]
    retry = gw.decisions()[-1]
    assert (retry["outcome"], retry["status"], retry["replay_of"]) == ("deny", 409, first)
    assert await used_and_reserved(gw) == (8, 0)
    assert await launches_received(gw) == 1


async def test_the_same_key_with_another_body_is_refused_with_409(
    store: dict[str, Any], start_gateway: StartGateway, make_token: MakeToken
) -> None:
    """Same key, different request: 409 problem+json idempotency_conflict; not forwarded,
    nothing reserved, and the record says deny 409."""
    gw = await start_gateway(store=store)
    token = make_token(jti=JTI)
    assert (await gw.launch(token=token, count=1, headers=KEY))[0] == 201
    first = gw.decisions()[-1]["decision_id"]

    async with gw.session.post(
        f"{gw.url}/v1/instances",
        json={"instance_type": "p5.48xlarge", "count": 2, "region": "us-east-1"},
        headers={"X-Account-Id": RESTRICTED, "License-Token": token, **KEY},
    ) as r:
        status, content_type, problem = r.status, r.content_type, await r.json(content_type=None)

    assert (status, content_type) == (409, "application/problem+json")
    assert problem["reason"] == "idempotency_conflict"
    assert problem["type"] == "urn:launchgate:problem:idempotency_conflict"
    assert first in problem["detail"]
    record = gw.decisions()[-1]
    assert (record["outcome"], record["reason"], record["status"]) == (
        "deny",
        "idempotency_conflict",
        409,
    )
    assert record["reserved"] is None
    assert "replay_of" not in record
    assert await used_and_reserved(gw) == (8, 0)
    assert await launches_received(gw) == 1


async def test_concurrent_duplicates_reserve_and_forward_once(
    store: dict[str, Any], start_gateway: StartGateway, make_token: MakeToken
) -> None:
    """Eight copies of one launch at once: one is reserved and forwarded; the others are told
    the first attempt is still in progress (409) and never reach the upstream."""
    gw = await start_gateway(store=store)
    token = make_token(jti=JTI)
    await gw.stub_fail(delay_s=0.5, times=1)  # keep the winner in flight
    results = await asyncio.gather(*(gw.launch(token=token, headers=KEY) for _ in range(8)))
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [201] + [409] * 7
    details = {body["detail"] for status, body, _ in results if status == 409}
    assert all("still in progress" in detail for detail in details)
    assert await used_and_reserved(gw) == (8, 0)
    assert [d["reserved"] for d in gw.decisions() if d["reason"] == "licensed"] == [8]
    assert await launches_received(gw) == 1


async def test_a_retry_after_an_upstream_error_reserves_again(
    store: dict[str, Any], start_gateway: StartGateway, make_token: MakeToken
) -> None:
    """The first attempt got a 500 (released: nothing launched); the retry is a launch of its
    own, reserved anew, and the key now names it."""
    gw = await start_gateway(store=store)
    token = make_token(jti=JTI)
    await gw.stub_fail(status=500, times=1)
    assert (await gw.launch(token=token, headers=KEY))[0] == 500
    assert await used_and_reserved(gw) == (0, 0)
    status, _, headers = await gw.launch(token=token, headers=KEY)
    assert status == 201
    retry = gw.decisions()[-1]
    assert retry["reserved"] == 8
    assert "replay_of" not in retry
    assert await used_and_reserved(gw) == (8, 0)
    bound = await gw.gateway.ledger.idempotency_key(RESTRICTED, KEY["Idempotency-Key"])
    assert bound is not None
    assert bound.decision_id == headers["Launchgate-Decision-Id"]


async def test_two_accounts_may_use_the_same_key(
    store: dict[str, Any], start_gateway: StartGateway, make_token: MakeToken
) -> None:
    """A key is scoped to its account: the same key string from another account is a launch
    of its own."""
    gw = await start_gateway(store=store)
    tokens = {
        RESTRICTED: make_token(jti="lic-one"),
        "acct-2002": make_token(account="acct-2002", jti="lic-two"),
    }
    for account, token in tokens.items():
        status, _, _ = await gw.launch(account=account, token=token, headers=KEY)
        assert status == 201
    assert [d["reserved"] for d in gw.decisions()] == [8, 8]
    assert all("replay_of" not in d for d in gw.decisions())
    assert await used_and_reserved(gw, "lic-one") == await used_and_reserved(gw, "lic-two")


@pytest.mark.parametrize(
    ("account", "sku"),
    [(UNRESTRICTED, "p5.48xlarge"), (RESTRICTED, CPU_SKU)],
    ids=["unrestricted-account", "not-controlled-sku"],
)
async def test_a_key_on_a_launch_needing_no_license_stores_nothing(
    store: dict[str, Any],
    start_gateway: StartGateway,
    make_token: MakeToken,
    account: str,
    sku: str,
) -> None:
    """Launches that touch no license pass as before and leave the key free: a licensed launch
    of another body may use it next."""
    gw = await start_gateway(store=store)
    status, _, _ = await gw.launch(account=account, sku=sku, headers=KEY)
    assert status == 201
    assert await gw.gateway.ledger.idempotency_key(account, KEY["Idempotency-Key"]) is None
    status, _, _ = await gw.launch(token=make_token(jti=JTI), count=2, headers=KEY)
    assert status == 201
    assert await used_and_reserved(gw) == (16, 0)


async def test_in_shadow_mode_a_conflict_is_logged_and_forwarded(
    store: dict[str, Any], start_gateway: StartGateway, make_token: MakeToken
) -> None:
    """Shadow mode judges the key the same way but blocks nothing and reserves nothing more."""
    gw = await start_gateway(store=store, server={"mode": "shadow"})
    token = make_token(jti=JTI)
    assert (await gw.launch(token=token, count=1, headers=KEY))[0] == 201
    assert (await gw.launch(token=token, count=2, headers=KEY))[0] == 201
    record = gw.decisions()[-1]
    assert (record["reason"], record["enforced"]) == ("idempotency_conflict", False)
    assert await used_and_reserved(gw) == (8, 0)
    assert await launches_received(gw) == 2


@pytest.mark.parametrize(
    "headers",
    [
        [("Idempotency-Key", "a"), ("Idempotency-Key", "b")],
        [("Idempotency-Key", "k" * 256)],
    ],
    ids=["given-twice", "too-long"],
)
async def test_an_unusable_key_is_malformed(
    start_gateway: StartGateway, make_token: MakeToken, headers: list[tuple[str, str]]
) -> None:
    """A key given twice, or longer than 255 characters, has no one meaning: 400, nothing
    reserved or forwarded."""
    gw = await start_gateway()
    all_headers = CIMultiDict([("X-Account-Id", RESTRICTED), ("License-Token", make_token())])
    all_headers.extend(headers)
    async with gw.session.post(
        f"{gw.url}/v1/instances",
        json={"instance_type": "p5.48xlarge", "count": 1, "region": "us-east-1"},
        headers=all_headers,
    ) as r:
        assert r.status == 400
        assert (await r.json(content_type=None))["reason"] == "malformed_request"
    assert gw.decisions()[-1]["reserved"] is None
    assert await launches_received(gw) == 0


# --- dialect client tokens through the gateway ------------------------------------------------

RUN = "Action=RunInstances&InstanceType=p5.48xlarge&MinCount=1&MaxCount=1&ClientToken=tok-1"
FORM = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}


async def ec2_call(gw: Harness, body: str, token: str) -> tuple[int, str]:
    headers = {"X-Account-Id": RESTRICTED, "License-Token": token, **FORM}
    async with gw.session.post(f"{gw.url}/", data=body, headers=headers) as r:
        return r.status, await r.text()


async def test_ec2_client_token_is_the_key_without_a_header(
    store: dict[str, Any], start_gateway: StartGateway, make_token: MakeToken
) -> None:
    """An SDK retry of RunInstances repeats its ClientToken: counted once; the token on
    another request is a conflict."""
    gw = await start_gateway(store=store, routes=[{"dialect": "aws-ec2"}])
    token = make_token(jti=JTI)
    assert (await ec2_call(gw, RUN, token))[0] == 200
    assert (await ec2_call(gw, RUN, token))[0] == 200
    first, retry = gw.decisions()
    assert retry["replay_of"] == first["decision_id"]
    assert await used_and_reserved(gw) == (8, 0)
    # ... and launched once: the retry went on to an API that deduplicates it (the stub does)
    async with gw.session.get(f"{gw.stub_url}/v1/instances") as r:
        assert len((await r.json())["instances"]) == 1
    status, text = await ec2_call(gw, RUN.replace("MaxCount=1", "MaxCount=2"), token)
    assert status == 409
    assert '"idempotency_conflict"' in text
    assert await used_and_reserved(gw) == (8, 0)


async def test_a_client_token_retry_past_the_apis_window_is_not_sent_again(
    start_gateway: StartGateway, make_token: MakeToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The API deduplicates a client token only for a while (an hour is taken): a retry later
    than that would launch again, uncounted, so it is refused (409) and not forwarded."""
    monkeypatch.setattr("launchgate.idempotency.CLIENT_TOKEN_WINDOW_S", 0.0)
    gw = await start_gateway(routes=[{"dialect": "aws-ec2"}])
    token = make_token(jti=JTI)
    assert (await ec2_call(gw, RUN, token))[0] == 200
    status, text = await ec2_call(gw, RUN, token)
    assert status == 409 and "not sent again" in text
    first, retry = gw.decisions()
    assert (retry["reason"], retry["replay_of"]) == ("idempotency_conflict", first["decision_id"])
    assert await used_and_reserved(gw) == (8, 0)
    assert len(await gw.stub_requests()) == 1


async def test_gce_request_id_is_the_key_without_a_header(
    store: dict[str, Any], start_gateway: StartGateway, make_token: MakeToken
) -> None:
    """A Compute Engine insert retried with its requestId is counted once."""
    gw = await start_gateway(store=store, routes=[{"dialect": "gcp-compute"}])
    token = make_token(jti=JTI, skus=["a3-highgpu-8g"])
    url = URL(
        f"{gw.url}/compute/v1/projects/p/zones/us-central1-a/instances"
        "?requestId=3f1c2b7e-8a1d-4e55-9a0b-1c2d3e4f5a6b",
        encoded=True,
    )
    body = {"name": "train-1", "machineType": "zones/us-central1-a/machineTypes/a3-highgpu-8g"}
    headers = {"X-Account-Id": RESTRICTED, "License-Token": token}
    for _ in range(2):
        async with gw.session.post(url, json=body, headers=headers) as r:
            assert r.status == 200, await r.text()
    first, retry = gw.decisions()
    assert (first["reserved"], retry["reserved"]) == (8, 0)
    assert retry["replay_of"] == first["decision_id"]
    assert await used_and_reserved(gw) == (8, 0)


# --- the pieces -------------------------------------------------------------------------------


def launch_request(
    method: str = "POST",
    path: str = "/v1/instances",
    query: str = "",
    body: bytes = b'{"instance_type": "p5.48xlarge"}',
    headers: dict[str, str] | None = None,
) -> LaunchRequest:
    return LaunchRequest(method, path, query, CIMultiDictProxy(CIMultiDict(headers or {})), body)


BASE_FINGERPRINT = fingerprint(launch_request(), "us-east-1")


@pytest.mark.parametrize(
    ("request_", "same"),
    [
        (launch_request(), True),
        (
            launch_request(headers={"License-Token": "other", "X-Trace": "1"}),
            True,
        ),  # headers ignored
        (launch_request(method="PUT"), False),
        (launch_request(path="/v1/instancez"), False),
        (launch_request(query="dry=1"), False),
        (launch_request(body=b'{"instance_type": "p5.48xlarge" }'), False),
        (launch_request(path="/v1/instance", query="s"), False),  # parts do not run together
        (launch_request(query="", body=b'\n{"instance_type": "p5.48xlarge"}'), False),
    ],
)
def test_the_fingerprint_covers_method_path_query_and_body(
    request_: LaunchRequest, same: bool
) -> None:
    """A retry must repeat method, path, query and body byte for byte; headers may differ."""
    assert (fingerprint(request_, "us-east-1") == BASE_FINGERPRINT) is same


@pytest.mark.parametrize("region", ["eu-west-1", None, "us-east-1\n"])
def test_the_fingerprint_covers_the_region(region: str | None) -> None:
    """An API deduplicates a client token within one region (EC2 reads it from Host): the same
    call judged for another region is another launch."""
    assert fingerprint(launch_request(), region) != BASE_FINGERPRINT


@pytest.mark.parametrize(
    ("header", "client_token", "expected"),
    [
        (None, None, None),
        ("k-1", None, "k-1"),
        ("k-1", "tok", "k-1"),  # the header wins
        (None, "tok", "tok"),
        ("  ", "tok", "tok"),  # an empty header is no header
        (" k-1 ", None, "k-1"),
        ("\tk-1 ", None, "k-1"),
        ("k" * 255, None, "k" * 255),
    ],
)
def test_the_key_is_the_header_else_the_client_token(
    header: str | None, client_token: str | None, expected: str | None
) -> None:
    """Idempotency-Key first, then the dialect's token; surrounding blanks do not count."""
    headers = {} if header is None else {"Idempotency-Key": header}
    request = launch_request(headers=headers)
    launch = Launch((), None, client_token=client_token)
    assert idempotency_key(request.headers, launch) == expected


@pytest.mark.parametrize(
    ("header", "client_token"),
    [
        ("caf\u00e9", None),
        ("ab\udcffcd", None),
        ("tab\there", None),
        (None, "t\u00f6k"),
        ("k\u00a0", None),  # blanks other than SP and HTAB are part of the key, not trimmed
        ("\u3000k", None),
    ],
)
def test_a_key_outside_printable_ascii_is_malformed(
    header: str | None, client_token: str | None
) -> None:
    """An sf-string, as the IETF draft has it: a header's bytes that were not UTF-8 (decoded to
    lone surrogates), other non-ASCII text and control characters are malformed (they would
    also fail where the ledger stores the key)."""
    headers = {} if header is None else {"Idempotency-Key": header}
    request = launch_request(headers=headers)
    launch = Launch((), None, client_token=client_token)
    with pytest.raises(MalformedLaunch, match="printable ASCII"):
        idempotency_key(request.headers, launch)


EC2 = build_ec2({}, "routes[0]")
GCP = build_gcp({}, "routes[0]")
INSERT = "/compute/v1/projects/p/zones/us-central1-a/instances"
A3 = b'{"machineType": "a3-highgpu-8g"}'
JSON = {"Content-Type": "application/json"}


def ec2_request(body: str) -> LaunchRequest:
    return launch_request(
        path="/", body=body.encode(), headers={"Content-Type": "application/x-www-form-urlencoded"}
    )


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (RUN, "tok-1"),
        (RUN.replace("&ClientToken=tok-1", ""), None),
        (RUN.replace("tok-1", ""), None),
        (
            "Action=RequestSpotFleet&SpotFleetRequestConfig.ClientToken=sf-1"
            "&SpotFleetRequestConfig.TargetCapacity=1"
            "&SpotFleetRequestConfig.LaunchSpecifications.1.InstanceType=p5.48xlarge",
            "sf-1",
        ),
        (
            "Action=CreateLaunchTemplate&ClientToken=lt-1"
            "&LaunchTemplateData.InstanceType=p5.48xlarge",
            "lt-1",
        ),
    ],
)
def test_ec2_reads_its_client_token(body: str, expected: str | None) -> None:
    """ClientToken (RequestSpotFleet: inside its config) becomes the launch's client_token."""
    launch = EC2.parse(ec2_request(body))
    assert launch is not None
    assert launch.client_token == expected


def test_ec2_refuses_a_client_token_spelled_in_another_case() -> None:
    """EC2 names are case-sensitive: 'clientToken' next to what the dialect reads is ambiguous."""
    with pytest.raises(MalformedLaunch, match="ClientToken"):
        EC2.parse(ec2_request(RUN.replace("ClientToken", "clientToken")))


@pytest.mark.parametrize(
    ("query", "expected"),
    [("requestId=r-1", "r-1"), ("request_id=r-1", "r-1"), ("", None), ("requestId=", None)],
)
def test_gce_reads_its_request_id(query: str, expected: str | None) -> None:
    """requestId (or request_id) becomes the launch's client_token."""
    launch = GCP.parse(launch_request(path=INSERT, query=query, body=A3, headers=JSON))
    assert launch is not None
    assert launch.client_token == expected


def test_gce_refuses_a_request_id_spelled_in_another_case() -> None:
    """'RequestId' is not Compute Engine's name for it: malformed, not silently ignored."""
    with pytest.raises(MalformedLaunch, match="RequestId"):
        GCP.parse(launch_request(path=INSERT, query="RequestId=r-1", body=A3, headers=JSON))
