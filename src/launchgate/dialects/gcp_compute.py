"""``gcp-compute``: Compute Engine's REST/JSON API (CONTRACT section 9).

Under the route's ``path`` (default ``/compute/v1``) this dialect claims, by method and
path shape only, the calls that create or resize capacity, and reads their items:

- ``POST projects/{p}/zones/{z}/instances`` (insert), ``PUT …/instances/{i}`` (update),
  ``POST …/instances/{i}/setMachineType`` and ``…/setMachineResources``: x 1;
- ``POST projects/{p}/zones/{z}/instances/bulkInsert`` and the regional one: x the
  largest of ``count``, ``minCount`` and the number of ``perInstanceProperties``, over
  ``instanceProperties`` and every ``instanceFlexibilityPolicy`` machine type;
- ``POST projects/{p}/global/instanceTemplates`` and the regional one: x 0 (a template);
- managed instance groups and autoscalers (insert, update, patch, resize, ...): they
  size capacity from a template given by reference, so they are unresolvable.

An item is the machine type (last segment of its URL) x instances, plus each
``guestAccelerators[]`` type x ``acceleratorCount`` x instances. A custom machine type
``[FAMILY-]custom-CPUS-MEM[-ext]`` is the SKU ``FAMILY-custom`` (``n1`` when no family
is named): its shape does not change what accelerators it carries, which is none, so the
catalog can list one SKU per family. Anything named only by reference
(``sourceInstanceTemplate``, ``sourceMachineImage``, ``sourceInstance``) is unresolvable.

Compute Engine maps JSON onto protobuf, so a field may also be spelled snake_case
(``machine_type``); both spellings are read, and a key that matches one only up to
letter case or both spellings at once is malformed. Everything else (GET, DELETE,
``start``, ...) is not claimed and passes untouched.

The ``requestId`` query parameter, Compute Engine's idempotency token, is the launch's
``client_token``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any, Final

from launchgate.dialects import Item, Launch, LaunchRequest, check_keys, route_path, route_region
from launchgate.strict import (
    MISSING,
    MalformedLaunch,
    loads_json,
    parse_count,
    parse_query,
    require_identity_encoding,
    require_json_content_type,
    single_params,
)

DEFAULT_PATH: Final = "/compute/v1"
_KEYS: Final = frozenset({"path", "region"})

_NAME = re.compile(r"[a-z](?:[-a-z0-9]*[a-z0-9])?")
_RESOURCE = re.compile(
    r"(?:https?://[^/?#]+/compute/[^/?#]+/)?"
    r"(?:projects/(?P<project>[^/?#]+)/)?"
    r"(?:zones/(?P<zone>[^/?#]+)/)?"
    r"(?:(?P<kind>[A-Za-z]+)/)?"
    r"(?P<name>[^/?#]+)"
)
_CUSTOM = re.compile(r"(?:(?P<family>[a-z][a-z0-9]*)-)?custom-[0-9]+-[0-9]+(?:-ext)?")


@dataclass(frozen=True, slots=True)
class _Call:
    """A claimed request with what its path says: project and zone or region."""

    request: LaunchRequest
    params: Mapping[str, tuple[str, str]]  # folded query parameter name -> (name, value)
    project: str
    zone: str | None
    region: str | None


_Reader = Callable[[_Call], Launch | None]


def _snake(camel: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", camel).lower()


def _fold(name: str) -> str:
    return name.replace("_", "").lower()


def _field(obj: Mapping[str, Any], camel: str) -> Any:
    """``obj[camel]`` or ``obj[snake_case]``; MISSING when absent or null.

    MalformedLaunch when both spellings are present, or a key matches only up to case.
    """
    keys = [k for k in obj if _fold(k) == _fold(camel)]
    if not keys:
        return MISSING
    if len(keys) > 1:
        raise MalformedLaunch(f"{camel!r} is given as {keys[0]!r} and {keys[1]!r}")
    if keys[0] not in (camel, _snake(camel)):
        raise MalformedLaunch(f"{keys[0]!r} differs from {camel!r} only in letter case")
    value = obj[keys[0]]
    return MISSING if value is None else value


def _object(value: Any, what: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise MalformedLaunch(f"{what} must be a JSON object")
    return value


def _section(obj: Mapping[str, Any], camel: str) -> dict[str, Any]:
    """The object ``obj[camel]`` (either spelling); empty when absent."""
    value = _field(obj, camel)
    return {} if value is MISSING else _object(value, camel)


def _body(call: _Call) -> dict[str, Any]:
    request = call.request
    require_identity_encoding(request.headers)
    require_json_content_type(request.headers)
    return _object(loads_json(request.body), "the body")


def _resource(value: Any, kind: str, call: _Call) -> str:
    """The name at the end of a full or partial resource URL, checked against the path."""
    if not isinstance(value, str):
        raise MalformedLaunch(f"a {kind} reference must be a string")
    match = _RESOURCE.fullmatch(value)
    if match is None:
        raise MalformedLaunch(f"{value!r} is not a {kind} URL or name")
    if (match["project"] or match["zone"] or match["kind"]) and match["kind"] != kind:
        raise MalformedLaunch(f"{value!r} is not a {kind} URL")
    if match["project"] is not None and match["project"] != call.project:
        raise MalformedLaunch(f"{value!r} names another project than the path")
    zone = match["zone"]
    if zone is not None:
        if call.zone is not None and zone != call.zone:
            raise MalformedLaunch(f"{value!r} names another zone than the path")
        if call.zone is None and call.region is not None and _region_of(zone) != call.region:
            raise MalformedLaunch(f"{value!r} names a zone outside the path's region")
    name = match["name"]
    if not _NAME.fullmatch(name):
        raise MalformedLaunch(f"{name!r} is not a Compute Engine {kind} name")
    return name


def _machine_type(value: Any, call: _Call) -> str:
    name = _resource(value, "machineTypes", call)
    custom = _CUSTOM.fullmatch(name)
    return f"{custom['family'] or 'n1'}-custom" if custom else name


def _accelerators(props: Mapping[str, Any], instances: int, call: _Call) -> list[Item]:
    """One item per ``guestAccelerators[]`` entry: its type x acceleratorCount x instances."""
    entries = _field(props, "guestAccelerators")
    if entries is MISSING:
        return []
    if not isinstance(entries, list):
        raise MalformedLaunch("guestAccelerators must be a list")
    items = []
    for entry in entries:
        entry = _object(entry, "a guestAccelerators entry")
        kind = _field(entry, "acceleratorType")
        if kind is MISSING:
            raise MalformedLaunch("a guestAccelerators entry names no acceleratorType")
        raw = _field(entry, "acceleratorCount")
        if raw is MISSING:
            raise MalformedLaunch("a guestAccelerators entry has no acceleratorCount")
        # int32 in proto3 JSON: a number or a string of digits.
        per = parse_count(raw, "acceleratorCount", digit_strings=True)
        items.append(Item(_resource(kind, "acceleratorTypes", call), per * instances))
    return items


def _instance_items(props: Mapping[str, Any], instances: int, call: _Call) -> list[Item]:
    """The machine type x instances (when named) and the guest accelerators."""
    machine_type = _field(props, "machineType")
    items = [] if machine_type is MISSING else [Item(_machine_type(machine_type, call), instances)]
    return items + _accelerators(props, instances, call)


def _named_sources(call: _Call, body: Mapping[str, Any], *names: str) -> list[str]:
    """Which of ``names`` the query or the body uses to name a source by reference."""
    used = []
    for name in names:
        param = call.params.get(_fold(name))
        if param is not None and param[0] not in (name, _snake(name)):
            raise MalformedLaunch(f"query parameter {param[0]!r} differs from {name!r} in case")
        if param is not None or _field(body, name) is not MISSING:
            used.append(name)
    return used


def _by_reference(sources: list[str], what: str) -> str | None:
    if not sources:
        return None
    return f"{what} from {' and '.join(sources)}: the machine type and accelerators are there"


def _insert(call: _Call) -> Launch:
    body = _body(call)
    sources = _named_sources(call, body, "sourceInstanceTemplate", "sourceMachineImage")
    items = _instance_items(body, 1, call)
    if not sources and _field(body, "machineType") is MISSING:
        raise MalformedLaunch("instances.insert names no machineType")
    return Launch(tuple(items), call.region, _by_reference(sources, "instances.insert"))


def _update(call: _Call) -> Launch | None:
    body = _body(call)
    sources = _named_sources(call, body, "sourceMachineImage")
    items = _instance_items(body, 1, call)
    if not items and not sources:
        return None  # names no size: changes what the instance has, not what it is
    return Launch(tuple(items), call.region, _by_reference(sources, "instances.update"))


def _set_machine_type(call: _Call) -> Launch:
    body = _body(call)
    machine_type = _field(body, "machineType")
    if machine_type is MISSING:
        raise MalformedLaunch("setMachineType names no machineType")
    return Launch((Item(_machine_type(machine_type, call), 1),), call.region)


def _set_machine_resources(call: _Call) -> Launch | None:
    items = _accelerators(_body(call), 1, call)
    # No accelerators left after the call: it removes capacity, launches none.
    return Launch(tuple(items), call.region) if items else None


def _count(body: Mapping[str, Any], name: str, *, allow_zero: bool = False) -> int:
    raw = _field(body, name)
    # int64 in proto3 JSON: a number or a string of digits.
    return (
        0 if raw is MISSING else parse_count(raw, name, allow_zero=allow_zero, digit_strings=True)
    )


def _bulk_insert(call: _Call) -> Launch:
    body = _body(call)
    sources = _named_sources(call, body, "sourceInstanceTemplate")
    names = _section(body, "perInstanceProperties")
    instances = max(_count(body, "count"), _count(body, "minCount", allow_zero=True), len(names))
    if instances == 0:
        raise MalformedLaunch("bulkInsert names no count")
    props = _section(body, "instanceProperties")
    machine_types: dict[str, Item] = {}
    if _field(props, "machineType") is not MISSING:
        sku = _machine_type(_field(props, "machineType"), call)
        machine_types[sku] = Item(sku, instances)
    # Each flexible machine type is an alternative for every instance: all are judged.
    selections = _section(_section(body, "instanceFlexibilityPolicy"), "instanceSelections")
    for selection in selections.values():
        listed = _field(_object(selection, "an instance selection"), "machineTypes")
        listed = [] if listed is MISSING else listed
        if not isinstance(listed, list):
            raise MalformedLaunch("machineTypes must be a list")
        for value in listed:
            sku = _machine_type(value, call)
            machine_types[sku] = Item(sku, instances)
    if not machine_types and not sources:
        raise MalformedLaunch("bulkInsert names no machine type")
    items = [*machine_types.values(), *_accelerators(props, instances, call)]
    return Launch(tuple(items), call.region, _by_reference(sources, "bulkInsert"))


def _template(call: _Call) -> Launch:
    body = _body(call)
    sources = _named_sources(call, body, "sourceInstance")
    props = _section(body, "properties")
    if not sources and _field(props, "machineType") is MISSING:
        raise MalformedLaunch("the instance template names no machineType")
    items = _instance_items(props, 0, call)
    return Launch(tuple(items), call.region, _by_reference(sources, "the instance template"))


def _group(call: _Call) -> Launch:
    why = "instance groups and autoscalers size capacity from an instance template by reference"
    return Launch((), call.region, why)


def _endpoints() -> tuple[tuple[str, tuple[str, ...], _Reader], ...]:
    table: list[tuple[str, str, _Reader]] = [
        ("POST", "projects/*/zones/{zone}/instances", _insert),
        ("PUT", "projects/*/zones/{zone}/instances/*", _update),
        ("POST", "projects/*/zones/{zone}/instances/*/setMachineType", _set_machine_type),
        ("POST", "projects/*/zones/{zone}/instances/*/setMachineResources", _set_machine_resources),
        ("POST", "projects/*/zones/{zone}/instances/bulkInsert", _bulk_insert),
        ("POST", "projects/*/regions/{region}/instances/bulkInsert", _bulk_insert),
        ("POST", "projects/*/global/instanceTemplates", _template),
        ("POST", "projects/*/regions/{region}/instanceTemplates", _template),
    ]
    for where in ("zones/{zone}", "regions/{region}"):
        groups = f"projects/*/{where}/instanceGroupManagers"
        table += [
            ("POST", groups, _group),
            ("PUT", f"{groups}/*", _group),
            ("PATCH", f"{groups}/*", _group),
        ]
        table += [
            ("POST", f"{groups}/*/{verb}", _group)
            for verb in (
                "resize",
                "resizeAdvanced",
                "resizeRequests",
                "createInstances",
                "setInstanceTemplate",
                "applyUpdatesToInstances",
                "recreateInstances",
            )
        ]
        table += [(m, f"projects/*/{where}/autoscalers", _group) for m in ("POST", "PUT", "PATCH")]
    return tuple((m, tuple(p.lower().split("/")), reader) for m, p, reader in table)


_ENDPOINTS: Final = _endpoints()
_METHODS: Final = frozenset(m for m, _, _ in _ENDPOINTS)


def _region_of(zone: str) -> str:
    region, dash, suffix = zone.rpartition("-")
    if not (region and dash and suffix):
        raise MalformedLaunch(f"zone {zone!r} is not of the form REGION-SUFFIX")
    return region


def _segment(raw: str) -> str:
    # A ';param' suffix never changes which collection a segment names for matching.
    return raw.split(";", 1)[0]


@dataclass(frozen=True, slots=True)
class GcpCompute:
    """Claims Compute Engine launch calls under ``path``; reads their items."""

    path: str = DEFAULT_PATH
    region: str | None = None
    name: str = "gcp-compute"
    prefix: bool = True
    shaped: bool = True

    @property
    def methods(self) -> frozenset[str]:
        return _METHODS

    def _match(self, method: str, path: str) -> tuple[_Reader, dict[str, str]] | None:
        base = [s.lower() for s in self.path.split("/") if s]
        segments = [_segment(s) for s in path.split("/") if s]
        if [s.lower() for s in segments[: len(base)]] != base:
            return None
        rest = segments[len(base) :]
        for endpoint_method, pattern, reader in _ENDPOINTS:
            if endpoint_method != method or len(pattern) != len(rest):
                continue
            captured: dict[str, str] = {"project": rest[1]}
            for want, got in zip(pattern, rest, strict=True):
                if want.startswith("{"):
                    captured[want.strip("{}")] = got
                elif want != "*" and want != got.lower():
                    break
            else:
                return reader, captured
        return None

    def claims(self, method: str, path: str) -> bool:
        return self._match(method, path) is not None

    def parse(self, request: LaunchRequest) -> Launch | None:
        """The launch's items; None for a call that turns out to add no capacity.

        Raises MalformedLaunch when the request has no one meaning.
        """
        match = self._match(request.method, request.path)
        if match is None:
            raise MalformedLaunch("not a Compute Engine launch call")
        reader, captured = match
        # Parsed for every call: a repeated or case-variant parameter is malformed anywhere.
        params = single_params(parse_query(request.query), fold=_fold)
        zone = captured.get("zone")
        region = _region_of(zone) if zone is not None else captured.get("region", self.region)
        launch = reader(_Call(request, params, captured["project"], zone, region))
        token = _request_id(params)
        return launch if launch is None or token is None else replace(launch, client_token=token)


def _request_id(params: Mapping[str, tuple[str, str]]) -> str | None:
    """The ``requestId`` query parameter (either spelling); None when absent or empty."""
    param = params.get(_fold("requestId"))
    if param is None:
        return None
    name, value = param
    if name not in ("requestId", "request_id"):
        raise MalformedLaunch(f"query parameter {name!r} differs from 'requestId' in case")
    return value or None


def build(table: Mapping[str, Any], where: str) -> GcpCompute:
    """The dialect for one ``[[routes]]`` entry; ConfigError names ``where`` and the key."""
    check_keys(table, _KEYS, where, "gcp-compute")
    path = route_path(table, where, DEFAULT_PATH)
    return GcpCompute(path=path, region=route_region(table, where))
