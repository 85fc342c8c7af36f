"""The gateway end to end: the real app on a real socket in front of the real stub backend.

Every row of the CONTRACT section 3 decision table, token attacks, depletion, revocation,
and the reservation lifecycle against upstream failures.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from yarl import URL

from conftest import (
    CPU_SKU,
    GENERIC_ROUTE,
    H100_SKU,
    ISSUER,
    RECORD_FIELDS,
    RESTRICTED,
    UNRESTRICTED,
    Keys,
    MakeToken,
    StartGateway,
    now,
    raw_upstream,
    read_request,
    replying,
    tls_certificates,
    tls_site,
    write_config,
)
from launchgate import proxy
from launchgate.audit import verify_file
from launchgate.config import load_config
from launchgate.gateway import Gateway
from launchgate.paths import normalize_path
from launchgate.sqliteledger import SqliteLedger
from launchgate.stub import create_stub_app
from launchgate.tokens import issue_token


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forge(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    """A hand-made compact JWS (for attacks the issuer would never produce)."""
    return ".".join(
        [_b64(json.dumps(header).encode()), _b64(json.dumps(claims).encode()), _b64(signature)]
    )


def good_claims(**overrides: Any) -> dict[str, Any]:
    t = int(now())
    claims = {
        "iss": "compliance.example-cloud",
        "aud": "launchgate",
        "sub": RESTRICTED,
        "jti": "lic-forged",
        "iat": t,
        "exp": t + 3600,
        "skus": [H100_SKU],
        "max_accelerators": 64,
    }
    claims.update(overrides)
    return claims


async def test_unrestricted_account_launches_controlled_sku(start_gateway: StartGateway) -> None:
    """Row 4: an account outside restricted jurisdictions is forwarded to the upstream."""
    gw = await start_gateway()
    status, body, headers = await gw.launch(account=UNRESTRICTED)
    assert status == 201
    assert len(body["instances"]) == 1
    decision = gw.decisions()[-1]
    assert (decision["outcome"], decision["reason"]) == ("allow", "account_not_restricted")
    assert headers["Launchgate-Decision-Id"] == decision["decision_id"]
    assert decision["eccn"] == "3A090.a" and decision["accelerators"] == 8
    assert decision["license"] is None  # no token presented


async def test_a_token_presented_is_recorded_even_when_no_row_reads_it(
    start_gateway: StartGateway, make_token: MakeToken
) -> None:
    """`license` is null only when no token was presented (CONTRACT section 5): a launch decided
    before the token rows (an unrestricted account, a malformed body, a method override, an
    oversized body) records the token as presented."""
    gw = await start_gateway(server={"max_body_bytes": 1000})
    token = make_token(jti="lic-shown")
    status, _, _ = await gw.launch(account=UNRESTRICTED, token=token)
    assert status == 201
    headers = {"License-Token": token, "X-Account-Id": RESTRICTED}
    assert (await gw.send("POST", "/v1/instances", b"{not json", headers=headers))[0] == 400
    override = {**headers, "X-HTTP-Method-Override": "PUT"}
    assert (await gw.send("POST", "/v1/instances", b"{}", headers=override))[0] == 400
    big = json.dumps({"instance_type": H100_SKU, "pad": "x" * 2000}).encode()
    assert (await gw.send("POST", "/v1/instances", big, headers=headers))[0] == 413
    reasons = [(d["reason"], d["license"]) for d in gw.decisions()]
    shown = {"jti": "lic-shown", "kid": "k-ed", "iss": ISSUER}
    assert [r for r, _ in reasons] == [
        "account_not_restricted",
        "malformed_request",
        "malformed_request",
        "body_too_large",
    ]
    assert all(license == shown for _, license in reasons), reasons


async def test_non_controlled_sku_passes_for_restricted_account(
    start_gateway: StartGateway,
) -> None:
    """Row 3: a SKU without a controlled accelerator needs no license."""
    gw = await start_gateway()
    status, _, _ = await gw.launch(sku=CPU_SKU)
    assert status == 201
    assert gw.decisions()[-1]["reason"] == "sku_not_controlled"


@pytest.mark.parametrize(
    ("account", "sku", "status", "reason"),
    [
        (None, H100_SKU, 400, "missing_account"),
        ("", H100_SKU, 400, "missing_account"),
        ("acct-nobody", H100_SKU, 403, "unknown_account"),
        ("acct-nobody", "x9.unknown", 403, "unknown_account"),
        (RESTRICTED, "x9.unknown", 403, "unknown_sku"),
        (RESTRICTED, H100_SKU, 403, "license_required"),
        ("acct-2003", H100_SKU, 403, "license_required"),  # HK, aliased to CN
        ("acct-2004", H100_SKU, 403, "license_required"),  # MO, restricted country
        ("acct-2002", H100_SKU, 403, "license_required"),  # SG, parent in CN
    ],
)
async def test_denials_without_token(
    start_gateway: StartGateway, account: str | None, sku: str, status: int, reason: str
) -> None:
    """Rows 2, 5, 6, 7: denied launches get problem+json and never reach the upstream."""
    gw = await start_gateway()
    got, body, headers = await gw.launch(account=account, sku=sku)
    assert (got, body["reason"]) == (status, reason)
    assert headers["Content-Type"] == "application/problem+json"  # RFC 9457, no parameters
    assert body["type"] == f"urn:launchgate:problem:{reason}"
    assert body["status"] == status and body["title"] and body["detail"]
    assert body["decision_id"] == gw.decisions()[-1]["decision_id"]
    assert await gw.stub_requests() == []


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b'{"count": 1}',
        b'{"instance_type": 5}',
        b'{"instance_type": ""}',
        b'{"instance_type": "p5.48xlarge", "count": 0}',
        b'{"instance_type": "p5.48xlarge", "count": -1}',
        b'{"instance_type": "p5.48xlarge", "count": 1.5}',
        b'{"instance_type": "p5.48xlarge", "count": 2.0}',
        b'{"instance_type": "p5.48xlarge", "count": true}',
        b'{"instance_type": "p5.48xlarge", "count": "2"}',
        b'{"instance_type": "p5.48xlarge", "count": 100001}',
        b'{"instance_type": "m7i.large", "instance_type": "p5.48xlarge"}',
        b'{"instance_type": "p5.48xlarge", "x": {"a": 1, "a": 2}}',
        # A key read, spelt again in other letter case (CONTRACT section 9, one meaning or none)
        b'{"instance_type": "m7i.large", "Instance_Type": "p5.48xlarge"}',
        # Keys that Java's equalsIgnoreCase (dotless i) or a per-character lower case (dotted
        # capital I) would take for the one read.
        '{"\u0131nstance_type": "p5.48xlarge", "instance_type": "m7i.large"}'.encode(),
        '{"\u0130NSTANCE_TYPE": "p5.48xlarge", "instance_type": "m7i.large"}'.encode(),
        b'{"instance_type": "p5.48xlarge", "count": 1, "COUNT": 50}',
        b'{"instance_type": "p5.48xlarge", "Region": "us-east-1"}',
        b'{"instance_type": "p5.48xlarge", "count": NaN}',
        b'\xef\xbb\xbf{"instance_type": "p5.48xlarge"}',
        b'{"instance_type": "p5.48xlarge\xff"}',
        b'{"instance_type": "p5.48xlarge"} {"instance_type": "m7i.large"}',
        b"[]",
    ],
)
async def test_malformed_launch_bodies(start_gateway: StartGateway, body: bytes) -> None:
    """Row 1: a body with no one meaning is 400 malformed_request, before anything else."""
    gw = await start_gateway()
    async with gw.session.post(
        f"{gw.url}/v1/instances", data=body, headers={"Content-Type": "application/json"}
    ) as r:
        assert r.status == 400
        problem = await r.json(content_type="application/problem+json")
    assert problem["reason"] == "malformed_request"
    assert await gw.stub_requests() == []
    assert (await gw.gateway.ledger.licenses()) == []


@pytest.mark.parametrize(
    "header", ["X-Account-Id", "License-Token", "x_account_id", "License_Token"]
)
async def test_a_launch_with_two_identity_headers_is_malformed(
    start_gateway: StartGateway, make_token: MakeToken, header: str
) -> None:
    """Two account (or token) headers could be read two ways: the gateway would judge the first
    while the upstream might act on the last (or, spelt with "_", a CGI-style upstream on either).
    400, recorded, nothing forwarded or reserved."""
    gw = await start_gateway()
    token = make_token(jti="lic-twice")
    headers = [("X-Account-Id", UNRESTRICTED), ("License-Token", token)]
    second = RESTRICTED if "account" in header.lower() else make_token()
    headers.append((header, second))
    body = {"instance_type": H100_SKU, "count": 1}
    async with gw.session.post(f"{gw.url}/v1/instances", json=body, headers=headers) as r:
        assert r.status == 400
        problem = await r.json(content_type="application/problem+json")
    assert problem["reason"] == "malformed_request"
    canonical = "X-Account-Id" if "account" in header.lower() else "License-Token"
    assert f"more than one {canonical} header" in problem["detail"]
    assert await gw.stub_requests() == []
    assert await gw.license("lic-twice") is None
    [record] = gw.decisions()
    assert (record["reason"], record["decision_id"]) == (
        "malformed_request",
        problem["decision_id"],
    )


async def _post(url: str, target: str, head: bytes, body: bytes) -> tuple[int, dict[str, Any]]:
    """POST ``body`` with exactly the header lines ``head`` (aiohttp's client would add a
    Content-Type)."""
    host, port = url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        f"POST {target} HTTP/1.1\r\nHost: gw\r\n".encode()
        + head
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
        + body
    )
    answer = await reader.read()
    writer.close()
    status_line, _, payload = answer.partition(b"\r\n\r\n")
    return int(status_line.split()[1]), json.loads(payload)


async def _raw_launch(url: str, headers: bytes) -> tuple[int, dict[str, Any]]:
    """POST a launch with header bytes as given (aiohttp's client sends only UTF-8)."""
    body = json.dumps({"instance_type": H100_SKU, "count": 1}).encode()
    return await _post(url, "/v1/instances", b"Content-Type: application/json\r\n" + headers, body)


async def test_a_request_target_with_a_fragment_is_malformed(start_gateway: StartGateway) -> None:
    """RFC 9112 has no '#' in a request target: an upstream would drop '#x' and launch, while
    the path would match no route here. 400, nothing forwarded."""
    gw = await start_gateway()
    host, port = gw.url.removeprefix("http://").split(":")
    for target in (b"/v1/instances#x", b"/v1/instances#", b"/v1/instances?a=1#x"):
        body = json.dumps({"instance_type": H100_SKU, "count": 1}).encode()
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"POST "
            + target
            + b" HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
            + f"X-Account-Id: {RESTRICTED}\r\nContent-Length: {len(body)}\r\n".encode()
            + b"Connection: close\r\n\r\n"
            + body
        )
        answer = await reader.read()
        writer.close()
        head, _, payload = answer.partition(b"\r\n\r\n")
        assert head.split()[1] == b"400", target
        assert json.loads(payload)["reason"] == "malformed_request"
    assert await gw.stub_requests() == []


async def test_an_account_is_judged_as_it_is_forwarded(start_gateway: StartGateway) -> None:
    """Only HTTP's blanks (SP, HTAB) are trimmed from the account header: "acct-1001" with an
    ideographic space is not acct-1001, so it is not judged as that account while the upstream
    gets the other spelling."""
    gw = await start_gateway()
    status, problem = await _raw_launch(gw.url, f"X-Account-Id: {UNRESTRICTED}\u3000\r\n".encode())
    assert (status, problem["reason"]) == (403, "unknown_account")
    status, _ = await _raw_launch(gw.url, f"X-Account-Id: \t{UNRESTRICTED} \r\n".encode())
    assert status == 201


async def test_header_bytes_that_are_not_utf8_are_judged_and_recorded(
    start_gateway: StartGateway, make_token: MakeToken
) -> None:
    """An account header or an Idempotency-Key with bytes that are not UTF-8 gets a decision
    and its record like any other launch (the record spells such bytes as backslash
    escapes); none is a 500, and the chain stays intact."""
    gw = await start_gateway()
    token = make_token(jti="lic-bytes").encode()
    status, problem = await _raw_launch(gw.url, b"X-Account-Id: acct-\xff\r\n")
    assert (status, problem["reason"]) == (403, "unknown_account")
    status, keyed = await _raw_launch(
        gw.url,
        b"X-Account-Id: "
        + RESTRICTED.encode()
        + b"\r\nLicense-Token: "
        + token
        + b"\r\nIdempotency-Key: k-\xff\r\n",
    )
    assert (status, keyed["reason"]) == (400, "malformed_request")
    assert "printable ASCII" in keyed["detail"]
    first, second = gw.decisions()
    assert (first["decision_id"], first["account"]) == (problem["decision_id"], "acct-\\udcff")
    assert (second["decision_id"], second["reason"]) == (keyed["decision_id"], "malformed_request")
    assert await gw.stub_requests() == []
    assert await gw.license("lic-bytes") is None
    assert verify_file(gw.config.audit_path).ok


async def test_compressed_launch_body_is_malformed(start_gateway: StartGateway) -> None:
    """A Content-Encoding the gateway does not decode cannot be judged: 400, also when it hides
    in a second header behind an identity one."""
    import gzip

    gw = await start_gateway()
    plain = json.dumps({"instance_type": H100_SKU}).encode()
    for encodings, body in ((["gzip"], gzip.compress(plain)), (["identity", "gzip"], plain)):
        headers = [("Content-Encoding", e) for e in encodings] + [("X-Account-Id", RESTRICTED)]
        async with gw.session.post(f"{gw.url}/v1/instances", data=body, headers=headers) as r:
            assert r.status == 400
            assert (await r.json(content_type=None))["reason"] == "malformed_request"
    assert await gw.stub_requests() == []


async def test_a_claimed_request_that_launches_nothing_goes_on_the_path_it_was_read_on(
    start_gateway: StartGateway,
) -> None:
    """Found by QA: an EC2 DescribeInstances (claimed by the route, read, no launch) was sent
    on its raw path, "%2e%2e" segments and all, where a launch goes on the path it was judged
    on. Both now go on the normalized path."""
    gw = await start_gateway(routes=[{"dialect": "aws-ec2", "path": "/ec2"}])
    raw = "/ec2/x/%2e%2e/y?Action=DescribeInstances"
    url = URL(f"{gw.url}{raw}", encoded=True)  # sent as written, "%2e%2e" and all
    async with gw.session.get(url, headers={"X-Account-Id": RESTRICTED}) as r:
        assert r.status == 200
    [sent] = await gw.stub_requests()
    assert sent["path"] == "/ec2/y"


