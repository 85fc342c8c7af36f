"""The ``gcp-compute`` dialect: Compute Engine requests to items, and the gate end to end.

Fixtures are the requests in shared/reference/launch_apis.md section 2 (each cites the
provider document it is taken from); the bypass corpus is that file's section 7 as far
as it applies to Compute Engine.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import zlib
from collections.abc import Mapping
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from conftest import RESTRICTED, UNRESTRICTED, MakeToken, StartGateway
from launchgate.dialects import Item, Launch, LaunchRequest
from launchgate.dialects.gcp_compute import GcpCompute, build
from launchgate.errors import ConfigError
from launchgate.strict import MalformedLaunch

BASE = "/compute/v1/projects/my-project"
ZONE = f"{BASE}/zones/us-central1-a"
INSERT = f"{ZONE}/instances"
REGIONAL_BULK = f"{BASE}/regions/us-central1/instances/bulkInsert"
TEMPLATES = f"{BASE}/global/instanceTemplates"
JSON_HEADERS = {"Content-Type": "application/json"}

# launch_apis.md 2.1: the "realistic request" for instances.insert, adapted from console
# "Equivalent REST" exports and https://cloud.google.com/compute/docs/reference/latest/instances/insert
INSERT_N1_T4: dict[str, Any] = {
    "name": "train-1",
    "machineType": "projects/my-project/zones/us-central1-a/machineTypes/n1-standard-8",
    "guestAccelerators": [
        {
            "acceleratorType": "projects/my-project/zones/us-central1-a/acceleratorTypes/nvidia-tesla-t4",
            "acceleratorCount": 4,
        }
    ],
    "scheduling": {"onHostMaintenance": "TERMINATE", "automaticRestart": True},
    "disks": [
        {
            "boot": True,
            "autoDelete": True,
            "type": "PERSISTENT",
            "mode": "READ_WRITE",
            "initializeParams": {
                "sourceImage": "projects/debian-cloud/global/images/family/debian-12",
                "diskSizeGb": "100",
            },
        }
    ],
    "networkInterfaces": [
        {
            "subnetwork": "projects/my-project/regions/us-central1/subnetworks/default",
            "accessConfigs": [{"name": "External NAT", "networkTier": "PREMIUM"}],
        }
    ],
}
# launch_apis.md 2.1: the accelerator-optimized variant (the GPU is in the machine type),
# https://cloud.google.com/compute/docs/gpus/create-gpu-vm-accelerator-optimized
INSERT_A2: dict[str, Any] = {
    "name": "train-2",
    "machineType": "zones/us-central1-a/machineTypes/a2-highgpu-1g",
}
# launch_apis.md 2.2: regionInstances.bulkInsert,
# https://cloud.google.com/compute/docs/reference/rest/v1/instances/bulkInsert
BULK_A3: dict[str, Any] = {
    "count": "8",
    "minCount": "8",
    "namePattern": "train-####",
    "instanceProperties": {
        "machineType": "a3-highgpu-8g",
        "scheduling": {"onHostMaintenance": "TERMINATE"},
        "disks": [
            {
                "boot": True,
                "initializeParams": {
                    "sourceImage": "projects/debian-cloud/global/images/family/debian-12"
                },
            }
        ],
        "networkInterfaces": [{"network": "global/networks/default"}],
    },
    "locationPolicy": {
        "locations": {
            "zones/us-central1-a": {"preference": "ALLOW"},
            "zones/us-central1-b": {"preference": "ALLOW"},
        }
    },
}
# launch_apis.md 2.3: instanceTemplates.insert (bare names in templates, per the
# AcceleratorConfig doc); response fixture apache/libcloud gce/global_instanceTemplates_insert.json
TEMPLATE_A2: dict[str, Any] = {
    "name": "gpu-tmpl",
    "properties": {
        "machineType": "a2-highgpu-1g",
        "guestAccelerators": [{"acceleratorType": "nvidia-tesla-a100", "acceleratorCount": 1}],
    },
}
# launch_apis.md 2.4: setMachineType,
# https://cloud.google.com/compute/docs/reference/rest/v1/instances/setMachineType (gcloud docs)
SET_MACHINE_TYPE: dict[str, Any] = {"machineType": "zones/us-central1-f/machineTypes/n1-standard-1"}
# launch_apis.md 2.4: setMachineResources,
# https://cloud.google.com/compute/docs/reference/rest/v1/instances/setMachineResources
SET_MACHINE_RESOURCES: dict[str, Any] = {
    "guestAccelerators": [
        {
            "acceleratorType": "projects/my-project/zones/us-central1-a/acceleratorTypes/nvidia-tesla-t4",
            "acceleratorCount": 4,
        }
    ]
}


def request(
    method: str,
    path: str,
    body: Mapping[str, Any] | bytes | str,
    query: str = "",
    headers: Mapping[str, str] | None = None,
) -> LaunchRequest:
    raw = body if isinstance(body, bytes) else body.encode() if isinstance(body, str) else None
    data = raw if raw is not None else json.dumps(body).encode()
    proxy = CIMultiDictProxy(CIMultiDict(JSON_HEADERS if headers is None else headers))
    return LaunchRequest(method, path, query, proxy, data)


DIALECT = build({}, "routes[0]")


def parse(*args: Any, **kwargs: Any) -> Launch | None:
    return DIALECT.parse(request(*args, **kwargs))


def items(launch: Launch | None) -> list[tuple[str, int]]:
    assert launch is not None
    return [(i.sku, i.count) for i in launch.items]


# --- items and region -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "expected", "region"),
    [
        (
            "POST",
            INSERT,
            INSERT_N1_T4,
            [("n1-standard-8", 1), ("nvidia-tesla-t4", 4)],
            "us-central1",
        ),
        ("POST", INSERT, INSERT_A2, [("a2-highgpu-1g", 1)], "us-central1"),
        ("POST", REGIONAL_BULK, BULK_A3, [("a3-highgpu-8g", 8)], "us-central1"),
        (
            "POST",
            f"{ZONE}/instances/bulkInsert",
            {
                "count": 4,
                "instanceProperties": {
                    "machineType": "n1-standard-8",
                    "guestAccelerators": [
                        {"acceleratorType": "nvidia-tesla-t4", "acceleratorCount": "2"}
                    ],
                },
            },
            [("n1-standard-8", 4), ("nvidia-tesla-t4", 8)],
            "us-central1",
        ),
        (
            "POST",
            REGIONAL_BULK,
            {
                "count": "2",
                "perInstanceProperties": {"a": {}, "b": {}, "c": {}},
                "instanceProperties": {"machineType": "a2-highgpu-2g"},
            },
            [("a2-highgpu-2g", 3)],
            "us-central1",
        ),
        (
            "POST",
            REGIONAL_BULK,
            {
                "count": 2,
                "instanceProperties": {"machineType": "a3-highgpu-8g"},
                "instanceFlexibilityPolicy": {
                    "instanceSelections": {
                        "first": {"machineTypes": ["a3-highgpu-8g"], "rank": 1},
                        "second": {"machineTypes": ["a2-ultragpu-8g"], "rank": 2},
                    }
                },
            },
            [("a3-highgpu-8g", 2), ("a2-ultragpu-8g", 2)],
            "us-central1",
        ),
        ("POST", TEMPLATES, TEMPLATE_A2, [("a2-highgpu-1g", 0), ("nvidia-tesla-a100", 0)], None),
        (
            "POST",
            f"{BASE}/regions/europe-west4/instanceTemplates",
            TEMPLATE_A2,
            [("a2-highgpu-1g", 0), ("nvidia-tesla-a100", 0)],
            "europe-west4",
        ),
        (
            "POST",
            f"{BASE}/zones/us-central1-f/instances/vm-1/setMachineType",
            SET_MACHINE_TYPE,
            [("n1-standard-1", 1)],
            "us-central1",
        ),
        (
            "POST",
            f"{INSERT}/vm-1/setMachineResources",
            SET_MACHINE_RESOURCES,
            [("nvidia-tesla-t4", 4)],
            "us-central1",
        ),
        (
            "PUT",
            f"{INSERT}/vm-1",
            {"name": "vm-1", "machineType": "zones/us-central1-a/machineTypes/a3-highgpu-8g"},
            [("a3-highgpu-8g", 1)],
            "us-central1",
        ),
        (
            "POST",
            INSERT,
            {
                "machineType": "https://www.googleapis.com/compute/v1/projects/my-project/zones/us-central1-a/machineTypes/a2-highgpu-1g"
            },
            [("a2-highgpu-1g", 1)],
            "us-central1",
        ),
        (
            "POST",
            INSERT,
            {
                "machine_type": "n1-standard-8",
                "guest_accelerators": [
                    {"accelerator_type": "nvidia-h100-80gb", "accelerator_count": 2}
                ],
            },
            [("n1-standard-8", 1), ("nvidia-h100-80gb", 2)],
            "us-central1",
        ),
        ("POST", INSERT, {"machineType": "custom-8-30720"}, [("n1-custom", 1)], "us-central1"),
        (
            "POST",
            INSERT,
            {"machineType": "zones/us-central1-a/machineTypes/n2-custom-8-30720-ext"},
            [("n2-custom", 1)],
            "us-central1",
        ),
        (
            "POST",
            f"{BASE}/zones/us-central1-ai1a/instances",
            {"machineType": "a3-ultragpu-8g"},
            [("a3-ultragpu-8g", 1)],
            "us-central1",
        ),
        (
            "POST",
            "/compute/v1/projects/my-project/zones/us-central1-a/Instances;v=1",
            INSERT_A2,
            [("a2-highgpu-1g", 1)],
            "us-central1",
        ),
    ],
)
def test_items_and_region(
    method: str, path: str, body: Any, expected: list[tuple[str, int]], region: str | None
) -> None:
    """Each launch call yields its machine type and accelerators x instances, and its region."""
    launch = parse(method, path, body)
    assert items(launch) == expected
    assert launch is not None
    assert launch.region == region
    assert launch.unresolvable is None


def test_escaped_key_names_are_read_decoded() -> None:
    """A JSON-escaped key (\\u006dachineType) is the key it decodes to (section 7, item 32)."""
    launch = parse("POST", INSERT, b'{"\\u006dachineType": "a3-highgpu-8g"}')
    assert items(launch) == [("a3-highgpu-8g", 1)]


def test_route_region_applies_to_global_templates_only() -> None:
    """A route's region names global calls; a zone in the path wins over it."""
    dialect = build({"region": "asia-east1"}, "routes[0]")
    assert dialect.parse(request("POST", TEMPLATES, TEMPLATE_A2)) == Launch(
        (Item("a2-highgpu-1g", 0), Item("nvidia-tesla-a100", 0)), "asia-east1"
    )
    launch = dialect.parse(request("POST", INSERT, INSERT_A2))
    assert launch is not None and launch.region == "us-central1"


