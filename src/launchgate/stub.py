"""A stand-in instance-launch API for integration tests and demos (CONTRACT section 7).

Routes:

- ``POST /v1/instances`` launches ``count`` (default 1, at most 100,000, as the gateway
  passes) instances of the body's ``instance_type`` in its ``region``; 201
  ``{"instances": [...]}``, one per count. The providers' APIs below answer at most 1000.
- ``GET /v1/instances`` lists everything launched so far.
- ``GET /_stub/requests`` lists every request received (except these listings).
- With ``keep_last`` (``stub-backend --keep-last N``, as the benchmark runs it) both
  lists hold only the last N.
- ``DELETE /_stub/requests`` or ``POST /_stub/reset`` forget requests, instances and
  failure modes.
- ``POST /_stub/fail`` with ``{"status": 500, "times": 3}`` and/or ``{"delay_s": 2}``:
  the next ``times`` requests to paths outside ``/_stub`` (every one until reset when
  ``times`` is omitted) sleep ``delay_s`` and then answer ``status`` with
  ``{"error": "injected failure"}``. Each call replaces the previous failure mode.
- ``POST /_stub/echo`` streams the request body back, chunk by chunk.
- ``GET /_stub/bytes?n=N`` streams N bytes of the pattern ``i % 256``.
- the providers' own launch APIs, each answering with its own success shape
  (reference launch_apis.md), at any path prefix:

  - EC2 Query (GET or POST, any path, an ``Action`` parameter): 200 ``text/xml``
    ``<{Action}Response>``; ``RunInstances`` lists ``MaxCount`` instances, and a repeat of
    one with its ``ClientToken`` launches nothing and answers as the first did (EC2's
    idempotency);
  - Compute Engine (POST ``…/projects/{p}/zones/{z}/instances``, ``…/bulkInsert``,
    ``…/instances/{i}/setMachineType|setMachineResources``, ``…/instanceTemplates``):
    200 ``compute#operation``; a repeat of a launch with its ``requestId`` launches
    nothing and answers the first one's operation (Compute Engine's idempotency);
  - Azure Resource Manager (PUT/PATCH ``…/providers/Microsoft.Compute/virtualMachines/{vm}``
    or ``…/virtualMachineScaleSets/{name}``): the resource echoed with ``id`` and
    ``provisioningState``, 201 for PUT, 200 for PATCH;
  - Nova (POST ``…/servers``): 202 ``{"server": {"id", "links", "adminPass", …}}``;
    POST ``…/servers/{id}/action``: 202, empty.

- anything else: 404 ``{"error": "not found", "path": ...}``.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import re
import secrets
import signal
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit
from xml.sax.saxutils import escape

from aiohttp import web

from launchgate.strict import MAX_COUNT

MAX_INSTANCES_PER_LAUNCH: Final = 1000
BODY_PREVIEW_BYTES: Final = 64 * 1024
KEEP_BYTES: Final = 16 * 1024 * 1024  # the most of a body the stub keeps to parse
_CHUNK_BYTES: Final = 64 * 1024
_PATTERN_BLOCK: Final = bytes(range(256)) * (_CHUNK_BYTES // 256)
_MAX_DELAY_S: Final = 3600.0
_FAIL_KEYS: Final = frozenset({"status", "times", "delay_s"})


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as the stub received it; ``body`` is a UTF-8 preview of the first 64 KiB."""

    method: str
    path: str
    query: str
    headers: tuple[tuple[str, str], ...]
    body: str
    body_length: int
    body_sha256: str

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "path": self.path,
            "query": self.query,
            "headers": _header_object(self.headers),
            "raw_headers": [list(pair) for pair in self.headers],
            "body": self.body,
            "body_length": self.body_length,
            "body_sha256": self.body_sha256,
        }


def _header_object(pairs: tuple[tuple[str, str], ...]) -> dict[str, str]:
    """Headers as one JSON object: names in their usual spelling (``X-Account-Id``, whatever
    case they came in), repeated fields joined with ", " in order (RFC 9110 section 5.3);
    ``raw_headers`` keeps every field line as it came."""
    merged: dict[str, str] = {}
    for name, value in pairs:
        key = "-".join(part.capitalize() for part in name.split("-"))
        merged[key] = f"{merged[key]}, {value}" if key in merged else value
    return merged