@pytest.mark.parametrize(
    ("content_type", "status"),
    [
        ("application/json; charset=utf-7", 400),
        ('application/json; charset="UTF-16"', 400),
        ("text/plain; charset=iso-8859-1", 400),
        ("application/json; charset*=utf-8''utf-7", 400),  # RFC 2231 (found by QA)
        # after a comma or a blank, where System.Web finds it too (found in review)
        ("application/x-www-form-urlencoded, charset=utf-7", 400),
        ("application/json charset = utf-7", 400),
        ("application/json;charset=utf8", 201),
        # inside another parameter's name or value, where Tomcat finds it (found in review)
        ("application/x-www-form-urlencoded; xcharset=IBM037", 400),
        ("application/json; foo=charset=UTF-16", 400),
        ("application/json; charset=UTF-8", 201),
        ("text/plain", 201),  # JSON sent as text, or as curl's form default: read as UTF-8
        ("application/x-www-form-urlencoded", 201),
    ],
)
async def test_a_generic_json_launch_body_in_another_charset_is_malformed(
    start_gateway: StartGateway, content_type: str, status: int
) -> None:
    """The body is judged as UTF-8. Found by QA: told charset=utf-7, an upstream read
    "+AGk-nstance_type" as a second instance_type key and launched 4 p5.48xlarge that the
    gateway had judged an m7i.large (sku_not_controlled). A charset other than UTF-8 is 400."""
    gw = await start_gateway()
    body = b'{"instance_type":"m7i.large","+AGk-nstance_type":"p5.48xlarge","count":4}'
    headers = {"Content-Type": content_type, "X-Account-Id": RESTRICTED}
    async with gw.session.post(f"{gw.url}/v1/instances", data=body, headers=headers) as r:
        assert r.status == status
        if status == 400:
            assert (await r.json(content_type=None))["reason"] == "malformed_request"
    assert len(await gw.stub_requests()) == (status == 201)


@pytest.mark.parametrize(
    "header",
    [
        "X-HTTP-Method-Override",
        "X-HTTP-Method",
        "X-Method-Override",
        # The same to a CGI-style server (found by QA: these went through).
        "X_HTTP_Method_Override",
        "x-http_method",
        "X_Method-Override",
    ],
)
async def test_method_override_headers_refused(start_gateway: StartGateway, header: str) -> None:
    """Method-override headers get 400 on any route, launch or not; on a launch route it is a
    recorded launch decision (malformed_request) with its id."""
    gw = await start_gateway()
    ids = []
    for method, path in (("GET", "/v1/instances"), ("POST", "/v1/instances")):
        headers = {header: "POST", "X-Account-Id": RESTRICTED}
        async with gw.session.request(method, f"{gw.url}{path}", headers=headers) as r:
            assert r.status == 400
            problem = await r.json(content_type="application/problem+json")
            assert problem["reason"] == "malformed_request"
            ids.append(problem["decision_id"])
    assert await gw.stub_requests() == []
    [record] = gw.decisions()  # the GET is no launch: not a decision
    assert ids[0] is None and record["decision_id"] == ids[1]
    assert (record["reason"], record["account"], record["method"]) == (
        "malformed_request",
        RESTRICTED,
        "POST",
    )


@pytest.mark.parametrize(
    "query",
    [
        "_method=POST",
        "x=1&_method=post",
        "x=1;_METHOD=POST",
        "%5Fmethod=POST",
        "_%6Dethod=POST",
        "%255Fmethod=POST",  # decoded twice
        "a=%26_method%3DPOST",  # decoded, then split
        "+_method+=POST",
        "_method%00x=POST",
        ".method=POST",  # PHP renames it _method (found in review)
        "x-http-method-override=POST",  # ASP.NET reads the header's name as a field (review)
        "X_HTTP_METHOD=POST",
        "%u005fmethod=POST",  # IIS decodes %u escapes (review)
        "X-HTTP-Method-Overr%C4%B1de=POST",  # .NET folds the dotless i (review)
    ],
)
async def test_method_override_query_parameter_refused(
    start_gateway: StartGateway, query: str
) -> None:
    """A ``_method`` query parameter is a method override too (found in review: Nova's router,
    the routes library's middleware, took ``PUT /v2.1/servers?_method=POST`` as a create):
    400 on any route, recorded on a launch route, nothing forwarded."""
    gw = await start_gateway()
    for method in ("PUT", "POST"):
        url = URL(f"{gw.url}/v1/instances?{query}", encoded=True)
        headers = {"X-Account-Id": RESTRICTED, "Content-Type": "application/json"}
        async with gw.session.request(method, url, headers=headers, data=b"{}") as r:
            assert r.status == 400
            problem = await r.json(content_type="application/problem+json")
            assert problem["reason"] == "malformed_request"
            assert "_method" in problem["detail"]
    assert await gw.stub_requests() == []
    [record] = gw.decisions()  # the PUT is no launch here: not a decision
    assert (record["reason"], record["method"]) == ("malformed_request", "POST")


@pytest.mark.parametrize(
    ("query", "overrides"),
    [
        ("%2525252525252525255Fmethod=POST", True),  # escaped eight times over
        ("&".join(["%2525255Fx=1"] * 65), True),  # more doubly escaped names than are read
        ("&".join(["%2525255Fx=1"] * 64), False),
        ("&".join(f"filter%5B{i}%5D=1" for i in range(600)), False),  # escaped once: read all
        ("&".join(f"k{i}=%41" for i in range(600)), False),
    ],
    ids=["deep", "too-many-to-read", "as-many-as-read", "brackets", "escaped-values"],
)
def test_the_override_parameter_is_read_within_bounds(query: str, overrides: bool) -> None:
    """A query of 8 KB of doubly escaped names took 24 ms of the event loop to read (review);
    past 64 such names it is refused instead. Names escaped once are all read."""
    assert proxy._overrides_method_in(query) is overrides


@pytest.mark.parametrize("query", ["payment_method=card", "q=_method", "method=x", "x=%5F"])
async def test_parameters_that_only_look_like_an_override_pass(
    start_gateway: StartGateway, query: str
) -> None:
    """Only a parameter named ``_method`` overrides: others with the word go on."""
    gw = await start_gateway()
    url = URL(f"{gw.url}/_stub/bytes?n=3&{query}", encoded=True)
    async with gw.session.get(url) as r:
        assert r.status == 200
    assert len(await gw.stub_requests()) == 1


async def test_a_method_override_refused_in_shadow_mode_is_recorded_as_enforced(
    start_gateway: StartGateway,
) -> None:
    """Shadow mode forwards every launch, but not one whose method the gateway cannot tell
    (section 9): that refusal is enforced, and its record says so (it said false)."""
    gw = await start_gateway(server={"mode": "shadow"})
    status, problem = await gw.send(
        "POST", "/v1/instances", {"instance_type": H100_SKU}, headers={"X-HTTP-Method": "PUT"}
    )
    assert (status, problem["reason"]) == (400, "malformed_request")
    assert await gw.stub_requests() == []
    [record] = gw.decisions()
    assert (record["mode"], record["enforced"]) == ("shadow", True)


async def test_licensed_launch_depletes_to_exhaustion(
    start_gateway: StartGateway, make_token: MakeToken
) -> None:
    """Rows 20-21: a license of 64 admits eight 8-GPU instances, then denies the ninth."""
    gw = await start_gateway()
    token = make_token(max_accelerators=64, jti="lic-64")
    for _ in range(4):
        status, body, _ = await gw.launch(token=token, count=2)
        assert status == 201, body
    status, body, _ = await gw.launch(token=token, count=1)
    assert (status, body["reason"]) == (403, "license_exhausted")
    assert "0 of 64" in body["detail"] and "needs 8" in body["detail"]
    state = await gw.license("lic-64")
    assert (state.used, state.reserved) == (64, 0)
    licensed = [d for d in gw.decisions() if d["reason"] == "licensed"]
    assert len(licensed) == 4
    assert licensed[0]["license"] == {
        "jti": "lic-64",
        "kid": "k-ed",
        "iss": "compliance.example-cloud",
    }
    completed = [r for r in gw.records() if r["event"] == "launch.completed"]
    assert [c["upstream_status"] for c in completed] == [201] * 4
    assert {c["decision_id"] for c in completed} == {d["decision_id"] for d in licensed}
    launched = [r for r in await gw.stub_requests() if r["method"] == "POST"]
    assert len(launched) == 4


async def test_partial_fit_is_denied_whole(
    start_gateway: StartGateway, make_token: MakeToken
) -> None:
    """A launch that needs more than is left is denied and reserves nothing."""
    gw = await start_gateway()
    token = make_token(max_accelerators=12, jti="lic-12")
    assert (await gw.launch(token=token))[0] == 201
    status, body, _ = await gw.launch(token=token)
    assert (status, body["reason"]) == (403, "license_exhausted")
    assert "4 of 12" in body["detail"]
    state = await gw.license("lic-12")
    assert (state.used, state.reserved) == (8, 0)


async def test_es256_token_is_accepted(
    start_gateway: StartGateway, make_token: MakeToken, keys: Keys
) -> None:
    """Row 21 with an ES256 key: both algorithms verify."""
    gw = await start_gateway()
    status, _, _ = await gw.launch(token=make_token(private_key=keys.p256, kid="k-es"))
    assert status == 201


async def test_token_header_never_forwarded_nor_logged(
    start_gateway: StartGateway, make_token: MakeToken
) -> None:
    """The raw token reaches neither the upstream nor the decision log."""
    gw = await start_gateway()
    token = make_token()
    assert (await gw.launch(token=token))[0] == 201
    assert (await gw.launch(token=token + "x"))[0] == 403
    forwarded = (await gw.stub_requests())[0]
    assert "license-token" not in {name.lower() for name in forwarded["headers"]}
    assert forwarded["headers"]["X-Account-Id"] == RESTRICTED
    assert token not in json.dumps(forwarded)
    log_text = gw.config.audit_path.read_text()
    assert token not in log_text and token.split(".")[2] not in log_text
    # Spelt with "_" (one name to a CGI-style upstream), on a launch or any other request.
    await gw.launch(account=UNRESTRICTED, headers={"License_Token": token})
    async with gw.session.get(f"{gw.url}/v1/instances", headers={"license_token": token}) as r:
        assert r.status == 200
    assert token not in json.dumps(await gw.stub_requests())


def _token_cases(keys: Keys) -> list[tuple[str, str]]:
    t = int(now())
    es_key_ed_token = issue_token(
        private_key=keys.ed25519,
        kid="k-es",
        issuer="compliance.example-cloud",
        account=RESTRICTED,
        skus=[H100_SKU],
        max_accelerators=8,
        expires_in_s=600,
    )
    ed_pub = (keys.folder / "jwks.json").read_text().encode()
    import hashlib
    import hmac

    def hs256(secret: bytes) -> str:
        header = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": "k-ed"}).encode())
        payload = _b64(json.dumps(good_claims()).encode())
        sig = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        return f"{header}.{payload}.{_b64(sig)}"

    def sign(**claims: Any) -> str:
        args: dict[str, Any] = {
            "private_key": keys.ed25519,
            "kid": "k-ed",
            "issuer": "compliance.example-cloud",
            "account": RESTRICTED,
            "skus": [H100_SKU],
            "max_accelerators": 8,
            "expires_in_s": 600,
        }
        args.update(claims)
        return issue_token(**args)

    valid = sign()
    head, payload, sig = valid.split(".")
    tampered_claims = json.loads(base64.urlsafe_b64decode(payload + "==")) | {
        "max_accelerators": 10_000
    }
    return [
        ("not-a-jws", "token_invalid"),
        ("a.b", "token_invalid"),
        (forge({"alg": "none", "kid": "k-ed"}, good_claims()), "token_invalid"),
        (hs256(ed_pub), "token_invalid"),  # key confusion: public key bytes as HMAC secret
        (forge({"alg": "RS256", "kid": "k-ed"}, good_claims(), b"x" * 256), "token_invalid"),
        (
            forge(
                {"alg": "EdDSA", "kid": "k-ed", "jku": "http://127.0.0.1/keys"},
                good_claims(),
                b"x" * 64,
            ),
            "token_invalid",
        ),
        (
            forge({"alg": "EdDSA", "kid": "k-ed", "jwk": {"kty": "OKP"}}, good_claims(), b"x" * 64),
            "token_invalid",
        ),
        (
            forge(
                {"alg": "EdDSA", "kid": "k-ed", "x5u": "http://127.0.0.1/c"},
                good_claims(),
                b"x" * 64,
            ),
            "token_invalid",
        ),
        (forge({"alg": "EdDSA", "kid": "nobody"}, good_claims(), b"x" * 64), "token_unknown_key"),
        (forge({"alg": "EdDSA"}, good_claims(), b"x" * 64), "token_unknown_key"),
        (es_key_ed_token, "token_invalid"),  # EdDSA token naming the ES256 key
        (f"{head}.{_b64(json.dumps(tampered_claims).encode())}.{sig}", "token_invalid"),
        (f"{head}.{payload}.{_b64(b'0' * 64)}", "token_invalid"),
        (sign(expires_in_s=1, now=t - 120), "token_expired"),
        (sign(not_before=t + 3600), "token_not_yet_valid"),
        (sign(issuer="someone-else"), "token_wrong_issuer"),
        (sign(audience="another-gateway"), "token_wrong_audience"),
        (sign(account=UNRESTRICTED), "token_account_mismatch"),
        (sign(skus=["p4d.24xlarge"]), "token_sku_not_covered"),
        (sign(regions=["eu-west-1"]), "token_region_not_covered"),
    ]


async def test_token_attacks_and_claim_rows(start_gateway: StartGateway, keys: Keys) -> None:
    """Rows 8-17: every bad token is denied with its reason code and never forwarded."""
    gw = await start_gateway()
    for token, reason in _token_cases(keys):
        status, body, _ = await gw.launch(token=token)
        assert (status, body["reason"]) == (403, reason), (reason, body)
        assert token not in json.dumps(body)
    assert await gw.stub_requests() == []
    assert await gw.gateway.ledger.licenses() == []


async def test_token_within_leeway_still_valid(
    start_gateway: StartGateway, make_token: MakeToken
) -> None:
    """Row 11 respects leeway_s: a token expired 10 s ago passes with a 30 s leeway."""
    gw = await start_gateway()
    token = make_token(expires_in_s=1, now=now() - 11)
    assert (await gw.launch(token=token))[0] == 201


async def test_region_covered_and_missing(
    start_gateway: StartGateway, make_token: MakeToken
) -> None:
    """Row 17: a region-limited license needs the request's region among its regions."""
    gw = await start_gateway()
    token = make_token(regions=["us-east-1"])
    assert (await gw.launch(token=token, region="us-east-1"))[0] == 201
    status, body, _ = await gw.launch(token=token, region=None)
    assert (status, body["reason"]) == (403, "token_region_not_covered")


async def test_revocation_denies_from_then_on(
    start_gateway: StartGateway, make_token: MakeToken
) -> None:
    """Row 19: `launchgate token revoke` (another process) denies the license at once."""
    gw = await start_gateway()
    token = make_token(jti="lic-revoke-me")
    assert (await gw.launch(token=token))[0] == 201
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "launchgate", "token", "revoke", "--config", str(gw.config_path)),
        *("lic-revoke-me", "--reason", "end user concern"),
        stderr=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
    )
    _, stderr = await process.communicate()
    assert process.returncode == 0, stderr
    status, body, _ = await gw.launch(token=token)
    assert (status, body["reason"]) == (403, "license_revoked")
    assert len([r for r in await gw.stub_requests() if r["method"] == "POST"]) == 1


