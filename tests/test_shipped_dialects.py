"""Every dialect of the shipped config/launchgate.toml, end to end through `launchgate serve`
in front of `launchgate stub-backend`, both as real processes (CONTRACT section 9).

The requests are the ones the README shows for each route."""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from conftest import SHIPPED, Keys, MakeToken
from test_serve import Process, free_port, spawn, start_serve

FORM = "application/x-www-form-urlencoded"
JSON = "application/json"


@dataclass(frozen=True)
class Example:
    dialect: str
    method: str
    path: str
    content_type: str
    body: bytes
    sku: str  # the SKU a license must cover
    success: int  # the provider's own success status


H100_VM = {
    "location": "East US",
    "properties": {"hardwareProfile": {"vmSize": "Standard_ND96isr_H100_v5"}},
}
EXAMPLES = [
    Example(
        "aws-ec2",
        "POST",
        "/ec2/",
        FORM,
        b"Action=RunInstances&Version=2016-11-15&ImageId=ami-0abcdef1234567890"
        b"&InstanceType=p5.48xlarge&MinCount=1&MaxCount=1",
        "p5.48xlarge",
        200,
    ),
    *(
        Example(  # v1, and the same API's other surfaces, which launch just as well
            "gcp-compute",
            "POST",
            f"/compute/{version}/projects/my-project/zones/us-central1-a/instances",
            JSON,
            json.dumps(
                {"name": "vm-1", "machineType": "zones/us-central1-a/machineTypes/a3-highgpu-8g"}
            ).encode(),
            "a3-highgpu-8g",
            200,
        )
        for version in ("v1", "beta", "alpha")
    ),
    Example(
        "azure-arm",
        "PUT",
        "/azure/subscriptions/sub-1/resourceGroups/rg-1/providers/Microsoft.Compute/virtualMachines/vm-1?api-version=2024-07-01",
        JSON,
        json.dumps(H100_VM).encode(),
        "Standard_ND96isr_H100_v5",
        201,
    ),
    *(
        Example(  # v2.1, and /v2, where Nova serves the same API (legacy v2 compatible)
            "openstack-nova",
            "POST",
            f"/{version}/servers",
            JSON,
            json.dumps(
                {
                    "server": {
                        "name": "vm-1",
                        "imageRef": "70a599e0-31e7-49b7-b260-868f441e862b",
                        "flavorRef": "g1.h100x8",
                    }
                }
            ).encode(),
            "g1.h100x8",
            202,
        )
        for version in ("v2.1", "v2")
    ),
]


@dataclass
class Deployment:
    url: str
    stub_url: str
    gateway: Process
    stub: Process


@pytest.fixture
async def shipped(tmp_path: Path, keys: Keys) -> AsyncIterator[Deployment]:
    """The shipped config/ copied as it is, with free ports, the test keys and a fresh data dir."""
    stub = await spawn("stub-backend", "--listen", "127.0.0.1:0")
    stub_url = (await stub.wait_for_line("listening on")).rsplit(" ", 1)[-1]
    config_dir = tmp_path / "config"
    shutil.copytree(SHIPPED, config_dir, ignore=shutil.ignore_patterns("data", "*.pem"))
    shutil.copy(keys.folder / "jwks.json", config_dir / "keys" / "jwks.json")
    listen, admin = free_port(), free_port()
    main = config_dir / "launchgate.toml"
    text = main.read_text()
    text = re.sub(r'^listen = ".*"', f'listen = "127.0.0.1:{listen}"', text, flags=re.M)
    text = re.sub(r'^admin_listen = ".*"', f'admin_listen = "127.0.0.1:{admin}"', text, flags=re.M)
    text = re.sub(r'^url = "http://127.0.0.1:9000"', f'url = "{stub_url}"', text, flags=re.M)
    main.write_text(text)
    gateway = await start_serve(main, f"http://127.0.0.1:{admin}")
    yield Deployment(f"http://127.0.0.1:{listen}", stub_url, gateway, stub)
    await gateway.stop()
    await stub.stop()


async def send(
    d: Deployment, e: Example, account: str, token: str | None = None
) -> tuple[int, bytes, dict[str, Any]]:
    headers = {"Content-Type": e.content_type, "X-Account-Id": account}
    if token:
        headers["License-Token"] = token
    async with (
        aiohttp.ClientSession() as session,
        session.request(e.method, d.url + e.path, data=e.body, headers=headers) as r,
    ):
        return r.status, await r.read(), dict(r.headers)


async def stub_paths(d: Deployment) -> list[str]:
    async with aiohttp.ClientSession() as session, session.get(f"{d.stub_url}/_stub/requests") as r:
        return [q["path"] for q in (await r.json())["requests"]]


@pytest.mark.parametrize("example", EXAMPLES, ids=[f"{e.dialect}:{e.path[:16]}" for e in EXAMPLES])
async def test_each_dialect_allows_denies_and_licenses(
    shipped: Deployment, make_token: MakeToken, example: Example
) -> None:
    """Unrestricted: the provider's success; restricted without a license: 403, nothing
    reaches the upstream; with a covering license: the provider's success again."""
    status, body, _ = await send(shipped, example, "acct-1001")
    assert status == example.success, body
    before = await stub_paths(shipped)
    status, body, headers = await send(shipped, example, "acct-2001")
    assert status == 403 and headers["Content-Type"].startswith("application/problem+json")
    assert json.loads(body)["reason"] == "license_required"
    assert await stub_paths(shipped) == before
    token = make_token(skus=[example.sku], max_accelerators=8, jti=f"lic-{example.dialect}")
    status, body, headers = await send(shipped, example, "acct-2001", token)
    assert status == example.success, body
    assert "Launchgate-Decision-Id" in headers
    status, body, _ = await send(shipped, example, "acct-2001", token)
    assert (status, json.loads(body)["reason"]) == (403, "license_exhausted")


async def test_opaque_route_cannot_pass_for_restricted_accounts(shipped: Deployment) -> None:
    """An opaque route (a batch envelope) is unresolvable: denied unless the account is unrestricted."""
    batch = Example("opaque", "POST", "/BATCH", "multipart/mixed; boundary=b", b"--b--\r\n", "", 0)
    status, body, _ = await send(shipped, batch, "acct-2001")
    assert (status, json.loads(body)["reason"]) == (403, "unresolvable_launch")
    status, body, _ = await send(shipped, batch, "acct-nobody")
    assert (status, json.loads(body)["reason"]) == (403, "unknown_account")
    status, _, _ = await send(shipped, batch, "acct-1001")
    assert status == 404  # forwarded; the stub has no batch endpoint


@pytest.mark.parametrize("method", ["PUT", "PATCH", "DELETE", "OPTIONS", "HEAD"])
async def test_an_ec2_launch_by_any_method_is_judged(shipped: Deployment, method: str) -> None:
    """Found by QA: RunInstances by PUT, PATCH, DELETE, OPTIONS or HEAD was forwarded unjudged
    (the stub launched 4 H100 instances each time, and no record was written). Whatever the
    method, an EC2 launch is judged: a restricted account without a license gets 403."""
    query = "Action=RunInstances&InstanceType=p5.48xlarge&MinCount=1&MaxCount=4"
    launch = Example("aws-ec2", method, f"/ec2/?{query}", FORM, b"", "p5.48xlarge", 0)
    before = await stub_paths(shipped)
    status, body, _ = await send(shipped, launch, "acct-2001")
    assert status == 403
    if method != "HEAD":
        assert json.loads(body)["reason"] == "license_required"
    assert await stub_paths(shipped) == before