# --- calls that launch nothing ------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("POST", f"{INSERT}/vm-1/setMachineResources", {"guestAccelerators": []}),
        ("POST", f"{INSERT}/vm-1/setMachineResources", {}),
        ("PUT", f"{INSERT}/vm-1", {"name": "vm-1", "labels": {"team": "ml"}}),
    ],
)
def test_calls_that_add_no_capacity_are_not_launches(method: str, path: str, body: Any) -> None:
    """Removing accelerators, or an update naming no machine type, parses to None (forwarded)."""
    assert parse(method, path, body) is None


# --- unresolvable -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "query"),
    [
        # launch_apis.md 2.1 template variant: body with only a name + ?sourceInstanceTemplate=
        (
            "POST",
            INSERT,
            {"name": "train-1"},
            "sourceInstanceTemplate=global/instanceTemplates/gpu-tmpl",
        ),
        (
            "POST",
            INSERT,
            {"name": "t"},
            "source_instance_template=projects/p/regions/r/instanceTemplates/t",
        ),
        ("POST", INSERT, {"name": "t"}, "sourceMachineImage=global/machineImages/gpu-image"),
        ("POST", INSERT, {"name": "t", "sourceMachineImage": "global/machineImages/gpu-image"}, ""),
        # an explicit machine type does not say what accelerators the template attaches
        ("POST", INSERT, INSERT_A2, "sourceInstanceTemplate=global/instanceTemplates/gpu-tmpl"),
        ("POST", INSERT, {"name": "t"}, "source%49nstanceTemplate=global/instanceTemplates/t"),
        (
            "POST",
            REGIONAL_BULK,
            {"count": "8", "sourceInstanceTemplate": "global/instanceTemplates/t"},
            "",
        ),
        (
            "POST",
            f"{BASE}/regions/us-central1/instanceTemplates",
            {"name": "t", "sourceInstance": "zones/us-central1-a/instances/vm"},
            "",
        ),
        # launch_apis.md 2.3 / 7.5: managed instance groups and autoscalers
        (
            "POST",
            f"{ZONE}/instanceGroupManagers",
            {"instanceTemplate": "global/instanceTemplates/t", "targetSize": 4},
            "",
        ),
        ("POST", f"{ZONE}/instanceGroupManagers/mig-1/resize", b"", "size=100"),
        ("PATCH", f"{ZONE}/instanceGroupManagers/mig-1", {"targetSize": 100}, ""),
        ("PUT", f"{BASE}/regions/us-central1/instanceGroupManagers/mig-1", {}, ""),
        (
            "POST",
            f"{ZONE}/instanceGroupManagers/mig-1/createInstances",
            {"instances": [{"name": "a"}]},
            "",
        ),
        ("POST", f"{ZONE}/instanceGroupManagers/mig-1/setInstanceTemplate", {}, ""),
        ("POST", f"{BASE}/regions/us-central1/instanceGroupManagers/mig-1/resizeRequests", {}, ""),
        ("POST", f"{ZONE}/autoscalers", {"target": "mig-1"}, ""),
        ("PATCH", f"{BASE}/regions/us-central1/autoscalers", {}, "autoscaler=a"),
    ],
)
def test_launches_by_reference_are_unresolvable(
    method: str, path: str, body: Any, query: str
) -> None:
    """A launch whose machine type lives in a referenced template or group is unresolvable."""
    launch = parse(method, path, body, query)
    assert launch is not None
    assert launch.unresolvable
    assert launch.region == "us-central1"