async def test_store_unavailable_fails_closed(
    start_gateway: StartGateway, make_token: MakeToken, tmp_path: Path
) -> None:
    """Row 18: with the ledger unusable, licensed launches get 503, with a Retry-After (found
    by QA: a client had nothing to pace its retries by); others still pass."""
    (tmp_path / "a-directory").mkdir()
    gw = await start_gateway(store={"url": f"sqlite:{tmp_path / 'a-directory'}"})
    status, body, headers = await gw.launch(token=make_token())
    assert (status, body["reason"]) == (503, "store_unavailable")
    assert headers["Retry-After"] == "1"
    assert (await gw.launch(account=UNRESTRICTED))[0] == 201
    assert (await gw.launch(sku=CPU_SKU))[0] == 201
    assert [r["path"] for r in await gw.stub_requests()] == ["/v1/instances"] * 2


async def test_upstream_5xx_releases_reservation(
    start_gateway: StartGateway, make_token: MakeToken
) -> None:
    """An upstream error answer is relayed as is and the reservation is released."""
    gw = await start_gateway()
    await gw.stub_fail(status=500, times=1)
    token = make_token(jti="lic-5xx", max_accelerators=8)
    status, _, headers = await gw.launch(token=token)
    assert status == 500
    assert "Launchgate-Decision-Id" in headers
    state = await gw.license("lic-5xx")
    assert (state.used, state.reserved) == (0, 0)
    assert (await gw.launch(token=token))[0] == 201
    completed = [r for r in gw.records() if r["event"] == "launch.completed"]
    assert [(c["upstream_status"], c["settlement"]) for c in completed] == [
        (500, "released"),
        (201, "used"),
    ]


async def test_upstream_down_gives_502_and_releases(
    start_gateway: StartGateway, make_token: MakeToken, unused_tcp_port: int
) -> None:
    """No connection to the upstream: 502 upstream_unavailable, reservation released."""
    gw = await start_gateway(upstream_url=f"http://127.0.0.1:{unused_tcp_port}")
    status, body, _ = await gw.launch(token=make_token(jti="lic-down"))
    assert (status, body["reason"]) == (502, "upstream_unavailable")
    state = await gw.license("lic-down")
    assert (state.used, state.reserved) == (0, 0)
    completed = [r for r in gw.records() if r["event"] == "launch.completed"][-1]
    assert completed["upstream_status"] is None and completed["settlement"] == "released"
    assert completed["error"] == "upstream_unavailable"  # the reason the client was given


@pytest.mark.parametrize("trusted", [True, False], ids=["trusted", "untrusted"])
async def test_a_launch_to_an_https_upstream(
    start_gateway: StartGateway,
    make_token: MakeToken,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    trusted: bool,
) -> None:
    """Over TLS to a trusted upstream the launch goes through and is counted; to one whose
    certificate does not check out nothing is sent: 502 upstream_unavailable, released."""
    ca, cert, key = tls_certificates(tmp_path)
    other, _, _ = tls_certificates(tmp_path, "other.example")
    monkeypatch.setenv("SSL_CERT_FILE", str(ca if trusted else other))
    stub = create_stub_app()
    async with tls_site(stub, cert, key) as port:
        gw = await start_gateway(upstream_url=f"https://localhost:{port}")
        status, body, _ = await gw.launch(token=make_token(jti="lic-tls"))
    state = await gw.license("lic-tls")
    [completed] = [r for r in gw.records() if r["event"] == "launch.completed"]
    if trusted:
        assert status == 201, body
        assert (state.used, state.reserved) == (8, 0)
        assert (completed["upstream_status"], completed["settlement"]) == (201, "used")
    else:
        assert (status, body["reason"]) == (502, "upstream_unavailable")
        assert (state.used, state.reserved) == (0, 0)
        assert (completed["upstream_status"], completed["settlement"]) == (None, "released")


async def test_a_connect_that_hangs_gives_504_and_releases(
    start_gateway: StartGateway, make_token: MakeToken
) -> None:
    """An upstream that takes the TCP connection but never finishes the TLS handshake: no
    request was sent, so 504 upstream_timeout within the connect timeout, units released."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # the ClientHello, never answered

    async with raw_upstream(silent) as url:
        gw = await start_gateway(
            upstream_url=url.replace("http:", "https:"), upstream={"connect_timeout_s": 0.3}
        )
        started = asyncio.get_running_loop().time()
        status, body, _ = await gw.launch(token=make_token(jti="lic-hang"))
        assert asyncio.get_running_loop().time() - started < 3
    assert (status, body["reason"]) == (504, "upstream_timeout")
    state = await gw.license("lic-hang")
    assert (state.used, state.reserved) == (0, 0)
    [completed] = [r for r in gw.records() if r["event"] == "launch.completed"]
    assert (completed["settlement"], completed["error"]) == ("released", "upstream_timeout")


async def test_upstream_timeout_gives_504_and_settles_as_used(
    start_gateway: StartGateway, make_token: MakeToken
) -> None:
    """The upstream took the launch then timed out: 504, the reservation counts as used."""
    gw = await start_gateway(upstream={"timeout_s": 0.3})
    await gw.stub_fail(delay_s=2, times=1)
    status, body, _ = await gw.launch(token=make_token(jti="lic-slow"))
    assert (status, body["reason"]) == (504, "upstream_timeout")
    state = await gw.license("lic-slow")
    assert (state.used, state.reserved) == (8, 0)
    completed = [r for r in gw.records() if r["event"] == "launch.completed"][-1]
    assert completed["settlement"] == "used_unknown"


async def test_a_launch_given_back_while_under_way_is_counted_when_it_answers(
    start_gateway: StartGateway, make_token: MakeToken, tmp_path: Path
) -> None:
    """Found by QA: staff ran `licenses release` with a shorter reservation_ttl_s than the
    gateway's while a launch was under way; it settled the launch as unknown, gave it back, and
    the 2xx that followed counted nothing (the next launch of the whole quantity passed too).
    The 2xx counts it again, and its completion record says used."""
    gw = await start_gateway()
    await gw.stub_fail(delay_s=1.5, times=1)
    token = make_token(jti="lic-away", max_accelerators=8)
    launch = asyncio.create_task(gw.launch(token=token))
    staff = SqliteLedger(tmp_path / "ledger.sqlite3", create=False)
    await staff.open()
    try:
        deadline = time.monotonic() + 5
        while not await staff.expire_reservations(now=time.time(), ttl_s=0):
            assert time.monotonic() < deadline, "the launch reserved nothing"
            await asyncio.sleep(0.05)
        [decision] = gw.decisions()
        await staff.give_back(decision["decision_id"], now=time.time(), note="checked")
        assert (await gw.license("lic-away")).used == 0
    finally:
        await staff.close()
    status, _, _ = await launch
    assert status == 201
    state = await gw.license("lic-away")
    assert (state.used, state.reserved) == (8, 0)
    [completed] = [r for r in gw.records() if r["event"] == "launch.completed"]
    assert completed["settlement"] == "used"
    status, problem, _ = await gw.launch(token=token)
    assert (status, problem["reason"]) == (403, "license_exhausted")


@pytest.mark.parametrize(("ttl", "warned"), [(5, True), (60, False)])
async def test_a_reservation_ttl_within_the_upstream_timeouts_is_warned_of(
    start_gateway: StartGateway, ttl: float, warned: bool
) -> None:
    """A TTL that a launch can outlive while it waits for its answer (connect 2 s + read 5 s in
    the test config is 7 s) is logged at start: the sweeper would settle it as used early."""
    with structlog.testing.capture_logs() as logs:
        await start_gateway(store={"reservation_ttl_s": ttl})
    warnings = [e for e in logs if e["event"] == "config.reservation_ttl_short"]
    assert bool(warnings) is warned
    if warned:
        assert (warnings[0]["reservation_ttl_s"], warnings[0]["upstream_s"]) == (5, 7)


async def test_a_reload_to_a_short_reservation_ttl_is_warned_of(
    start_gateway: StartGateway,
) -> None:
    """The same warning when a reload brings the short TTL (found by QA: only a start warned)."""
    gw = await start_gateway(store={"reservation_ttl_s": 60})
    text = gw.config_path.read_text()
    gw.config_path.write_text(text.replace("reservation_ttl_s = 60", "reservation_ttl_s = 5"))
    with structlog.testing.capture_logs() as logs:
        assert await gw.gateway.reload(gw.config_path)
    [warning] = [e for e in logs if e["event"] == "config.reservation_ttl_short"]
    assert (warning["reservation_ttl_s"], warning["upstream_s"]) == (5, 7)


async def test_body_too_large_is_413(start_gateway: StartGateway) -> None:
    """A launch body over max_body_bytes gets 413 body_too_large and is not forwarded."""
    gw = await start_gateway(server={"max_body_bytes": 1024})
    body = json.dumps({"instance_type": H100_SKU, "pad": "x" * 2000}).encode()
    async with gw.session.post(
        f"{gw.url}/v1/instances", data=body, headers={"X-Account-Id": RESTRICTED}
    ) as r:
        assert r.status == 413
        assert (await r.json(content_type=None))["reason"] == "body_too_large"

    async def chunks() -> Any:
        for _ in range(4):
            yield b"x" * 512

    async with gw.session.post(
        f"{gw.url}/v1/instances", data=chunks(), headers={"X-Account-Id": RESTRICTED}
    ) as r:
        assert r.status == 413
    assert await gw.stub_requests() == []


@pytest.mark.parametrize("mode", ["enforce", "shadow"])
async def test_a_chunked_body_too_large_that_arrives_whole_is_caught(
    start_gateway: StartGateway, mode: str
) -> None:
    """A chunked launch body already here whole when the launch is read (one write with its
    head, no Content-Length to refuse it by): over max_body_bytes it is body_too_large; in
    shadow mode it is forwarded whole all the same."""
    gw = await start_gateway(server={"mode": mode, "max_body_bytes": 1024})
    body = json.dumps({"instance_type": H100_SKU, "pad": "x" * 3000}).encode()
    host, port = gw.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/instances HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        + f"X-Account-Id: {RESTRICTED}\r\nTransfer-Encoding: chunked\r\n".encode()
        + b"Connection: close\r\n\r\n"
        + f"{len(body):x}\r\n".encode()
        + body
        + b"\r\n0\r\n\r\n"
    )
    answer = await reader.read()
    writer.close()
    assert answer.split()[1] == (b"413" if mode == "enforce" else b"201")
    [decision] = gw.decisions()
    assert (decision["reason"], decision["enforced"]) == ("body_too_large", mode == "enforce")
    forwarded = await gw.stub_requests()
    if mode == "enforce":
        assert forwarded == []
    else:
        assert forwarded[0]["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_shadow_mode_forwards_would_be_denials(start_gateway: StartGateway) -> None:
    """Shadow mode decides and records, but forwards everything (enforced: false)."""
    gw = await start_gateway(server={"mode": "shadow"})
    status, _, _ = await gw.launch()
    assert status == 201
    decision = gw.decisions()[-1]
    assert (decision["outcome"], decision["reason"], decision["enforced"], decision["mode"]) == (
        "deny",
        "license_required",
        False,
        "shadow",
    )
    assert gw.records()[-1]["event"] == "launch.completed"


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_shadow_mode_forwards_a_launch_body_too_large_to_judge(
    start_gateway: StartGateway, chunked: bool
) -> None:
    """Shadow mode forwards whatever the outcome, an oversized body too: recorded as a would-be
    body_too_large, then sent upstream whole, the part read to find it too large included."""
    gw = await start_gateway(server={"mode": "shadow", "max_body_bytes": 1024})
    body = json.dumps({"instance_type": H100_SKU, "pad": "x" * 200_000}).encode()

    async def pieces() -> Any:
        for at in range(0, len(body), 700):  # the limit is crossed mid-way through the 2nd
            yield body[at : at + 700]

    headers = {"X-Account-Id": RESTRICTED, "Content-Type": "application/json"}
    data = pieces() if chunked else body
    async with gw.session.post(f"{gw.url}/v1/instances", data=data, headers=headers) as r:
        assert r.status == 201
        decision_id = r.headers["Launchgate-Decision-Id"]
    [forwarded] = await gw.stub_requests()
    assert forwarded["body_length"] == len(body)
    assert forwarded["body_sha256"] == hashlib.sha256(body).hexdigest()
    decision, completed = gw.records()[-2:]
    assert (decision["reason"], decision["enforced"], decision["decision_id"]) == (
        "body_too_large",
        False,
        decision_id,
    )
    assert (completed["event"], completed["upstream_status"]) == ("launch.completed", 201)


async def test_decision_record_fields(start_gateway: StartGateway, make_token: MakeToken) -> None:
    """Each launch.decision record has every CONTRACT section 5 field, nulls where n/a."""
    gw = await start_gateway()
    await gw.launch(account=UNRESTRICTED, sku=CPU_SKU)
    await gw.launch(token=make_token(), count=2)
    required = RECORD_FIELDS
    first, second = gw.decisions()
    assert required <= set(first) and required <= set(second)
    assert first["license"] is None and first["accelerator"] is None
    assert second["accelerators"] == 16 and second["restricted"] is True
    assert second["items"] == [
        {
            "sku": H100_SKU,
            "count": 2,
            "accelerator": "H100-SXM5-80GB",
            "accelerators": 16,
            "eccn": "3A090.a",
            "controlled": True,
        }
    ]
    assert [r["seq"] for r in gw.records()] == list(range(1, len(gw.records()) + 1))


@pytest.mark.parametrize("licensed", [True, False])
async def test_a_decision_that_cannot_be_logged_is_not_forwarded(
    start_gateway: StartGateway, make_token: MakeToken, licensed: bool
) -> None:
    """Fail closed on the decision log: when the record cannot be written (a full disk), the
    launch gets a 500 problem, never reaches the upstream, and its units are given back.
    A licensed launch's record is written by the ledger's thread; an unlicensed one's by the
    log's own: both paths are held to this."""
    gw = await start_gateway()
    audit = gw.gateway.recorder.audit

    def full_disk(entries: list[dict[str, Any]]) -> list[dict[str, Any] | Exception]:
        raise OSError(28, "No space left on device")

    audit._write_locked = full_disk  # type: ignore[method-assign]
    token = make_token(max_accelerators=64, jti="lic-disk") if licensed else None
    status, body, _ = await gw.launch(token=token, account=RESTRICTED if licensed else UNRESTRICTED)
    assert (status, body["reason"]) == (500, "internal_error")
    assert [r for r in await gw.stub_requests() if r["method"] == "POST"] == []
    if licensed:
        state = await gw.license("lic-disk")
        assert (state.used, state.reserved) == (0, 0)  # reserved, then released


