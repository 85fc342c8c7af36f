"""The stub instance-launch API (CONTRACT section 7), over real sockets."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import re
import signal
import sys
import time
from typing import Any
from xml.etree import ElementTree

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from multidict import CIMultiDict
from pytest_aiohttp import AiohttpClient, AiohttpServer

from launchgate.stub import BODY_PREVIEW_BYTES, STUB_STATE_KEY, create_stub_app

Client = TestClient[web.Request, web.Application]


@pytest.fixture
async def client(aiohttp_client: AiohttpClient) -> Client:
    return await aiohttp_client(create_stub_app())


async def _requests(client: Client) -> list[dict[str, Any]]:
    response = await client.get("/_stub/requests")
    assert response.status == 200
    records: list[dict[str, Any]] = (await response.json())["requests"]
    return records


async def test_launch_answers_one_instance_per_count(client: Client) -> None:
    """A launch with count 3 answers 201 with three distinct instance ids."""
    response = await client.post(
        "/v1/instances", json={"instance_type": "p5.48xlarge", "count": 3, "region": "us-east-1"}
    )
    assert response.status == 201
    instances = (await response.json())["instances"]
    assert len(instances) == 3
    assert len({i["id"] for i in instances}) == 3
    for instance in instances:
        assert re.fullmatch(r"i-[0-9a-f]{17}", instance["id"])
        assert instance["instance_type"] == "p5.48xlarge"
        assert instance["region"] == "us-east-1"


@pytest.mark.parametrize(
    ("body", "expected_count"),
    [
        ({"instance_type": "m7i.large"}, 1),
        ({"instance_type": "m7i.large", "count": 1001}, 1001),
        ({"instance_type": "m7i.large", "count": 100_000}, 100_000),
    ],
    ids=["count-defaults-to-1", "one-per-count", "up-to-what-the-gateway-passes"],
)
async def test_launch_count_default_and_cap(
    client: Client, body: dict[str, Any], expected_count: int
) -> None:
    """count defaults to 1, and answers one instance per count (CONTRACT section 7; found by
    QA: 1001 answered 1000) up to what the gateway passes; a missing region answers null."""
    response = await client.post("/v1/instances", json=body)
    assert response.status == 201
    instances = (await response.json())["instances"]
    assert len(instances) == expected_count
    assert instances[0]["region"] is None


@pytest.mark.parametrize(
    "body",
    [
        b"{not json",
        b"[1, 2]",
        b'{"instance_type": "x", "count": 0}',
        b'{"count": true}',
        b"\xff",
        b'{"instance_type": "x", "count": 100001}',
    ],
    ids=["bad-json", "not-object", "zero-count", "bool-count", "not-utf8", "count-too-large"],
)
async def test_launch_rejects_bad_body(client: Client, body: bytes) -> None:
    """A launch body that is not a JSON object with a positive count answers 400 JSON."""
    response = await client.post("/v1/instances", data=body)
    assert response.status == 400
    assert "error" in await response.json()
    assert (await (await client.get("/v1/instances")).json()) == {"instances": []}


async def test_list_instances_returns_everything_launched(client: Client) -> None:
    """GET /v1/instances lists every instance launched so far, across launches."""
    first = await client.post("/v1/instances", json={"instance_type": "a", "count": 2})
    second = await client.post("/v1/instances", json={"instance_type": "b"})
    launched = (await first.json())["instances"] + (await second.json())["instances"]
    response = await client.get("/v1/instances")
    assert response.status == 200
    assert (await response.json())["instances"] == launched


async def test_requests_are_recorded_with_headers_query_and_body(client: Client) -> None:
    """A recorded request keeps raw path, query, duplicate headers in order and the body."""
    body = b'{"instance_type": "p5.48xlarge"}'
    headers = CIMultiDict([("X-Dup", "one"), ("X-Account-Id", "acct-1"), ("X-Dup", "two")])
    await client.post("/v1/instances?dry=1&x=a%26b%20c", data=body, headers=headers)
    [record] = await _requests(client)
    assert record["method"] == "POST"
    assert record["path"] == "/v1/instances"
    assert record["query"] == "dry=1&x=a%26b%20c"
    assert [v for n, v in record["raw_headers"] if n == "X-Dup"] == ["one", "two"]
    assert ["X-Account-Id", "acct-1"] in record["raw_headers"]
    # As one object too: names in their usual spelling, a repeated field's values joined.
    assert record["headers"]["X-Dup"] == "one, two"
    assert record["headers"]["X-Account-Id"] == "acct-1"
    assert record["body"] == body.decode()
    assert record["body_length"] == len(body)
    assert record["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_recorded_header_names_take_their_usual_spelling(client: Client) -> None:
    """However a name's case came, the headers object spells it X-Account-Id; raw_headers keeps
    it as sent."""
    headers = CIMultiDict([("x-account-id", "acct-1"), ("X-FORWARDED-FOR", "10.0.0.1")])
    await client.post("/v1/instances", data=b"{}", headers=headers)
    [record] = await _requests(client)
    assert record["headers"]["X-Account-Id"] == "acct-1"
    assert record["headers"]["X-Forwarded-For"] == "10.0.0.1"
    assert ["x-account-id", "acct-1"] in record["raw_headers"]


async def test_recorded_body_is_truncated_but_hashed_whole(client: Client) -> None:
    """A large body is recorded as a 64 KiB preview with the full length and SHA-256."""
    body = b"a" * (3 * BODY_PREVIEW_BYTES + 7)
    await client.put("/somewhere/else", data=body)
    [record] = await _requests(client)
    assert record["body"] == "a" * BODY_PREVIEW_BYTES
    assert record["body_length"] == len(body)
    assert record["body_sha256"] == hashlib.sha256(body).hexdigest()


async def test_unknown_path_is_404_json_and_recorded(client: Client) -> None:
    """Any other method or path answers 404 JSON naming the path, and is recorded."""
    for method, path in [("GET", "/nope"), ("PUT", "/v1/instances")]:
        response = await client.request(method, path)
        assert response.status == 404
        assert await response.json() == {"error": "not found", "path": path}
    assert [(r["method"], r["path"]) for r in await _requests(client)] == [
        ("GET", "/nope"),
        ("PUT", "/v1/instances"),
    ]


async def test_injected_status_fails_times_then_succeeds(client: Client) -> None:
    """fail with times 2: two launches get that status, the third succeeds; /_stub is exempt."""
    response = await client.post("/_stub/fail", json={"status": 503, "times": 2})
    assert response.status == 200
    statuses = []
    for _ in range(3):
        launch = await client.post("/v1/instances", json={"instance_type": "x"})
        statuses.append(launch.status)
        if launch.status == 503:
            assert await launch.json() == {"error": "injected failure"}
        # /_stub calls in between neither fail nor use up the count.
        assert (await client.get("/_stub/bytes?n=1")).status == 200
    assert statuses == [503, 503, 201]
    launches = [r for r in await _requests(client) if r["path"] == "/v1/instances"]
    assert len(launches) == 3
    assert len((await (await client.get("/v1/instances")).json())["instances"]) == 1


async def test_injected_delay_without_times_lasts_until_reset(client: Client) -> None:
    """delay_s slows every non-/_stub request until reset, then answers normally."""
    await client.post("/_stub/fail", json={"delay_s": 0.2})
    for _ in range(2):
        started = time.monotonic()
        response = await client.get("/v1/instances")
        assert time.monotonic() - started >= 0.2
        assert response.status == 200
    await client.post("/_stub/reset")
    started = time.monotonic()
    await client.get("/v1/instances")
    assert time.monotonic() - started < 0.2


async def test_injected_delay_and_status_combine(client: Client) -> None:
    """delay_s with status: the request is delayed, then answers the injected status once."""
    await client.post("/_stub/fail", json={"delay_s": 0.2, "status": 500, "times": 1})
    started = time.monotonic()
    response = await client.post("/v1/instances", json={"instance_type": "x"})
    assert time.monotonic() - started >= 0.2
    assert response.status == 500
    assert (await client.post("/v1/instances", json={"instance_type": "x"})).status == 201


async def test_delayed_request_is_recorded_while_waiting(client: Client) -> None:
    """A delayed request is already in /_stub/requests before its answer is sent."""
    await client.post("/_stub/fail", json={"delay_s": 5})
    pending = asyncio.create_task(client.post("/v1/instances", json={"instance_type": "x"}))
    try:
        for _ in range(100):
            if any(r["path"] == "/v1/instances" for r in await _requests(client)):
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("delayed request was never recorded")
        assert not pending.done()
    finally:
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"times": 2},
        {"status": 200},
        {"status": "500"},
        {"status": True},
        {"status": 500, "times": 0},
        {"delay_s": -1},
        {"delay_s": "2"},
        {"status": 500, "bogus": 1},
        [500],
    ],
)
async def test_fail_rejects_invalid_settings(client: Client, body: Any) -> None:
    """Invalid failure settings answer 400 JSON and inject nothing."""
    response = await client.post("/_stub/fail", json=body)
    assert response.status == 400
    assert "error" in await response.json()
    assert (await client.get("/v1/instances")).status == 200


async def test_echo_streams_a_large_body_back_unchanged(client: Client) -> None:
    """POST /_stub/echo returns a 5 MB body byte for byte, chunked, with its Content-Type."""
    body = bytes(range(256)) * (5 * 1024 * 1024 // 256) + b"tail"
    response = await client.post(
        "/_stub/echo", data=io.BytesIO(body), headers={"Content-Type": "application/x-test"}
    )
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/x-test"
    assert response.headers["Transfer-Encoding"] == "chunked"
    assert await response.read() == body
    [record] = await _requests(client)
    assert record["path"] == "/_stub/echo"
    assert record["body_length"] == len(body)
    assert record["body_sha256"] == hashlib.sha256(body).hexdigest()


@pytest.mark.parametrize("n", [0, 1, 300, 64 * 1024, 3 * 64 * 1024 + 5])
async def test_bytes_streams_n_bytes_of_pattern(client: Client, n: int) -> None:
    """GET /_stub/bytes?n=N answers exactly N bytes of i % 256 with Content-Length N."""
    response = await client.get(f"/_stub/bytes?n={n}")
    assert response.status == 200
    assert response.headers["Content-Length"] == str(n)
    data = await response.read()
    assert data == bytes(i % 256 for i in range(n))


@pytest.mark.parametrize("query", ["", "?n=", "?n=-1", "?n=abc", "?n=%C2%B2"])
async def test_bytes_rejects_bad_n(client: Client, query: str) -> None:
    """GET /_stub/bytes without a non-negative integer n answers 400."""
    assert (await client.get(f"/_stub/bytes{query}")).status == 400


@pytest.mark.parametrize(
    ("method", "path"), [("DELETE", "/_stub/requests"), ("POST", "/_stub/reset")]
)
async def test_reset_clears_records_instances_and_failures(
    client: Client, method: str, path: str
) -> None:
    """Reset forgets recorded requests (itself included), instances and failure modes."""
    await client.post("/v1/instances", json={"instance_type": "x"})
    await client.post("/_stub/fail", json={"status": 500})
    response = await client.request(method, path)
    assert response.status == 200
    assert await _requests(client) == []
    launch = await client.post("/v1/instances", json={"instance_type": "x"})
    assert launch.status == 201
    assert len((await (await client.get("/v1/instances")).json())["instances"]) == 1
    state = client.app[STUB_STATE_KEY]
    assert state.failure is None


async def test_listing_requests_is_not_recorded(client: Client) -> None:
    """GET /_stub/requests never shows up in its own listing."""
    await _requests(client)
    await _requests(client)
    assert await _requests(client) == []


async def test_stub_over_a_real_socket(aiohttp_server: AiohttpServer) -> None:
    """The app serves launches to an ordinary ClientSession over TCP on 127.0.0.1."""
    server = await aiohttp_server(create_stub_app(), host="127.0.0.1")
    async with aiohttp.ClientSession() as session:
        url = f"http://127.0.0.1:{server.port}/v1/instances"
        async with session.post(url, json={"instance_type": "x", "count": 2}) as response:
            assert response.status == 201
            assert len((await response.json())["instances"]) == 2
        async with session.get(url) as response:
            assert len((await response.json())["instances"]) == 2


_RUN_STUB = (
    "import asyncio; from launchgate.stub import run_stub; asyncio.run(run_stub('127.0.0.1', 0))"
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
async def test_run_stub_prints_its_port_and_stops_on_signal(signum: signal.Signals) -> None:
    """run_stub on port 0 prints the real bound URL, serves it, and exits 0 on SIGTERM/SIGINT."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _RUN_STUB, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 10)).decode()
        match = re.fullmatch(r"stub-backend listening on (http://127\.0\.0\.1:(\d+))\n", line)
        assert match, line
        assert int(match[2]) > 0
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"{match[1]}/v1/instances") as response,
        ):
            assert json.loads(await response.text()) == {"instances": []}
        process.send_signal(signum)
        assert await asyncio.wait_for(process.wait(), 10) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