# --- malformed ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("path", "body", "query", "headers"),
    [
        (INSERT, b'{"machineType": "n1-standard-8", "machineType": "a3-highgpu-8g"}', "", None),
        (INSERT, b'{"x": {"a": 1, "a": 2}, "machineType": "n1-standard-8"}', "", None),
        (INSERT, {"machineType": "n1-standard-8", "machine_type": "a3-highgpu-8g"}, "", None),
        (INSERT, {"MachineType": "a3-highgpu-8g"}, "", None),
        (INSERT, {"machinetype": "a3-highgpu-8g"}, "", None),
        (INSERT, b'\xef\xbb\xbf{"machineType": "a3-highgpu-8g"}', "", None),
        (INSERT, '{"machineType": "a3-highgpu-8g"}'.encode("utf-16"), "", None),
        (INSERT, '{"machineType": "a3-highgpu-8g"}'.encode("utf-16-le"), "", None),
        (INSERT, b'{"machineType": "a3-highgpu-8g"} {"machineType": "n1-standard-8"}', "", None),
        (
            INSERT,
            b'{"machineType": "a2-highgpu-1g", "guestAccelerators": [{"acceleratorType": "nvidia-l4", "acceleratorCount": NaN}]}',
            "",
            None,
        ),
        (INSERT, b'{"machineType": "a2-highgpu-1g", "x": Infinity}', "", None),
        (INSERT, b'{"machineType": "a2-\xff"}', "", None),
        (INSERT, b"", "", None),
        (INSERT, [{"machineType": "a3-highgpu-8g"}], "", None),
        (INSERT, {"name": "no-type"}, "", None),
        (INSERT, {"machineType": 5}, "", None),
        (INSERT, {"machineType": "A3-HIGHGPU-8G"}, "", None),
        (INSERT, {"machineType": "zones/us-central1-a/machineTypes/a3-highgpu-8g?x=1"}, "", None),
        (INSERT, {"machineType": "zones/us-central1-a/diskTypes/a3-highgpu-8g"}, "", None),
        (INSERT, {"machineType": "zones/us-central1-a/a3-highgpu-8g"}, "", None),
        (INSERT, {"machineType": "zones/us-central1-a/machineTypes/"}, "", None),
        # launch_apis.md 7.20: a zone or project in the body that disagrees with the path
        (INSERT, {"machineType": "zones/us-east1-b/machineTypes/a3-highgpu-8g"}, "", None),
        (
            INSERT,
            {"machineType": "projects/OTHER/zones/us-central1-a/machineTypes/a3-highgpu-8g"},
            "",
            None,
        ),
        (
            REGIONAL_BULK,
            {
                "count": 1,
                "instanceProperties": {
                    "machineType": "zones/europe-west4-a/machineTypes/a3-highgpu-8g"
                },
            },
            "",
            None,
        ),
        (
            INSERT,
            {"machineType": "n1-standard-8", "guestAccelerators": {"acceleratorType": "nvidia-l4"}},
            "",
            None,
        ),
        (
            INSERT,
            {
                "machineType": "n1-standard-8",
                "guestAccelerators": [{"acceleratorType": "nvidia-l4"}],
            },
            "",
            None,
        ),
        (
            INSERT,
            {"machineType": "n1-standard-8", "guestAccelerators": [{"acceleratorCount": 1}]},
            "",
            None,
        ),
        (
            INSERT,
            {
                "machineType": "n1-standard-8",
                "guestAccelerators": [{"acceleratorType": "nvidia-l4", "acceleratorCount": 0}],
            },
            "",
            None,
        ),
        (
            INSERT,
            {
                "machineType": "n1-standard-8",
                "guestAccelerators": [{"acceleratorType": "nvidia-l4", "acceleratorCount": 1.5}],
            },
            "",
            None,
        ),
        (
            INSERT,
            {
                "machineType": "n1-standard-8",
                "guestAccelerators": [{"acceleratorType": "nvidia-l4", "acceleratorCount": True}],
            },
            "",
            None,
        ),
        # launch_apis.md 7.15 / 7.35: counts that lax parsers read as numbers
        (
            REGIONAL_BULK,
            {"count": "8.0", "instanceProperties": {"machineType": "a3-highgpu-8g"}},
            "",
            None,
        ),
        (
            REGIONAL_BULK,
            {"count": 8.0, "instanceProperties": {"machineType": "a3-highgpu-8g"}},
            "",
            None,
        ),
        (
            REGIONAL_BULK,
            b'{"count": 1e3, "instanceProperties": {"machineType": "a3-highgpu-8g"}}',
            "",
            None,
        ),
        (
            REGIONAL_BULK,
            {"count": "1e3", "instanceProperties": {"machineType": "a3-highgpu-8g"}},
            "",
            None,
        ),
        (
            REGIONAL_BULK,
            {"count": -1, "instanceProperties": {"machineType": "a3-highgpu-8g"}},
            "",
            None,
        ),
        (
            REGIONAL_BULK,
            {"count": True, "instanceProperties": {"machineType": "a3-highgpu-8g"}},
            "",
            None,
        ),
        (
            REGIONAL_BULK,
            {"count": 100001, "instanceProperties": {"machineType": "a3-highgpu-8g"}},
            "",
            None,
        ),
        (
            REGIONAL_BULK,
            {"count": " 8", "instanceProperties": {"machineType": "a3-highgpu-8g"}},
            "",
            None,
        ),
        (REGIONAL_BULK, {"instanceProperties": {"machineType": "a3-highgpu-8g"}}, "", None),
        (REGIONAL_BULK, {"count": 2}, "", None),
        (
            REGIONAL_BULK,
            {
                "count": 2,
                "instanceProperties": {"machineType": "a3-highgpu-8g"},
                "instanceFlexibilityPolicy": {
                    "instanceSelections": {"a": {"machineTypes": "a2-highgpu-1g"}}
                },
            },
            "",
            None,
        ),
        (TEMPLATES, {"name": "t", "properties": {}}, "", None),
        (f"{INSERT}/vm/setMachineType", {}, "", None),
        (f"{BASE}/zones/nodash/instances", INSERT_A2, "", None),
        # launch_apis.md 7.22-7.27: query-string games
        (INSERT, {"name": "t"}, "sourceInstanceTemplate=a&sourceInstanceTemplate=b", None),
        (INSERT, {"name": "t"}, "sourceInstanceTemplate=a&source_instance_template=b", None),
        (INSERT, INSERT_A2, "SourceInstanceTemplate=global/instanceTemplates/t", None),
        (INSERT, INSERT_A2, "requestId=1&requestId=2", None),
        (INSERT, INSERT_A2, "requestId=1;sourceInstanceTemplate=t", None),
        (INSERT, INSERT_A2, "requestId=%zz", None),
        (INSERT, INSERT_A2, "requestId=%ff", None),
        # launch_apis.md 7.41 / 7.42: encodings and content types the gateway does not read
        (INSERT, INSERT_A2, "", {"Content-Encoding": "gzip"}),
        (INSERT, INSERT_A2, "", {"Content-Encoding": "identity, br"}),
        (INSERT, INSERT_A2, "", {"Content-Type": "text/plain"}),
        (INSERT, INSERT_A2, "", {"Content-Type": "application/json+protobuf"}),
        (INSERT, INSERT_A2, "", {"Content-Type": "application/json; charset=utf-16"}),
    ],
)
def test_malformed(path: str, body: Any, query: str, headers: Mapping[str, str] | None) -> None:
    """A request that could be read two ways, or not at all, is malformed."""
    with pytest.raises(MalformedLaunch):
        parse("POST", path, body, query, headers)