async def test_a_launch_whose_accepted_answer_breaks_off_is_counted(
    start_gateway: StartGateway, make_token: MakeToken
) -> None:
    """The upstream answers 201 and hangs up mid-body: the launch happened, so it is used and
    recorded as completed with 201; the client's copy of the answer is cut off too."""

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 100\r\n\r\n" + b"{" * 10)
        await writer.drain()

    token = make_token(max_accelerators=64, jti="lic-cut")
    async with raw_upstream(upstream) as url:
        gw = await start_gateway(upstream_url=url)
        body = json.dumps({"instance_type": H100_SKU, "count": 1}).encode()
        headers = {
            "Content-Type": "application/json",
            "X-Account-Id": RESTRICTED,
            "License-Token": token,
        }
        with structlog.testing.capture_logs() as logs:
            async with gw.session.post(f"{gw.url}/v1/instances", data=body, headers=headers) as r:
                assert r.status == 201
                decision_id = r.headers["Launchgate-Decision-Id"]
                with pytest.raises(aiohttp.ClientPayloadError):
                    await r.read()
    # The completion record was written before the break: the metric and a log line naming
    # the decision are its trace.
    assert {"event": "upstream.body_failed", "decision_id": decision_id} in [
        {k: e.get(k) for k in ("event", "decision_id")} for e in logs
    ]
    errors = gw.gateway.metrics.registry.get_sample_value(
        "launchgate_upstream_errors_total", {"kind": "body"}
    )
    assert errors == 1
    state = await gw.license("lic-cut")
    assert (state.used, state.reserved) == (8, 0)
    [completed] = [r for r in gw.records() if r["event"] == "launch.completed"]
    assert completed["decision_id"] == decision_id
    assert (completed["upstream_status"], completed["settlement"]) == (201, "used")


async def test_a_launch_answered_with_broken_http_is_502_and_counted(
    start_gateway: StartGateway, make_token: MakeToken
) -> None:
    """An answer that is not HTTP may follow a launch that happened: 502, counted as used."""

    upstream = replying(b"HTTP/1.1 2xx Created\r\n\r\n")
    token = make_token(max_accelerators=64, jti="lic-garbled")
    async with raw_upstream(upstream) as url:
        gw = await start_gateway(upstream_url=url)
        status, body, _ = await gw.launch(token=token, account=RESTRICTED)
    assert (status, body["reason"]) == (502, "upstream_unavailable")
    assert body["detail"] == "the upstream's answer is not valid HTTP"
    state = await gw.license("lic-garbled")
    assert (state.used, state.reserved) == (8, 0)
    [completed] = [r for r in gw.records() if r["event"] == "launch.completed"]
    assert (completed["upstream_status"], completed["settlement"]) == (None, "used_unknown")


async def test_a_client_that_hangs_up_mid_answer_is_no_upstream_error(
    start_gateway: StartGateway,
) -> None:
    """The client leaves while a long answer streams: the gateway stops relaying and drops
    the upstream connection, and counts no upstream failure."""
    upstream_gone = asyncio.Event()

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100000000\r\n\r\n")
        try:
            for _ in range(2000):
                writer.write(b"x" * 50_000)
                await writer.drain()
                await asyncio.sleep(0.005)
        except ConnectionError:
            upstream_gone.set()

    async with raw_upstream(upstream) as url:
        gw = await start_gateway(upstream_url=url)
        with structlog.testing.capture_logs() as logs:
            async with gw.session.get(f"{gw.url}/v1/large") as r:
                assert r.status == 200
                await r.content.readexactly(100_000)
                r.close()  # the client hangs up
            await asyncio.wait_for(upstream_gone.wait(), 5)
            await asyncio.sleep(0.05)
    errors = gw.gateway.metrics.registry.get_sample_value(
        "launchgate_upstream_errors_total", {"kind": "body"}
    )
    assert not errors
    assert [e for e in logs if e["log_level"] in ("warning", "error")] == []


async def test_a_put_launch_on_a_closed_kept_connection_is_not_sent_again(
    start_gateway: StartGateway, make_token: MakeToken
) -> None:
    """PUT is idempotent, but a second answer to a launch must not settle its reservation:
    a launch whose kept connection drops is counted as used (it may have arrived), never
    sent again and then released on the second attempt's refusal."""
    seen: list[str] = []

    async def upstream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:  # each request: GETs answered, a first PUT cut off, any other PUT refused
            try:
                head, _ = await read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):  # the gateway hung up
                return
            method = head.split(b" ", 1)[0].decode()
            seen.append(method)
            if method == "PUT" and seen.count("PUT") == 1:
                return
            status = b"200 OK" if method == "GET" else b"409 Conflict"
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()

    route = {
        "method": "PUT",
        "path": "/v1/vms",
        "dialect": "generic-json",
        "sku": "/instance_type",
        "count": "/count",
        "region": "/region",
    }
    token = make_token(max_accelerators=64, jti="lic-put")
    async with raw_upstream(upstream) as url:
        gw = await start_gateway(upstream_url=url, routes=[route])
        status, _ = await gw.send("GET", "/v1/vms", b"", account=None)  # a kept connection
        assert status == 200
        body = {"instance_type": H100_SKU, "count": 1, "region": "us-east-1"}
        status, answer = await gw.send("PUT", "/v1/vms", body, token=token)
    assert (status, answer["reason"]) == (502, "upstream_unavailable")
    assert seen == ["GET", "PUT"]  # not sent again
    state = await gw.license("lic-put")
    assert (state.used, state.reserved) == (8, 0)


async def test_a_launch_cancelled_while_reserving_gives_the_units_back(
    start_gateway: StartGateway, make_token: MakeToken
) -> None:
    """A handler cancelled (a stop's timeout) while the ledger reserves forwards nothing, so
    once the reservation is made it is released, not left for the sweeper to count as used."""
    from multidict import CIMultiDict, CIMultiDictProxy

    from launchgate.dialects import LaunchRequest
    from launchgate.policy import decide
    from launchgate.proxy import reserve_license

    gw = await start_gateway()
    gateway, config = gw.gateway, gw.config
    token = make_token(max_accelerators=64, jti="lic-cancel")
    real_reserve = gateway.ledger.reserve
    entered, proceed = asyncio.Event(), asyncio.Event()

    async def slow_reserve(**kwargs: Any) -> Any:
        entered.set()
        await proceed.wait()
        return await real_reserve(**kwargs)

    gateway.ledger.reserve = slow_reserve  # type: ignore[method-assign]
    body = json.dumps({"instance_type": H100_SKU, "count": 1}).encode()
    headers = CIMultiDictProxy(CIMultiDict({"Content-Type": "application/json"}))
    request = LaunchRequest("POST", "/v1/instances", "", headers, body)
    launch = config.routes[0].dialect.parse(request)
    assert launch is not None
    decision = decide(
        launch, RESTRICTED, token, config, lambda t: gateway.verifier.verify(t, now=now())
    )
    assert decision.reason == "licensed" and decision.license is not None
    task = asyncio.create_task(
        reserve_license(gateway, config, decision, decision.license, "d-cancel", request, launch)
    )
    await entered.wait()
    task.cancel()
    proceed.set()
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(200):
        state = await gw.license("lic-cancel")
        if state is not None and state.reserved == 0:
            break
        await asyncio.sleep(0.01)
    assert state is not None and (state.used, state.reserved) == (0, 0)
    reservation = await gateway.ledger.reservation("d-cancel")
    assert reservation is not None and reservation.state == "released"


async def test_mixed_concurrent_traffic_shares_upstream_connections_correctly(
    start_gateway: StartGateway, make_token: MakeToken
) -> None:
    """Launches, streamed and short answers and HEADs at once over the pooled upstream
    connections: every answer is the right one, byte for byte, the license is spent
    exactly, each allowed launch reached the upstream once, and no connection leaks."""
    gw = await start_gateway()
    token = make_token(max_accelerators=400, jti="lic-mixed")  # 50 launches of 8
    sizes = [0, 1, 1000, 65536, 65537, 300_000]

    async def get(n: int) -> bool:
        async with gw.session.get(f"{gw.url}/_stub/bytes?n={n}") as r:
            return r.status == 200 and await r.read() == bytes(i % 256 for i in range(n))

    async def head(n: int) -> bool:
        async with gw.session.head(f"{gw.url}/_stub/bytes?n={n}") as r:
            return r.status == 200 and await r.read() == b""

    async def launch() -> int:
        status, _, _ = await gw.launch(token=token)
        return status

    jobs = [launch() for _ in range(60)]
    jobs += [get(sizes[i % len(sizes)]) for i in range(60)]
    jobs += [head(sizes[i % len(sizes)]) for i in range(20)]
    results = await asyncio.gather(*jobs)
    statuses = results[:60]
    assert sorted(statuses) == [201] * 50 + [403] * 10
    assert all(results[60:])
    state = await gw.license("lic-mixed")
    assert (state.used, state.reserved) == (400, 0)
    launched = [r for r in await gw.stub_requests() if r["method"] == "POST"]
    assert len(launched) == 50
    # Kept connections serve the burst; none is left busy once it is over.
    upstream = gw.gateway.upstream
    idle = sum(len(q) for q in upstream._idle.values())
    assert 0 < idle == len(upstream._open) <= 140


async def test_a_reload_keeps_restart_only_keys_as_running_until_a_restart(
    start_gateway: StartGateway,
) -> None:
    """A reload that changes a key only a restart applies (here the decision log's path) warns,
    and the running configuration keeps the value that runs: undoing the change in the file
    and reloading again is quiet, not a second warning about a change never applied."""
    h = await start_gateway()
    running = h.gateway.config.audit_path
    text = h.config_path.read_text()
    assert str(running) in text
    h.config_path.write_text(text.replace(str(running), str(running.with_name("elsewhere.jsonl"))))
    with structlog.testing.capture_logs() as logs:
        assert await h.gateway.reload(h.config_path)
        assert h.gateway.config.audit_path == running
        h.config_path.write_text(text)
        assert await h.gateway.reload(h.config_path)
    warned = [e["keys"] for e in logs if e["event"] == "config.reload_needs_restart"]
    assert warned == [["audit.path"]]
    assert [e["event"] for e in logs].count("config.reloaded") == 2


async def test_a_launch_is_judged_by_one_configuration_across_a_reload(
    start_gateway: StartGateway, make_token: MakeToken, tmp_path: Path
) -> None:
    """A reload while a launch's body is still arriving: the launch is judged wholly by the
    configuration it began under, its token by that configuration's keys too (found by QA: the
    verifier was read after the body, so the new keys judged the token and the old registry
    the account: a launch either alone would deny went through, or the reverse)."""
    gw = await start_gateway()
    token = make_token(jti="lic-reload")
    empty = tmp_path / "no-keys.json"
    empty.write_text('{"keys": []}')
    text = gw.config_path.read_text()
    jwks = str(gw.config.jwks_path)
    assert jwks in text
    halfway = asyncio.Event()
    go_on = asyncio.Event()

    async def body() -> AsyncIterator[bytes]:
        yield b'{"instance_type": "p5.48xlarge", '
        halfway.set()
        await go_on.wait()
        yield b'"count": 1, "region": "us-east-1"}'

    async def send() -> tuple[int, dict[str, Any]]:
        headers = {"Content-Type": "application/json", "X-Account-Id": RESTRICTED}
        headers["License-Token"] = token
        async with gw.session.post(f"{gw.url}/v1/instances", data=body(), headers=headers) as r:
            return r.status, await r.json(content_type=None)

    sending = asyncio.create_task(send())
    await halfway.wait()
    await asyncio.sleep(0.1)  # the gateway has the headers and is reading the body
    gw.config_path.write_text(text.replace(jwks, str(empty)))
    assert await gw.gateway.reload(gw.config_path)
    go_on.set()
    status, answer = await sending
    assert status == 201, answer  # the keys it began under trust the token
    status, answer, _ = await gw.launch(token=token)
    assert (status, answer["reason"]) == (403, "token_unknown_key")  # the next: the new keys