# --- the providers' own launch APIs (reference launch_apis.md §1-§4) -------------------------

_EC2_FORM = {"Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
_NS = "http://ec2.amazonaws.com/doc/2016-11-15/"


def _parse_xml(data: bytes) -> ElementTree.Element:
    return ElementTree.fromstring(data)  # noqa: S314 -- the stub's own answer, built in this test


async def test_ec2_run_instances_answers_run_instances_response_xml(client: Client) -> None:
    """RunInstances answers 200 text/xml RunInstancesResponse with MaxCount instances."""
    body = (
        "Action=RunInstances&Version=2016-11-15&ImageId=ami-60a54009&InstanceType=p5.48xlarge"
        "&MinCount=1&MaxCount=3&Placement.AvailabilityZone=us-east-1d"
    )
    response = await client.post("/", data=body, headers=_EC2_FORM)
    assert response.status == 200
    assert response.content_type == "text/xml"
    root = _parse_xml(await response.read())
    ns = {"ec2": "http://ec2.amazonaws.com/doc/2016-11-15/"}
    assert root.tag == "{http://ec2.amazonaws.com/doc/2016-11-15/}RunInstancesResponse"
    assert root.findtext("ec2:requestId", namespaces=ns)
    assert re.fullmatch(r"r-[0-9a-f]{17}", root.findtext("ec2:reservationId", "", ns))
    instances = root.findall("ec2:instancesSet/ec2:item", ns)
    assert len(instances) == 3
    assert {i.findtext("ec2:instanceType", namespaces=ns) for i in instances} == {"p5.48xlarge"}
    ids = [i.findtext("ec2:instanceId", namespaces=ns) for i in instances]
    listed = (await (await client.get("/v1/instances")).json())["instances"]
    assert [i["id"] for i in listed] == ids
    assert listed[0]["region"] == "us-east-1"


async def test_ec2_run_instances_repeated_with_its_client_token_launches_once(
    client: Client,
) -> None:
    """EC2's idempotency: a RunInstances repeated with its ClientToken launches nothing more
    and answers the first reservation again (found by QA: the stub launched every repeat, so a
    test could not tell what the provider would have launched). Without one, each launches."""
    body = "Action=RunInstances&InstanceType=p5.48xlarge&MinCount=1&MaxCount=2"
    answers = []
    for extra in ("&ClientToken=ct-1", "&ClientToken=ct-1", "&ClientToken=ct-2", "", ""):
        response = await client.post("/", data=body + extra, headers=_EC2_FORM)
        assert response.status == 200
        answers.append(_parse_xml(await response.read()).findtext(f"{{{_NS}}}reservationId"))
    assert answers[0] == answers[1]
    assert len(set(answers)) == 4
    listed = (await (await client.get("/v1/instances")).json())["instances"]
    assert len(listed) == 8  # ct-1 once, ct-2, and the two without a token
    await client.post("/_stub/reset")
    response = await client.post("/", data=body + "&ClientToken=ct-1", headers=_EC2_FORM)
    assert _parse_xml(await response.read()).findtext(f"{{{_NS}}}reservationId") != answers[0]


async def test_gce_launch_repeated_with_its_request_id_launches_once(client: Client) -> None:
    """Compute Engine's idempotency: a launch repeated with its requestId answers the first
    operation again and launches nothing more."""
    path = "/compute/v1/projects/p/zones/us-central1-a/instances/bulkInsert"
    body = {"count": 2, "instanceProperties": {"machineType": "a3-highgpu-8g"}}
    ids = []
    for query in ("?requestId=r-1", "?requestId=r-1", "?requestId=r-2", ""):
        response = await client.post(path + query, json=body)
        assert response.status == 200
        ids.append((await response.json())["id"])
    assert ids[0] == ids[1] and len(set(ids)) == 3
    listed = (await (await client.get("/v1/instances")).json())["instances"]
    assert len(listed) == 6


@pytest.mark.parametrize(
    ("action", "element"),
    [
        ("RequestSpotInstances&InstanceCount=2", "spotInstanceRequestSet"),
        ("CreateFleet", "fleetId"),
        ("RequestSpotFleet", "spotFleetRequestId"),
        ("CreateLaunchTemplate&LaunchTemplateName=t", "launchTemplate"),
        ("DescribeInstances", "return"),
    ],
)
async def test_ec2_query_actions_answer_their_response(
    client: Client, action: str, element: str
) -> None:
    """Any Action at any path, by GET query, answers <{Action}Response> with its key element."""
    response = await client.get(f"/any/path?Action={action}")
    assert response.status == 200
    root = _parse_xml(await response.read())
    name = action.split("&")[0]
    assert root.tag == f"{{http://ec2.amazonaws.com/doc/2016-11-15/}}{name}Response"
    assert root.find(f"{{http://ec2.amazonaws.com/doc/2016-11-15/}}{element}") is not None


async def test_ec2_bad_action_answers_an_ec2_error(client: Client) -> None:
    """An Action that is not an operation name answers 400 with EC2's error shape."""
    response = await client.get("/?Action=%3Cx%3E")
    assert response.status == 400
    root = _parse_xml(await response.read())
    assert root.findtext("Errors/Error/Code") == "InvalidAction"


@pytest.mark.parametrize(
    ("path", "body", "operation", "instances"),
    [
        (
            "/compute/v1/projects/my-project/zones/us-central1-a/instances",
            {"name": "train-1", "machineType": "zones/us-central1-a/machineTypes/a2-highgpu-1g"},
            "insert",
            [("a2-highgpu-1g", "us-central1")],
        ),
        (
            "/compute/v1/projects/my-project/regions/us-central1/instances/bulkInsert",
            {
                "count": "2",
                "namePattern": "t-##",
                "instanceProperties": {"machineType": "a3-highgpu-8g"},
            },
            "bulkInsert",
            [("a3-highgpu-8g", "us-central1")] * 2,
        ),
        (
            "/compute/v1/projects/p/zones/us-central1-a/instances/train-1/setMachineType",
            {"machineType": "zones/us-central1-a/machineTypes/a2-highgpu-1g"},
            "setMachineType",
            [],
        ),
        (
            "/compute/v1/projects/p/global/instanceTemplates",
            {"name": "gpu-tmpl", "properties": {"machineType": "a2-highgpu-1g"}},
            "compute.instanceTemplates.insert",
            [],
        ),
    ],
    ids=["insert", "regional-bulk-insert", "set-machine-type", "template"],
)
async def test_gce_calls_answer_compute_operations(
    client: Client,
    path: str,
    body: dict[str, Any],
    operation: str,
    instances: list[tuple[str, str]],
) -> None:
    """Compute Engine calls answer 200 compute#operation (libcloud GCE fixture shape)."""
    response = await client.post(path, json=body)
    assert response.status == 200
    answer = await response.json()
    assert answer["kind"] == "compute#operation"
    assert answer["operationType"] == operation
    assert answer["status"] == "RUNNING"
    assert answer["targetLink"].startswith("https://compute.googleapis.com/compute/v1/projects/")
    listed = (await (await client.get("/v1/instances")).json())["instances"]
    assert [(i["instance_type"], i["region"]) for i in listed] == instances


@pytest.mark.parametrize(
    "path",
    [
        "/compute/v1/projects/p/regions/us-central1/instances",
        "/compute/v1/projects/p/regions/us-central1/instances/train-1/setMachineType",
    ],
)
async def test_gce_has_no_regional_insert_or_resize(client: Client, path: str) -> None:
    """Compute Engine's regional instance calls are bulkInsert and templates only: the stub
    launches nothing elsewhere (found in review: it launched on a regional insert, which the
    gateway rightly does not judge as one)."""
    response = await client.post(path, json={"name": "x", "machineType": "a3-highgpu-8g"})
    assert response.status == 404
    assert (await (await client.get("/v1/instances")).json())["instances"] == []


async def test_arm_put_answers_201_with_the_resource(client: Client) -> None:
    """An ARM VM PUT answers 201 with the resource echoed, its id and provisioningState."""
    path = "/subscriptions/0000/resourceGroups/rg/providers/Microsoft.Compute/virtualMachines/vm1"
    hardware = {"vmSize": "Standard_ND96isr_H100_v5"}
    resource = {"location": "eastus", "properties": {"hardwareProfile": hardware}}
    response = await client.put(f"{path}?api-version=2024-07-01", json=resource)
    assert response.status == 201
    answer = await response.json()
    assert answer["id"] == path and answer["name"] == "vm1"
    assert answer["type"] == "Microsoft.Compute/virtualMachines"
    assert answer["location"] == "eastus"
    assert answer["properties"]["hardwareProfile"] == hardware
    assert answer["properties"]["provisioningState"] == "Creating"
    listed = (await (await client.get("/v1/instances")).json())["instances"]
    assert [(i["instance_type"], i["region"]) for i in listed] == [
        ("Standard_ND96isr_H100_v5", "eastus")
    ]


async def test_arm_patch_of_a_scale_set_answers_200_any_case(client: Client) -> None:
    """ARM paths are case-insensitive; a PATCH answers 200 with provisioningState Updating."""
    path = (
        "/SUBSCRIPTIONS/s/RESOURCEGROUPS/g/PROVIDERS/MICROSOFT.COMPUTE/VIRTUALMACHINESCALESETS/ss"
    )
    response = await client.patch(
        path, json={"sku": {"name": "Standard_NC24ads_A100_v4", "capacity": 4}}
    )
    assert response.status == 200
    answer = await response.json()
    assert answer["sku"]["capacity"] == 4
    assert answer["properties"]["provisioningState"] == "Updating"


async def test_nova_create_answers_202_with_the_server(client: Client) -> None:
    """Nova create answers 202 {"server": {id, links, adminPass}} and a Location header."""
    body = {"server": {"name": "t", "imageRef": "70a5", "flavorRef": "g1.a100x4", "max_count": "2"}}
    response = await client.post("/v2.1/servers", json=body)
    assert response.status == 202
    created = (await response.json())["server"]
    assert created["adminPass"] and created["OS-DCF:diskConfig"] == "AUTO"
    assert created["links"][0]["href"].endswith(f"/v2.1/servers/{created['id']}")
    assert response.headers["Location"] == created["links"][0]["href"]
    listed = (await (await client.get("/v1/instances")).json())["instances"]
    assert [i["instance_type"] for i in listed] == ["g1.a100x4", "g1.a100x4"]


async def test_nova_reads_a_flavor_reference_as_nova_does(client: Client) -> None:
    """The last segment of the reference's path, its query aside, as Nova and the gateway read
    it (found by QA: "1?x=/g1.h100x8" launched g1.h100x8 on the stub, flavor 1 on Nova)."""
    for ref in ("1?x=/g1.h100x8", "http://nova/v2.1/flavors/1?x=/g1.h100x8"):
        response = await client.post("/v2.1/servers", json={"server": {"flavorRef": ref}})
        assert response.status == 202
    listed = (await (await client.get("/v1/instances")).json())["instances"]
    assert [i["instance_type"] for i in listed] == ["1", "1"]


async def test_nova_reservation_id_and_actions(client: Client) -> None:
    """return_reservation_id answers a reservation id; a server action answers 202, empty."""
    body = {"server": {"flavorRef": "1", "return_reservation_id": "True", "min_count": "2"}}
    response = await client.post("/v2.1/p1/servers", json=body)
    assert response.status == 202
    assert re.fullmatch(r"r-[0-9a-f]{8}", (await response.json())["reservation_id"])
    response = await client.post("/v2.1/servers/abc/action", json={"resize": {"flavorRef": "2"}})
    assert (response.status, await response.read()) == (202, b"")


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/compute/v1/projects/p/zones/z/instances"),
        ("PUT", "/subscriptions/s/resourceGroups/g/providers/Microsoft.Compute/virtualMachines/v"),
        ("POST", "/v2.1/servers"),
    ],
)
async def test_provider_bodies_must_be_json_objects(client: Client, method: str, path: str) -> None:
    """A provider launch whose body is not a JSON object answers 400 and launches nothing."""
    response = await client.request(method, path, data=b"[1]")
    assert response.status == 400
    assert (await (await client.get("/v1/instances")).json())["instances"] == []


