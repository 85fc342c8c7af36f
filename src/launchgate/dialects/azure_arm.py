"""``azure-arm``: Azure Resource Manager (CONTRACT section 9).

ARM compares path segments, query parameter names and JSON property names without
regard to letter case, so this dialect does too; and because of that, two keys of one
JSON object (at any depth) or two query parameters that differ only in case are
malformed: ARM would read one of them, and nobody can say which. Under the route's
``path`` (default ``/``) it claims, by method and path shape only:

- ``PUT``/``PATCH /subscriptions/{s}/resourceGroups/{g}/providers/Microsoft.Compute/
  virtualMachines/{vm}``: ``properties.hardwareProfile.vmSize`` x 1. A PATCH that names
  no size launches nothing (it is forwarded unjudged); a PUT that names none is
  unresolvable (ARM keeps or defaults a size the gateway cannot see).
- ``…/virtualMachineScaleSets/{name}``: ``sku.name`` (unless it is ``Mix``) and every
  ``properties.skuProfile.vmSizes[].name``, each x ``sku.capacity``. A PATCH naming
  neither a size nor a capacity launches nothing; one that names only one of them (a
  scale-out, a resize of the running instances) is unresolvable: the other half is in
  the existing scale set.
- template deployments and deployment stacks
  (``…/providers/Microsoft.Resources/deployments/{name}`` at any scope): unresolvable.
  Their sizes hide behind expressions, copy loops, links and nested deployments.
- ``…/providers/Microsoft.Insights/autoscaleSettings/{name}``: unresolvable when it
  targets a scale set (or may: a change to its profiles that does not say what it
  targets); anything else launches nothing.
- ``POST /batch``: the portal's envelope. Unresolvable when any inner request is one
  of the launches above; read-only or unrelated envelopes launch nothing.

The region is ``location`` lower-cased with spaces removed, else the route's ``region``.
Sizes are reported as spelled in the request: ARM accepts ``standard_nd96isr_h100_v5``
for ``Standard_ND96isr_H100_v5``, so the catalog lookup must ignore case for them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import unquote, urlsplit

from launchgate.dialects import Item, Launch, LaunchRequest, check_keys, route_path, route_region
from launchgate.paths import UnsafePath, decoded_segment, normalize_path
from launchgate.strict import (
    MISSING,
    MalformedLaunch,
    fold_case,
    loads_json,
    parse_count,
    parse_query,
    require_identity_encoding,
    require_json_content_type,
    single_params,
)

DEFAULT_PATH: Final = "/"
_KEYS: Final = frozenset({"path", "region"})
_METHODS: Final = frozenset({"PUT", "PATCH", "POST"})
_READ_ONLY: Final = frozenset({"GET", "HEAD", "OPTIONS"})
_HTTP_METHODS: Final = _READ_ONLY | {"PUT", "PATCH", "POST", "DELETE"}
_OVERRIDES: Final = frozenset({"x-http-method-override", "x-http-method", "x-method-override"})
# ARM ignores case in paths, keys and values: one spelling for each (see ``fold_case``).
_fold: Final = fold_case


@dataclass(frozen=True, slots=True)
class _Call:
    request: LaunchRequest
    base: tuple[str, ...]  # the route path's folded segments
    region: str | None  # the route's


_Reader = Callable[[_Call], Launch | None]


def _one_spelling(document: Any) -> None:
    """MalformedLaunch when an object anywhere holds two keys that differ only in case."""
    stack = [document]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            folded: dict[str, str] = {}
            for key in node:
                other = folded.setdefault(_fold(key), key)
                if other != key:
                    raise MalformedLaunch(f"keys {other!r} and {key!r} differ only in case")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _get(obj: Mapping[str, Any], name: str) -> Any:
    """``obj[name]`` compared case-insensitively; MISSING when absent or null."""
    want = _fold(name)
    value = next((v for k, v in obj.items() if _fold(k) == want), None)
    return MISSING if value is None else value


def _at(obj: Mapping[str, Any], *names: str) -> Any:
    """The value at the path ``names`` (case-insensitive); MISSING when any step is absent.

    MalformedLaunch when a step on the way is not an object.
    """
    node: Any = obj
    for depth, name in enumerate(names):
        if node is MISSING:
            return MISSING
        if not isinstance(node, dict):
            where = ".".join(names[:depth]) or "the body"
            raise MalformedLaunch(f"{where} must be a JSON object")
        node = _get(node, name)
    return node


def _body(call: _Call) -> dict[str, Any]:
    request = call.request
    require_identity_encoding(request.headers)
    require_json_content_type(request.headers)
    document = loads_json(request.body)
    if not isinstance(document, dict):
        raise MalformedLaunch("the body must be a JSON object")
    _one_spelling(document)
    return document


def _size(value: Any, what: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise MalformedLaunch(f"{what} must be a non-empty string")
    return value


def _region(body: Mapping[str, Any], call: _Call) -> str | None:
    location = _get(body, "location")
    if location is MISSING:
        return call.region
    if not isinstance(location, str):
        raise MalformedLaunch("location must be a string")
    return location.replace(" ", "").lower() or call.region


def _virtual_machine(call: _Call) -> Launch | None:
    body = _body(call)
    size = _at(body, "properties", "hardwareProfile", "vmSize")
    if size is not MISSING:
        return Launch((Item(_size(size, "vmSize"), 1, fold_case=True),), _region(body, call))
    if call.request.method == "PATCH":
        return None
    why = "a virtual machine PUT without hardwareProfile.vmSize keeps or defaults its size"
    return Launch((), _region(body, call), why)


def _scale_set(call: _Call) -> Launch | None:
    body = _body(call)
    sizes: list[str] = []
    name = _at(body, "sku", "name")
    mix = name is not MISSING and _fold(_size(name, "sku.name")) == "mix"
    if name is not MISSING and not mix:
        sizes.append(name)
    listed = _at(body, "properties", "skuProfile", "vmSizes")
    if listed is not MISSING:
        if not isinstance(listed, list) or not all(isinstance(e, dict) for e in listed):
            raise MalformedLaunch("skuProfile.vmSizes must be a list of objects")
        sizes += [_size(_get(entry, "name"), "vmSizes[].name") for entry in listed]
    capacity = _at(body, "sku", "capacity")
    region = _region(body, call)
    if capacity is MISSING:
        if not sizes and not mix and call.request.method == "PATCH":
            return None  # names neither size nor capacity: tags, profiles, policies
        return Launch(
            (), region, "a scale set size without sku.capacity: the count is the set's own"
        )
    count = parse_count(capacity, "sku.capacity", allow_zero=True, digit_strings=True)
    if not sizes:
        return Launch((), region, "sku.capacity without a size: the size is the scale set's own")
    unique = dict.fromkeys(sizes)  # one item per size, in the order named
    return Launch(tuple(Item(s, count, fold_case=True) for s in unique), region)


def _deployment(call: _Call) -> Launch:
    why = "a template deployment: its sizes hide behind expressions, loops and links"
    return Launch((), call.region, why)


def _autoscale(call: _Call) -> Launch | None:
    body = _body(call)
    target = _at(body, "properties", "targetResourceUri")
    if target is MISSING:
        if _get(body, "properties") is MISSING:
            return None
        why = "an autoscale setting that may raise a scale set's capacity"
        return Launch((), _region(body, call), why)
    if not isinstance(target, str):
        raise MalformedLaunch("targetResourceUri must be a string")
    if _names_a_scale_set(target):
        why = "an autoscale setting raises a scale set's capacity later"
        return Launch((), _region(body, call), why)
    return None


def _names_a_scale_set(target: str) -> bool:
    """Whether an autoscale setting's ``targetResourceUri`` may name a scale set: whether the
    word appears in it at all, as given or decoded up to three times, folded, however the rest
    is spelt (found in review: "//providers//Microsoft.Compute//virtualMachineScaleSets/x"
    was read as another resource; "%2F", "?" or a trailing dot around it too, unconfirmed).
    Coarse on purpose: such a setting is unresolvable, which only ever judges more."""
    readings = [target]
    while (
        len(readings) < 4 and (decoded := unquote(readings[-1], errors="replace")) != readings[-1]
    ):
        readings.append(decoded)
    return any("virtualmachinescalesets" in _fold(reading) for reading in readings)


def _batch(call: _Call) -> Launch | None:
    body = _body(call)
    requests = _get(body, "requests")
    if not isinstance(requests, list):
        raise MalformedLaunch("a batch must list its requests")
    for entry in requests:
        if not isinstance(entry, dict):
            raise MalformedLaunch("a batch request must be a JSON object")
        method, url = _get(entry, "httpMethod"), _get(entry, "url")
        if not isinstance(method, str) or not isinstance(url, str):
            raise MalformedLaunch("a batch request needs an httpMethod and a url")
        _no_method_override(entry)
        verb = method.upper()  # ARM ignores case; anything else ("PUT ") may be read either way
        if verb not in _HTTP_METHODS:
            raise MalformedLaunch(f"a batch request's httpMethod {method!r} is not a method")
        if verb in _READ_ONLY:
            continue
        parts = urlsplit(url)
        # A url without a scheme starting with "//" has two readings: a repeated slash to a
        # router ("//subscriptions/..."), a host to URL resolution (RFC 3986 5.2:
        # "//management.azure.com/subscriptions/..."). Both are judged (found by QA, each in
        # turn: either one alone let the other's launch through unjudged).
        readings = [parts.path] if parts.scheme else [url.partition("?")[0].partition("#")[0]]
        if (not parts.scheme and url.startswith("//")) or (parts.scheme and not parts.netloc):
            # Host first: "//h/p", "///h/p" (WHATWG skips any number of slashes), "https:h/p".
            # (Found by QA: "///management.azure.com/..." was read only as a path.)
            after_host = readings[0].lstrip("/").partition("/")[2]
            readings.append("/" + after_host)
        for raw in readings:
            if _launches(call, verb, raw):
                return Launch((), call.region, "a launch inside a batch envelope")
    return None


def _launches(call: _Call, verb: str, raw: str) -> bool:
    """Whether ``verb`` on the path ``raw`` (relative to the batch's route) is a launch."""
    try:
        path = normalize_path("/" + raw.lstrip("/"))
    except (UnsafePath, ValueError) as e:
        raise MalformedLaunch(f"a batch request's url cannot be normalized: {e}") from None
    segments = _Folded([s for s in path.split("/") if s])
    if segments.starts_with(call.base):
        segments = segments.after(len(call.base))
    return _endpoint(verb, segments) is not None


def _no_method_override(entry: Mapping[str, Any]) -> None:
    stack: list[Any] = [entry]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if any(isinstance(k, str) and _fold(k) in _OVERRIDES for k in node):
                raise MalformedLaunch("a batch request carries a method-override header")
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)


