"""The ``openstack-nova`` dialect: server create and resize (CONTRACT §9).

Fixtures are Nova's own API samples and wire forms from shared/reference/launch_apis.md §4;
each names its source. End-to-end tests run the gateway in front of the stub with a catalog
that adds example flavors to the shipped one.
"""

from __future__ import annotations

import gzip
import json
import tomllib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from conftest import RESTRICTED, SHIPPED, UNRESTRICTED, Harness, MakeToken, StartGateway
from launchgate.dialects import Item, LaunchRequest
from launchgate.dialects.openstack_nova import OpenstackNova, build
from launchgate.errors import ConfigError
from launchgate.strict import MalformedLaunch

NOVA = build({"region": "RegionOne"}, "routes[0]")
GPU_FLAVOR = "g1.a100x4"  # launch_apis.md §4.1 wire form; 4 x A100 in the test catalog
JSON = "application/json"


def request(
    body: Any,
    path: str = "/v2.1/servers",
    *,
    content_type: str | None = JSON,
    **headers: str,
) -> LaunchRequest:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    h: CIMultiDict[str] = CIMultiDict()
    if content_type is not None:
        h["Content-Type"] = content_type
    h.update(headers)
    return LaunchRequest("POST", path, "", CIMultiDictProxy(h), raw)


def server(**fields: Any) -> dict[str, Any]:
    return {"server": {"name": "train-1", "imageRef": "70a599e0", **fields}}


READS = [
    # openstack/nova doc/api_samples/servers/server-create-req.json
    pytest.param(
        "/v2.1/servers",
        {
            "server": {
                "accessIPv4": "1.2.3.4",
                "accessIPv6": "80fe::",
                "name": "new-server-test",
                "imageRef": "70a599e0-31e7-49b7-b260-868f441e862b",
                "flavorRef": "1",
                "availability_zone": "nova",
                "OS-DCF:diskConfig": "AUTO",
                "metadata": {"My Server Name": "Apache1"},
                "personality": [{"path": "/etc/banner.txt", "contents": "ICAgICAgDQoi"}],
                "security_groups": [{"name": "default"}],
            }
        },
        Item("1", 1),
        id="server-create-req",
    ),
    # openstack/nova doc/api_samples/servers/v2.37/server-create-req.json (flavorRef as a URL)
    pytest.param(
        "/v2.1/servers",
        {
            "server": {
                "name": "auto-allocate-network",
                "imageRef": "70a599e0-31e7-49b7-b260-868f441e862b",
                "flavorRef": "http://openstack.example.com/flavors/1",
                "networks": "auto",
            }
        },
        Item("1", 1),
        id="v2.37-flavor-url",
    ),
    # launch_apis.md §4.1 wire form (adapted)
    pytest.param(
        "/v2.1/servers",
        server(flavorRef=GPU_FLAVOR, availability_zone="gpu-az", networks="auto"),
        Item(GPU_FLAVOR, 1),
        id="wire-form",
    ),
    # openstack/nova doc/api_samples/os-multiple-create/multiple-create-post-req.json
    pytest.param(
        "/v2.1/servers",
        {
            "server": {
                "name": "new-server-test",
                "imageRef": "http://openstack.example.com/openstack/images/70a599e0",
                "flavorRef": "http://openstack.example.com/openstack/flavors/1",
                "metadata": {"My Server Name": "Apache1"},
                "return_reservation_id": "True",
                "min_count": "2",
                "max_count": "3",
            }
        },
        Item("1", 3),
        id="multiple-create-strings",
    ),
    # schema flavor_ref: ['string', 'integer'] (nova/api/validation/parameter_types.py)
    pytest.param("/v2.1/servers", server(flavorRef=42), Item("42", 1), id="integer-flavor"),
    pytest.param("/v2.1/servers", server(flavorRef="7", max_count=5), Item("7", 5), id="max"),
    pytest.param("/v2.1/servers", server(flavorRef="7", min_count=4), Item("7", 4), id="min"),
    # §7 item 15: "0003" matches Nova's ^[0-9]*$ and means 3
    pytest.param("/v2.1/servers", server(flavorRef="7", max_count="0003"), Item("7", 3), id="0003"),
    # common.get_id_from_href: the last segment of the URL's path, query dropped
    pytest.param(
        "/v2.1/servers",
        server(flavorRef="https://nova.example:8774/v2.1/flavors/g1.a100x4?x=1#f"),
        Item(GPU_FLAVOR, 1),
        id="flavor-url-query",
    ),
    # project id in the URL (launch_apis.md §4.0, nova api-ref urls.inc)
    pytest.param(
        "/v2.1/6f70656e737461636b20342065766572/servers",
        server(flavorRef=GPU_FLAVOR),
        Item(GPU_FLAVOR, 1),
        id="project-path",
    ),
    # nova/api/openstack/compute/routes.py: "'/os-volumes_boot' is a clone of '/servers'"
    pytest.param(
        "/v2.1/os-volumes_boot", server(flavorRef=GPU_FLAVOR), Item(GPU_FLAVOR, 1), id="boot"
    ),
    # openstack/nova doc/api_samples/servers/server-action-resize.json
    pytest.param(
        "/v2.1/servers/f5dc173b-6804-445a-a6d8-c705dad5b5eb/action",
        {"resize": {"flavorRef": "2", "OS-DCF:diskConfig": "AUTO"}},
        Item("2", 1),
        id="resize",
    ),
    pytest.param(
        "/v2.1/p1/servers/f5dc173b/action",
        {"resize": {"flavorRef": GPU_FLAVOR}},
        Item(GPU_FLAVOR, 1),
        id="resize-project-path",
    ),
    # Nova's resize takes str(flavorRef) as the flavor id, not the URL's last segment
    pytest.param(
        "/v2.1/servers/x/action",
        {"resize": {"flavorRef": "http://n/flavors/2"}},
        Item("http://n/flavors/2", 1),
        id="resize-url-verbatim",
    ),
]