@dataclass(frozen=True, slots=True)
class Instance:
    """A launched instance; ``instance_type`` and ``region`` are echoed from the request."""

    id: str
    instance_type: Any
    region: Any

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "instance_type": self.instance_type, "region": self.region}


@dataclass(frozen=True, slots=True)
class FailureMode:
    """What the next matching requests suffer; ``times`` None means until reset."""

    status: int | None
    delay_s: float
    times: int | None


@dataclass(slots=True)
class StubState:
    """Everything the stub remembers between requests; one per app. Every request and
    instance, or only the last ``keep_last`` of each (a benchmark's load would otherwise
    grow the heap, and the collector's pauses, without end)."""

    requests: deque[RecordedRequest]
    instances: deque[Instance]
    failure: FailureMode | None = None
    # A launch's answer by its client token (EC2's ClientToken, Compute Engine's requestId), as
    # the provider keeps it: a repeat launches nothing and gets the first answer again. The
    # gateway sends a retry of a launch it counted on to an upstream that deduplicates (found
    # by QA: the stub launched each repeat, so "launched <= licensed" could not be checked).
    answers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def keeping(cls, keep_last: int | None) -> StubState:
        return cls(deque(maxlen=keep_last), deque(maxlen=keep_last))

    def reset(self) -> None:
        self.requests.clear()
        self.instances.clear()
        self.failure = None
        self.answers.clear()

    def answer_once(self, token: str | None, answer: Callable[[], str]) -> str:
        """``answer()``, or, for a ``token`` seen before, what it gave then (the oldest
        forgotten past ``_MAX_ANSWERS``)."""
        if token is None:
            return answer()
        if token not in self.answers:
            if len(self.answers) >= _MAX_ANSWERS:
                del self.answers[next(iter(self.answers))]
            self.answers[token] = answer()
        return self.answers[token]

    def take_failure(self) -> FailureMode | None:
        """The failure mode for one request, counting it against ``times``."""
        failure = self.failure
        if failure is not None and failure.times is not None:
            remaining = failure.times - 1
            self.failure = (
                FailureMode(failure.status, failure.delay_s, remaining) if remaining else None
            )
        return failure


_MAX_ANSWERS: Final = 100_000
STUB_STATE_KEY: Final = web.AppKey("stub_state", StubState)


class _BodyTap:
    """Hashes and measures a body as it streams past, keeping a bounded preview.

    With ``keep_all`` it also keeps the whole body for the route to parse, up to
    ``KEEP_BYTES``; a larger body is measured and hashed but not kept.
    """

    def __init__(self, *, keep_all: bool) -> None:
        self._sha = hashlib.sha256()
        self._preview = bytearray()
        self._kept = bytearray() if keep_all else None
        self._overflow = False
        self.length = 0

    def feed(self, chunk: bytes) -> None:
        self._sha.update(chunk)
        self.length += len(chunk)
        if len(self._preview) < BODY_PREVIEW_BYTES:
            self._preview += chunk[: BODY_PREVIEW_BYTES - len(self._preview)]
        if self._kept is not None:
            self._kept += chunk
            if len(self._kept) > KEEP_BYTES:
                self._kept, self._overflow = None, True

    @property
    def body(self) -> bytes:
        if self._overflow:
            raise _json_error(web.HTTPBadRequest, f"body over {KEEP_BYTES} bytes")
        if self._kept is None:
            raise RuntimeError("this body was not kept")
        return bytes(self._kept)

    def record(self, request: web.Request) -> RecordedRequest:
        path, _, query = request.raw_path.partition("?")
        return RecordedRequest(
            method=request.method,
            path=path,
            query=query,
            headers=tuple((_text(name), _text(value)) for name, value in request.raw_headers),
            # A multi-byte character cut at the preview's edge becomes U+FFFD: fine for a preview.
            body=self._preview.decode("utf-8", errors="replace"),
            body_length=self.length,
            body_sha256=self._sha.hexdigest(),
        )