def test_digit_string_counts_are_read() -> None:
    """int64 counts come as JSON strings in proto3 JSON; digit strings count (7.15)."""
    body = {"count": "0008", "instanceProperties": {"machineType": "a3-highgpu-8g"}}
    assert items(parse("POST", REGIONAL_BULK, body)) == [("a3-highgpu-8g", 8)]


def test_charset_utf8_and_no_content_type_are_accepted() -> None:
    """``application/json; charset=UTF-8`` and a missing Content-Type read the same body."""
    for headers in ({"Content-Type": "application/json; charset=UTF-8"}, {}):
        assert items(parse("POST", INSERT, INSERT_A2, headers=headers)) == [("a2-highgpu-1g", 1)]


# --- claims -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "claimed"),
    [
        ("POST", INSERT, True),
        ("POST", f"{ZONE}/instances/bulkInsert", True),
        ("POST", REGIONAL_BULK, True),
        ("POST", f"{INSERT}/vm-1/setMachineType", True),
        ("POST", f"{INSERT}/vm-1/setMachineResources", True),
        ("PUT", f"{INSERT}/vm-1", True),
        ("POST", TEMPLATES, True),
        ("POST", f"{BASE}/regions/us-central1/instanceTemplates", True),
        ("POST", f"{ZONE}/instanceGroupManagers/mig/resize", True),
        ("PATCH", f"{BASE}/regions/us-central1/autoscalers", True),
        ("POST", "/COMPUTE/V1/PROJECTS/my-project/ZONES/us-central1-a/INSTANCES", True),
        ("POST", f"{ZONE}/instances;x=y", True),
        # not launches: listed, read, deleted, started, labelled, other collections
        ("GET", INSERT, False),
        ("GET", f"{INSERT}/vm-1", False),
        ("DELETE", f"{INSERT}/vm-1", False),
        ("POST", f"{INSERT}/vm-1/start", False),
        ("POST", f"{INSERT}/vm-1/resume", False),
        ("POST", f"{INSERT}/vm-1/stop", False),
        ("POST", f"{INSERT}/vm-1/setLabels", False),
        ("POST", f"{INSERT}/vm-1", False),
        ("GET", TEMPLATES, False),
        ("DELETE", f"{TEMPLATES}/t", False),
        ("GET", f"{ZONE}/instanceGroupManagers/mig", False),
        ("POST", f"{ZONE}/instanceGroupManagers/mig/deleteInstances", False),
        ("POST", f"{ZONE}/disks", False),
        ("GET", f"{ZONE}/operations/op-1", False),
        ("POST", "/compute/beta/projects/my-project/zones/us-central1-a/instances", False),
        ("POST", "/batch/compute/v1", False),
        ("POST", "/v1/instances", False),
    ],
)
def test_claims(method: str, path: str, claimed: bool) -> None:
    """Only the launch calls' method and path shape are claimed; the rest pass unjudged."""
    assert DIALECT.claims(method, path) is claimed