async def test_reloads_apply_in_the_order_they_were_asked(
    start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two SIGHUPs close together: the first one's load is slow, the second's quick. The files
    as the second read them win, not the first's read, which finished last (found by QA)."""
    gw = await start_gateway()
    first, second = gw.gateway.config, load_config(gw.config_path)
    loads = iter([(0.3, first), (0.0, second)])

    def load(path: Path) -> Any:
        pause, config = next(loads)
        time.sleep(pause)  # (in the thread that loads)
        return config

    monkeypatch.setattr("launchgate.gateway.load_config", load)
    reloads = [asyncio.create_task(gw.gateway.reload(gw.config_path)) for _ in range(2)]
    assert [await reload for reload in reloads] == [True, True]
    assert gw.gateway.config is second


async def test_the_store_pool_size_is_restart_only(start_gateway: StartGateway) -> None:
    """The ledger's connections are made at start: a reload that changes [store] pool_size
    warns and keeps the size that runs."""
    h = await start_gateway(store={"pool_size": 4})
    text = h.config_path.read_text()
    assert "pool_size = 4" in text
    h.config_path.write_text(text.replace("pool_size = 4", "pool_size = 7"))
    with structlog.testing.capture_logs() as logs:
        assert await h.gateway.reload(h.config_path)
    assert h.gateway.config.store_pool_size == 4
    warned = [e["keys"] for e in logs if e["event"] == "config.reload_needs_restart"]
    assert warned == [["store.pool_size"]]


async def test_a_reload_that_fails_unexpectedly_keeps_the_running_configuration(
    start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Not only a ConfigError: whatever loading raises, the running configuration stays, the
    failure is logged and counted, and the reload task does not die with it."""
    h = await start_gateway()
    running = h.gateway.config

    def broken(path: Path) -> None:
        raise UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")

    monkeypatch.setattr("launchgate.gateway.load_config", broken)
    with structlog.testing.capture_logs() as logs:
        assert await h.gateway.reload(h.config_path) is False
    assert h.gateway.config is running
    [failed] = [e for e in logs if e["event"] == "config.reload_failed"]
    assert "UnicodeDecodeError" in failed["error"]
    assert h.gateway.metrics.reloads.labels("failed")._value.get() == 1


async def test_the_sweeper_follows_a_reloaded_reservation_ttl(
    start_gateway: StartGateway, make_token: MakeToken
) -> None:
    """`[store] reservation_ttl_s` is no restart-only key: after a reload the sweeper settles by
    the new one (found by review: it kept the value it started with)."""
    with structlog.testing.capture_logs():  # (a TTL this short is warned about)
        gw = await start_gateway(store={"reservation_ttl_s": 10})  # a sweep every 2.5 s
    await gw.gateway.ledger.reserve(
        jti="lic-ttl",
        account=RESTRICTED,
        max_accelerators=8,
        expires=now() + 600,
        amount=8,
        decision_id="d-old",
        now=now() - 5,  # open for 5 s: within 10 s for 5 s more, past 1 s
    )
    text = gw.config_path.read_text()
    assert "reservation_ttl_s = 10" in text
    gw.config_path.write_text(text.replace("reservation_ttl_s = 10", "reservation_ttl_s = 1"))
    assert await gw.gateway.reload(gw.config_path)
    for _ in range(80):  # 4 s: the next sweep, not the old TTL's expiry
        reservation = await gw.gateway.ledger.reservation("d-old")
        if reservation is not None and reservation.state != "reserved":
            break
        await asyncio.sleep(0.05)
    assert reservation is not None and reservation.state == "settled_unknown"


async def test_a_launch_answering_2xx_after_the_sweeper_is_used_and_cannot_be_given_back(
    start_gateway: StartGateway, make_token: MakeToken
) -> None:
    """Found by QA: a launch that answered 201 after the sweeper had settled it as unknown stayed
    so ("settled_elsewhere"); staff gave it back, and the license launched twice its quantity.
    The 201 makes it used, and its completion record says so."""
    with structlog.testing.capture_logs():  # (a TTL this short is warned about)
        gw = await start_gateway(store={"reservation_ttl_s": 1})
    await gw.stub_fail(delay_s=2.0, times=1)
    status, _, headers = await gw.launch(token=make_token(jti="lic-late", max_accelerators=8))
    assert status == 201
    [completed] = [r for r in gw.records() if r["event"] == "launch.completed"]
    assert (completed["upstream_status"], completed["settlement"]) == (201, "used")
    decision_id = headers["Launchgate-Decision-Id"]
    reservation = await gw.gateway.ledger.reservation(decision_id)
    assert reservation is not None and reservation.state == "used"
    with pytest.raises(ValueError, match="'used'"):
        await gw.gateway.ledger.give_back(decision_id, now=time.time(), note=None)
    assert (await gw.license("lic-late")).used == 8


async def test_a_completion_record_says_when_the_sweeper_settled_the_launch_first(
    start_gateway: StartGateway, make_token: MakeToken
) -> None:
    """The upstream answers 500 after the TTL: the sweeper has already settled the reservation
    as used, so the release finds nothing reserved, and the completion record says so rather
    than "released" (found by QA: it said released, and the ledger had counted it used)."""
    with structlog.testing.capture_logs():  # (a TTL this short is warned about)
        gw = await start_gateway(store={"reservation_ttl_s": 1})
    await gw.stub_fail(status=500, times=1, delay_s=2.0)
    status, _, _ = await gw.launch(token=make_token(jti="lic-swept"))
    assert status == 500
    [completed] = [r for r in gw.records() if r["event"] == "launch.completed"]
    assert (completed["upstream_status"], completed["settlement"]) == (500, "settled_elsewhere")
    state = await gw.license("lic-swept")
    assert (state.used, state.reserved) == (8, 0)


async def test_a_gateway_stopping_mid_sweep_records_what_the_sweep_settled(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A gateway told to stop while a sweep is under way (a license row held elsewhere keeps
    a sweep waiting) lets the sweep finish and write its `reservation.settled` records before
    it closes the log. (The sweep was cancelled: what it had settled as used was in the ledger
    with no record of it in the decision log.)"""
    gateway = Gateway(load_config(write_config(tmp_path, "http://127.0.0.1:9", keys)))
    ledger = gateway.ledger
    expire = ledger.expire_reservations
    swept, go_on = asyncio.Event(), asyncio.Event()

    async def slow_sweep(*, now: float, ttl_s: float) -> list[str]:
        await ledger.reserve(
            jti="lic-swept",
            account=RESTRICTED,
            max_accelerators=8,
            expires=now + 600,
            amount=8,
            decision_id="d-swept",
            now=now - ttl_s - 5,
        )
        settled = await expire(now=now, ttl_s=ttl_s)
        swept.set()
        await go_on.wait()  # the rest of a sweep: another license's row, held elsewhere
        return settled

    monkeypatch.setattr(ledger, "expire_reservations", slow_sweep)
    await gateway.start()
    await asyncio.wait_for(swept.wait(), 5)
    stopping = asyncio.ensure_future(gateway.stop())
    await asyncio.sleep(0.05)
    assert not stopping.done()  # waiting for the sweep
    go_on.set()
    await asyncio.wait_for(stopping, 5)
    lines = gateway.config.audit_path.read_text().splitlines()
    settled = [json.loads(line) for line in lines]
    assert [(r["event"], r["decision_id"], r["settlement"]) for r in settled] == [
        ("reservation.settled", "d-swept", "used")
    ]


async def test_the_sweeper_outlives_a_record_it_could_not_write(
    start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A `reservation.settled` record the decision log refuses (a full disk) is logged on stdout
    with its decision id, and the sweeper goes on sweeping. (The error ended the sweeper: no
    reservation expired again until a restart.)"""
    with structlog.testing.capture_logs() as logs:  # (a TTL this short is warned about)
        gw = await start_gateway(store={"reservation_ttl_s": 1})  # a sweep every 0.5 s
        write = gw.gateway.recorder.event
        refused: list[str] = []

        async def full_disk_once(event: str, **fields: Any) -> dict[str, Any]:
            if not refused:
                refused.append(fields["decision_id"])
                raise OSError(28, "No space left on device")
            return await write(event, **fields)

        monkeypatch.setattr(gw.gateway.recorder, "event", full_disk_once)
        for decision_id in ("d-first", "d-second"):
            await gw.gateway.ledger.reserve(
                jti="lic-ttl",
                account=RESTRICTED,
                max_accelerators=16,
                expires=now() + 600,
                amount=8,
                decision_id=decision_id,
                now=now() - 5,
            )
            for _ in range(60):  # 3 s
                reservation = await gw.gateway.ledger.reservation(decision_id)
                if reservation is not None and reservation.state != "reserved":
                    break
                await asyncio.sleep(0.05)
            assert reservation is not None and reservation.state == "settled_unknown"
    assert refused == ["d-first"]
    [failed] = [e for e in logs if e["event"] == "audit.write_failed"]
    assert (failed["decision_id"], failed["record"]) == ("d-first", "reservation.settled")
    settled = [r["decision_id"] for r in gw.records() if r["event"] == "reservation.settled"]
    assert settled == ["d-second"]


# Every dialect on its default mount, beside a generic-json route (aws-ec2 and azure-arm on "/").
EVERY_DIALECT: list[dict[str, Any]] = [
    {"dialect": "aws-ec2"},
    {"dialect": "azure-arm"},
    {"dialect": "gcp-compute"},
    {"dialect": "openstack-nova", "region": "RegionOne"},
    {"dialect": "opaque", "path": "/batch", "methods": ["POST"]},
    {
        "method": "POST",
        "path": "/v1/instances",
        "dialect": "generic-json",
        "sku": "/instance_type",
        "count": "/count",
    },
]


async def test_every_dialect_on_its_default_mount_beside_a_generic_route(
    start_gateway: StartGateway,
) -> None:
    """Routes are tried deepest mount first (found by QA: an aws-ec2 or azure-arm route on its
    default path "/" could not be configured beside any other route). Each launch below is
    judged by the route it belongs to, an opaque mount under aws-ec2's "/" takes its own
    requests, and nothing of a restricted account's reaches the upstream."""
    gw = await start_gateway(routes=EVERY_DIALECT)
    assert [route.dialect.name for route in gw.config.routes] == [
        "generic-json",  # /v1/instances, an exact path
        "gcp-compute",  # /compute/v1, its launch calls
        "openstack-nova",  # /v2.1
        "opaque",  # /batch
        "azure-arm",  # /, its launch calls only
        "aws-ec2",  # /, every request
    ]
    vm = "/subscriptions/s1/resourceGroups/g1/providers/Microsoft.Compute/virtualMachines/vm1"
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    launches: list[tuple[str, str, dict[str, Any] | bytes, dict[str, str] | None, str]] = [
        (
            "POST",
            "/v1/instances",
            {"instance_type": H100_SKU, "count": 1},
            None,
            "license_required",
        ),
        (
            "POST",
            "/",
            b"Action=RunInstances&InstanceType=p5.48xlarge&MinCount=1&MaxCount=1",
            form,
            "license_required",
        ),
        (
            "PUT",
            f"{vm}?api-version=2024-07-01",
            {
                "location": "eastus",
                "properties": {"hardwareProfile": {"vmSize": "Standard_ND96isr_H100_v5"}},
            },
            None,
            "license_required",
        ),
        (
            "POST",
            "/compute/v1/projects/p1/zones/us-central1-a/instances",
            {"name": "vm-1", "machineType": "zones/us-central1-a/machineTypes/a3-highgpu-8g"},
            None,
            "license_required",
        ),
        ("POST", "/v2.1/servers", {"server": {"flavorRef": "g1.h100x8"}}, None, "license_required"),
        (
            "POST",
            "/batch",
            b"--b--",
            {"Content-Type": "multipart/mixed; boundary=b"},
            "unresolvable_launch",
        ),
    ]
    for method, path, body, headers, reason in launches:
        status, answer = await gw.send(method, path, body, headers=headers)
        assert (status, answer.get("reason")) == (403, reason), (method, path, answer)
    assert await gw.stub_requests() == []
    status, _ = await gw.send(
        "POST", "/v1/instances", {"instance_type": H100_SKU, "count": 1}, account=UNRESTRICTED
    )
    assert status == 201
    assert [r["path"] for r in gw.decisions()] == [
        *(path.partition("?")[0] for _, path, *_ in launches),
        "/v1/instances",
    ]


_P5_TIMES_4 = "InstanceType=p5.48xlarge&MinCount=4&MaxCount=4"
_EC2_LAUNCH = f"Action=RunInstances&{_P5_TIMES_4}"
_VM = "/subscriptions/s1/resourceGroups/g1/providers/Microsoft.Compute/virtualMachines/vm1"


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        pytest.param(
            "PATCH", f"{_VM}?api-version=2024-07-01&{_EC2_LAUNCH}", {"tags": {}}, id="arm"
        ),
        pytest.param("POST", f"/BATCH?{_EC2_LAUNCH}", {"requests": []}, id="arm-batch"),
        pytest.param(
            "POST", f"/v2.1/servers/abc/action?{_EC2_LAUNCH}", {"reboot": {}}, id="nova-action"
        ),
        pytest.param(
            "POST",
            f"/compute/v1/projects/p1/zones/us-central1-a/instances/i1/setMachineResources?{_EC2_LAUNCH}",
            {"guestAccelerators": []},
            id="gce",
        ),
        pytest.param(
            "POST", f"/v1/instances?{_EC2_LAUNCH}", {"instance_type": "m5.large"}, id="generic"
        ),
        pytest.param(  # JSON to the generic route, a form to an upstream that trusts the type
            "POST",
            "/v1/instances",
            {"instance_type": "m5.large", "note": f"&{_EC2_LAUNCH.replace('Action', 'ACTION')}&"},
            id="generic-body-sent-as-a-form",
        ),
        pytest.param("POST", f"/batch?{_EC2_LAUNCH}", {"requests": []}, id="opaque"),
        # Read as an upstream might (found in a second review: the stub decodes twice, and
        # launched 4x H100 for "%2541ction" on each of these routes).
        pytest.param(
            "PATCH",
            f"{_VM}?api-version=2024-07-01&%2541ction=RunInstances&{_P5_TIMES_4}",
            {"tags": {}},
            id="arm-name-encoded-twice",
        ),
        pytest.param(
            "POST",
            f"/v2.1/servers/abc/action?Action=Run%2549nstances&{_P5_TIMES_4}",
            {"reboot": {}},
            id="nova-value-encoded-twice",
        ),
        pytest.param(
            "POST",
            f"/v1/instances?x=1%26Action%3DRunInstances%26{_P5_TIMES_4}",
            {"instance_type": "m5.large"},
            id="decoded-then-split",
        ),
        pytest.param(
            "POST",
            f"/v1/instances?x=1;Action=RunInstances;{_P5_TIMES_4}",
            {"instance_type": "m5.large"},
            id="semicolons",
        ),
        pytest.param(
            "POST",
            f"/v1/instances?Action%00x=RunInstances&{_P5_TIMES_4}",
            {"instance_type": "m5.large"},
            id="name-cut-at-nul",
        ),
    ],
)
async def test_an_ec2_call_under_another_route_has_two_meanings(
    start_gateway: StartGateway,
    request: pytest.FixtureRequest,
    method: str,
    path: str,
    body: dict[str, Any],
) -> None:
    """Found in review: with aws-ec2 on "/" beside other routes, a request another route takes
    (a Nova reboot, an ARM PATCH, a generic launch of an uncontrolled SKU) carrying an EC2
    launch Action in its query or body went to an EC2-style upstream unjudged, or under a
    record of something else, and launched 4x H100. EC2 serves its API on any path: such a
    request reads as two things, and is malformed for every account."""
    gw = await start_gateway(routes=EVERY_DIALECT)
    form = "form" in request.node.callspec.id
    headers = {"Content-Type": "application/x-www-form-urlencoded" if form else "application/json"}
    for account in (RESTRICTED, UNRESTRICTED):
        status, answer = await gw.send(method, path, body, account=account, headers=headers)
        assert (status, answer.get("reason")) == (400, "malformed_request"), answer
        if path.startswith("/BATCH"):  # ARM's batch, and, to a router ignoring case, /batch's
            assert "'/batch', which another route judges" in answer["detail"]
        else:
            assert "EC2 RunInstances" in answer["detail"]
    assert await gw.stub_requests() == []
    # Another EC2 Action there launches nothing: the route's own reading stands.
    status, _ = await gw.send(
        "POST", "/v1/instances?Action=DescribeInstances", {"instance_type": "m5.large"}
    )
    assert status == 201


async def test_a_json_body_that_mentions_an_ec2_call_is_no_ec2_call(
    start_gateway: StartGateway,
) -> None:
    """A JSON body is read as JSON: a startup script that calls EC2 is text, not a second
    meaning (found in review: a GCE launch carrying one was refused for every account). Only
    a body a Content-Type calls a form is read for an EC2 Action, as EC2 and the stub read."""
    gw = await start_gateway(routes=EVERY_DIALECT)
    script = f"curl 'https://ec2.us-east-1.amazonaws.com/?Version=2016-11-15&{_EC2_LAUNCH}'"
    launch = {
        "name": "vm-1",
        "machineType": "zones/us-central1-a/machineTypes/n2-standard-4",
        "metadata": {"items": [{"key": "startup-script", "value": script}]},
    }
    path = "/compute/v1/projects/p1/zones/us-central1-a/instances"
    status, answer = await gw.send("POST", path, launch, account=UNRESTRICTED)
    assert status == 200, answer
    assert [(r["path"], r["method"]) for r in await gw.stub_requests()] == [(path, "POST")]


async def test_an_ec2_mount_claims_its_path_in_any_letter_case(
    start_gateway: StartGateway,
) -> None:
    """EC2 ignores the path: an upstream that routes paths case-insensitively sends "/EC2" to it
    too (found in review: that went unjudged with aws-ec2 on /ec2)."""
    gw = await start_gateway(routes=[{"dialect": "aws-ec2", "path": "/ec2"}])
    for path in ("/EC2", "/Ec2/x"):
        status, answer = await gw.send("GET", f"{path}?{_EC2_LAUNCH}", b"")
        assert (status, answer.get("reason")) == (403, "license_required"), (path, answer)
    assert await gw.stub_requests() == []


async def test_an_ec2_route_under_another_reads_its_own_launches(
    start_gateway: StartGateway,
) -> None:
    """An aws-ec2 route mounted under another one judges the EC2 launches on its mount by
    itself (found in review: the outer route's second reading made every one of them 400)."""
    gw = await start_gateway(
        routes=[
            {"dialect": "aws-ec2", "region": "us-east-1"},
            {"dialect": "aws-ec2", "path": "/eu-west-1", "region": "eu-west-1"},
        ]
    )
    status, answer = await gw.send("GET", f"/eu-west-1?{_EC2_LAUNCH}", b"")
    assert (status, answer.get("reason")) == (403, "license_required"), answer
    [record] = gw.decisions()
    assert (record["region"], record["sku"], record["count"]) == ("eu-west-1", "p5.48xlarge", 4)


async def test_a_second_token_under_a_jti_for_another_account_cannot_spend_it(
    start_gateway: StartGateway, make_token: MakeToken
) -> None:
    """A jti names one license. Found in review: a token issued in error under another
    account's jti launched against that account's license (both accounts drew on one
    quantity). The ledger keeps the account it first saw; a token for another account is
    refused (token_account_mismatch), nothing is forwarded, and neither quantity moves."""
    gw = await start_gateway()
    first = make_token(jti="lic-shared", max_accelerators=64)
    other = make_token(jti="lic-shared", account="acct-2002", max_accelerators=64)
    assert (await gw.launch(token=first))[0] == 201  # 8 used, on record for acct-2001
    status, body, _ = await gw.launch(account="acct-2002", token=other)
    assert (status, body["reason"]) == (403, "token_account_mismatch")
    assert "another account" in body["detail"] and "acct-2001" not in body["detail"]
    state = await gw.license("lic-shared")
    assert (state.account, state.used, state.reserved) == ("acct-2001", 8, 0)
    assert len([r for r in await gw.stub_requests() if r["method"] == "POST"]) == 1
    [*_, record] = [r for r in gw.decisions() if r["event"] == "launch.decision"]
    assert (record["reason"], record["account"], record["reserved"]) == (
        "token_account_mismatch",
        "acct-2002",
        None,
    )
    assert (await gw.launch(token=first))[0] == 201  # the license's own account goes on


async def test_a_token_reissued_under_a_jti_with_less_is_held_to_its_own_quantity(
    start_gateway: StartGateway, make_token: MakeToken
) -> None:
    """The ledger keeps the quantity of the first token it saw for a jti. Found by QA: a token
    re-issued under that jti for 4 launched 12 against the first one's 64. Each launch is now
    held to its own token's quantity too; what it would have reserved past it is given back."""
    gw = await start_gateway()
    first = make_token(jti="lic-reissued", max_accelerators=64)
    smaller = make_token(jti="lic-reissued", max_accelerators=12)
    assert (await gw.launch(token=first))[0] == 201  # 8 used
    status, body, _ = await gw.launch(token=smaller)  # 8 more would make 16 > 12
    assert (status, body["reason"]) == (403, "license_exhausted")
    assert "4 of 12" in body["detail"]
    state = await gw.license("lic-reissued")
    assert (state.used, state.reserved, state.max_accelerators) == (8, 0, 64)
    assert len([r for r in await gw.stub_requests() if r["method"] == "POST"]) == 1
    [*_, record] = [r for r in gw.decisions() if r["event"] == "launch.decision"]
    assert (record["reason"], record["reserved"]) == ("license_exhausted", None)
    assert (await gw.launch(token=first))[0] == 201  # the first token's 64 still hold: 16 used


_ARM_H100 = {
    "location": "eastus",
    "properties": {"hardwareProfile": {"vmSize": "Standard_ND96isr_H100_v5"}},
}
_GCE_A3 = {"name": "vm-1", "machineType": "zones/us-central1-a/machineTypes/a3-highgpu-8g"}
_VM = "/subscriptions/s/resourceGroups/g/providers/Microsoft.Compute/virtualMachines"


@pytest.mark.parametrize(
    ("method", "raw", "body", "sent"),
    [
        # a VM named "..": no launch once normalized, one to an upstream that keeps the dots
        (
            "PUT",
            f"/azure{_VM}/..",
            _ARM_H100,
            "/azure/subscriptions/s/resourceGroups/g/providers/Microsoft.Compute",
        ),
        (
            "PUT",
            f"/azure{_VM}/%2E%2e",
            _ARM_H100,
            "/azure/subscriptions/s/resourceGroups/g/providers/Microsoft.Compute",
        ),
        (
            "PUT",
            "/azure/./subscriptions/s/resourceGroups/g/providers/Microsoft.Compute/virtualMachines/.",
            _ARM_H100,
            "/azure/subscriptions/s/resourceGroups/g/providers/Microsoft.Compute/virtualMachines",
        ),
        ("PUT", f"/azure/x/../{_VM[1:]}/%2e", _ARM_H100, f"/azure{_VM}"),
        # a zone or a project named ".." or "."
        (
            "POST",
            "/compute/v1/projects/p/zones/../instances",
            _GCE_A3,
            "/compute/v1/projects/p/instances",
        ),
        (
            "POST",
            "/compute/v1/./projects/p/zones/./instances",
            _GCE_A3,
            "/compute/v1/projects/p/zones/instances",
        ),
        (
            "POST",
            "/compute/v1/projects/../zones/us-central1-a/instances",
            _GCE_A3,
            "/compute/v1/zones/us-central1-a/instances",
        ),
    ],
)
async def test_an_unjudged_request_goes_on_without_its_dot_segments(
    start_gateway: StartGateway, method: str, raw: str, body: Any, sent: str
) -> None:
    """A request no route claims once normalized goes upstream on that normalized path when it
    has dot segments, as RFC 3986 resolves them: sent as written, an upstream that keeps them
    (the stub) read a launch into it (found in review: ".../virtualMachines/.." created an
    H100 VM named ".."; a first fix that refused such paths when a route claimed the reading
    with the dots kept was bypassed by a "." in the mount, and refused "/ec2/../x")."""
    gw = await start_gateway(
        routes=[
            {"dialect": "azure-arm", "path": "/azure"},
            {"dialect": "gcp-compute", "path": "/compute/v1"},
        ]
    )
    status, _ = await gw.send(method, f"{raw}?api-version=2024-07-01", body)
    assert status == 404  # the stub has nothing there
    assert gw.decisions() == []
    [forwarded] = await gw.stub_requests()
    assert forwarded["path"] == sent
    async with gw.session.get(f"{gw.stub_url}/v1/instances") as r:
        assert (await r.json())["instances"] == []


async def test_a_request_no_route_could_read_goes_on_with_its_dot_segments(
    start_gateway: StartGateway,
) -> None:
    """CONTRACT section 6: a request that is not a launch reaches the upstream with its path
    unchanged (found by QA: "GET /a/../b" went as "/b"). Only a path that an upstream keeping
    or resolving dot segments otherwise could read under a route's mount (one of its segments,
    decoded and folded, is the first of a mount's, or a route is mounted at "/") goes on
    normalized."""
    gw = await start_gateway()  # one route, on /v1/instances
    unchanged = ["/a/../b", "/a/./b", "/a/%2e%2E/b", "/a/%2E/b/", "/x/..//y?q=/../"]
    for raw in unchanged:
        status, _ = await gw.send("GET", raw, b"")
        assert status == 404, raw
    normalized = {"/x/../V1/volumes": "/V1/volumes", "/x/%2e%2e/%2576%31/y": "/%25761/y"}
    for raw in normalized:
        await gw.send("GET", raw, b"")
    sent = [
        r["path"] + (f"?{r['query']}" if r.get("query") else "") for r in await gw.stub_requests()
    ]
    assert sent == [*unchanged, *normalized.values()]
    assert gw.decisions() == []
    gw = await start_gateway(routes=[GENERIC_ROUTE, {"dialect": "aws-ec2"}])  # aws-ec2 on "/"
    await gw.send("GET", "/a/../b", b"")
    assert (await gw.stub_requests())[-1]["path"] == "/b"  # (the same stub as above)


@pytest.mark.parametrize("raw", ["/ec2/../x", "/EC2/%2e%2E/v1/instances", "/batch/../x"])
async def test_dot_segments_that_leave_a_catch_all_mount_are_not_a_launch(
    start_gateway: StartGateway, raw: str
) -> None:
    """Found in review of that first fix: "GET /ec2/../x" was 400 because the aws-ec2 route
    claims every path under its mount with the dots kept. It is an ordinary request, sent on."""
    gw = await start_gateway(
        routes=[
            {"dialect": "aws-ec2", "path": "/ec2"},
            {"dialect": "opaque", "path": "/batch", "methods": ["GET"]},
        ]
    )
    status, _ = await gw.send("GET", raw, b"")
    assert status in (200, 404)
    assert gw.decisions() == []
    [forwarded] = await gw.stub_requests()
    assert forwarded["path"] == normalize_path(raw)


@pytest.mark.parametrize(
    "raw", ["/x/..;/v1/instances", "/x/.;a/y", "/x/%2e%2E;a/v1/instances", "/v1/;x/instances"]
)
async def test_a_dot_segment_with_parameters_is_refused(
    start_gateway: StartGateway, raw: str
) -> None:
    """ "..;x" is a name to the gateway and a dot segment to a server that cuts parameters
    first (Tomcat's reading): two meanings, so 400, whatever the route."""
    gw = await start_gateway()
    status, answer = await gw.send("POST", raw, {"instance_type": "p5.48xlarge"})
    assert (status, answer["reason"]) == (400, "malformed_request")
    assert await gw.stub_requests() == []


_BATCH_UNDER_EC2 = [
    {"dialect": "opaque", "path": "/batch", "methods": ["POST", "GET"]},
    {"dialect": "aws-ec2", "path": "/"},
]


@pytest.mark.parametrize(
    ("routes", "method", "raw", "headers"),
    [
        (None, "POST", "/v1/instances;x", None),
        (None, "POST", "/v1;jsessionid=1/instances", None),
        (None, "POST", "/v1/instances;", None),
        ([{"dialect": "openstack-nova", "path": "/v2.1"}], "POST", "/v2.1/servers;x", None),
        # Found in review: a route that claims the path as written (aws-ec2 mounted at "/")
        # hid the route that claims it without its parameters, and a route chosen by a header.
        (_BATCH_UNDER_EC2, "POST", "/batch;x/job1/start", {}),
        (_BATCH_UNDER_EC2, "GET", "/batch;x", {}),
        (
            [{"dialect": "openstack-nova", "path": "/v2.1"}],
            "POST",
            "/servers;x",
            {"Content-Type": "application/json; version=2.1"},
        ),
    ],
)
async def test_a_launch_path_behind_path_parameters_is_refused_and_recorded(
    start_gateway: StartGateway,
    routes: list[dict[str, Any]] | None,
    method: str,
    raw: str,
    headers: dict[str, str] | None,
) -> None:
    """Found by QA: "POST /v1/instances;x" from a restricted account went upstream unjudged;
    Tomcat, Jetty and Spring cut path parameters before routing and would launch. A path that
    another route claims once its parameters are cut has two meanings: 400, recorded."""
    gw = await start_gateway(routes=routes)
    body = {"instance_type": "p5.48xlarge", "server": {"flavorRef": "g1.h100x8"}}
    status, answer = await gw.send(method, raw, b"" if method == "GET" else body, headers=headers)
    assert (status, answer["reason"]) == (400, "malformed_request")
    assert "parameters (';')" in answer["detail"]
    [record] = gw.decisions()
    assert (record["reason"], record["decision_id"]) == ("malformed_request", answer["decision_id"])
    assert await gw.stub_requests() == []


async def test_parameters_that_leave_the_route_that_claims_the_path_are_left_alone(
    start_gateway: StartGateway,
) -> None:
    """An EC2 call under an aws-ec2 route at "/" is one whatever its path says: parameters there
    change no route, and the call goes on as any other (here one that launches nothing)."""
    gw = await start_gateway(routes=[{"dialect": "aws-ec2", "path": "/"}])
    status, _ = await gw.send(
        "POST",
        "/x;jsessionid=1",
        b"Action=DescribeInstances&Version=2016-11-15",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert status == 200
    assert gw.decisions() == []
    [forwarded] = await gw.stub_requests()
    assert forwarded["path"] == "/x;jsessionid=1"


async def test_a_path_with_parameters_that_is_no_launch_path_goes_on(
    start_gateway: StartGateway,
) -> None:
    """Parameters elsewhere are left alone: only a launch path read through them is refused."""
    gw = await start_gateway()
    status, _ = await gw.send("POST", "/v1/volumes;x", {"size": 1})
    assert status == 404  # the stub has nothing there
    assert gw.decisions() == []
    [forwarded] = await gw.stub_requests()
    assert forwarded["path"] == "/v1/volumes;x"


@pytest.mark.parametrize(
    "raw",
    [
        "//evil/v1/instances",
        "///evil/v1/instances",
        "/V1/Instances",
        "/v1/instances.json",
        "/v1/instances.-",
        "/v1/instances.a.b",
        "/v1/instance%2573",
        "/v1/x/%252e%252e/instances",
    ],
)
async def test_a_path_that_upstream_servers_read_as_the_launch_path_is_judged_malformed(
    start_gateway: StartGateway, raw: str
) -> None:
    """Found by QA: these went upstream unjudged (no route claims them as written), and an
    upstream routing on WHATWG's new URL(target, base), a case-insensitive router (Express's
    default, ASP.NET Core) or Rails' format suffix launched a p5.48xlarge for a restricted
    account. Two meanings: recorded, 400 for every account, nothing sent."""
    gw = await start_gateway()
    body = {"instance_type": H100_SKU, "count": 1, "region": "us-east-1"}
    for account in (RESTRICTED, UNRESTRICTED):
        status, answer = await gw.send("POST", raw, body, account=account)
        assert (status, answer["reason"]) == (400, "malformed_request"), answer
        assert "'/v1/instances', which another route judges" in answer["detail"]
    assert await gw.stub_requests() == []
    [first, _] = gw.decisions()
    assert (first["reason"], first["account"], first["path"]) == (
        "malformed_request",
        RESTRICTED,
        normalize_path(raw),
    )


@pytest.mark.parametrize(
    ("media", "body"),
    [
        (
            "application/x-www-form-urlencoded",
            b'{"a":"&instance_type=p5.48xlarge&count=8&","instance_type":"m7i.large","count":1}',
        ),
        (
            "application/x-www-form-urlencoded; charset=utf-8",
            b'{"a":"x;instance%5Ftype[]=p5.48xlarge;","instance_type":"m7i.large"}',
        ),
        ("multipart/form-data; boundary=b", b'{"instance_type":"m7i.large"}'),
        # PHP's names and media types, and a binder ignoring case (found in review)
        ("application/x-www-form-urlencoded", b'{"t":"m7i.large","a":"&instance.type=p5&"}'),
        ("application/x-www-form-urlencoded", b'{"t":"m7i.large","a":"&instance[type=p5&"}'),
        ("application/x-www-form-urlencoded", b'{"t":"m7i.large","a":"&INSTANCE_TYPE=p5&"}'),
        ("application/x-www-form-urlencoded,text/plain", b'{"a":"&instance_type=p5&"}'),
        ("multipart/form-data,; boundary=x", b'{"instance_type":"m7i.large"}'),
        # a NUL ends PHP's name; .NET's case folding takes the dotless i (review)
        ("application/x-www-form-urlencoded", b'{"t":"m7i.large","a":"&instance_type%00=p5&"}'),
        ("application/x-www-form-urlencoded", b'{"t":"m7i.large","a":"&%C4%B1nstance_type=p5&"}'),
        # names in brackets, as Rack 2 and qs read them, and nested under a wrapping key, as
        # Rails' wrap_parameters reads them (found in a third review)
        ("application/x-www-form-urlencoded", b'{"a":"&]instance_type=p5&[count=8&"}'),
        ("application/x-www-form-urlencoded", b'{"a":"&[instance_type]=p5&[count]=8&"}'),
        ("application/x-www-form-urlencoded", b'{"a":"&instance[instance_type]=p5&"}'),
        # IIS's %u escapes, and a media type System.Web matches by its start (review)
        ("application/x-www-form-urlencoded", b'{"a":"&%u0069nstance_type=p5&"}'),
        ("application/x-www-form-urlencodedX", b'{"a":"&instance_type=p5&"}'),
    ],
)
async def test_a_json_launch_that_reads_as_another_form_is_malformed(
    start_gateway: StartGateway, media: str, body: bytes
) -> None:
    """Found by QA: this body, judged as JSON, launches an m7i.large; an upstream reading it as
    the form its Content-Type names (Express with urlencoded(), Django REST framework, Rails)
    launched a p5.48xlarge for a restricted account. Two meanings: 400, nothing sent."""
    gw = await start_gateway()
    for account in (RESTRICTED, UNRESTRICTED):
        status, answer = await gw.send(
            "POST", "/v1/instances", body, account=account, headers={"Content-Type": media}
        )
        assert (status, answer["reason"]) == (400, "malformed_request"), answer
        assert "form" in answer["detail"]
    assert await gw.stub_requests() == []


async def test_json_sent_as_curl_s_default_form_is_judged_as_json(
    start_gateway: StartGateway, make_token: MakeToken
) -> None:
    """`curl -d '{...}'` sends JSON as a form: its one field is the whole body, so it has one
    meaning, and it is judged; so is a nested pointer's field, by its qs-style name."""
    form = {"Content-Type": "application/x-www-form-urlencoded"}
    gw = await start_gateway()
    body = json.dumps({"instance_type": H100_SKU, "count": 1, "note": "R&D; q=1"}).encode()
    status, _ = await gw.send("POST", "/v1/instances", body, account=UNRESTRICTED, headers=form)
    assert status == 201
    licensed = {**form, "License-Token": make_token(jti="lic-form")}
    status, _ = await gw.send("POST", "/v1/instances", body, headers=licensed)
    assert status == 201
    assert (await gw.license("lic-form")).used == 8
    nested = {**GENERIC_ROUTE, "sku": "/spec/type"}
    gw = await start_gateway(routes=[nested])
    body = b'{"x":"&spec[type]=p5.48xlarge&","spec":{"type":"m7i.large"}}'
    status, answer = await gw.send("POST", "/v1/instances", body, account=RESTRICTED, headers=form)
    assert (status, answer["reason"]) == (400, "malformed_request"), answer


@pytest.mark.parametrize("content_type", [b"", b"Content-Type:\r\n", b"Content-Type: \t\r\n"])
async def test_a_launch_without_a_content_type_is_read_as_a_form_too(
    start_gateway: StartGateway, content_type: bytes
) -> None:
    """Found in a third review: Rack (so Rails and Sinatra) reads a POST with no Content-Type,
    or an empty one, as a form; this body, judged as JSON an m7i.large, launched 8 p5.48xlarge
    there. Two meanings: 400, nothing sent. JSON without such a field passes untyped, as
    ``requests.post(url, data=json.dumps(...))`` sends it, ``&`` in a value too."""
    gw = await start_gateway()
    head = content_type + f"X-Account-Id: {RESTRICTED}\r\n".encode()
    body = b'{"a":"&instance_type=p5.48xlarge&count=8&","instance_type":"m7i.large"}'
    status, answer = await _post(gw.url, "/v1/instances", head, body)
    assert (status, answer["reason"]) == (400, "malformed_request"), answer
    assert "read as a form, its body has a field 'instance_type'" in answer["detail"]
    assert await gw.stub_requests() == []
    plain = json.dumps({"instance_type": "m7i.large", "note": "R&D; a=b"}).encode()
    status, answer = await _post(gw.url, "/v1/instances", head, plain)
    assert status == 201, answer
    assert [d["reason"] for d in gw.decisions()] == ["malformed_request", "sku_not_controlled"]


@pytest.mark.parametrize(
    "query",
    [
        "instance_type=p5.48xlarge&count=8",
        "Count=8",
        "instance%5Binstance_type%5D=p5.48xlarge",
        "[instance_type]=p5.48xlarge",
        "x=1;region=us-west-2",
        "%u0063ount=64",  # IIS's %u escapes (found in review)
    ],
)
async def test_a_launch_whose_query_names_a_field_it_is_judged_by_is_malformed(
    start_gateway: StartGateway, query: str
) -> None:
    """Found in a third review: Rails merges the query's parameters over the body's, and
    launched 8 p5.48xlarge for ``?instance_type=p5.48xlarge&count=8`` on a JSON launch judged
    an m7i.large (the region a token is limited to moves the same way). 400, nothing sent;
    other parameters, or a name without a value, pass."""
    gw = await start_gateway()
    body = {"instance_type": "m7i.large", "count": 1, "region": "us-east-1"}
    status, answer = await gw.send("POST", f"/v1/instances?{query}", body)
    assert (status, answer["reason"]) == (400, "malformed_request"), answer
    assert "its query has a field" in answer["detail"]
    assert await gw.stub_requests() == []
    for harmless in ("dry_run=1&tag=a", "instance_type", "account_id=7", "filter.region=eu"):
        status, answer = await gw.send("POST", f"/v1/instances?{harmless}", body)
        assert status == 201, (harmless, answer)


async def test_an_ec2_call_in_a_body_read_as_a_form_under_another_route_has_two_meanings(
    start_gateway: StartGateway,
) -> None:
    """Found in a third review: with aws-ec2 on "/", an EC2 launch in a generic launch's body
    sent with no Content-Type (Rack reads it as a form), or with a form type PHP reads as one
    ("application/x-www-form-urlencoded,text/plain"), ran RunInstances p5.48xlarge x4 on an
    EC2-style upstream: 400, as with the plain form type."""
    gw = await start_gateway(routes=EVERY_DIALECT)
    body = f'{{"instance_type":"m7i.large","x":"&{_EC2_LAUNCH}&"}}'.encode()
    for content_type in (b"", b"Content-Type: application/x-www-form-urlencoded,text/plain\r\n"):
        head = content_type + f"X-Account-Id: {UNRESTRICTED}\r\n".encode()
        status, answer = await _post(gw.url, "/v1/instances", head, body)
        assert (status, answer["reason"]) == (400, "malformed_request"), answer
        assert "EC2 RunInstances" in answer["detail"]
    assert await gw.stub_requests() == []


_PUT_LAUNCH = {**GENERIC_ROUTE, "method": "PUT"}


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/x-www-form-urlencoded", b"_method=PUT&instance_type=p5.48xlarge"),
        (None, b".method=PUT&instance_type=p5.48xlarge"),  # PHP's $_POST['_method']
        ("application/x-www-form-urlencoded", b"X-HTTP-Method-Override=PUT"),  # ASP.NET's
        ("application/json", b'{"_method":"PUT","instance_type":"p5.48xlarge"}'),  # Laravel's
        (
            "multipart/form-data; boundary=b",  # Rack unquotes the name (found in review)
            b'--b\r\nContent-Disposition: form-data; name="_\\method"\r\n\r\nPUT\r\n--b--\r\n',
        ),
        ("application/json", b'{"instance_type":"p5.48xlarge"}'),  # or no field: the same
    ],
)
async def test_a_post_to_a_path_a_route_launches_by_another_method_is_judged(
    start_gateway: StartGateway, content_type: str | None, body: bytes
) -> None:
    """Found in review: Rack::MethodOverride (in every Rails app but API-only ones) turns a
    POST with a ``_method`` form field into that method, Laravel reads one from a JSON body,
    PHP renames ``.method`` to it, Spring's HiddenHttpMethodFilter reads it from a multipart
    part named in RFC 2047, ASP.NET reads an ``X-HTTP-Method-Override`` field: a POST that no
    route takes, on a path a route launches on by PUT, launched there unjudged, and a body
    searched for the field was passed by these spellings, by gzip and by UTF-7. It is judged as
    that launch, whatever its body: refused for a restricted account, recorded; nothing sent."""
    gw = await start_gateway(routes=[_PUT_LAUNCH, {"dialect": "azure-arm"}])
    vm = f"{_VM}/vm-1?api-version=2024-07-01"
    for path in ("/v1/instances", vm, "/V1/Instances"):
        head = f"X-Account-Id: {RESTRICTED}\r\n".encode()
        if content_type is not None:
            head += f"Content-Type: {content_type}\r\n".encode()
        status, answer = await _post(gw.url, path, head, body)
        assert status in (400, 403), (path, answer)
    assert await gw.stub_requests() == []
    assert [d["method"] for d in gw.decisions()] == ["POST"] * 3


