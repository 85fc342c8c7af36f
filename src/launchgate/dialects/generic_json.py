"""``generic-json``: one JSON body, SKU, count and region read by JSON Pointers."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote_plus

from launchgate.dialects import Item, Launch, LaunchRequest, check_keys, route_path
from launchgate.errors import ConfigError
from launchgate.strict import (
    MISSING,
    MalformedLaunch,
    fold_case,
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

    @property
    def methods(self) -> frozenset[str]:
        return frozenset({self.method})

    def claims(self, method: str, path: str) -> bool:
        return method == self.method and path == self.path

    @property
    def fields(self) -> frozenset[str]:
        """The body's top-level fields it is judged by, the first token of each pointer, in
        folded (form binders that ignore case, such as ASP.NET Core's, read them so)."""
        return frozenset(fold_case(p[0]) for p in (self.sku, self.count, self.region) if p)

    def parse(self, request: LaunchRequest) -> Launch:
        require_identity_encoding(request.headers)
        # Any media type (clients send JSON as text/plain or as curl's form default), but the
        # body is read as UTF-8 and so must be meant as UTF-8, and not as another form.
        media = require_utf8_charset(request.headers)
        if media is not None:
            # PHP cuts a media type at ",", ";" or a blank (found in review: with
            # "application/x-www-form-urlencoded,text/plain" it read a form).
            media = _MEDIA_END.split(media.strip(), maxsplit=1)[0].lower()
            if media in _FORMS:
                _no_form_reading(media, request.body, self.fields)
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


_FORM: Final = "application/x-www-form-urlencoded"
_FORMS: Final = frozenset({_FORM, "multipart/form-data"})
_FIELD_BASE = re.compile(r"[^\[.]*")  # "a[b]" and "a.b" are a's, to qs-style form parsers
_MEDIA_END = re.compile(r"[,;\s]")
_PHP_MANGLED = re.compile(r"[ .\[]")


def _no_form_reading(media: str, body: bytes, fields: frozenset[str]) -> None:
    """MalformedLaunch for a body whose media type has an upstream read it as a form with a
    field the launch is judged by: the gateway judges the JSON, the upstream launches the
    form's (found by QA: ``{"a":"&instance_type=p5.48xlarge&","instance_type":"m7i.large"}`` as
    ``application/x-www-form-urlencoded`` was judged an m7i.large, and an Express upstream
    with ``urlencoded()`` launched a p5.48xlarge). JSON sent with curl's form default has no
    such field (its one field is the whole body), and passes."""
    if media != _FORM:
        raise MalformedLaunch(f"a launch body sent as {media} is read as a form")
    text = body.decode("utf-8", "replace")
    for pair in re.split("[&;]", text):
        # Cut at a NUL, as PHP reads a name (with strlen); folded as .NET's OrdinalIgnoreCase
        # folds (the dotless i and the long s too; both found in review).
        name = fold_case(unquote_plus(pair.partition("=")[0], errors="replace").partition("\0")[0])
        base = _FIELD_BASE.match(name)
        for read in (base.group() if base else name, _php_name(name)):
            if read in fields:
                raise MalformedLaunch(
                    f"read as the form its Content-Type names, the body has a {read!r}"
                    " field of its own"
                )


def _php_name(name: str) -> str:
    """The top-level name PHP gives a form field: leading blanks dropped, an array's index cut,
    then " ", "." and an unclosed "[" made "_" (found in review: "instance.type" is
    ``$_POST['instance_type']``)."""
    name = name.lstrip(" ")
    at = name.find("[")
    if at >= 0 and "]" in name[at:]:
        name = name[:at]
    return _PHP_MANGLED.sub("_", name)


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
    return GenericJson(
        method=method.upper(),
        path=path,
        sku=sku,
        count=_pointer(table, "count", where),
        region=_pointer(table, "region", where),
        default_region=default_region,
    )