def test_route_shape() -> None:
    """The default route is /compute/v1, a prefix route, POST/PUT/PATCH only."""
    assert (DIALECT.path, DIALECT.region) == ("/compute/v1", None)
    assert isinstance(DIALECT, GcpCompute)
    assert DIALECT.name == "gcp-compute" and DIALECT.prefix is True
    assert DIALECT.methods == {"POST", "PUT", "PATCH"}


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"sku": "/machineType"}, "routes[3]: unknown key 'sku'"),
        ({"path": "compute/v1"}, "routes[3].path"),
        ({"path": "/compute//v1"}, "routes[3].path"),
        ({"path": "/compute/%2F"}, "routes[3].path"),
        ({"path": 5}, "routes[3].path"),
        ({"region": ""}, "routes[3].region"),
        ({"region": 1}, "routes[3].region"),
    ],
)
def test_build_rejects_bad_routes(table: dict[str, Any], message: str) -> None:
    """A bad route entry is a ConfigError naming the entry and key."""
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        build(table, "routes[3]")


# --- end to end ---------------------------------------------------------------------------

ROUTE = {"dialect": "gcp-compute", "path": "/compute/v1"}


def sha256(data: Mapping[str, Any] | bytes) -> str:
    raw = data if isinstance(data, bytes) else json.dumps(data).encode()
    return hashlib.sha256(raw).hexdigest()


async def test_unrestricted_account_reaches_the_upstream(start_gateway: StartGateway) -> None:
    """Row 4: an unrestricted account's A3 bulkInsert is forwarded byte for byte."""
    gw = await start_gateway(routes=[ROUTE])
    status, _ = await gw.send(
        "POST", REGIONAL_BULK + "?requestId=r-1", BULK_A3, account=UNRESTRICTED
    )
    assert status in (200, 201)  # the stub answers as the provider does (stub.py)
    [got] = await gw.stub_requests()
    assert (got["method"], got["path"], got["query"]) == ("POST", REGIONAL_BULK, "requestId=r-1")
    assert got["body_sha256"] == sha256(BULK_A3)
    decision = gw.decisions()[-1]
    assert (decision["reason"], decision["region"]) == ("account_not_restricted", "us-central1")
    assert decision["items"][0]["sku"] == "a3-highgpu-8g" and decision["accelerators"] == 64


async def test_uncontrolled_machine_passes_for_restricted_account(
    start_gateway: StartGateway,
) -> None:
    """Row 3: an N1 with T4s (not controlled) needs no license, even for a restricted account."""
    gw = await start_gateway(routes=[ROUTE])
    status, _ = await gw.send("POST", INSERT, INSERT_N1_T4)
    assert status in (200, 201)
    assert [r["body_sha256"] for r in await gw.stub_requests()] == [sha256(INSERT_N1_T4)]
    assert gw.decisions()[-1]["reason"] == "sku_not_controlled"


async def test_restricted_account_without_token_is_denied(start_gateway: StartGateway) -> None:
    """Row 7: a restricted account's A2 insert without a token is 403 and never forwarded."""
    gw = await start_gateway(routes=[ROUTE])
    status, problem = await gw.send("POST", INSERT, INSERT_A2)
    assert (status, problem["reason"]) == (403, "license_required")
    assert await gw.stub_requests() == []