@pytest.mark.parametrize(("path", "body", "item"), READS)
def test_reads_nova_samples(path: str, body: Any, item: Item) -> None:
    """Nova's samples read as one item: flavor x max(min_count, max_count, 1); region from the route."""
    launch = NOVA.parse(request(body, path))
    assert launch is not None
    assert launch.items == (item,)
    assert launch.region == "RegionOne"
    assert launch.unresolvable is None


@pytest.mark.parametrize(
    "body",
    [
        {"reboot": {"type": "HARD"}},
        {"confirmResize": None},
        {"os-start": None},
        {"unshelve": None},
        {"createBackup": {"name": "b", "backup_type": "daily", "rotation": 1}},
    ],
    ids=["reboot", "confirm-resize", "start", "unshelve", "backup"],
)
def test_other_server_actions_are_not_launches(body: Any) -> None:
    """Only resize among server actions names a flavor; the others parse to None."""
    assert NOVA.parse(request(body, "/v2.1/servers/abc/action")) is None


MALFORMED = [
    # §7 item 30: duplicate keys at any depth
    pytest.param(b'{"server": {"flavorRef": "1", "flavorRef": "g1.a100x4"}}', id="dup-flavor"),
    pytest.param(b'{"server": {"flavorRef": "1"}, "server": {"flavorRef": "2"}}', id="dup-server"),
    pytest.param(
        b'{"server": {"flavorRef": "1", "metadata": {"a": "1", "a": "2"}}}', id="dup-deep"
    ),
    # §7 item 31: keys that differ only in case from the ones read
    pytest.param(server(FlavorRef=GPU_FLAVOR), id="FlavorRef"),
    pytest.param(server(flavorRef="1", flavorref=GPU_FLAVOR), id="flavorref-twin"),
    pytest.param(server(flavorRef="1", MAX_COUNT=5), id="MAX_COUNT"),
    pytest.param({"Server": {"flavorRef": GPU_FLAVOR}}, id="Server"),
    # §7 items 33-35, 38: encodings, trailing data, literals, lenient JSON
    pytest.param(b'\xef\xbb\xbf{"server": {"flavorRef": "1"}}', id="bom"),
    pytest.param('{"server": {"flavorRef": "1"}}'.encode("utf-16"), id="utf16"),
    pytest.param(b'{"server": {"flavorRef": "\xff"}}', id="not-utf8"),
    pytest.param(b'{"server": {"flavorRef": "1"}} {"server": {"flavorRef": "2"}}', id="trailing"),
    pytest.param(b'{"server": {"flavorRef": "1", "max_count": NaN}}', id="nan"),
    pytest.param(b'{"server": {"flavorRef": "1", "max_count": Infinity}}', id="infinity"),
    pytest.param(b"{'server': {'flavorRef': '1'}}", id="single-quotes"),
    pytest.param(b'{"server": {"flavorRef": "1"} /* c */}', id="comment"),
    # §7 item 15 / CONTRACT §9: counts
    pytest.param(server(flavorRef="1", max_count="3.0"), id="count-3.0-string"),
    pytest.param(server(flavorRef="1", max_count=3.0), id="count-float"),
    pytest.param(b'{"server": {"flavorRef": "1", "max_count": 1e3}}', id="count-exponent"),
    pytest.param(server(flavorRef="1", max_count=-1), id="count-negative"),
    pytest.param(server(flavorRef="1", max_count=True), id="count-bool"),
    pytest.param(server(flavorRef="1", max_count=0), id="count-zero"),
    pytest.param(server(flavorRef="1", max_count="0"), id="count-zero-string"),
    pytest.param(server(flavorRef="1", max_count=100001), id="count-huge"),
    pytest.param(server(flavorRef="1", max_count="+3"), id="count-plus"),
    pytest.param(server(flavorRef="1", max_count=" 3"), id="count-space"),
    pytest.param(server(flavorRef="1", max_count=""), id="count-empty"),
    pytest.param(server(flavorRef="1", min_count=None), id="count-null"),
    # flavor references Nova would not take
    pytest.param(server(), id="no-flavor"),
    pytest.param(server(flavorRef=""), id="empty-flavor"),
    pytest.param(server(flavorRef=True), id="bool-flavor"),
    pytest.param(server(flavorRef=None), id="null-flavor"),
    pytest.param(server(flavorRef={"id": "1"}), id="object-flavor"),
    pytest.param(server(flavorRef="http://n/flavors/"), id="url-without-id"),
    pytest.param(server(flavorRef="http://[::1/flavors/1"), id="bad-url"),
    pytest.param({"server": "g1.a100x4"}, id="server-not-object"),
    pytest.param([server(flavorRef="1")], id="array-body"),
]


