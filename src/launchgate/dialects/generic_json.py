"""``generic-json``: one JSON body, SKU, count and region read by JSON Pointers."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from launchgate.dialects import Item, Launch, LaunchRequest, check_keys, route_path, with_head
from launchgate.errors import ConfigError
from launchgate.forms import MULTIPART, judged_field_in, media_read_as_form, media_type, squash
from launchgate.strict import (
    MISSING,
    MalformedLaunch,
    loads_json,
    parse_count,
    parse_pointer,
    require_identity_encoding,
    require_utf8_charset,
    resolve_pointer,
)

_KEYS: Final = frozenset({"method", "path", "sku", "count", "region", "default_region"})


@dataclass(frozen=True, slots=True)
class GenericJson:
    method: str
    path: str
    sku: tuple[str, ...]
    count: tuple[str, ...] | None
    region: tuple[str, ...] | None
    default_region: str | None
    name: str = "generic-json"
    prefix: bool = False
    shaped: bool = False  # (its one path)
    # The body's top-level fields it is judged by, the first token of each pointer, as
    # ``forms.squash`` spells them for comparing with a form's names.
    fields: frozenset[str] = field(init=False)

    def __post_init__(self) -> None:
        tokens = (p[0] for p in (self.sku, self.count, self.region) if p)
        # (A token of no letters or digits, such as "_", is left out: every name has that.)
        object.__setattr__(self, "fields", frozenset(squash(t) for t in tokens) - {""})

    @property
    def methods(self) -> frozenset[str]:
        return with_head(frozenset({self.method}))

    def claims(self, method: str, path: str) -> bool:
        return path == self.path and (
            method == self.method or (method == "HEAD" and self.method == "GET")
        )

    def parse(self, request: LaunchRequest) -> Launch:
        require_identity_encoding(request.headers)
        # Any media type (clients send JSON as text/plain or as curl's form default), but the
        # body is read as UTF-8 and so must be meant as UTF-8, and not as another form.
        require_utf8_charset(request.headers)
        _no_form_reading(request, self.fields)
        body = loads_json(request.body)
        sku = resolve_pointer(body, self.sku)
        if not isinstance(sku, str) or not sku:
            raise MalformedLaunch("the SKU is missing or not a non-empty string")
        count = 1
        if self.count is not None:
            raw = resolve_pointer(body, self.count)
            count = 1 if raw is MISSING else parse_count(raw, "count")
        region = self.default_region
        if self.region is not None:
            raw = resolve_pointer(body, self.region)
            if isinstance(raw, str) and raw:
                region = raw
            elif raw is not MISSING and raw is not None:
                raise MalformedLaunch("the region must be a string")
        return Launch((Item(sku, count),), region)


def _no_form_reading(request: LaunchRequest, fields: frozenset[str]) -> None:
    """MalformedLaunch for a launch that an upstream could read as a form with a field it is
    judged by: the gateway judges the JSON, the upstream launches the form's (found by QA:
    ``{"a":"&instance_type=p5.48xlarge&","instance_type":"m7i.large"}`` as
    ``application/x-www-form-urlencoded`` was judged an m7i.large, and an Express upstream with
    ``urlencoded()`` launched a p5.48xlarge). So is one sent with no Content-Type (Rack reads it
    as a form), one sent as ``multipart/form-data``, and one whose query names such a field
    (found in review: Rails merges the query over the body, and launched ``?instance_type=``).
    See ``forms`` for how names are read. JSON sent with curl's form default has no such field
    (its one field is the whole body), and passes."""
    media = [media_type(value) for value in request.headers.getall("Content-Type", ())]
    if any(m.startswith(MULTIPART) for m in media):
        raise MalformedLaunch("a launch body sent as multipart is read as a form")
    name = judged_field_in(request.query, fields) if request.query else None
    if name is not None:
        raise MalformedLaunch(
            f"its query has a field {name!r}, which upstreams read as one the launch is judged"
            " by (Rails takes the query's over the body's)"
        )
    if media_read_as_form(media):
        name = judged_field_in(request.body.decode("utf-8", "replace"), fields)
        if name is not None:
            raise MalformedLaunch(
                f"read as a form, its body has a field {name!r}, which upstreams read as one the"
                " launch is judged by"
            )


def _pointer(table: Mapping[str, Any], key: str, where: str) -> tuple[str, ...] | None:
    value = table.get(key)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{where}.{key}: must be a JSON Pointer string")
    try:
        return parse_pointer(value)
    except ValueError as e:
        raise ConfigError(f"{where}.{key}: {e}") from None


def build(table: Mapping[str, Any], where: str) -> GenericJson:
    check_keys(table, _KEYS, where, "generic-json")
    method = table.get("method", "POST")
    if not isinstance(method, str) or not method.isalpha():
        raise ConfigError(f"{where}.method: must be an HTTP method")
    path = route_path(table, where, None)
    sku = _pointer(table, "sku", where)
    if sku is None:
        raise ConfigError(f"{where}: missing key 'sku' (a JSON Pointer)")
    default_region = table.get("default_region")
    if default_region is not None and not isinstance(default_region, str):
        raise ConfigError(f"{where}.default_region: must be a string")
    region = table.get("region")
    # Not a JSON Pointer: the region the route serves, as every other dialect's ``region`` is
    # (CONTRACT section 9, "pointer, else route"; found by QA: "eu-central-1" failed check, and
    # the route's region could be given only as ``default_region``).
    route_s = isinstance(region, str) and region != "" and not region.startswith("/")
    if route_s:
        if default_region is not None:
            raise ConfigError(
                f"{where}: 'region' names the route's region ({region!r}), and so does"
                " 'default_region': give one"
            )
        default_region = region
    return GenericJson(
        method=method.upper(),
        path=path,
        sku=sku,
        count=_pointer(table, "count", where),
        region=None if route_s else _pointer(table, "region", where),
        default_region=default_region,
    )
