"""The gateway configuration: TOML validated once into immutable objects.

``parse_config`` is pure over the main file's mapping plus a loader for the files it
references; ``load_config`` is the I/O. Every error is a ConfigError that names the
file and key at fault, shown to staff verbatim.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import astuple, dataclass, replace
from pathlib import Path
from typing import Any, Final, Literal, TypeVar

from yarl import URL

from launchgate.accounts import (
    Account,
    Jurisdictions,
    build_jurisdictions,
    load_accounts,
    load_country_groups,
)
from launchgate.catalog import ECCN_CLASSES, Catalog, load_catalog
from launchgate.dialects import (
    HeaderReading,
    Route,
    build_route,
    mount_head,
    with_second_readings,
)
from launchgate.errors import ConfigError
from launchgate.forward import GATEWAY_SET, HOP_BY_HOP
from launchgate.idempotency import CLIENT_TOKEN_WINDOW_S
from launchgate.tokens import KeyRing
from launchgate.tomlfile import as_table, only_tables, read_toml, require_table

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Config:
    source: Path
    listen: HostPort
    admin_listen: HostPort
    mode: Literal["enforce", "shadow"]
    max_body_bytes: int
    upstream_url: URL
    connect_timeout_s: float
    timeout_s: float
    # Whether the upstream deduplicates launches on the Idempotency-Key header: only then is a
    # retry of a launch already counted sent on under that header (else 409).
    upstream_deduplicates_idempotency_key: bool
    # For how long after a first attempt it does (``idempotency_key_window_s``; None when it
    # does not): a later retry of a counted launch is refused (409), as it could launch again.
    upstream_idempotency_key_window_s: float | None
    account_header: str
    token_header: str
    jwks_path: Path
    keyring: KeyRing
    issuers: tuple[str, ...]
    audience: str
    leeway_s: float
    store_url: str
    # Connections to PostgreSQL per gateway process, at most (SQLite has one, on its thread).
    store_pool_size: int
    reservation_ttl_s: float
    audit_path: Path
    catalog: Catalog
    accounts: Mapping[str, Account]
    jurisdictions: Jurisdictions
    controlled_eccns: frozenset[str]
    routes: tuple[Route, ...]  # in the order a request tries them (Route.precedence)
    # The routes whose API also picks calls by a header, with how they read one
    # (``Route.by_header``): asked about a request that no route claims by its path.
    header_routes: tuple[tuple[Route, HeaderReading], ...] = ()
    # The routes that launch by a method other than POST (not a route that takes every request
    # under its mount, aws-ec2: what it reads is a second reading of the routes under it), each
    # with its mount's first segment (``mount_head``), and those methods: what a POST can be
    # overridden to, upstream (``proxy._launches_by_override``).
    override_routes: tuple[tuple[Route, str], ...] = ()
    override_methods: tuple[str, ...] = ()

    @property
    def base_dir(self) -> Path:
        return self.source.parent

    @property
    def enforcing(self) -> bool:
        return self.mode == "enforce"


@dataclass(frozen=True, slots=True)
class RestartOnly:
    """The settings a gateway applies only when it starts: a reload keeps them as they run,
    and so does a worker started again by ``--workers`` (whatever the file says by then)."""

    store_url: str
    store_pool_size: int
    audit_path: Path
    listen: HostPort
    admin_listen: HostPort

    @classmethod
    def of(cls, config: Config) -> RestartOnly:
        return cls(
            config.store_url,
            config.store_pool_size,
            config.audit_path,
            config.listen,
            config.admin_listen,
        )

    def changed_keys(self, other: RestartOnly) -> list[str]:
        """The configuration keys, as staff write them, whose values ``other`` changes."""
        return [
            key
            for key, old, new in (
                ("store.url", self.store_url, other.store_url),
                ("store.pool_size", self.store_pool_size, other.store_pool_size),
                ("audit.path", self.audit_path, other.audit_path),
                ("server.listen", self.listen, other.listen),
                ("server.admin_listen", self.admin_listen, other.admin_listen),
            )
            if old != new
        ]

    def applied_to(self, config: Config) -> Config:
        return replace(
            config,
            store_url=self.store_url,
            store_pool_size=self.store_pool_size,
            audit_path=self.audit_path,
            listen=self.listen,
            admin_listen=self.admin_listen,
        )

    def to_json(self) -> str:
        listeners = astuple(self.listen), astuple(self.admin_listen)
        store = [self.store_url, self.store_pool_size]
        return json.dumps([*store, str(self.audit_path), *listeners])

    @classmethod
    def from_json(cls, text: str) -> RestartOnly:
        store_url, pool_size, audit_path, listen, admin_listen = json.loads(text)
        return cls(
            store_url, pool_size, Path(audit_path), HostPort(*listen), HostPort(*admin_listen)
        )


class _Section:
    """Typed accessors over one TOML table; every error names file, table and key."""

    def __init__(self, data: Mapping[str, Any], where: str, allowed: set[str]) -> None:
        self.data, self.where = data, where
        unknown = set(data) - allowed
        if unknown:
            raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")

    def _get(self, key: str, default: object) -> object:
        if key not in self.data:
            if default is _REQUIRED:
                raise ConfigError(f"{self.where}: missing key {key!r}")
            return default
        return self.data[key]

    def text(self, key: str, default: object = None) -> str:
        value = self._get(key, _REQUIRED if default is None else default)
        if not isinstance(value, str) or not value:
            raise ConfigError(f"{self.where}.{key}: must be a non-empty string")
        return value

    def number(self, key: str, default: float | None = None, *, minimum: float = 0) -> float:
        value = self._get(key, _REQUIRED if default is None else default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= minimum:
            raise ConfigError(f"{self.where}.{key}: must be a number > {minimum:g}")
        return float(value)

    def between(self, key: str, default: float, low: float, high: float) -> float:
        """A number from ``low`` to ``high``, both included."""
        value = self._get(key, default)
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not low <= value <= high
        ):
            raise ConfigError(f"{self.where}.{key}: must be a number from {low:g} to {high:g}")
        return float(value)

    def integer(self, key: str, default: int | None = None) -> int:
        value = self._get(key, _REQUIRED if default is None else default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{self.where}.{key}: must be an integer >= 1")
        return value

    def flag(self, key: str, *, default: bool) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.where}.{key}: must be true or false")
        return value

    def strings(self, key: str, default: list[str] | None = None) -> tuple[str, ...]:
        value = self._get(key, _REQUIRED if default is None else default)
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            raise ConfigError(f"{self.where}.{key}: must be a list of strings")
        return tuple(value)

    def header(self, key: str, default: str) -> str:
        """A request header the gateway reads for itself: a valid field name (RFC 9110 5.1)
        that neither HTTP nor the gateway already gives a meaning of its own."""
        name = self.text(key, default)
        if not _FIELD_NAME.fullmatch(name):
            raise ConfigError(f"{self.where}.{key}: {name!r} is not an HTTP header name")
        if name.lower() in _TAKEN_HEADERS:
            raise ConfigError(f"{self.where}.{key}: {name!r} already means something in HTTP")
        return name

    def path(self, key: str, base: Path) -> Path:
        return base / self.text(key)  # an absolute path stays absolute

    def load(self, key: str, base: Path, loader: Callable[[Path], _T]) -> _T:
        """``loader`` on the file ``key`` names; its errors name this key too, after the file."""
        path = self.path(key, base)
        try:
            return loader(path)
        except ConfigError as e:
            raise ConfigError(f"{self.where}.{key}: {e}") from e


_REQUIRED = object()
# A bound against a slip of the keyboard (PostgreSQL allows 100 connections by default).
_MAX_POOL_SIZE: Final = 1000
_MAX_LEEWAY_S: Final = 300
_MAX_KEY_WINDOW_S: Final = 7 * 24 * 3600
_FIELD_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")  # RFC 9110 5.1: a token
# Framing headers, the hop-by-hop ones (RFC 9110 7.6.1) that never reach the upstream, and
# those the gateway sets: none can carry an account or a license token too.
_TAKEN_HEADERS: Final = (
    HOP_BY_HOP
    | GATEWAY_SET
    | {
        "host",
        "content-length",
        "content-type",
        "content-encoding",
    }
)


def parse_host_port(value: str, where: str) -> HostPort:
    host, sep, port = value.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{where}: must be HOST:PORT, got {value!r}")
    return HostPort(host, int(port))


def _section(data: Mapping[str, Any], name: str, source: Path, allowed: set[str]) -> _Section:
    return _Section(require_table(data, name, str(source)), f"{source}: [{name}]", allowed)


def parse_config(data: Mapping[str, Any], source: Path) -> Config:
    """Validate the main file's mapping and load every file it references."""
    base = source.parent
    sections = {"server", "upstream", "identity", "tokens", "store", "audit"}
    sections |= {"catalog", "accounts", "policy", "routes"}
    only_tables(data, sections, str(source))

    server = _section(data, "server", source, {"listen", "admin_listen", "mode", "max_body_bytes"})
    listen = parse_host_port(server.text("listen", "127.0.0.1:8080"), f"{server.where}.listen")
    admin = parse_host_port(
        server.text("admin_listen", "127.0.0.1:9901"), f"{server.where}.admin_listen"
    )
    if admin.port == listen.port and admin.port != 0:
        # "Never on the proxy port" (CONTRACT section 2), however the host is spelled: found by
        # QA, "localhost:X" or "0.0.0.0:X" beside "127.0.0.1:X" passed check, then serve failed.
        raise ConfigError(
            f"{server.where}.admin_listen: must not be on the proxy's port {listen.port} (listen)"
        )
    mode = server.text("mode", "enforce")
    if mode not in ("enforce", "shadow"):
        raise ConfigError(f"{server.where}.mode: must be 'enforce' or 'shadow', got {mode!r}")

    upstream = _section(
        data,
        "upstream",
        source,
        {
            "url",
            "connect_timeout_s",
            "timeout_s",
            "deduplicates_idempotency_key",
            "idempotency_key_window_s",
        },
    )
    upstream_url = URL(upstream.text("url"))
    if upstream_url.scheme not in ("http", "https") or not upstream_url.host:
        raise ConfigError(f"{upstream.where}.url: must be an http(s) URL, got {upstream_url}")
    if upstream_url.query_string or upstream_url.fragment:
        raise ConfigError(f"{upstream.where}.url: must not carry a query or fragment")

    identity = _section(data, "identity", source, {"account_header"})
    tokens = _section(data, "tokens", source, {"header", "jwks", "issuers", "audience", "leeway_s"})
    jwks_path = tokens.path("jwks", base)
    issuers = tokens.strings("issuers")
    if not issuers:  # every token would be token_wrong_issuer (found by QA: check said ok)
        raise ConfigError(f"{tokens.where}.issuers: must name at least one issuer")
    store = _section(data, "store", source, {"url", "pool_size", "reservation_ttl_s"})
    pool_size = store.integer("pool_size", 10)
    if pool_size > _MAX_POOL_SIZE:
        raise ConfigError(f"{store.where}.pool_size: must be at most {_MAX_POOL_SIZE}")
    audit = _section(data, "audit", source, {"path"})
    catalog = _section(data, "catalog", source, {"file"})
    accounts = _section(data, "accounts", source, {"file"})
    policy = _section(
        data,
        "policy",
        source,
        {
            "country_groups_file",
            "restricted_country_groups",
            "restricted_countries",
            "controlled_eccns",
        },
    )
    groups = policy.load("country_groups_file", base, load_country_groups)
    controlled = frozenset(policy.strings("controlled_eccns", ["3A090.a", "3A090.b"]))
    bad = sorted(controlled - ECCN_CLASSES)
    if bad:
        raise ConfigError(f"{policy.where}.controlled_eccns: unknown class {bad[0]!r}")

    routes_value = data.get("routes", [])
    if not isinstance(routes_value, list) or not routes_value:
        raise ConfigError(f"{source}: [[routes]] must list at least one launch route")
    routes = tuple(
        build_route(as_table(r, f"{source}: routes[{i}]"), f"{source}: routes[{i}]")
        for i, r in enumerate(routes_value)
    )
    for i, route in enumerate(routes):
        for j, other in enumerate(routes[:i]):
            if route.ties(other):
                raise ConfigError(f"{source}: routes[{i}] claims the same requests as routes[{j}]")
    # Tried in this order, the first that claims a request taking it (``Route.precedence``).
    routes = with_second_readings(routes)
    account_header = identity.header("account_header", "X-Account-Id")
    token_header = tokens.header("header", "License-Token")
    # One name for both would remove the account with the token; "_" counts as "-" (CGI).
    if account_header.lower().replace("_", "-") == token_header.lower().replace("_", "-"):
        raise ConfigError(
            f"{tokens.where}.header: {token_header!r} is the account header too"
            " ([identity].account_header); they must be different headers"
        )

    # Clock skew allowed on exp and nbf: seconds, not hours (found in review: 1e12 made tokens
    # a year past their expiry valid, and `check` said ok).
    leeway_s = tokens.between("leeway_s", 30, 0, _MAX_LEEWAY_S)
    # Checked whether or not the flag is set, so a bad value never waits for it to surface.
    key_window_s = upstream.number("idempotency_key_window_s", CLIENT_TOKEN_WINDOW_S)
    if key_window_s > _MAX_KEY_WINDOW_S:  # (found in review: 1e308 meant "however late" again)
        raise ConfigError(
            f"{upstream.where}.idempotency_key_window_s: must be at most {_MAX_KEY_WINDOW_S}"
            " seconds (7 days)"
        )
    deduplicates = upstream.flag("deduplicates_idempotency_key", default=False)

    override_routes = tuple(
        (r, mount_head(r.dialect.path)) for r in routes if "*" not in r.dialect.methods
    )
    return Config(
        source=source,
        listen=listen,
        admin_listen=admin,
        mode="shadow" if mode == "shadow" else "enforce",
        max_body_bytes=server.integer("max_body_bytes", 1_048_576),
        upstream_url=upstream_url,
        connect_timeout_s=upstream.number("connect_timeout_s", 5),
        timeout_s=upstream.number("timeout_s", 60),
        upstream_deduplicates_idempotency_key=deduplicates,
        upstream_idempotency_key_window_s=key_window_s if deduplicates else None,
        account_header=account_header,
        token_header=token_header,
        jwks_path=jwks_path,
        keyring=tokens.load("jwks", base, KeyRing.from_jwks_file),
        issuers=issuers,
        audience=tokens.text("audience", "launchgate"),
        leeway_s=leeway_s,
        store_url=store.text("url", "sqlite:data/ledger.sqlite3"),
        store_pool_size=pool_size,
        reservation_ttl_s=store.number("reservation_ttl_s", 300),
        audit_path=audit.path("path", base),
        catalog=catalog.load("file", base, load_catalog),
        accounts=accounts.load("file", base, load_accounts),
        jurisdictions=build_jurisdictions(
            groups,
            policy.strings("restricted_country_groups", []),
            policy.strings("restricted_countries", []),
            policy.where,
        ),
        controlled_eccns=controlled,
        routes=routes,
        header_routes=tuple((r, r.by_header) for r in routes if r.by_header is not None),
        override_routes=override_routes,
        override_methods=tuple(
            sorted({m for r, _ in override_routes for m in r.dialect.methods} - {"POST"})
        ),
    )


def load_config(path: Path) -> Config:
    """Read and validate the main file and every file it references."""
    path = path.resolve() if path.exists() else path
    return parse_config(read_toml(path), path)