_BODY_KEY: Final = web.RequestKey("stub_body", _BodyTap)


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", errors="replace")


def _json_error(cls: type[web.HTTPError], message: str, **extra: Any) -> web.HTTPError:
    return cls(text=json.dumps({"error": message, **extra}), content_type="application/json")


def _json_object(request: web.Request) -> dict[str, Any]:
    """The request body as a JSON object; raises 400 for anything else."""
    try:
        value = json.loads(request[_BODY_KEY].body)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError alike
        raise _json_error(web.HTTPBadRequest, f"body is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise _json_error(web.HTTPBadRequest, "body must be a JSON object")
    return value


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


async def _launch(request: web.Request) -> web.Response:
    body = _json_object(request)
    count = body.get("count", 1)
    if not _is_int(count) or count < 1:
        raise _json_error(web.HTTPBadRequest, "count must be a positive integer")
    # One per count (CONTRACT section 7; found by QA: 1001 answered 1000), up to the most the
    # gateway passes; past it 400, never fewer than asked.
    if count > MAX_COUNT:
        raise _json_error(web.HTTPBadRequest, f"count must be at most {MAX_COUNT}")
    launched = [
        # 17 hex digits, like EC2 ids.
        Instance(f"i-{secrets.token_hex(9)[:17]}", body.get("instance_type"), body.get("region"))
        for _ in range(count)
    ]
    request.app[STUB_STATE_KEY].instances.extend(launched)
    return web.json_response({"instances": [i.to_json() for i in launched]}, status=201)


async def _list_instances(request: web.Request) -> web.Response:
    instances = request.app[STUB_STATE_KEY].instances
    return web.json_response({"instances": [i.to_json() for i in instances]})


async def _list_requests(request: web.Request) -> web.Response:
    records = request.app[STUB_STATE_KEY].requests
    return web.json_response({"requests": [r.to_json() for r in records]})


async def _reset(request: web.Request) -> web.Response:
    request.app[STUB_STATE_KEY].reset()
    return web.json_response({"reset": True})


def _parse_failure(body: dict[str, Any]) -> FailureMode:
    """A validated failure mode; raises 400 naming the key at fault."""
    unknown = sorted(set(body) - _FAIL_KEYS)
    if unknown:
        raise _json_error(web.HTTPBadRequest, f"unknown keys: {', '.join(unknown)}")
    if "status" not in body and "delay_s" not in body:
        raise _json_error(web.HTTPBadRequest, "give status, delay_s or both")
    status = body.get("status")
    if status is not None and not (_is_int(status) and 400 <= status <= 599):
        raise _json_error(web.HTTPBadRequest, "status must be an integer from 400 to 599")
    delay_s = body.get("delay_s", 0)
    if (
        not isinstance(delay_s, int | float)
        or isinstance(delay_s, bool)
        or not math.isfinite(delay_s)
        or not 0 <= delay_s <= _MAX_DELAY_S
    ):
        raise _json_error(web.HTTPBadRequest, f"delay_s must be a number from 0 to {_MAX_DELAY_S}")
    times = body.get("times")
    if times is not None and not (_is_int(times) and times >= 1):
        raise _json_error(web.HTTPBadRequest, "times must be a positive integer")
    return FailureMode(status=status, delay_s=float(delay_s), times=times)


async def _set_failure(request: web.Request) -> web.Response:
    failure = _parse_failure(_json_object(request))
    request.app[STUB_STATE_KEY].failure = failure
    return web.json_response(
        {"status": failure.status, "delay_s": failure.delay_s, "times": failure.times}
    )


async def _echo(request: web.Request) -> web.StreamResponse:
    tap = _BodyTap(keep_all=False)
    try:
        response = web.StreamResponse()
        response.headers["Content-Type"] = request.headers.get(
            "Content-Type", "application/octet-stream"
        )
        response.enable_chunked_encoding()
        await response.prepare(request)
        async for chunk in request.content.iter_chunked(_CHUNK_BYTES):
            tap.feed(chunk)
            await response.write(chunk)
        await response.write_eof()
        return response
    finally:
        # Recorded once the body has streamed through, even when the client gave up.
        request.app[STUB_STATE_KEY].requests.append(tap.record(request))


async def _bytes(request: web.Request) -> web.StreamResponse:
    raw = request.query.get("n", "")
    if not (raw.isascii() and raw.isdigit()):
        raise _json_error(web.HTTPBadRequest, "n must be a non-negative integer")
    remaining = int(raw)
    response = web.StreamResponse()
    response.content_type = "application/octet-stream"
    response.content_length = remaining
    await response.prepare(request)
    if request.method == "HEAD":  # the length is announced, the body never sent
        remaining = 0
    while remaining:
        # _PATTERN_BLOCK is a whole number of 256-byte periods, so every chunk starts at 0.
        chunk = _PATTERN_BLOCK[: min(remaining, _CHUNK_BYTES)]
        await response.write(chunk)
        remaining -= len(chunk)
    await response.write_eof()
    return response


# --- The providers' own launch APIs (reference launch_apis.md §1-§4) -------------------------

_EC2_XMLNS: Final = "http://ec2.amazonaws.com/doc/2016-11-15/"
_EC2_ACTION = re.compile(r"[A-Za-z][A-Za-z0-9]{0,127}")
_GCE = re.compile(
    r"(?P<base>.*)/projects/(?P<project>[^/]+)/(?:"
    r"(?P<scope>zones|regions)/(?P<location>[^/]+)/(?:"
    r"instances(?:/(?P<bulk>bulkInsert)|/(?P<instance>[^/]+)/(?P<verb>setMachineType|setMachineResources))?"
    r"|(?P<regional_template>instanceTemplates))"
    r"|global/(?P<template>instanceTemplates))"
)
_ARM = re.compile(
    r".*/subscriptions/[^/]+/resourceGroups/[^/]+/providers/Microsoft\.Compute/"
    r"(?P<kind>virtualMachines|virtualMachineScaleSets)/(?P<name>[^/]+)",
    re.IGNORECASE,
)
_NOVA = re.compile(r"(?P<base>.*)/(?:servers|os-volumes_boot)(?:/(?P<server>[^/]+)/action)?")


def _ec2_params(request: web.Request) -> dict[str, str]:
    """The Query parameters, read as a lenient server would (the last of a repeat wins)."""
    params = dict(parse_qsl(request.query_string, keep_blank_values=True))
    if request.method == "POST" and request.content_type == "application/x-www-form-urlencoded":
        body = request[_BODY_KEY].body.decode("utf-8", errors="replace")
        params.update(parse_qsl(body, keep_blank_values=True))
    return params


def _xml(text: str, status: int = 200) -> web.Response:
    return web.Response(
        text='<?xml version="1.0" encoding="UTF-8"?>\n' + text,
        status=status,
        content_type="text/xml",
        charset="UTF-8",
    )


def _how_many(value: object) -> int:
    """A count as a lenient server reads one (digits or an integer), 1 otherwise, capped."""
    text = str(value) if isinstance(value, int | str) and not isinstance(value, bool) else ""
    if not (text.isascii() and text.isdigit() and len(text) <= 7):
        return 1
    return max(1, min(int(text), MAX_INSTANCES_PER_LAUNCH))


def _ec2_body(request: web.Request, action: str, params: dict[str, str]) -> str:
    """The inner elements of ``<{action}Response>`` for the launch Actions."""
    if action == "RunInstances":
        itype = params.get("InstanceType", "m1.small")
        zone = params.get("Placement.AvailabilityZone", "us-east-1a")
        launched = [
            Instance(f"i-{secrets.token_hex(9)[:17]}", itype, zone[:-1] or None)
            for _ in range(_how_many(params.get("MaxCount", 1)))
        ]
        request.app[STUB_STATE_KEY].instances.extend(launched)
        items = "".join(
            f"<item><instanceId>{i.id}</instanceId>"
            f"<imageId>{escape(params.get('ImageId', ''))}</imageId>"
            "<instanceState><code>0</code><name>pending</name></instanceState>"
            f"<instanceType>{escape(itype)}</instanceType>"
            f"<placement><availabilityZone>{escape(zone)}</availabilityZone></placement></item>"
            for i in launched
        )
        return (
            f"<reservationId>r-{secrets.token_hex(9)[:17]}</reservationId>"
            "<ownerId>123456789012</ownerId><groupSet/>"
            f"<instancesSet>{items}</instancesSet>"
        )
    if action == "RequestSpotInstances":
        itype = escape(params.get("LaunchSpecification.InstanceType", ""))
        items = "".join(
            f"<item><spotInstanceRequestId>sir-{secrets.token_hex(4)}</spotInstanceRequestId>"
            "<state>open</state>"
            f"<launchSpecification><instanceType>{itype}</instanceType></launchSpecification></item>"
            for _ in range(_how_many(params.get("InstanceCount", 1)))
        )
        return f"<spotInstanceRequestSet>{items}</spotInstanceRequestSet>"
    if action == "CreateFleet":
        return f"<fleetId>fleet-{uuid.uuid4()}</fleetId><errorSet/><fleetInstanceSet/>"
    if action == "RequestSpotFleet":
        return f"<spotFleetRequestId>sfr-{uuid.uuid4()}</spotFleetRequestId>"
    if action in ("CreateLaunchTemplate", "CreateLaunchTemplateVersion"):
        template = params.get("LaunchTemplateId", f"lt-{secrets.token_hex(9)[:17]}")
        name = escape(params.get("LaunchTemplateName", "stub"))
        return (
            f"<launchTemplate><launchTemplateId>{escape(template)}</launchTemplateId>"
            f"<launchTemplateName>{name}</launchTemplateName>"
            "<defaultVersionNumber>1</defaultVersionNumber>"
            "<latestVersionNumber>1</latestVersionNumber></launchTemplate>"
        )
    return "<return>true</return>"


def _ec2(request: web.Request) -> web.Response | None:
    params = _ec2_params(request)
    action = params.get("Action")
    if action is None:
        return None
    request_id = uuid.uuid4()
    if not _EC2_ACTION.fullmatch(action):
        return _xml(
            "<Response><Errors><Error><Code>InvalidAction</Code>"
            "<Message>The action is not valid for this web service.</Message></Error></Errors>"
            f"<RequestID>{request_id}</RequestID></Response>",
            status=400,
        )
    token = params.get("ClientToken") if action == "RunInstances" else None
    inner = request.app[STUB_STATE_KEY].answer_once(
        None if token is None else f"ec2:{token}", lambda: _ec2_body(request, action, params)
    )
    return _xml(
        f'<{action}Response xmlns="{_EC2_XMLNS}">'
        f"<requestId>{request_id}</requestId>{inner}</{action}Response>"
    )


def _flavor_id(value: Any) -> Any:
    """A flavorRef as Nova reads it (``common.get_id_from_href``): the last segment of the
    reference's path, its query aside. Found by QA: "1?x=/g1.h100x8" launched g1.h100x8 here,
    where Nova (and the gateway) read flavor 1."""
    return urlsplit(value).path.rsplit("/", 1)[-1] if isinstance(value, str) else value


def _last_segment(value: Any) -> Any:
    return value.rsplit("/", 1)[-1] if isinstance(value, str) else value


def _gce(request: web.Request) -> web.Response | None:
    match = _GCE.fullmatch(request.path)
    if request.method != "POST" or match is None:
        return None
    parts = match.groupdict()
    if parts["scope"] == "regions" and not (parts["bulk"] or parts["regional_template"]):
        # Compute Engine has no regional insert or setMachineType: only regionInstances.bulkInsert
        # and regionInstanceTemplates (found in review: the stub launched on such a path).
        return None
    body = _json_object(request)
    request_id = request.query.get("requestId")
    key = None if request_id is None else f"gce:{request.path}:{request_id}"
    text = request.app[STUB_STATE_KEY].answer_once(
        key, lambda: json.dumps(_gce_launch(request, parts, body))
    )
    return web.Response(text=text, content_type="application/json")


def _gce_launch(
    request: web.Request, parts: dict[str, Any], body: dict[str, Any]
) -> dict[str, Any]:
    """Launch what a Compute Engine call asks for; its operation."""
    base = f"https://compute.googleapis.com{parts['base']}/projects/{parts['project']}"
    scope = f"{parts['scope']}/{parts['location']}" if parts["scope"] else "global"
    if parts["template"] or parts["regional_template"]:
        kind, target = "compute.instanceTemplates.insert", f"instanceTemplates/{body.get('name')}"
    elif parts["verb"]:
        kind, target = parts["verb"], f"instances/{parts['instance']}"
    else:
        kind = "bulkInsert" if parts["bulk"] else "insert"
        target = f"instances/{body.get('name') or body.get('namePattern')}"
        properties = body.get("instanceProperties") if parts["bulk"] else body
        properties = properties if isinstance(properties, dict) else {}
        count = _how_many(body.get("count", 1)) if parts["bulk"] else 1
        location = parts["location"]
        region = location.rsplit("-", 1)[0] if parts["scope"] == "zones" else location
        machine = _last_segment(properties.get("machineType"))
        request.app[STUB_STATE_KEY].instances.extend(
            Instance(str(secrets.randbits(63)), machine, region) for _ in range(count)
        )
    operation_id = str(secrets.randbits(63))
    name = f"operation-{int(time.time() * 1000)}-{secrets.token_hex(6)}"
    now = datetime.now(UTC).isoformat(timespec="milliseconds")
    operation: dict[str, Any] = {
        "kind": "compute#operation",
        "id": operation_id,
        "name": name,
        "operationType": kind,
        "targetLink": f"{base}/{scope}/{target}",
        "targetId": str(secrets.randbits(63)),
        "status": "RUNNING",
        "user": "stub@launchgate.invalid",
        "progress": 0,
        "insertTime": now,
        "startTime": now,
        "selfLink": f"{base}/{scope}/operations/{name}",
    }
    if parts["scope"]:
        operation[parts["scope"][:-1]] = f"{base}/{scope}"
    return operation


def _arm(request: web.Request) -> web.Response | None:
    match = _ARM.fullmatch(request.path)
    if request.method not in ("PUT", "PATCH") or match is None:
        return None
    resource = _json_object(request)
    vm = match["kind"].lower() == "virtualmachines"
    properties = resource.get("properties")
    properties = dict(properties) if isinstance(properties, dict) else {}
    created = request.method == "PUT"
    properties["provisioningState"] = "Creating" if created else "Updating"
    if vm:
        properties.setdefault("vmId", str(uuid.uuid4()))
    answer = {
        **resource,
        "id": request.path,
        "name": match["name"],
        "type": f"Microsoft.Compute/{'virtualMachines' if vm else 'virtualMachineScaleSets'}",
        "properties": properties,
    }
    if created and vm:
        size = properties.get("hardwareProfile", {})
        size = size.get("vmSize") if isinstance(size, dict) else None
        instance = Instance(f"vm-{secrets.token_hex(8)}", size, resource.get("location"))
        request.app[STUB_STATE_KEY].instances.append(instance)
    return web.json_response(answer, status=201 if created else 200)


def _nova(request: web.Request) -> web.Response | None:
    match = _NOVA.fullmatch(request.path)
    if request.method != "POST" or match is None:
        return None
    body = _json_object(request)
    if match["server"] is not None:
        return web.Response(status=202)  # resize and the other actions answer 202, no body
    server = body.get("server")
    server = server if isinstance(server, dict) else {}
    count = max(_how_many(server.get("min_count", 1)), _how_many(server.get("max_count", 1)))
    flavor = _flavor_id(server.get("flavorRef"))
    launched = [Instance(str(uuid.uuid4()), flavor, None) for _ in range(count)]
    request.app[STUB_STATE_KEY].instances.extend(launched)
    if str(server.get("return_reservation_id", "")).lower() in ("true", "1", "yes", "on"):
        return web.json_response({"reservation_id": f"r-{secrets.token_hex(4)}"}, status=202)
    href = f"http://{request.host}{match['base']}/servers/{launched[0].id}"
    answer = {
        "server": {
            "id": launched[0].id,
            "links": [{"href": href, "rel": "self"}, {"href": href, "rel": "bookmark"}],
            "adminPass": secrets.token_urlsafe(9),
            "OS-DCF:diskConfig": "AUTO",
            "security_groups": [{"name": "default"}],
        }
    }
    return web.json_response(answer, status=202, headers={"Location": href})


async def _provider(request: web.Request) -> web.Response:
    """A provider launch API's own answer, or 404 for a path no provider serves."""
    for answer in (_ec2, _gce, _arm, _nova):
        response = answer(request)
        if response is not None:
            return response
    raise _json_error(web.HTTPNotFound, "not found", path=request.path)


_UNRECORDED: Final = frozenset({_list_requests})
_RECORDS_ITSELF: Final = frozenset({_echo})
_PARSES_BODY: Final = frozenset({_launch, _set_failure, _provider})

_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _is_stub_path(path: str) -> bool:
    return path == "/_stub" or path.startswith("/_stub/")


@web.middleware
async def _record_and_fail(request: web.Request, handler: _Handler) -> web.StreamResponse:
    """Record the request, then apply any injected failure, then run the route."""
    route_handler = request.match_info.handler
    if route_handler in _UNRECORDED or route_handler in _RECORDS_ITSELF:
        return await handler(request)
    state = request.app[STUB_STATE_KEY]
    tap = _BodyTap(keep_all=route_handler in _PARSES_BODY)
    try:
        async for chunk in request.content.iter_chunked(_CHUNK_BYTES):
            tap.feed(chunk)
    finally:
        # Recorded before the route runs, so a reset forgets the reset request too, and a
        # delayed request is visible while it waits.
        state.requests.append(tap.record(request))
    request[_BODY_KEY] = tap
    failure = None if _is_stub_path(request.path) else state.take_failure()
    if failure is not None:
        if failure.delay_s:
            await asyncio.sleep(failure.delay_s)
        if failure.status is not None:
            return web.json_response({"error": "injected failure"}, status=failure.status)
    return await handler(request)


def create_stub_app(*, keep_last: int | None = None) -> web.Application:
    """A fresh stub backend with empty state, remembering every request and instance or
    only the last ``keep_last``."""
    app = web.Application(middlewares=[_record_and_fail])
    app[STUB_STATE_KEY] = StubState.keeping(keep_last)
    app.router.add_post("/v1/instances", _launch)
    app.router.add_get("/v1/instances", _list_instances)
    app.router.add_get("/_stub/requests", _list_requests)
    app.router.add_delete("/_stub/requests", _reset)
    app.router.add_post("/_stub/reset", _reset)
    app.router.add_post("/_stub/fail", _set_failure)
    app.router.add_post("/_stub/echo", _echo)
    app.router.add_get("/_stub/bytes", _bytes)
    # Catch-all last: the providers' APIs; unknown paths and methods alike get 404.
    app.router.add_route("*", "/{tail:.*}", _provider)
    return app


async def run_stub(host: str, port: int, *, keep_last: int | None = None) -> None:
    """Serve the stub on HOST:PORT until cancelled, SIGTERM or SIGINT.

    Once listening, prints ``stub-backend listening on http://HOST:PORT`` (the real
    port when ``port`` is 0) as one line on stdout. Raises OSError if it cannot bind.
    """
    # Bodies are recorded as they arrived: aiohttp would otherwise decompress them first.
    runner = web.AppRunner(
        create_stub_app(keep_last=keep_last), access_log=None, auto_decompress=False
    )
    await runner.setup()
    try:
        # A short grace period: a stub holding shutdown for an injected delay helps nobody.
        site = web.TCPSite(runner, host, port, shutdown_timeout=1.0)
        await site.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        signals = (signal.SIGTERM, signal.SIGINT)
        for signum in signals:
            loop.add_signal_handler(signum, stop.set)
        try:
            # Printed only once the handlers are in place: whoever reads this line may
            # signal at once.
            bound_port = runner.addresses[0][1]
            shown_host = f"[{host}]" if ":" in host else host
            print(f"stub-backend listening on http://{shown_host}:{bound_port}", flush=True)
            await stop.wait()
        finally:
            for signum in signals:
                loop.remove_signal_handler(signum)
    finally:
        await runner.cleanup()
