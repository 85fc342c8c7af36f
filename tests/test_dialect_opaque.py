"""The ``opaque`` dialect: recognised launches that cannot be read (CONTRACT §9)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from conftest import RESTRICTED, UNRESTRICTED, Harness, StartGateway
from launchgate.dialects import LaunchRequest
from launchgate.dialects.opaque import Opaque, build
from launchgate.errors import ConfigError

BATCH = build({"path": "/batch", "methods": ["post", "PUT"], "region": "eastus"}, "routes[1]")


def request(
    method: str = "POST", path: str = "/batch", body: bytes = b"\xff not json"
) -> LaunchRequest:
    return LaunchRequest(method, path, "", CIMultiDictProxy(CIMultiDict()), body)


def test_every_claimed_request_is_unresolvable() -> None:
    """Whatever the body (even bytes no parser takes), the launch has no items and says why."""
    launch = BATCH.parse(request())
    assert launch.items == ()
    assert launch.region == "eastus"
    assert launch.unresolvable == "opaque route: POST /batch cannot be read"


@pytest.mark.parametrize(
    ("method", "path", "claimed"),
    [
        ("POST", "/batch", True),
        ("PUT", "/batch/x/y", True),
        ("GET", "/batch", False),
        ("POST", "/batches", False),
        ("POST", "/BATCH", False),
        ("POST", "/", False),
    ],
)
def test_claims_listed_methods_under_the_path(method: str, path: str, claimed: bool) -> None:
    """Methods are matched upper-cased; the path and everything under it, case-sensitively."""
    assert BATCH.claims(method, path) is claimed


def test_ignore_case_matches_paths_as_arm_does() -> None:
    """With ignore_case, /BATCH and /Batch/x are the route's too (reference §7 item 44)."""
    arm = build({"path": "/batch", "methods": ["POST"], "ignore_case": True}, "r")
    assert arm.claims("POST", "/BATCH") and arm.claims("POST", "/Batch/x")
    assert not arm.claims("POST", "/batches")
    # ... and as a router that decodes the path first (found in review, on azure-arm's paths)
    deploy = build({"path": "/deployments", "methods": ["PUT"], "ignore_case": True}, "r")
    assert deploy.claims("PUT", "/DEPLOYMENT%C5%BF/d") and deploy.claims("PUT", "/deployment\u017f")
    exact = build({"path": "/deployments", "methods": ["PUT"]}, "r")  # case-sensitive: as given
    assert not exact.claims("PUT", "/deployment%C5%BF/d")


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"methods": ["POST"]}, r"routes\[1\]: missing key 'path'"),
        ({"path": "/b//c", "methods": ["POST"]}, r"routes\[1\]\.path"),
        ({"path": "/b"}, r"routes\[1\]\.methods"),
        ({"path": "/b", "methods": []}, r"routes\[1\]\.methods"),
        ({"path": "/b", "methods": "POST"}, r"routes\[1\]\.methods"),
        ({"path": "/b", "methods": ["PO ST"]}, r"routes\[1\]\.methods"),
        ({"path": "/b", "methods": ["POST"], "region": 3}, r"routes\[1\]\.region"),
        ({"path": "/b", "methods": ["POST"], "ignore_case": "yes"}, r"routes\[1\]\.ignore_case"),
        ({"path": "/b", "methods": ["POST"], "sku": "/x"}, r"routes\[1\]: unknown key 'sku'"),
    ],
)
def test_build_rejects_bad_route_keys(table: dict[str, Any], message: str) -> None:
    """ConfigError names the route and the key at fault."""
    with pytest.raises(ConfigError, match=message):
        build(table, "routes[1]")


def test_build_normalizes_methods() -> None:
    """Methods are stored upper-cased; the region is optional."""
    assert build({"path": "/b", "methods": ["post"]}, "r") == Opaque(
        path="/b", methods=frozenset({"POST"}), region=None
    )


# --- end to end -------------------------------------------------------------------------------