def _segments(path: str) -> list[str]:
    """The path's segments as ARM matches them (``_segment``)."""
    return [_segment(s) for s in path.split("/") if s]


def _segment(raw: str) -> str:
    """A path segment as ARM matches it: decoded (``decoded_segment``) and folded. A ';param'
    suffix never changes which resource a segment names for matching."""
    return _fold(decoded_segment(raw).split(";", 1)[0])


class _Folded:
    """A path's segments, each decoded and folded only when looked at: matching reads a few,
    and a long path of escapes would otherwise cost its whole length in folding (found in
    review: 8 KB of them took 2 ms a route)."""

    __slots__ = ("_done", "_raw")

    def __init__(self, raw: list[str]) -> None:
        self._raw = raw
        self._done: dict[int, str] = {}

    def __len__(self) -> int:
        return len(self._raw)

    def __getitem__(self, index: int) -> str:
        index %= len(self._raw)
        folded = self._done.get(index)
        if folded is None:
            folded = self._done[index] = _segment(self._raw[index])
        return folded

    def starts_with(self, base: tuple[str, ...]) -> bool:
        return len(self._raw) >= len(base) and all(self[i] == b for i, b in enumerate(base))

    def after(self, count: int) -> _Folded:
        return _Folded(self._raw[count:])