async def test_licensed_launch_reserves_every_controlled_item(
    start_gateway: StartGateway, make_token: MakeToken
) -> None:
    """Licensed: the token covers each controlled SKU; the reservation sums count x per instance."""
    gw = await start_gateway(routes=[ROUTE])
    body = {
        "count": "2",
        "instanceProperties": {"machineType": "a3-highgpu-8g"},
        "instanceFlexibilityPolicy": {
            "instanceSelections": {"alt": {"machineTypes": ["a2-ultragpu-8g"]}}
        },
    }
    token = make_token(skus=["a3-highgpu-8g", "a2-ultragpu-8g"], max_accelerators=64)
    status, _ = await gw.send("POST", REGIONAL_BULK, body, token=token)
    assert status in (200, 201)  # the stub answers as the provider does (stub.py)
    [got] = await gw.stub_requests()
    assert got["body_sha256"] == sha256(body)
    assert "license-token" not in [name.lower() for name in got["headers"]]
    decision = gw.decisions()[-1]
    assert (decision["reason"], decision["reserved"]) == ("licensed", 32)
    reservation = await gw.gateway.ledger.reservation(decision["decision_id"])
    assert reservation is not None and reservation.amount == 32
    license = await gw.license(decision["license"]["jti"])
    assert (license.used, license.reserved) == (32, 0)  # a 2xx turns the reservation into use


async def test_token_must_cover_every_controlled_item(
    start_gateway: StartGateway, make_token: MakeToken
) -> None:
    """A machine type covered but a guest accelerator not: token_sku_not_covered, not forwarded."""
    gw = await start_gateway(routes=[ROUTE])
    body = {
        "machineType": "a2-highgpu-1g",
        "guestAccelerators": [{"acceleratorType": "nvidia-h100-80gb", "acceleratorCount": 2}],
    }
    token = make_token(skus=["a2-highgpu-1g"])
    status, problem = await gw.send("POST", INSERT, body, token=token)
    assert (status, problem["reason"]) == (403, "token_sku_not_covered")
    assert gw.decisions()[-1]["sku"] == "nvidia-h100-80gb"
    assert await gw.stub_requests() == []


async def test_template_needs_a_covering_token_and_reserves_nothing(
    start_gateway: StartGateway, make_token: MakeToken
) -> None:
    """An instance template is count 0: licensed with a covering token, nothing reserved."""
    gw = await start_gateway(routes=[ROUTE])
    status, problem = await gw.send("POST", TEMPLATES, TEMPLATE_A2)
    assert (status, problem["reason"]) == (403, "license_required")
    token = make_token(skus=["a2-highgpu-1g", "nvidia-tesla-a100"], max_accelerators=1)
    await gw.send("POST", TEMPLATES, TEMPLATE_A2, token=token)
    decision = gw.decisions()[-1]
    assert (decision["reason"], decision["reserved"]) == ("licensed", 0)
    assert [r["path"] for r in await gw.stub_requests()] == [TEMPLATES]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", INSERT, b""),
        ("GET", f"{INSERT}/vm-1", b""),
        ("DELETE", f"{INSERT}/vm-1", b""),
        ("POST", f"{INSERT}/vm-1/start", b""),
        ("POST", f"{INSERT}/vm-1/setLabels", {"labels": {"a": "b"}, "labelFingerprint": "x"}),
        ("PUT", f"{INSERT}/vm-1", {"name": "vm-1", "labels": {"a": "b"}}),
        ("POST", f"{INSERT}/vm-1/setMachineResources", {"guestAccelerators": []}),
    ],
)
async def test_non_launch_calls_pass_untouched_and_unjudged(
    start_gateway: StartGateway, method: str, path: str, body: Any
) -> None:
    """Reads, deletes, starts and size-free updates reach the upstream with no decision."""
    gw = await start_gateway(routes=[ROUTE])
    await gw.send(method, path + "?requestId=q", body)
    [got] = await gw.stub_requests()
    assert (got["method"], got["path"], got["query"]) == (method, path, "requestId=q")
    assert got["body_sha256"] == sha256(body)
    assert gw.decisions() == []


A3 = {"machineType": "zones/us-central1-a/machineTypes/a3-highgpu-8g"}