@pytest.mark.parametrize("body", MALFORMED)
def test_create_bodies_with_no_one_meaning_are_malformed(body: Any) -> None:
    """Duplicate keys, case variants, bad encodings, counts and flavors raise MalformedLaunch."""
    with pytest.raises(MalformedLaunch):
        NOVA.parse(request(body))


@pytest.mark.parametrize(
    "body",
    [
        {"resize": {"flavorRef": "2"}, "reboot": {"type": "SOFT"}},
        {"Resize": {"flavorRef": GPU_FLAVOR}},
        {"resize": {"FlavorRef": GPU_FLAVOR}},
        {"resize": GPU_FLAVOR},
        {"resize": {}},
        {},
    ],
    ids=["two-actions", "Resize", "FlavorRef", "not-object", "no-flavor", "empty"],
)
def test_malformed_actions(body: Any) -> None:
    """An action body must name one action; a resize must name its flavor plainly."""
    with pytest.raises(MalformedLaunch):
        NOVA.parse(request(body, "/v2.1/servers/abc/action"))


@pytest.mark.parametrize(
    ("headers", "content_type"),
    [
        ({"Content-Encoding": "gzip"}, JSON),
        ({}, "text/plain"),
        ({}, "application/json; charset=utf-16"),
        ({}, "application/x-www-form-urlencoded"),
    ],
    ids=["gzip", "text-plain", "utf16-charset", "form"],
)
def test_framing_the_gateway_cannot_read_is_malformed(
    headers: dict[str, str], content_type: str
) -> None:
    """§7 items 41-42: compressed bodies and non-JSON content types are refused."""
    with pytest.raises(MalformedLaunch):
        NOVA.parse(request(server(flavorRef="1"), content_type=content_type, **headers))


