"""Shared fixtures: signing keys, a make_token factory, and a gateway on real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from multidict import CIMultiDictProxy
from yarl import URL

from launchgate.config import Config, load_config
from launchgate.gateway import Gateway
from launchgate.proxy import create_app
from launchgate.stub import create_stub_app
from launchgate.tokens import PrivateKey, generate_key, issue_token, load_private_key
from launchgate.upstream import origin_of

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "config"
ISSUER = "compliance.example-cloud"
RESTRICTED = "acct-2001"  # CN (config/accounts.toml)
UNRESTRICTED = "acct-1001"  # DE
H100_SKU = "p5.48xlarge"  # 8x H100, 3A090.a
CPU_SKU = "m7i.large"  # no accelerator
# Every launch.decision record has these (CONTRACT section 5; items from section 9).
RECORD_FIELDS = frozenset(
    {
        *("event", "timestamp", "decision_id", "outcome", "reason", "enforced", "mode"),
        *("account", "restricted", "sku", "count", "accelerator", "accelerators", "eccn"),
        *("controlled", "region", "license", "method", "path", "items"),
        *("seq", "prev_hash", "hash"),
    }
)


@dataclass(frozen=True)
class Keys:
    folder: Path
    ed25519: PrivateKey  # kid "k-ed"
    p256: PrivateKey  # kid "k-es"


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    folder = tmp_path / "keys"
    ed = generate_key("k-ed", folder, "EdDSA")
    es = generate_key("k-es", folder, "ES256")
    return Keys(folder, load_private_key(ed), load_private_key(es))


MakeToken = Callable[..., str]


@pytest.fixture
def make_token(keys: Keys) -> MakeToken:
    """A license token for the restricted demo account; keyword arguments override."""

    def make(**overrides: Any) -> str:
        args: dict[str, Any] = {
            "private_key": keys.ed25519,
            "kid": "k-ed",
            "issuer": ISSUER,
            "account": RESTRICTED,
            "skus": [H100_SKU],
            "max_accelerators": 64,
            "expires_in_s": 3600,
        }
        args.update(overrides)
        return issue_token(**args)

    return make


GENERIC_ROUTE: dict[str, Any] = {
    "method": "POST",
    "path": "/v1/instances",
    "dialect": "generic-json",
    "sku": "/instance_type",
    "count": "/count",
    "region": "/region",
}


def write_config(
    tmp_path: Path,
    upstream_url: str,
    keys: Keys,
    routes: list[dict[str, Any]] | None = None,
    **sections: dict[str, Any],
) -> Path:
    """A main configuration in ``tmp_path`` over the shipped catalog, accounts and groups.

    ``routes`` replaces the default single generic-json route on ``/v1/instances``.
    """
    base: dict[str, dict[str, Any]] = {
        "server": {
            "listen": "127.0.0.1:0",
            "admin_listen": "127.0.0.1:1",
            "mode": "enforce",
            "max_body_bytes": 65536,
        },
        "upstream": {"url": upstream_url, "connect_timeout_s": 2, "timeout_s": 5},
        "identity": {"account_header": "X-Account-Id"},
        "tokens": {
            "header": "License-Token",
            "jwks": str(keys.folder / "jwks.json"),
            "issuers": [ISSUER],
            "audience": "launchgate",
            "leeway_s": 30,
        },
        "store": {"url": f"sqlite:{tmp_path / 'ledger.sqlite3'}"},
        "audit": {"path": str(tmp_path / "decisions.jsonl")},
        "catalog": {"file": str(SHIPPED / "catalog.toml")},
        "accounts": {"file": str(SHIPPED / "accounts.toml")},
        "policy": {
            "country_groups_file": str(SHIPPED / "country_groups.toml"),
            "restricted_country_groups": ["D:5"],
            "restricted_countries": ["MO"],
            "controlled_eccns": ["3A090.a", "3A090.b"],
        },
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    lines = []
    for name, values in base.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in values.items()]
    for route in routes if routes is not None else [GENERIC_ROUTE]:
        lines.append("[[routes]]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in route.items()]
    path = tmp_path / "launchgate.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass
class Harness:
    """A real gateway app on a real socket in front of the real stub backend."""

    url: str
    stub_url: str
    gateway: Gateway
    config_path: Path
    session: aiohttp.ClientSession

    @property
    def config(self) -> Config:
        return self.gateway.config

    async def launch(
        self,
        account: str | None = RESTRICTED,
        sku: str = H100_SKU,
        count: int = 1,
        token: str | None = None,
        region: str | None = "us-east-1",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, dict[str, Any], CIMultiDictProxy[str]]:
        body: dict[str, Any] = {"instance_type": sku, "count": count}
        if region is not None:
            body["region"] = region
        all_headers = dict(headers or {})
        if account is not None:
            all_headers["X-Account-Id"] = account
        if token is not None:
            all_headers["License-Token"] = token
        async with self.session.post(
            f"{self.url}/v1/instances", json=body, headers=all_headers
        ) as r:
            return r.status, await r.json(content_type=None), r.headers

    async def send(
        self,
        method: str,
        raw_path: str,
        body: Mapping[str, Any] | bytes,
        *,
        account: str | None = RESTRICTED,
        token: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> tuple[int, dict[str, Any]]:
        """Any request, raw path kept as written (JSON body unless bytes); status and JSON answer."""
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        all_headers = dict({"Content-Type": "application/json"} if headers is None else headers)
        if account is not None:
            all_headers["X-Account-Id"] = account
        if token is not None:
            all_headers["License-Token"] = token
        url = URL(f"{self.url}{raw_path}", encoded=True)
        async with self.session.request(method, url, data=data, headers=all_headers) as r:
            text = await r.text()
            try:
                return r.status, json.loads(text)
            except ValueError:
                return r.status, {"text": text}

    async def stub_requests(self) -> list[dict[str, Any]]:
        async with self.session.get(f"{self.stub_url}/_stub/requests") as r:
            data: dict[str, Any] = await r.json()
            return list(data["requests"])

    async def stub_fail(self, **mode: Any) -> None:
        async with self.session.post(f"{self.stub_url}/_stub/fail", json=mode) as r:
            assert r.status == 200, await r.text()

    def records(self) -> list[dict[str, Any]]:
        path = self.config.audit_path
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def decisions(self) -> list[dict[str, Any]]:
        return [r for r in self.records() if r["event"] == "launch.decision"]

    async def license(self, jti: str) -> Any:
        return await self.gateway.ledger.license(jti)


StartGateway = Callable[..., Awaitable[Harness]]


@pytest.fixture
async def stub_server(aiohttp_server: Any) -> TestServer:
    server: TestServer = await aiohttp_server(create_stub_app(), auto_decompress=False)
    return server


@pytest.fixture
async def start_gateway(
    tmp_path: Path, keys: Keys, stub_server: TestServer, aiohttp_server: Any
) -> AsyncIterator[StartGateway]:
    """Start a gateway (config sections overridable) in front of the stub backend."""
    sessions: list[aiohttp.ClientSession] = []

    async def start(
        upstream_url: str | None = None,
        routes: list[dict[str, Any]] | None = None,
        **sections: dict[str, Any],
    ) -> Harness:
        stub_url = str(stub_server.make_url("")).rstrip("/")
        path = write_config(tmp_path, upstream_url or stub_url, keys, routes, **sections)
        gateway = Gateway(load_config(path))
        server: TestServer = await aiohttp_server(create_app(gateway), auto_decompress=False)
        session = aiohttp.ClientSession()
        sessions.append(session)
        return Harness(str(server.make_url("")).rstrip("/"), stub_url, gateway, path, session)

    yield start
    for session in sessions:
        await session.close()


def now() -> float:
    return time.time()


# --- plain TCP upstreams, for answers no HTTP server library would give -------------------

RawAnswer = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def start_raw_server(answer: RawAnswer) -> tuple[asyncio.Server, str]:
    """A TCP server on loopback answering each connection with ``answer`` (the connection is
    closed once it returns); the server and its http:// URL."""

    async def answering(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await answer(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(answering, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


@contextlib.asynccontextmanager
async def raw_upstream(answer: RawAnswer) -> AsyncIterator[str]:
    """``start_raw_server`` for the length of a block; yields its URL."""
    server, url = await start_raw_server(answer)
    try:
        yield url
    finally:
        server.close()
        await server.wait_closed()


def replying(answer: bytes) -> RawAnswer:
    """A raw upstream that reads a request's head, sends ``answer`` and hangs up."""

    async def reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer)
        await writer.drain()

    return reply


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request off a raw connection: its head, and its body by Content-Length."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ),
        0,
    )
    return head, await reader.readexactly(length)


# --- TLS upstreams ---------------------------------------------------------------------------


def tls_certificates(folder: Path, name: str = "localhost") -> tuple[Path, Path, Path]:
    """A certificate authority of its own and a server certificate it issued for the DNS name
    ``name`` alone (no IP address), with the extensions strict X.509 checking asks for; the PEM
    files of the authority's certificate, the server's certificate and the server's key."""

    def key_ids(key: ec.EllipticCurvePrivateKey) -> x509.SubjectKeyIdentifier:
        return x509.SubjectKeyIdentifier.from_public_key(key.public_key())

    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(minutes=5)
    end = start + datetime.timedelta(days=1)
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"test authority for {name}")])
    usage = dict.fromkeys(
        (
            "digital_signature",
            "content_commitment",
            "key_encipherment",
            "data_encipherment",
            "key_agreement",
            "key_cert_sign",
            "crl_sign",
            "encipher_only",
            "decipher_only",
        ),
        False,
    )
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(**{**usage, "key_cert_sign": True, "crl_sign": True}), critical=True
        )
        .add_extension(key_ids(ca_key), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    server = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(**{**usage, "digital_signature": True}), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.OID_SERVER_AUTH]), critical=False)
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
        .add_extension(key_ids(key), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_path, cert_path, key_path = (folder / f"{name}{ext}" for ext in (".ca", ".crt", ".key"))
    ca_path.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_path.write_bytes(server.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return ca_path, cert_path, key_path


@pytest.fixture(autouse=True)
def _fresh_upstream_origins() -> Iterator[None]:
    """Each test builds its upstream TLS contexts anew (``origin_of`` caches one per URL, read
    with the SSL_CERT_FILE of its first use; two tests may get the same port)."""
    origin_of.cache_clear()
    yield
    origin_of.cache_clear()


@contextlib.asynccontextmanager
async def tls_site(app: web.Application, cert: Path, key: Path) -> AsyncIterator[int]:
    """``app`` served over TLS on 127.0.0.1 for the length of a block; yields its port."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=context)
        await site.start()
        yield runner.addresses[0][1]
    finally:
        await runner.cleanup()