# launch_apis.md section 7, as it applies to Compute Engine: each is sent by the restricted
# account without a token; none may reach the upstream.
BYPASSES: list[tuple[str, str, str, Any, dict[str, str] | None, int]] = [
    # 7.5 scaling groups, 7.8 templates by reference, 7.45 query parameters that change meaning
    (
        "7.5 MIG insert",
        "POST",
        f"{ZONE}/instanceGroupManagers",
        {"instanceTemplate": "global/instanceTemplates/t", "targetSize": 8},
        None,
        403,
    ),
    (
        "7.5 MIG resize?size=",
        "POST",
        f"{ZONE}/instanceGroupManagers/mig/resize?size=64",
        b"",
        None,
        403,
    ),
    ("7.5 MIG patch", "PATCH", f"{ZONE}/instanceGroupManagers/mig", {"targetSize": 64}, None, 403),
    (
        "7.5 MIG createInstances",
        "POST",
        f"{ZONE}/instanceGroupManagers/mig/createInstances",
        {"instances": [{"name": "x"}]},
        None,
        403,
    ),
    (
        "7.5 regional MIG resize",
        "POST",
        f"{BASE}/regions/us-central1/instanceGroupManagers/mig/resize?size=9",
        b"",
        None,
        403,
    ),
    (
        "7.5 autoscaler",
        "POST",
        f"{ZONE}/autoscalers",
        {"target": "mig", "autoscalingPolicy": {"maxNumReplicas": 64}},
        None,
        403,
    ),
    (
        "7.8 sourceInstanceTemplate",
        "POST",
        f"{INSERT}?sourceInstanceTemplate=global/instanceTemplates/gpu-tmpl",
        {"name": "vm"},
        None,
        403,
    ),
    (
        "7.8 sourceMachineImage",
        "POST",
        f"{INSERT}?sourceMachineImage=global/machineImages/img",
        {"name": "vm"},
        None,
        403,
    ),
    (
        "7.8 bulkInsert sourceInstanceTemplate",
        "POST",
        REGIONAL_BULK,
        {"count": "8", "sourceInstanceTemplate": "global/instanceTemplates/t"},
        None,
        403,
    ),
    (
        "7.24 percent-encoded parameter name",
        "POST",
        f"{INSERT}?source%49nstanceTemplate=global/instanceTemplates/t",
        {"name": "vm"},
        None,
        403,
    ),
    (
        "7.25 case-variant parameter name",
        "POST",
        f"{INSERT}?SOURCEINSTANCETEMPLATE=t",
        A3,
        None,
        400,
    ),
    (
        "7.22 duplicated parameter",
        "POST",
        f"{INSERT}?sourceInstanceTemplate=a&sourceInstanceTemplate=b",
        A3,
        None,
        400,
    ),
    ("7.27 ';' separator", "POST", f"{INSERT}?requestId=1;sourceInstanceTemplate=t", A3, None, 400),
    # 7.6 resize of existing instances
    ("7.6 setMachineType", "POST", f"{INSERT}/vm/setMachineType", A3, None, 403),
    (
        "7.6 setMachineResources",
        "POST",
        f"{INSERT}/vm/setMachineResources",
        {"guestAccelerators": [{"acceleratorType": "nvidia-h100-80gb", "acceleratorCount": 8}]},
        None,
        403,
    ),
    (
        "7.6 instances.update",
        "PUT",
        f"{INSERT}/vm?mostDisruptiveAllowedAction=RESTART",
        A3,
        None,
        403,
    ),
    # 7.14 the GPU is in the machine type, no guestAccelerators
    ("7.14 G2 machine type", "POST", INSERT, {"machineType": "g2-standard-8"}, None, 403),
    ("7.14 A3 machine type", "POST", INSERT, A3, None, 403),
    # 7.15 / 7.35 count tricks
    (
        "7.15 count '8.0'",
        "POST",
        REGIONAL_BULK,
        {"count": "8.0", "instanceProperties": A3},
        None,
        400,
    ),
    (
        "7.35 count 1e3",
        "POST",
        REGIONAL_BULK,
        b'{"count": 1e3, "instanceProperties": {"machineType": "a3-highgpu-8g"}}',
        None,
        400,
    ),
    (
        "7.35 count 8.0",
        "POST",
        REGIONAL_BULK,
        b'{"count": 8.0, "instanceProperties": {"machineType": "a3-highgpu-8g"}}',
        None,
        400,
    ),
    (
        "7.15 count '0008'",
        "POST",
        REGIONAL_BULK,
        {"count": "0008", "instanceProperties": A3},
        None,
        403,
    ),
    # 7.20 zone/project in the body disagreeing with the path
    (
        "7.20 other zone",
        "POST",
        INSERT,
        {"machineType": "projects/my-project/zones/us-east4-a/machineTypes/a3-highgpu-8g"},
        None,
        400,
    ),
    (
        "7.20 other project",
        "POST",
        INSERT,
        {"machineType": "projects/OTHER/zones/us-central1-a/machineTypes/a3-highgpu-8g"},
        None,
        400,
    ),
    # 7.30-7.35 JSON tricks
    (
        "7.30 duplicate key",
        "POST",
        INSERT,
        b'{"machineType": "n1-standard-8", "machineType": "a3-highgpu-8g"}',
        None,
        400,
    ),
    (
        "7.30 nested duplicate key",
        "POST",
        INSERT,
        b'{"machineType": "n1-standard-8", "guestAccelerators": [{"acceleratorType": "nvidia-tesla-t4", "acceleratorType": "nvidia-h100-80gb", "acceleratorCount": 8}]}',
        None,
        400,
    ),
    ("7.31 snake_case alias", "POST", INSERT, {"machine_type": "a3-highgpu-8g"}, None, 403),
    (
        "7.31 both spellings",
        "POST",
        INSERT,
        {"machineType": "n1-standard-8", "machine_type": "a3-highgpu-8g"},
        None,
        400,
    ),
    (
        "7.31 case variant key",
        "POST",
        INSERT,
        {"machineType": "n1-standard-8", "MachineType": "a3-highgpu-8g"},
        None,
        400,
    ),
    ("7.32 escaped key", "POST", INSERT, b'{"\\u006dachineType": "a3-highgpu-8g"}', None, 403),
    ("7.33 BOM", "POST", INSERT, b'\xef\xbb\xbf{"machineType": "a3-highgpu-8g"}', None, 400),
    (
        "7.33 UTF-16 body",
        "POST",
        INSERT,
        '{"machineType": "a3-highgpu-8g"}'.encode("utf-16"),
        None,
        400,
    ),
    (
        "7.33 charset=utf-16",
        "POST",
        INSERT,
        A3,
        {"Content-Type": "application/json; charset=utf-16"},
        400,
    ),
    (
        "7.34 trailing document",
        "POST",
        INSERT,
        b'{"machineType": "n1-standard-8"} {"machineType": "a3-highgpu-8g"}',
        None,
        400,
    ),
    (
        "7.35 NaN",
        "POST",
        INSERT,
        b'{"machineType": "n1-standard-8", "guestAccelerators": [{"acceleratorType": "nvidia-h100-80gb", "acceleratorCount": NaN}]}',
        None,
        400,
    ),
    # 7.41-7.43 HTTP encoding, content type and method tricks
    (
        "7.41 gzip body",
        "POST",
        INSERT,
        gzip.compress(json.dumps(A3).encode()),
        {"Content-Type": "application/json", "Content-Encoding": "gzip"},
        400,
    ),
    (
        "7.41 deflate body",
        "POST",
        INSERT,
        zlib.compress(json.dumps(A3).encode()),
        {"Content-Type": "application/json", "Content-Encoding": "deflate"},
        400,
    ),
    ("7.42 text/plain", "POST", INSERT, A3, {"Content-Type": "text/plain"}, 400),
    ("7.42 json+protobuf", "POST", INSERT, A3, {"Content-Type": "application/json+protobuf"}, 400),
    (
        "7.43 method override",
        "POST",
        f"{INSERT}/vm",
        A3,
        {"Content-Type": "application/json", "X-HTTP-Method-Override": "PUT"},
        400,
    ),
    # 7.44 path tricks
    (
        "7.44 doubled slashes",
        "POST",
        "//compute/v1//projects/my-project/zones/us-central1-a//instances",
        A3,
        None,
        403,
    ),
    (
        "7.44 dot segments",
        "POST",
        "/compute/v1/projects/x/../my-project/./zones/us-central1-a/instances",
        A3,
        None,
        403,
    ),
    (
        "7.44 encoded letter",
        "POST",
        "/compute/v1/projects/my-project/zones/us-central1-a/%69nstances",
        A3,
        None,
        403,
    ),
    ("7.44 trailing slash", "POST", f"{INSERT}/", A3, None, 403),
    ("7.44 ;param", "POST", f"{INSERT};x=1", A3, None, 403),
    (
        "7.44 mixed case",
        "POST",
        "/compute/v1/projects/my-project/zones/us-central1-a/Instances",
        A3,
        None,
        403,
    ),
    (
        "7.44 encoded slash",
        "POST",
        "/compute/v1/projects/my-project/zones/us-central1-a%2Finstances",
        A3,
        None,
        400,
    ),
]


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "status"),
    [b[1:] for b in BYPASSES],
    ids=[b[0] for b in BYPASSES],
)
async def test_bypass_corpus(
    start_gateway: StartGateway,
    method: str,
    path: str,
    body: Any,
    headers: dict[str, str] | None,
    status: int,
) -> None:
    """Each known bypass is refused for a restricted account and never reaches the upstream."""
    gw = await start_gateway(routes=[ROUTE])
    got, problem = await gw.send(method, path, body, headers=headers)
    assert got == status, problem
    assert await gw.stub_requests() == []


