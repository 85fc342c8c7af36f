"""Launch dialects: how one provider API's wire format turns a request into items.

Each dialect is a small module with a ``build(table, where) -> Dialect`` factory,
registered in ``DIALECTS``. A dialect claims requests (method + normalized path) and
parses a claimed request's bytes into a ``Launch``: the SKUs and counts it can start.
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Final, Protocol

from multidict import CIMultiDictProxy

from launchgate.errors import ConfigError
from launchgate.paths import UnsafePath, fold_path, normalize_path
from launchgate.strict import MalformedLaunch

__all__ = [
    "DIALECTS",
    "Dialect",
    "HeaderReading",
    "Item",
    "Launch",
    "LaunchRequest",
    "MalformedLaunch",
    "Route",
    "SecondReading",
    "check_keys",
    "mount_head",
    "route_path",
    "route_region",
    "under_mount",
    "with_head",
    "with_second_readings",
]


@dataclass(frozen=True, slots=True)
class Item:
    sku: str
    count: int  # the most instances the request can launch; 0 for a template
    fold_case: bool = False  # the API compares SKU names case-insensitively (ARM)


@dataclass(frozen=True, slots=True)
class Launch:
    items: tuple[Item, ...]
    region: str | None
    unresolvable: str | None = None  # why the launch cannot be resolved to SKUs (row 6b)
    # The API's own idempotency token (EC2 ClientToken, GCE requestId), if the request has one.
    client_token: str | None = None


@dataclass(frozen=True, slots=True)
class LaunchRequest:
    method: str
    path: str  # normalized
    query: str  # raw query string, as received
    headers: CIMultiDictProxy[str]
    body: bytes


# The ``methods`` of a dialect that claims a request whatever its method (aws-ec2), for the
# check that no two routes tie; an opaque route may name any method at all (found in review:
# one on "PURGE" beside an aws-ec2 route passed the check).
EVERY_METHOD: Final = frozenset({"*"})


@functools.lru_cache(maxsize=1024)
def mount_head(path: str) -> str:
    """The first segment of ``path``, as ``fold_path`` reads it ("" for "/")."""
    return fold_path(path.strip("/").partition("/")[0])


def with_head(methods: frozenset[str]) -> frozenset[str]:
    """``methods``, with HEAD beside GET: Express, Rails, Symfony and Flask run a GET handler
    for a HEAD (found in review: a HEAD to a GET launch route went on unjudged, and launched)."""
    return methods | {"HEAD"} if "GET" in methods else methods


class Dialect(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def methods(self) -> frozenset[str]: ...

    @property
    def path(self) -> str: ...

    @property
    def prefix(self) -> bool:
        """True when the dialect claims requests under ``path``, not only ``path`` itself."""
        ...

    @property
    def shaped(self) -> bool:
        """True when, under ``path``, it claims only the calls of its API's launch shapes (by
        method and path), not every request there. The routes' precedence reads it."""
        ...

    def claims(self, method: str, path: str) -> bool: ...

    def parse(self, request: LaunchRequest) -> Launch | None:
        """Items of a claimed request, or None when its body shows it launches nothing.

        Raises MalformedLaunch when the request has no one meaning.
        """
        ...


# How a dialect that claims every request under its mount reads one that another route takes:
# the launch it would make of it, named, or None (``AwsEc2.launch_action``).
SecondReading = Callable[["LaunchRequest"], str | None]

# How a dialect whose API also picks its calls by a header reads a request no route claims by
# its path: why it would be a launch there (malformed: two meanings), or None
# (``OpenstackNova.claimed_by_header``).
HeaderReading = Callable[[str, str, CIMultiDictProxy[str]], str | None]


@dataclass(frozen=True, slots=True)
class Route:
    dialect: Dialect
    # The second readings of the routes that come after this one and claim its requests too,
    # set by ``with_second_readings``: a request this route takes that one of them reads as a
    # launch has two meanings (malformed), whatever this route makes of it.
    second_readings: tuple[SecondReading, ...] = ()
    # The dialect's ``claimed_by_header``, if its API has calls a header selects.
    by_header: HeaderReading | None = None

    def matches(self, method: str, path: str) -> bool:
        return self.dialect.claims(method, path)

    @property
    def precedence(self) -> tuple[int, int]:
        """The order in which routes are tried on a request, the first that claims it taking
        it: the deepest mount first, as in any path-based router (an API mounted under another
        takes its own requests: found by QA, an aws-ec2 route on its default path "/" could
        not be configured beside any other route); on one mount, an exact path, then the
        launch calls of an API of known shapes, then a mount that claims every request."""
        dialect = self.dialect
        rank = 0 if not dialect.prefix else 1 if dialect.shaped else 2
        return (-_depth(dialect.path), rank)

    def ties(self, other: Route) -> bool:
        """Whether both routes could claim one request with neither first (a configuration
        error): one mount (in any letter case: several dialects match theirs so, found in
        review), the same rank, and a method in common."""
        a, b = self.dialect, other.dialect
        if self.precedence != other.precedence or fold_path(a.path) != fold_path(b.path):
            return False
        return _methods_meet(a, b)