async def test_run_stub_records_compressed_bodies_as_sent() -> None:
    """The served stub does not decompress: it records the bytes that arrived."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _RUN_STUB, stdout=asyncio.subprocess.PIPE
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 10)).decode()
        base = line.rsplit(" ", 1)[-1].strip()
        body = gzip.compress(b"Action=DescribeInstances")
        async with aiohttp.ClientSession() as session:
            headers = {"Content-Encoding": "gzip", "Content-Type": "application/octet-stream"}
            async with session.post(f"{base}/x", data=body, headers=headers) as response:
                assert response.status == 404
            async with session.get(f"{base}/_stub/requests") as response:
                [record] = (await response.json())["requests"]
        assert record["body_sha256"] == hashlib.sha256(body).hexdigest()
    finally:
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.wait(), 10)


async def test_the_stub_can_remember_only_the_last_requests_and_instances(
    aiohttp_client: AiohttpClient,
) -> None:
    """With ``keep_last`` (``--keep-last``, as the benchmark runs it) requests and instances
    are kept up to a bound, the last ones; without it, every one (CONTRACT section 7)."""
    bounded = await aiohttp_client(create_stub_app(keep_last=5))
    unbounded = await aiohttp_client(create_stub_app())
    for client in (bounded, unbounded):
        for i in range(8):
            r = await client.post("/v1/instances", json={"instance_type": f"t{i}", "count": 1})
            assert r.status == 201
    for client, first in ((bounded, 3), (unbounded, 0)):
        recorded = await _requests(client)
        assert [json.loads(q["body"])["instance_type"] for q in recorded] == [
            f"t{i}" for i in range(first, 8)
        ]
        listed = (await (await client.get("/v1/instances")).json())["instances"]
        assert [i["instance_type"] for i in listed] == [f"t{i}" for i in range(first, 8)]