# Azure ARM batch (reference §7 item 12): POST /batch with requests[].httpMethod/url/content
ARM_ROUTE = {"dialect": "opaque", "path": "/batch", "methods": ["POST"], "ignore_case": True}
# GCP batch endpoint (reference §7 item 12): multipart/mixed inner requests
GCP_ROUTE = {"dialect": "opaque", "path": "/batch/compute/v1", "methods": ["POST"]}
ARM_BATCH = {
    "requests": [
        {
            "httpMethod": "PUT",
            "url": "/subscriptions/s/resourceGroups/g/providers/Microsoft.Compute/virtualMachines/v"
            "?api-version=2024-07-01",
            "content": {
                "location": "eastus",
                "properties": {"hardwareProfile": {"vmSize": "Standard_ND96isr_H100_v5"}},
            },
        }
    ]
}
GCP_BATCH = (
    b"--batch_x\r\nContent-Type: application/http\r\n\r\n"
    b"POST /compute/v1/projects/p/zones/us-central1-a/instances\r\n"
    b"Content-Type: application/json\r\n\r\n"
    b'{"name": "t", "machineType": "zones/us-central1-a/machineTypes/a3-highgpu-8g"}\r\n'
    b"--batch_x--\r\n"
)


async def call(
    gw: Harness, path: str, body: bytes, content_type: str, account: str | None = RESTRICTED
) -> tuple[int, Any]:
    headers = {"Content-Type": content_type}
    if account is not None:
        headers["X-Account-Id"] = account
    url = URL(f"{gw.url}{path}", encoded=True)
    async with gw.session.post(url, data=body, headers=headers) as r:
        return r.status, await r.json(content_type=None)


@pytest.mark.parametrize(
    ("path", "body", "content_type"),
    [
        pytest.param(
            "/batch", json.dumps(ARM_BATCH).encode(), "application/json", id="12-arm-batch"
        ),
        pytest.param(
            "/BATCH", json.dumps(ARM_BATCH).encode(), "application/json", id="44-arm-case"
        ),
        pytest.param(
            "//batch/./", json.dumps(ARM_BATCH).encode(), "application/json", id="44-path"
        ),
        pytest.param(
            "/batch/compute/v1", GCP_BATCH, "multipart/mixed; boundary=batch_x", id="12-gcp-batch"
        ),
    ],
)
async def test_restricted_account_is_denied_unresolvable(
    start_gateway: StartGateway, path: str, body: bytes, content_type: str
) -> None:
    """Batch envelopes from a restricted account: 403 unresolvable_launch; the stub sees nothing."""
    gw = await start_gateway(routes=[ARM_ROUTE])
    status, problem = await call(gw, path, body, content_type)
    assert (status, problem["reason"]) == (403, "unresolvable_launch")
    assert "opaque route" in problem["detail"]
    assert await gw.stub_requests() == []


async def test_unrestricted_account_is_forwarded(start_gateway: StartGateway) -> None:
    """An account known to be unrestricted passes: the request reaches the upstream as sent."""
    gw = await start_gateway(routes=[ARM_ROUTE])
    body = json.dumps(ARM_BATCH).encode()
    status, _ = await call(gw, "/batch", body, "application/json", account=UNRESTRICTED)
    assert status == 404  # the stub serves no /batch: what matters is that it got there
    [received] = await gw.stub_requests()
    assert received["path"] == "/batch" and received["body"] == body.decode()
    assert gw.decisions()[-1]["reason"] == "account_not_restricted"


async def test_unknown_account_is_denied(start_gateway: StartGateway) -> None:
    """An account not in the registry is not known to be unrestricted: 403 unknown_account."""
    gw = await start_gateway(routes=[ARM_ROUTE])
    status, problem = await call(gw, "/batch", b"{}", "application/json", account="acct-nobody")
    assert (status, problem["reason"]) == (403, "unknown_account")
    assert await gw.stub_requests() == []