async def test_a_post_to_a_path_launched_by_another_method_is_judged_as_that_launch(
    start_gateway: StartGateway,
) -> None:
    """Such a POST is judged as the launch it becomes upstream: one that launches nothing
    controlled passes for an unrestricted account, and under an opaque PUT mount (ARM template
    deployments) a POST action such as "validate" passes for an account known and unrestricted
    and is unresolvable for a restricted one (found in review: it was 400 for every account)."""
    opaque = {"dialect": "opaque", "path": "/deployments", "methods": ["PUT"]}
    gw = await start_gateway(routes=[_PUT_LAUNCH, opaque])
    plain = {"instance_type": "m7i.large"}
    status, _ = await gw.send("POST", "/v1/instances", plain, account=UNRESTRICTED)
    assert status == 201
    status, answer = await gw.send("POST", "/v1/instances", {"instance_type": H100_SKU})
    assert (status, answer["reason"]) == (403, "license_required"), answer
    status, _ = await gw.send("POST", "/deployments/d1/validate", {}, account=UNRESTRICTED)
    assert status == 404  # (the stub has nothing there: it went on)
    status, answer = await gw.send("POST", "/deployments/d1/validate", {})
    assert (status, answer["reason"]) == (403, "unresolvable_launch"), answer
    assert [(d["method"], d["reason"]) for d in gw.decisions()] == [
        ("POST", "sku_not_controlled"),
        ("POST", "license_required"),
        ("POST", "account_not_restricted"),
        ("POST", "unresolvable_launch"),
    ]