def _endpoint(method: str, f: _Folded) -> _Reader | None:
    """The reader for a launch call, by method and folded path segments after the route."""
    if method == "POST":
        return _batch if len(f) == 1 and f[0] == "batch" else None
    if method not in ("PUT", "PATCH"):
        return None
    if len(f) == 8 and (f[0], f[2], f[4], f[5]) == (
        "subscriptions",
        "resourcegroups",
        "providers",
        "microsoft.compute",
    ):
        if f[6] == "virtualmachines":
            return _virtual_machine
        if f[6] == "virtualmachinescalesets":
            return _scale_set
    if len(f) >= 4 and f[-4] == "providers":
        if (f[-3], f[-2]) in (
            ("microsoft.resources", "deployments"),
            ("microsoft.resources", "deploymentstacks"),
        ):
            return _deployment
        if (f[-3], f[-2]) == ("microsoft.insights", "autoscalesettings"):
            return _autoscale
    return None


@dataclass(frozen=True, slots=True)
class AzureArm:
    """Claims ARM launch calls under ``path``; reads their items."""

    path: str = DEFAULT_PATH
    region: str | None = None
    name: str = "azure-arm"
    prefix: bool = True
    shaped: bool = True

    @property
    def methods(self) -> frozenset[str]:
        return _METHODS

    def _reader(self, method: str, path: str) -> tuple[_Reader, tuple[str, ...]] | None:
        if method not in _METHODS:
            return None
        base = tuple(_segments(self.path))
        segments = _Folded([s for s in path.split("/") if s])
        if not segments.starts_with(base):
            return None
        reader = _endpoint(method, segments.after(len(base)))
        return None if reader is None else (reader, base)

    def claims(self, method: str, path: str) -> bool:
        return self._reader(method, path) is not None

    def parse(self, request: LaunchRequest) -> Launch | None:
        """The launch's items; None for a call whose body shows it launches nothing.

        Raises MalformedLaunch when the request has no one meaning.
        """
        found = self._reader(request.method, request.path)
        if found is None:
            raise MalformedLaunch("not an Azure Resource Manager launch call")
        reader, base = found
        single_params(parse_query(request.query), fold=_fold)  # api-version twice, any case
        return reader(_Call(request, base, self.region))


def build(table: Mapping[str, Any], where: str) -> AzureArm:
    """The dialect for one ``[[routes]]`` entry; ConfigError names ``where`` and the key."""
    check_keys(table, _KEYS, where, "azure-arm")
    return AzureArm(path=route_path(table, where, DEFAULT_PATH), region=route_region(table, where))