def _methods_meet(a: Dialect, b: Dialect) -> bool:
    return EVERY_METHOD in (a.methods, b.methods) or bool(a.methods & b.methods)


def _depth(path: str) -> int:
    return len([segment for segment in path.split("/") if segment])


def with_second_readings(routes: Sequence[Route]) -> tuple[Route, ...]:
    """``routes`` in the order a request tries them (``Route.precedence``), each with the
    second readings of the later routes of another dialect whose mount holds its own, with a
    method in common."""
    ordered = sorted(routes, key=lambda route: route.precedence)
    result = []
    for i, route in enumerate(ordered):
        readings = tuple(
            reading
            for later in ordered[i + 1 :]
            if (reading := getattr(later.dialect, "launch_action", None)) is not None
            # (an EC2 route under another reads EC2 itself: found in review, the outer one's
            # reading refused every launch on the inner one)
            and later.dialect.name != route.dialect.name
            and under_mount_in_any_case(route.dialect.path, later.dialect.path)
            and _methods_meet(later.dialect, route.dialect)
        )
        result.append(replace(route, second_readings=readings))
    return tuple(result)


def under_mount_in_any_case(path: str, mount: str) -> bool:
    """``under_mount`` as a router that decodes paths and ignores case reads both
    (``fold_path``), for a normalized ``path``. Folds only as many of its segments as the mount
    has (found in review: a path of 9 KB of escapes cost 1.9 ms a route folded whole)."""
    depth = _depth(mount)
    if depth == 0:
        return True
    head = "/".join(path.split("/", depth + 1)[: depth + 1])
    return fold_path(head) == fold_path(mount.rstrip("/"))


def under_mount(path: str, mount: str) -> bool:
    """Whether ``path`` is ``mount`` or a path under it (letter case as given)."""
    return path == mount or path.startswith(mount.rstrip("/") + "/")


def check_keys(table: Mapping[str, Any], allowed: frozenset[str], where: str, dialect: str) -> None:
    """Raise ConfigError naming ``where`` and the first key of ``table`` not in ``allowed``."""
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} for dialect {dialect}")


def route_path(table: Mapping[str, Any], where: str, default: str | None) -> str:
    """The route's ``path`` (``default`` when absent; required when None), already normalized."""
    path = table.get("path", default)
    if path is None:
        raise ConfigError(f"{where}: missing key 'path'")
    try:
        normal = normalize_path(path) if isinstance(path, str) else None
    except UnsafePath:
        normal = None
    if normal is None or normal != path:
        raise ConfigError(f"{where}.path: must be a normalized absolute path, got {path!r}")
    return normal


def route_region(table: Mapping[str, Any], where: str) -> str | None:
    """The route's optional literal ``region``: a string that is not blank."""
    region = table.get("region")
    if region is not None and (not isinstance(region, str) or not region.strip()):
        raise ConfigError(f"{where}.region: must be a non-empty string")
    return region


# Each dialect module exposes ``build(table, where) -> Dialect``; imported on first use.
DIALECTS: dict[str, str] = {
    "generic-json": "launchgate.dialects.generic_json",
    "aws-ec2": "launchgate.dialects.aws_ec2",
    "gcp-compute": "launchgate.dialects.gcp_compute",
    "azure-arm": "launchgate.dialects.azure_arm",
    "openstack-nova": "launchgate.dialects.openstack_nova",
    "opaque": "launchgate.dialects.opaque",
}


def _factory(name: str) -> Callable[[Mapping[str, Any], str], Dialect] | None:
    module_name = DIALECTS.get(name)
    if module_name is None:
        return None
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError:
        return None
    build: Callable[[Mapping[str, Any], str], Dialect] = module.build
    return build


def build_route(table: Mapping[str, Any], where: str) -> Route:
    """Validate one ``[[routes]]`` entry; ConfigError names the entry and key at fault."""
    name = table.get("dialect", "generic-json")
    factory = _factory(name) if isinstance(name, str) else None
    if factory is None:
        known = ", ".join(n for n in sorted(DIALECTS) if _factory(n) is not None)
        raise ConfigError(f"{where}.dialect: unknown dialect {name!r} (known: {known})")
    options = {k: v for k, v in table.items() if k != "dialect"}
    dialect = factory(options, where)
    return Route(dialect, by_header=getattr(dialect, "claimed_by_header", None))