@pytest.mark.parametrize(
    ("routes", "path", "body"),
    [
        # a PATCH route beside the PUT one, reading another field (found in review: judged by
        # the PUT's pointers only, an m7i.large; Laravel launched the PATCH's 8 p5.48xlarge)
        (
            [_PUT_LAUNCH, {**GENERIC_ROUTE, "method": "PATCH", "sku": "/size"}],
            "/v1/instances",
            {"_method": "PATCH", "instance_type": "m7i.large", "size": H100_SKU, "count": 8},
        ),
        # an opaque route that takes the POST itself (found in review: its reading,
        # unresolvable, was dropped for the PUT route's, an m7i.large)
        (
            [
                {**_PUT_LAUNCH, "path": "/batch/jobs"},
                {"dialect": "opaque", "path": "/batch", "methods": ["POST"]},
            ],
            "/batch/jobs",
            {"instance_type": "m7i.large", "jobs": [{"instance_type": H100_SKU, "count": 8}]},
        ),
    ],
)
async def test_a_post_that_reads_as_more_than_one_launch_is_malformed(
    start_gateway: StartGateway, routes: list[dict[str, Any]], path: str, body: dict[str, Any]
) -> None:
    gw = await start_gateway(routes=routes)
    for account in (RESTRICTED, UNRESTRICTED):
        status, answer = await gw.send("POST", path, body, account=account)
        assert (status, answer["reason"]) == (400, "malformed_request"), answer
        assert "another launch as well" in answer["detail"]
    assert await gw.stub_requests() == []


async def test_a_post_is_judged_as_a_launch_by_any_method_a_route_takes(
    start_gateway: StartGateway,
) -> None:
    """Found in review: only GET, HEAD, PUT, PATCH, DELETE and OPTIONS were looked for, while
    Symfony and Laravel override to any method and Express to any of node's: a POST with
    ``_method=MERGE`` launched 8 p5.48xlarge through a MERGE route, unjudged. And nested PUT
    routes are taken by the deeper one only, as a PUT is (found in review: an opaque PUT mount
    above a PUT route made a legitimate POST there 400)."""
    merge = {**GENERIC_ROUTE, "method": "MERGE", "path": "/odata/instances"}
    above = {"dialect": "opaque", "path": "/api", "methods": ["PUT"]}
    nested = {**_PUT_LAUNCH, "path": "/api/v1/instances"}
    gw = await start_gateway(routes=[merge, above, nested])
    body = {"_method": "MERGE", "instance_type": H100_SKU, "count": 8}
    status, answer = await gw.send("POST", "/odata/instances", body)
    assert (status, answer["reason"]) == (403, "license_required"), answer
    plain = {"instance_type": "m7i.large"}
    status, _ = await gw.send("POST", "/api/v1/instances", plain, account=UNRESTRICTED)
    assert status == 404  # (judged, allowed and sent on: the stub has nothing there)
    assert [d["reason"] for d in gw.decisions()] == ["license_required", "sku_not_controlled"]


async def test_a_head_to_a_get_launch_route_is_judged(start_gateway: StartGateway) -> None:
    """Found in review: Express, Rails, Symfony and Flask run a GET handler for a HEAD; a HEAD
    to a GET launch route went on unjudged and launched. A route on GET takes HEAD too."""
    legacy = {**GENERIC_ROUTE, "method": "GET", "path": "/legacy/launch"}
    gw = await start_gateway(routes=[legacy])
    for method in ("GET", "HEAD"):
        async with gw.session.request(
            method,
            f"{gw.url}/legacy/launch",
            data=json.dumps({"instance_type": H100_SKU, "count": 8}).encode(),
            headers={"Content-Type": "application/json", "X-Account-Id": RESTRICTED},
        ) as r:
            assert r.status == 403, method
    assert [(d["method"], d["reason"]) for d in gw.decisions()] == [
        ("GET", "license_required"),
        ("HEAD", "license_required"),
    ]