def test_no_content_type_is_read_as_json() -> None:
    """A body without Content-Type is still read strictly as JSON."""
    launch = NOVA.parse(request(server(flavorRef="1"), content_type=None))
    assert launch is not None and launch.items == (Item("1", 1),)


@pytest.mark.parametrize(
    ("method", "path", "claimed"),
    [
        ("POST", "/v2.1/servers", True),
        ("POST", "/v2.1/p1/servers", True),
        ("POST", "/v2.1/os-volumes_boot", True),
        ("POST", "/v2.1/servers/abc/action", True),
        ("POST", "/v2.1/p1/servers/abc/action", True),
        ("POST", "/v2.1/p1/os-volumes_boot/abc/action", True),
        ("GET", "/v2.1/servers", False),
        ("PUT", "/v2.1/servers/abc", False),
        ("POST", "/v2.1/servers/abc", False),
        ("POST", "/v2.1/servers/detail", False),
        ("POST", "/v2.1/a/b/servers", False),
        ("POST", "/v2.1/flavors", False),
        ("POST", "/v2.1", False),
        ("POST", "/v2.10/servers", False),
        ("POST", "/servers", False),
    ],
)
def test_claims_create_and_action_calls(method: str, path: str, claimed: bool) -> None:
    """The route claims POST creates and server actions under its path, nothing else."""
    assert NOVA.claims(method, path) is claimed


def _headers(**fields: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({k.replace("_", "-"): v for k, v in fields.items()}))


DEEP = build({"path": "/compute/v2.1"}, "routes[0]")


@pytest.mark.parametrize(
    ("dialect", "method", "path", "headers", "claimed"),
    [
        # Nova's URL map: a path naming no version goes to the API the header's version names.
        (NOVA, "POST", "/servers", _headers(Content_Type="application/json; version=2.1"), True),
        (NOVA, "POST", "/servers", _headers(Content_Type="application/json;version=2.1/x"), True),
        (NOVA, "POST", "/servers", _headers(Accept="application/json;q=0.8;VERSION = 2"), True),
        (
            NOVA,
            "POST",
            "/p1/servers",
            _headers(Content_Type='application/json; version="2.1"'),
            True,
        ),
        (NOVA, "POST", "/servers/abc/action", _headers(Accept="*/*; version=2.1"), True),
        (NOVA, "POST", "/v3/servers", _headers(Content_Type="application/json; version=2"), True),
        (
            DEEP,
            "POST",
            "/compute/servers",
            _headers(Content_Type="application/json;version=2.1"),
            True,
        ),
        # Not a launch there, not POST, no version named, or outside the mount's parent.
        (NOVA, "POST", "/flavors", _headers(Content_Type="application/json; version=2.1"), False),
        (
            NOVA,
            "POST",
            "/a/b/servers",
            _headers(Content_Type="application/json;version=2.1"),
            False,
        ),
        (NOVA, "GET", "/servers", _headers(Accept="application/json; version=2.1"), False),
        (NOVA, "POST", "/servers", _headers(Content_Type="application/json"), False),
        (DEEP, "POST", "/servers", _headers(Content_Type="application/json; version=2.1"), False),
        (
            DEEP,
            "POST",
            "/other/servers",
            _headers(Content_Type="application/json;version=2"),
            False,
        ),
        (build({"path": "/"}, "r"), "POST", "/x/servers", _headers(Accept="a/b;version=2"), False),
    ],
)
def test_claimed_by_a_version_header(
    dialect: OpenstackNova,
    method: str,
    path: str,
    headers: CIMultiDictProxy[str],
    claimed: bool,
) -> None:
    """A request no Nova route claims by its path, which a version parameter of its
    Content-Type or Accept would make a launch under the mount, is named (then malformed)."""
    reason = dialect.claimed_by_header(method, path, headers)
    assert (reason is not None) is claimed
    if claimed:
        assert reason is not None and f"under {dialect.path}" in reason


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"methods": ["POST"]}, r"routes\[2\]: unknown key 'methods'"),
        ({"path": "/v2.1/"}, r"routes\[2\]\.path"),
        ({"path": "/v2.1/%2e%2e"}, r"routes\[2\]\.path"),
        ({"region": 1}, r"routes\[2\]\.region"),
    ],
)
def test_build_rejects_bad_route_keys(table: dict[str, Any], message: str) -> None:
    """ConfigError names the route and the key at fault."""
    with pytest.raises(ConfigError, match=message):
        build(table, "routes[2]")