async def test_chunked_launch_body_is_judged_whole(start_gateway: StartGateway) -> None:
    """7.39: a chunked launch body is read whole before judging."""
    gw = await start_gateway(routes=[ROUTE])
    data = json.dumps(A3).encode()

    async def chunks() -> Any:
        for i in range(0, len(data), 7):
            yield data[i : i + 7]

    headers = {"Content-Type": "application/json", "X-Account-Id": RESTRICTED}
    async with gw.session.post(f"{gw.url}{INSERT}", data=chunks(), headers=headers) as r:
        assert r.status == 403
        assert (await r.json(content_type=None))["reason"] == "license_required"
    assert await gw.stub_requests() == []


async def test_each_api_version_is_its_own_route(start_gateway: StartGateway) -> None:
    """7.44: /compute/beta is judged when a route mounts it beside /compute/v1."""
    beta = {"dialect": "gcp-compute", "path": "/compute/beta"}
    gw = await start_gateway(routes=[ROUTE, beta])
    path = "/compute/beta/projects/my-project/zones/us-central1-a/instances"
    status, problem = await gw.send("POST", path, A3)
    assert (status, problem["reason"]) == (403, "license_required")
    assert await gw.stub_requests() == []


async def test_batch_envelope_behind_an_opaque_route(start_gateway: StartGateway) -> None:
    """7.12: /batch/compute/v1 (multipart/mixed) is unresolvable behind an ``opaque`` route."""
    pytest.importorskip("launchgate.dialects.opaque")  # another helper's dialect
    # The opaque route's keys are that dialect's; "methods" as CONTRACT section 9 names it.
    opaque = {"dialect": "opaque", "path": "/batch/compute/v1", "methods": ["POST"]}
    gw = await start_gateway(routes=[ROUTE, opaque])
    inner = (
        b"--batch_a1b2\r\nContent-Type: application/http\r\nContent-ID: <item1>\r\n\r\n"
        b"POST /compute/v1/projects/my-project/zones/us-central1-a/instances\r\n"
        b"Content-Type: application/json\r\n\r\n"
        b'{"name":"vm-1","machineType":"zones/us-central1-a/machineTypes/a3-highgpu-8g"}\r\n'
        b"--batch_a1b2--\r\n"
    )
    headers = {"Content-Type": "multipart/mixed; boundary=batch_a1b2"}
    status, problem = await gw.send("POST", "/batch/compute/v1", inner, headers=headers)
    assert (status, problem["reason"]) == (403, "unresolvable_launch")
    assert await gw.stub_requests() == []


async def test_undecodable_gzip_body_is_malformed(start_gateway: StartGateway) -> None:
    """7.41: a launch labelled gzip that is not gzip is 400 malformed, never forwarded."""
    gw = await start_gateway(routes=[ROUTE])
    headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
    status, _ = await gw.send("POST", INSERT, A3, headers=headers)
    assert await gw.stub_requests() == []
    assert status == 400