@pytest.mark.parametrize(
    ("method", "raw"),
    [
        ("POST", "/index.php/v1/instances"),
        ("POST", "/app/Index.PHP/v1/instances"),
        ("PUT", "/index.php/v1/servers"),
        ("POST", "/index.php/v1/servers"),  # (and _method=PUT upstream)
        ("POST", "/cgi-bin/api.cgi/v1/instances"),
        # under an alias, and behind a decoy (found in review: Symfony routes both as its
        # "/v1/servers"), and other scripts' types (review)
        ("PUT", "/api/index.php/v1/servers"),
        ("PUT", "/x.py/api/index.php/v1/servers"),
        ("PUT", "/app.phar/v1/servers"),
        ("PUT", "/Service.svc/v1/servers"),
    ],
)
async def test_a_path_after_a_script_s_name_is_read_as_a_front_controller_reads_it(
    start_gateway: StartGateway, method: str, raw: str
) -> None:
    """Found in review: Symfony and Laravel take the script's path off as their base URL, so
    "/index.php/v1/instances" is their "/v1/instances"; under mod_php, php-fpm and php -S a
    launch there went on unjudged and launched 8 p5.48xlarge. A path naming a script that is
    not a route's launch, read as a front controller reads it, is judged: two meanings, or as
    the launch it is there; never sent unjudged."""
    gw = await start_gateway(
        routes=[
            GENERIC_ROUTE,
            {**_PUT_LAUNCH, "path": "/v1/servers"},
            {**_PUT_LAUNCH, "path": "/api/v1/servers"},
        ]
    )
    body = {"_method": "PUT", "instance_type": H100_SKU, "count": 8}
    status, answer = await gw.send(method, raw, body)
    assert status in (400, 403), answer
    assert await gw.stub_requests() == []
    assert len(gw.decisions()) == 1


async def test_a_script_name_at_the_end_of_a_path_reads_as_the_root(
    start_gateway: StartGateway,
) -> None:
    """Found in review: with a launch route on "/", "/index.php" and "/index.php/" are "/" to a
    front controller, and launched there unjudged. A launch route's own path that names a
    script (an ARM resource group "ml.py") is judged as any."""
    gw = await start_gateway(routes=[{**GENERIC_ROUTE, "path": "/"}, {"dialect": "azure-arm"}])
    for raw in ("/index.php", "/index.php/"):
        status, answer = await gw.send("POST", raw, {"instance_type": H100_SKU})
        assert (status, answer.get("reason")) == (400, "malformed_request"), answer
    vm = "/subscriptions/s/resourceGroups/ml.py/providers/Microsoft.Compute/virtualMachines/vm1"
    body = {"location": "eastus", "properties": {"hardwareProfile": {"vmSize": "Standard_D2s_v5"}}}
    status, answer = await gw.send(
        "PUT", f"{vm}?api-version=2024-07-01", body, account=UNRESTRICTED
    )
    assert status in (200, 201), answer
    assert [d["reason"] for d in gw.decisions()] == ["malformed_request"] * 2 + [
        "sku_not_controlled"
    ]
    # A call that no route launches by, under a name that reads as a script, goes on (found in
    # review: DNS zones of .pl, .py and .do domains were 400).
    zone = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.Network/dnsZones/example.pl"
    status, _ = await gw.send("GET", f"{zone}?api-version=2018-05-01", b"", account=UNRESTRICTED)
    assert status == 404  # (the stub has nothing there)


async def test_a_post_a_catch_all_mount_takes_is_judged_as_another_route_s_launch_there(
    start_gateway: StartGateway,
) -> None:
    """Found in review: with aws-ec2 on "/", a POST on a path another route launches on by PUT
    was the EC2 route's (a DescribeInstances), and ASP.NET's ``X-HTTP-Method-Override`` form
    field made it that PUT launch. It is judged as that launch too."""
    gw = await start_gateway(routes=[_PUT_LAUNCH, {"dialect": "aws-ec2"}])
    head = (
        f"X-Account-Id: {RESTRICTED}\r\nContent-Type: application/x-www-form-urlencoded\r\n"
    ).encode()
    body = b"Action=DescribeInstances&X-HTTP-Method-Override=PUT&instance_type=p5.48xlarge"
    status, answer = await _post(gw.url, "/v1/instances", head, body)
    assert (status, answer["reason"]) == (400, "malformed_request"), answer
    assert await gw.stub_requests() == []


async def test_a_post_naming_a_path_launched_by_another_method_in_a_routing_header_is_malformed(
    start_gateway: StartGateway,
) -> None:
    """Found in review: ``POST /foo`` with ``X-Original-URL: /v1/instances`` and ``_method=PUT``
    in its body launched through a PUT route on older Symfony, which routes by the header."""
    gw = await start_gateway(routes=[_PUT_LAUNCH])
    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    for name in ("X-Original-URL", "X-Rewrite-URL"):
        body = b"_method=PUT&instance_type=p5.48xlarge"
        status, answer = await gw.send(
            "POST", "/foo", body, headers={**headers, name: "/v1/instances"}
        )
        assert (status, answer["reason"]) == (400, "malformed_request"), answer
        assert "where a route launches by PUT" in answer["detail"]
    assert await gw.stub_requests() == []


async def test_a_post_elsewhere_streams_on_whatever_it_carries(start_gateway: StartGateway) -> None:
    """Only a path a route launches on is read so: a POST elsewhere carrying a ``_method`` field
    is no launch, and goes on unread."""
    gw = await start_gateway(routes=[_PUT_LAUNCH])
    status, _ = await gw.send("POST", "/_stub/echo", b"_method=PUT")
    assert status == 200
    assert [(r["path"], r["body"]) for r in await gw.stub_requests()] == [
        ("/_stub/echo", "_method=PUT")
    ]
    assert gw.decisions() == []


@pytest.mark.parametrize(
    "header",
    [
        ("X-Original-URL", "/v1/instances"),
        ("X-Rewrite-URL", "/V1/Instances?x=1"),
        ("X_Original_URL", "/v1/instances"),  # as CGI-style servers read it (review)
        ("X-Original-URL", "http://x/v1/instances"),  # Zend strips the scheme and host (review)
        ("X-Original-URL", "/v1/instances#x"),  # a fragment dropped (review)
    ],
)
async def test_a_request_routed_by_a_header_to_the_launch_path_is_malformed(
    start_gateway: StartGateway, header: tuple[str, str]
) -> None:
    """Found by QA: "X-Original-URL: /v1/instances" on a POST elsewhere went upstream unjudged;
    IIS's URL Rewrite, older Symfony and Zend route by it, to the launch. Two meanings: 400,
    recorded, nothing sent. A GET naming it is no launch's, and goes on."""
    gw = await start_gateway()
    body = {"instance_type": H100_SKU, "count": 1}
    name, value = header
    headers = {"Content-Type": "application/json", name: value}
    status, answer = await gw.send("POST", "/v1/volumes", body, headers=headers)
    assert (status, answer["reason"]) == (400, "malformed_request"), answer
    assert f"its {name} header names '/v1/instances'" in answer["detail"]
    assert await gw.stub_requests() == []
    assert [d["reason"] for d in gw.decisions()] == ["malformed_request"]
    status, _ = await gw.send("GET", "/v1/volumes", b"", headers=headers)
    assert status == 404


async def test_a_routing_header_naming_the_request_s_own_path_is_read_with_it(
    start_gateway: StartGateway,
) -> None:
    """IIS's ARR sets X-Original-URL to the request's own URL: an ARM launch (mixed case, to a
    route that ignores case) carrying it was 400 (found in review); it is judged as any."""
    gw = await start_gateway(routes=[{"dialect": "azure-arm"}])
    vm = (
        "/subscriptions/s/resourceGroups/g/providers/Microsoft.Compute/virtualMachines/vm-1"
        "?api-version=2024-07-01"
    )
    body = {"location": "eastus", "properties": {"hardwareProfile": {"vmSize": "Standard_D2s_v5"}}}
    for header in ("X-Original-URL", "X-Rewrite-URL"):
        headers = {"Content-Type": "application/json", header: f"http://x{vm}"}
        status, answer = await gw.send("PUT", vm, body, account=UNRESTRICTED, headers=headers)
        assert status in (200, 201), answer
    assert [d["reason"] for d in gw.decisions()] == ["sku_not_controlled"] * 2


async def test_a_routing_header_naming_another_launch_call_of_the_route_is_malformed(
    start_gateway: StartGateway,
) -> None:
    """Found in review: an insert of one e2 VM naming bulkInsert in X-Original-URL was judged as
    the insert, and an upstream routing by the header would bulkInsert 50 a3-highgpu-8g. A
    routing header naming another path a route claims is two meanings, the request's own route
    too; one naming a path that cannot be read safely has none."""
    gw = await start_gateway(routes=[{"dialect": "gcp-compute"}])
    zone = "/compute/v1/projects/p/zones/us-central1-a/instances"
    body = {
        "name": "vm-1",
        "machineType": "zones/us-central1-a/machineTypes/e2-standard-4",
        "count": 50,
        "instanceProperties": {"machineType": "a3-highgpu-8g"},
    }
    headers = {"Content-Type": "application/json", "X-Original-URL": f"{zone}/bulkInsert"}
    status, answer = await gw.send("POST", zone, body, account=UNRESTRICTED, headers=headers)
    assert (status, answer["reason"]) == (400, "malformed_request"), answer
    headers["X-Original-URL"] = zone  # its own path: one meaning
    status, _ = await gw.send("POST", zone, body, account=UNRESTRICTED, headers=headers)
    assert status == 200
    headers["X-Original-URL"] = "v1/instances"
    status, answer = await gw.send("GET", "/anything", b"", headers=headers)
    assert (status, answer["reason"]) == (400, "malformed_request"), answer
    assert len(await gw.stub_requests()) == 1


@pytest.mark.parametrize(
    "twin",
    [
        {"Content_Type": "application/x-www-form-urlencoded"},
        {"Content-Type": "application/json", "Content_Type": "application/x-www-form-urlencoded"},
        {"Content-Type": "application/json", "Content_Encoding": "gzip"},
        {"Content-Type": "application/json", "Idempotency-Key": "a", "Idempotency_Key": "b"},
    ],
)
async def test_a_launch_with_an_underscore_twin_of_a_field_it_is_judged_by_is_malformed(
    start_gateway: StartGateway, twin: dict[str, str]
) -> None:
    """Found in review: "Content_Type: application/x-www-form-urlencoded" went upstream beside
    (or instead of) the Content-Type the launch was judged by; servers that read "_" as "-"
    (Puma before 5.6.9) saw a form, or gzip, or another key."""
    gw = await start_gateway()
    body = {"instance_type": H100_SKU, "count": 1}
    status, answer = await gw.send(
        "POST", "/v1/instances", body, account=UNRESTRICTED, headers=twin
    )
    assert (status, answer["reason"]) == (400, "malformed_request"), answer
    assert await gw.stub_requests() == []


async def test_a_content_length_spelt_with_an_underscore_is_not_sent_beside_the_real_one(
    start_gateway: StartGateway,
) -> None:
    """Found by QA: on a streamed request "Content_Length: 0" went upstream beside the real
    Content-Length; a server reading "_" as "-" and the first of two could frame the body as
    a request of its own."""
    gw = await start_gateway()
    headers = {"Content_Length": "0", "Content-Type": "application/octet-stream"}
    status, _ = await gw.send("POST", "/upload", b"x" * 179, headers=headers)
    assert status == 404
    sent = (await gw.stub_requests())[-1]["raw_headers"]
    assert [n for n, _ in sent if n.lower().replace("_", "-") == "content-length"] == [
        "Content-Length"
    ]


async def test_a_second_reading_that_a_mount_of_both_takes_is_its_own(
    start_gateway: StartGateway,
) -> None:
    """aws-ec2 on "/" takes every request, "/v1/launch" too: that it is the one to take a
    case-folded reading of "/v1/Launch" (a route's own, mixed-case path) is no second meaning,
    and the launch is judged by its route."""
    routes = [{**GENERIC_ROUTE, "path": "/v1/Launch"}, {"dialect": "aws-ec2"}]
    gw = await start_gateway(routes=routes)
    body = {"instance_type": H100_SKU, "count": 1}
    status, _ = await gw.send("POST", "/v1/Launch", body, account=UNRESTRICTED)
    assert status == 404  # judged, allowed, forwarded: the stub has nothing there
    status, answer = await gw.send("POST", "/v1/Launch", body, account=RESTRICTED)
    assert (status, answer["reason"]) == (403, "license_required")
    assert [d["reason"] for d in gw.decisions()] == ["account_not_restricted", "license_required"]


async def test_a_path_read_otherwise_by_no_route_goes_on(start_gateway: StartGateway) -> None:
    """What no route claims however it is read goes on as any request; a launch path whose
    other readings no route claims is judged as written."""
    gw = await start_gateway()
    body = {"instance_type": H100_SKU, "count": 1}
    for method, raw in (("POST", "/V1/Volumes"), ("GET", "/V1/Instances"), ("POST", "//x/v2/y")):
        status, _ = await gw.send(method, raw, body, account=RESTRICTED)
        assert status == 404, raw  # the stub has nothing there
    assert gw.decisions() == []
    status, answer = await gw.send("POST", "//v1/instances", body, account=RESTRICTED)
    assert (status, answer["reason"]) == (403, "license_required")  # "/instances" is no route's


async def test_a_count_that_fails_leaves_the_upstream_error_and_the_reload_as_they_are(
    start_gateway: StartGateway,
    make_token: MakeToken,
    monkeypatch: pytest.MonkeyPatch,
    unused_tcp_port: int,
) -> None:
    """With counting failing (the metrics folder of `serve --workers` gone), an upstream that
    cannot be reached was answered 500, not 502, and a reload that was applied reported as
    failed."""
    gw = await start_gateway(upstream_url=f"http://127.0.0.1:{unused_tcp_port}")

    def gone(*_: object) -> None:
        raise FileNotFoundError(2, "No such file or directory")

    for counter in (gw.gateway.metrics.upstream_errors, gw.gateway.metrics.reloads):
        monkeypatch.setattr(counter, "labels", gone)
    status, body, _ = await gw.launch(token=make_token(jti="lic-gone"))
    assert (status, body["reason"]) == (502, "upstream_unavailable")
    state = await gw.license("lic-gone")
    assert state is not None and (state.used, state.reserved) == (0, 0)
    assert await gw.gateway.reload(gw.config_path)


async def test_a_count_that_fails_does_not_fail_a_licensed_launch(
    start_gateway: StartGateway, make_token: MakeToken, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: with the metrics folder of `serve --workers` gone, every launch failed
    500, after its units were reserved and before they were sent; the reservation left behind
    would have been counted as used. A failing count is logged, and the launch goes on."""
    gw = await start_gateway()

    def full(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gw.gateway.metrics.decision_seconds, "observe", full)
    status, _, _ = await gw.launch(token=make_token(jti="lic-metrics"))
    assert status == 201
    state = await gw.license("lic-metrics")
    assert state is not None and (state.used, state.reserved) == (8, 0)