def test_build_defaults() -> None:
    """The default route is mounted at /v2.1, POST only, with no region."""
    assert build({}, "r") == OpenstackNova(path="/v2.1", region=None)
    assert NOVA.methods == {"POST"} and NOVA.name == "openstack-nova"


# --- end to end: the gateway in front of the stub ---------------------------------------------

ROUTE = {"dialect": "openstack-nova", "region": "RegionOne"}
# Example flavors for the test catalog: Nova flavors are named by the provider (§7 item 14).
FLAVORS = {
    GPU_FLAVOR: {"accelerator": "A100-SXM4-80GB", "accelerators_per_instance": 4},
    "1": {},
    "2": {},
}


@pytest.fixture
def nova_catalog(tmp_path: Path) -> Path:
    """The shipped catalog plus the example flavors it does not already define."""
    text = (SHIPPED / "catalog.toml").read_text()
    known = tomllib.loads(text).get("skus", {})
    lines = [text]
    for name, entry in FLAVORS.items():
        if name not in known:
            lines.append(f"[skus.{json.dumps(name)}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in entry.items()]
    path = tmp_path / "nova-catalog.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


async def start(start_gateway: StartGateway, catalog: Path) -> Harness:
    return await start_gateway(routes=[ROUTE], catalog={"file": str(catalog)})


async def nova_call(
    gw: Harness,
    body: Any,
    path: str = "/v2.1/servers",
    *,
    account: str | None = RESTRICTED,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    chunked: bool = False,
) -> tuple[int, bytes, Any]:
    """POST one raw Nova call (path and body bytes exactly as given)."""
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    h = {"Content-Type": JSON, "X-Auth-Token": "gAAAAABl-example", **(headers or {})}
    if account is not None:
        h["X-Account-Id"] = account
    if token is not None:
        h["License-Token"] = token
    data: Any = raw
    if chunked:

        async def pieces() -> AsyncIterator[bytes]:
            for i in range(0, len(raw), 5):
                yield raw[i : i + 5]

        data = pieces()
    url = URL(f"{gw.url}{path}", encoded=True)
    async with gw.session.post(url, data=data, headers=h) as r:
        return r.status, await r.read(), r.headers


async def test_unrestricted_account_creates_a_server(
    start_gateway: StartGateway, nova_catalog: Path
) -> None:
    """Allowed: Nova's 202 with server id, links and adminPass comes back through the gateway."""
    gw = await start(start_gateway, nova_catalog)
    status, raw, headers = await nova_call(
        gw, server(flavorRef=GPU_FLAVOR, max_count=2), account=UNRESTRICTED
    )
    assert status == 202, raw
    created = json.loads(raw)["server"]
    assert created["id"] and created["adminPass"] and created["links"][0]["rel"] == "self"
    assert headers["Location"] == created["links"][0]["href"]
    decision = gw.decisions()[-1]
    assert (decision["reason"], decision["sku"], decision["count"]) == (
        "account_not_restricted",
        GPU_FLAVOR,
        2,
    )
    assert decision["accelerators"] == 8 and decision["region"] == "RegionOne"


async def test_restricted_account_without_token_is_denied(
    start_gateway: StartGateway, nova_catalog: Path
) -> None:
    """Denied: a GPU flavor needs a license; nothing reaches the stub."""
    gw = await start(start_gateway, nova_catalog)
    status, raw, _ = await nova_call(gw, server(flavorRef=GPU_FLAVOR))
    assert status == 403
    assert json.loads(raw)["reason"] == "license_required"
    assert await gw.stub_requests() == []


async def test_licensed_create_and_resize(
    start_gateway: StartGateway, nova_catalog: Path, make_token: MakeToken
) -> None:
    """Licensed: 3 servers of 4 GPUs then a resize to the GPU flavor use 12 + 4 accelerators."""
    gw = await start(start_gateway, nova_catalog)
    token = make_token(jti="lic-nova", skus=[GPU_FLAVOR], regions=["RegionOne"])
    body = server(flavorRef=f"http://openstack.example.com/flavors/{GPU_FLAVOR}", max_count="3")
    status, raw, _ = await nova_call(gw, body, token=token)
    assert status == 202, raw
    status, raw, _ = await nova_call(
        gw, {"resize": {"flavorRef": GPU_FLAVOR}}, "/v2.1/servers/abc/action", token=token
    )
    assert (status, raw) == (202, b"")
    state = await gw.license("lic-nova")
    assert state is not None and state.used == 16
    assert [d["reason"] for d in gw.decisions()] == ["licensed", "licensed"]


async def test_other_actions_pass_unjudged(start_gateway: StartGateway, nova_catalog: Path) -> None:
    """A reboot from a restricted account is forwarded, with no decision recorded."""
    gw = await start(start_gateway, nova_catalog)
    status, _, _ = await nova_call(gw, {"reboot": {"type": "HARD"}}, "/v2.1/servers/abc/action")
    assert status == 202
    assert gw.decisions() == []
    assert len(await gw.stub_requests()) == 1


async def test_cpu_flavor_passes_for_restricted(
    start_gateway: StartGateway, nova_catalog: Path
) -> None:
    """A flavor without an accelerator needs no license."""
    gw = await start(start_gateway, nova_catalog)
    status, _, _ = await nova_call(gw, server(flavorRef="1"))
    assert status == 202
    assert gw.decisions()[-1]["reason"] == "sku_not_controlled"


GPU = f'"flavorRef": "{GPU_FLAVOR}"'


def bypass(case_id: str, reason: str, body: Any, **options: Any) -> Any:
    """One corpus entry; the id starts with its item number in reference §7."""
    return pytest.param(body, options, reason, id=case_id)


BYPASSES = [
    bypass("06-resize", "license_required", {"resize": {"flavorRef": GPU_FLAVOR}}, path="/v2.1/servers/abc/action"),
    bypass("06-resize-boot-clone", "license_required", {"resize": {"flavorRef": GPU_FLAVOR}}, path="/v2.1/os-volumes_boot/abc/action"),
    bypass("14-unknown-flavor", "unknown_sku", server(flavorRef="gpu-secret")),
    bypass("15-string-count", "license_required", server(flavorRef=GPU_FLAVOR, min_count="1", max_count="0003")),
    bypass("15-float-string-count", "malformed_request", server(flavorRef=GPU_FLAVOR, max_count="3.0")),
    bypass("30-duplicate-key", "malformed_request", f'{{"server": {{"flavorRef": "1", {GPU}}}}}'.encode()),
    bypass("31-case-variant", "malformed_request", server(flavorRef="1", FlavorRef=GPU_FLAVOR)),
    bypass("32-escaped-key", "license_required", b'{"server": {"\\u0066lavorRef": "g1.a100x4"}}'),
    bypass("33-bom", "malformed_request", b"\xef\xbb\xbf" + json.dumps(server(flavorRef=GPU_FLAVOR)).encode()),
    bypass("33-utf16", "malformed_request", json.dumps(server(flavorRef=GPU_FLAVOR)).encode("utf-16-le")),
    bypass("33-utf16-charset", "malformed_request", server(flavorRef=GPU_FLAVOR), headers={"Content-Type": "application/json; charset=utf-16"}),
    bypass("34-trailing", "malformed_request", f'{{"server": {{"flavorRef": "1"}}}} {{"server": {{{GPU}}}}}'.encode()),
    bypass("35-nan", "malformed_request", f'{{"server": {{{GPU}, "max_count": NaN}}}}'.encode()),
    bypass("35-exponent", "malformed_request", f'{{"server": {{{GPU}, "max_count": 1e3}}}}'.encode()),
    bypass("35-negative-zero", "malformed_request", f'{{"server": {{{GPU}, "max_count": -0}}}}'.encode()),
    bypass("38-comment", "malformed_request", f'{{"server": {{{GPU}}} // x\n}}'.encode()),
    bypass("39-chunked", "license_required", server(flavorRef=GPU_FLAVOR), chunked=True),
    bypass("41-gzip", "malformed_request", gzip.compress(json.dumps(server(flavorRef=GPU_FLAVOR)).encode()), headers={"Content-Encoding": "gzip"}),
    bypass("42-text-plain", "malformed_request", server(flavorRef=GPU_FLAVOR), headers={"Content-Type": "text/plain"}),
    bypass("43-method-override", "malformed_request", server(flavorRef=GPU_FLAVOR), headers={"X-HTTP-Method-Override": "GET"}),
    bypass("44-double-slash", "license_required", server(flavorRef=GPU_FLAVOR), path="/v2.1//servers"),
    bypass("44-dot-segments", "license_required", server(flavorRef=GPU_FLAVOR), path="/v2.1/./x/../servers"),
    bypass("44-encoded-letter", "license_required", server(flavorRef=GPU_FLAVOR), path="/v2.1/%73ervers"),
    bypass("44-trailing-slash", "license_required", server(flavorRef=GPU_FLAVOR), path="/v2.1/servers/"),
    bypass("44-project-id", "license_required", server(flavorRef=GPU_FLAVOR), path="/v2.1/p1/servers"),
    bypass("44-boot-clone", "license_required", server(flavorRef=GPU_FLAVOR), path="/v2.1/os-volumes_boot"),
    bypass("nova-urlmap-content-type-version", "malformed_request", server(flavorRef=GPU_FLAVOR, max_count=5), path="/servers", headers={"Content-Type": "application/json; version=2.1/x"}),
    bypass("nova-urlmap-accept-version", "malformed_request", server(flavorRef=GPU_FLAVOR, max_count=5), path="/servers", headers={"Accept": "application/json;version=2.1/x"}),
    bypass("nova-urlmap-project-id", "malformed_request", server(flavorRef=GPU_FLAVOR), path="/0123abcd/servers", headers={"Content-Type": "application/json; Version=2"}),
    bypass("nova-urlmap-underscore-content-type", "malformed_request", server(flavorRef=GPU_FLAVOR, max_count=5), path="/servers", headers={"Content_Type": "application/json; version=2.1/x"}),
    bypass("nova-urlmap-resize", "malformed_request", {"resize": {"flavorRef": GPU_FLAVOR}}, path="/servers/abc/action", headers={"Content-Type": "application/json; version=2.1"}),
    bypass("action-two-keys", "malformed_request", {"resize": {"flavorRef": GPU_FLAVOR}, "reboot": {}}, path="/v2.1/servers/abc/action"),
]  # fmt: skip


@pytest.mark.parametrize(("body", "options", "reason"), BYPASSES)
async def test_bypass_corpus_never_reaches_the_upstream(
    start_gateway: StartGateway,
    nova_catalog: Path,
    body: Any,
    options: dict[str, Any],
    reason: str,
) -> None:
    """Every Nova bypass of reference §7 gets its 4xx for a restricted account; the stub sees
    nothing."""
    gw = await start(start_gateway, nova_catalog)
    status, raw, _ = await nova_call(gw, body, **options)
    assert 400 <= status < 500, raw
    assert json.loads(raw)["reason"] == reason
    assert await gw.stub_requests() == []


async def test_a_launch_by_a_version_header_is_recorded_malformed(
    start_gateway: StartGateway, nova_catalog: Path, make_token: MakeToken
) -> None:
    """``POST /servers`` that Nova's URL map would send to the v2.1 API by its Content-Type's
    version (found in review: 5 GPU servers created on the stub, no record): 400, recorded as a
    launch decision on its path, nothing forwarded, even with a license that covers it; the
    same call on its versioned path is licensed."""
    gw = await start(start_gateway, nova_catalog)
    token = make_token(jti="lic-nova", skus=[GPU_FLAVOR], regions=["RegionOne"])
    versioned = {"Content-Type": "application/json; version=2.1/x"}
    body = server(flavorRef=GPU_FLAVOR, max_count=5)
    status, raw, _ = await nova_call(gw, body, "/servers", token=token, headers=versioned)
    assert status == 400, raw
    assert json.loads(raw)["reason"] == "malformed_request"
    [decision] = gw.decisions()
    assert (decision["reason"], decision["path"]) == ("malformed_request", "/servers")
    assert "version parameter" in decision["detail"]
    assert await gw.stub_requests() == []
    status, raw, _ = await nova_call(gw, body, token=token, headers=versioned)
    assert status == 202, raw
    assert gw.decisions()[-1]["reason"] == "licensed"


async def test_calls_a_version_header_does_not_make_launches_pass(
    start_gateway: StartGateway, nova_catalog: Path
) -> None:
    """A GET, or a POST that is no launch under the mount, goes on unjudged with its version
    parameter, as any request no route claims."""
    gw = await start(start_gateway, nova_catalog)
    accept = {"Accept": "application/json; version=2.1"}
    async with gw.session.get(f"{gw.url}/servers", headers=accept) as r:
        assert r.status < 500
    status, _, _ = await nova_call(gw, {"flavor": {"name": "x"}}, "/flavors", headers=accept)
    assert status < 500
    assert gw.decisions() == []
    assert len(await gw.stub_requests()) == 2


async def test_a_put_routed_as_a_post_by_a_method_parameter_is_refused(
    start_gateway: StartGateway, nova_catalog: Path
) -> None:
    """Nova's router (the routes library's middleware) routes by a ``_method`` query parameter
    (found in review: ``PUT /v2.1/servers?_method=POST`` created servers, unjudged): 400."""
    gw = await start(start_gateway, nova_catalog)
    for path in ("/v2.1/servers?_method=POST", "/v2.1/servers/abc/action?_method=post"):
        body = json.dumps(server(flavorRef=GPU_FLAVOR, max_count=5)).encode()
        headers = {"Content-Type": JSON, "X-Account-Id": RESTRICTED}
        async with gw.session.put(f"{gw.url}{path}", data=body, headers=headers) as r:
            assert r.status == 400
            assert (await r.json(content_type=None))["reason"] == "malformed_request"
    assert await gw.stub_requests() == []
