"""License tokens: key generation, the JWK Set key ring, issuing, and CONTRACT §3 rows 8-14."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import given
from hypothesis import strategies as st
from jwt.algorithms import ECAlgorithm, OKPAlgorithm

from launchgate import tokens
from launchgate.errors import ConfigError, TokenError
from launchgate.tokens import (
    KeyRing,
    License,
    TokenVerifier,
    generate_key,
    issue_token,
    load_private_key,
    parse_duration,
    peek,
)

NOW = 1_800_000_000.0
LEEWAY = 30
ISSUER = "compliance.example-cloud"


@dataclass(frozen=True)
class Keys:
    """Two trusted signing keys (one per algorithm), their JWK Set, and untrusted extras."""

    ed: Ed25519PrivateKey
    es: ec.EllipticCurvePrivateKey
    jwks: Path
    ring: KeyRing
    rogue_ed: Ed25519PrivateKey
    rsa: rsa.RSAPrivateKey


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    """Keys made the way staff make them: `keys generate` for both algorithms."""
    out = tmp_path_factory.mktemp("keys")
    ed_pem = generate_key("ed-1", out)
    es_pem = generate_key("es-1", out, alg="ES256")
    ed = load_private_key(ed_pem)
    es = load_private_key(es_pem)
    assert isinstance(ed, Ed25519PrivateKey)
    assert isinstance(es, ec.EllipticCurvePrivateKey)
    return Keys(
        ed=ed,
        es=es,
        jwks=out / "jwks.json",
        ring=KeyRing.from_jwks_file(out / "jwks.json"),
        rogue_ed=Ed25519PrivateKey.generate(),
        rsa=rsa.generate_private_key(public_exponent=65537, key_size=2048),
    )


@pytest.fixture
def verifier(keys: Keys) -> TokenVerifier:
    """A verifier with the example configuration's [tokens] settings."""
    return TokenVerifier(keys.ring, issuers=[ISSUER], audience="launchgate", leeway_s=LEEWAY)


# --- building tokens by hand (so tests can make every kind of bad token) ----------------


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def base_claims(**overrides: Any) -> dict[str, Any]:
    claims: dict[str, Any] = {
        "iss": ISSUER,
        "aud": "launchgate",
        "sub": "acct-2001",
        "jti": "lic-42",
        "iat": NOW - 3600,
        "exp": NOW + 3600,
        "skus": ["p5.48xlarge"],
        "max_accelerators": 64,
    }
    claims.update(overrides)
    return claims


def without(*names: str) -> dict[str, Any]:
    claims = base_claims()
    for name in names:
        del claims[name]
    return claims


def sign_raw(
    header: Mapping[str, Any] | bytes,
    payload: Mapping[str, Any] | bytes,
    key: Ed25519PrivateKey | ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | bytes | None,
) -> str:
    """A compact JWS over exactly these header/payload bytes, signed as `key` dictates."""
    h = header if isinstance(header, bytes) else json.dumps(dict(header)).encode()
    p = payload if isinstance(payload, bytes) else json.dumps(dict(payload)).encode()
    signing_input = f"{b64(h)}.{b64(p)}".encode()
    if isinstance(key, Ed25519PrivateKey):
        sig = key.sign(signing_input)
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        sig = ECAlgorithm(ECAlgorithm.SHA256).sign(signing_input, key)
    elif isinstance(key, rsa.RSAPrivateKey):
        sig = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    elif isinstance(key, bytes):
        sig = hmac.new(key, signing_input, hashlib.sha256).digest()
    else:
        sig = b""
    return f"{signing_input.decode()}.{b64(sig)}"


def ed_token(k: Keys, claims: Mapping[str, Any] | bytes | None = None, **header: Any) -> str:
    """A token signed by the trusted EdDSA key, with header extras and given claims."""
    return sign_raw(
        {"alg": "EdDSA", "typ": "JWT", "kid": "ed-1", **header},
        base_claims() if claims is None else claims,
        k.ed,
    )


def public_pem(k: Keys) -> bytes:
    return k.ed.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def tamper_payload(token: str) -> str:
    h, _, s = token.split(".")
    return f"{h}.{b64(json.dumps(base_claims(max_accelerators=10_000)).encode())}.{s}"


def tamper_signature(token: str) -> str:
    h, p, s = token.split(".")
    sig = bytearray(base64.urlsafe_b64decode(s + "=="))
    sig[0] ^= 0x01
    return f"{h}.{p}.{b64(bytes(sig))}"


# --- keys generate ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alg", "kty", "crv"), [("EdDSA", "OKP", "Ed25519"), ("ES256", "EC", "P-256")]
)
def test_generate_key_writes_private_pem_0600_and_public_jwk(
    tmp_path: Path, alg: str, kty: str, crv: str
) -> None:
    """keys generate: a 0600 PKCS#8 PEM and a public-only JWK with kid, alg and use."""
    pem = generate_key("2026-11", tmp_path / "new" / "dir", alg=alg)
    assert pem == tmp_path / "new" / "dir" / "2026-11.pem"
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    assert pem.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    load_private_key(pem)
    jwks = json.loads((pem.parent / "jwks.json").read_text())
    (jwk,) = jwks["keys"]
    assert jwk["kid"] == "2026-11"
    assert jwk["alg"] == alg
    assert jwk["use"] == "sig"
    assert (jwk["kty"], jwk["crv"]) == (kty, crv)
    assert "d" not in jwk
    assert KeyRing.from_jwks_file(pem.parent / "jwks.json").kids == ("2026-11",)


def test_generate_key_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    """The private key is never group/world readable, even with a permissive umask."""
    old = os.umask(0)
    try:
        pem = generate_key("k", tmp_path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600


def test_generate_key_refuses_to_overwrite_an_existing_pem(tmp_path: Path) -> None:
    """An existing KID.pem is never replaced, and the JWK Set is left untouched."""
    (tmp_path / "k.pem").write_bytes(b"precious")
    with pytest.raises(ConfigError, match=r"k\.pem.*already exists"):
        generate_key("k", tmp_path)
    assert (tmp_path / "k.pem").read_bytes() == b"precious"
    assert not (tmp_path / "jwks.json").exists()


def test_generate_key_twice_with_one_kid_fails(tmp_path: Path) -> None:
    """Generating the same kid again fails, naming the key file it refuses to overwrite (found
    by QA: it named jwks.json), and keeps the first key."""
    pem = generate_key("k", tmp_path)
    first = pem.read_bytes()
    with pytest.raises(ConfigError, match=r"k\.pem: already exists"):
        generate_key("k", tmp_path)
    assert pem.read_bytes() == first
    assert len(json.loads((tmp_path / "jwks.json").read_text())["keys"]) == 1


def test_generate_key_rejects_kid_already_in_jwks(tmp_path: Path) -> None:
    """A kid already published in jwks.json is an error even when its PEM is gone."""
    generate_key("k", tmp_path).unlink()
    with pytest.raises(ConfigError, match=r"jwks\.json.*'k' is already present"):
        generate_key("k", tmp_path)
    assert not (tmp_path / "k.pem").exists()


def test_generate_key_keeps_other_keys_and_members(tmp_path: Path) -> None:
    """Adding a key keeps every key (and any other member) already in the JWK Set."""
    other = {"kty": "OKP", "crv": "Ed25519", "x": "abc", "kid": "old", "alg": "EdDSA"}
    (tmp_path / "jwks.json").write_text(json.dumps({"keys": [other], "note": "kept"}))
    generate_key("new", tmp_path, alg="ES256")
    generate_key("newer", tmp_path)
    jwks = json.loads((tmp_path / "jwks.json").read_text())
    assert [k["kid"] for k in jwks["keys"]] == ["old", "new", "newer"]
    assert jwks["keys"][0] == other
    assert jwks["note"] == "kept"
    assert not [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize(
    ("kid", "alg", "jwks_text", "match"),
    [
        ("k", "RS256", None, "RS256"),
        ("k", "none", None, "none"),
        ("../escape", "EdDSA", None, "escape"),
        ("", "EdDSA", None, "key id"),
        (".hidden", "EdDSA", None, "hidden"),
        ("k", "EdDSA", "{not json", r"jwks\.json.*not valid JSON"),
        ("k", "EdDSA", '{"keys": {}}', r"jwks\.json.*not a JWK Set"),
        ("k", "EdDSA", "[]", r"jwks\.json.*not a JWK Set"),
    ],
)
def test_generate_key_errors_name_the_problem(
    tmp_path: Path, kid: str, alg: str, jwks_text: str | None, match: str
) -> None:
    """Bad alg, unsafe kid, or an unreadable JWK Set: ConfigError, and no PEM left behind."""
    if jwks_text is not None:
        (tmp_path / "jwks.json").write_text(jwks_text)
    with pytest.raises(ConfigError, match=match):
        generate_key(kid, tmp_path, alg=alg)
    assert not list(tmp_path.glob("*.pem"))


# --- load_private_key / parse_duration ----------------------------------------------------


def _pem(key: Any, password: bytes | None = None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    data: bytes = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )
    return data


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, "cannot read"),
        (b"hello", "not an unencrypted PEM"),
        (_pem(Ed25519PrivateKey.generate(), b"secret"), "not an unencrypted PEM"),
        (_pem(ec.generate_private_key(ec.SECP384R1())), "Ed25519.*P-256"),
    ],
    ids=["missing", "garbage", "encrypted", "p384"],
)
def test_load_private_key_errors_name_the_file(
    tmp_path: Path, content: bytes | None, match: str
) -> None:
    """A missing, garbled, encrypted or wrong-curve key file is a ConfigError naming it."""
    path = tmp_path / "signing.pem"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=rf"signing\.pem: .*{match}"):
        load_private_key(path)


def test_load_private_key_rejects_rsa(keys: Keys, tmp_path: Path) -> None:
    """An RSA key cannot sign license tokens."""
    path = tmp_path / "rsa.pem"
    path.write_bytes(_pem(keys.rsa))
    with pytest.raises(ConfigError, match=r"rsa\.pem"):
        load_private_key(path)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("45s", 45),
        ("30m", 1800),
        ("12h", 43200),
        ("90d", 7_776_000),
        ("1d", 86400),
        ("1.5h", 5400),  # CONTRACT section 1: "a number with unit"
        ("0.5d", 43200),
        ("2.0s", 2),
    ],
)
def test_parse_duration(text: str, seconds: int) -> None:
    """Durations are a number with unit s, m, h or d, making whole seconds."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", "90", "d", "0d", "-1d", "10w", "10 d", " 10d", "1D", "1.5s", "0.0h", ".5h", "1.h"]
)
def test_parse_duration_rejects(text: str) -> None:
    """Anything else is a ValueError that says what is expected."""
    with pytest.raises(ValueError, match="s, m, h or d"):
        parse_duration(text)


# --- issue_token --------------------------------------------------------------------------


def _issue(k: Keys, **overrides: Any) -> str:
    args: dict[str, Any] = {
        "private_key": k.ed,
        "kid": "ed-1",
        "issuer": ISSUER,
        "account": "acct-2001",
        "skus": ["p5.48xlarge"],
        "max_accelerators": 64,
        "expires_in_s": 3600,
        "now": NOW,
    }
    args.update(overrides)
    return issue_token(**args)


@pytest.mark.parametrize(
    ("key_attr", "kid", "alg"), [("ed", "ed-1", "EdDSA"), ("es", "es-1", "ES256")]
)
def test_issue_and_verify_round_trip(
    keys: Keys, verifier: TokenVerifier, key_attr: str, kid: str, alg: str
) -> None:
    """A token issued with either algorithm verifies to a License with every claim."""
    token = _issue(
        keys,
        private_key=getattr(keys, key_attr),
        kid=kid,
        skus=["p5.48xlarge", "p4d.24xlarge"],
        regions=["us-east-1"],
        license_ref="D123456",
        not_before=int(NOW) - 10,
        jti="lic-7",
    )
    header, _ = peek(token)
    assert header == {"alg": alg, "typ": "JWT", "kid": kid}
    assert verifier.verify(token, now=NOW) == License(
        jti="lic-7",
        sub="acct-2001",
        iss=ISSUER,
        aud=("launchgate",),
        iat=NOW,
        exp=NOW + 3600,
        nbf=NOW - 10,
        skus=("p5.48xlarge", "p4d.24xlarge"),
        max_accelerators=64,
        regions=("us-east-1",),
        license_ref="D123456",
        kid=kid,
        alg=alg,
    )


def test_issue_token_minimal_claims(keys: Keys) -> None:
    """Optional claims are absent unless given; jti defaults to a fresh 'lic-' id."""
    first, second = _issue(keys), _issue(keys)
    _, claims = peek(first)
    assert claims is not None
    assert set(claims) == {"iss", "aud", "sub", "jti", "iat", "exp", "skus", "max_accelerators"}
    assert claims["aud"] == "launchgate"
    assert claims["exp"] - claims["iat"] == 3600
    assert claims["jti"].startswith("lic-")
    assert claims["jti"] != (peek(second)[1] or {})["jti"]


@pytest.mark.parametrize(
    "overrides",
    [
        {"skus": []},
        {"skus": "p5.48xlarge"},
        {"skus": [""]},
        {"max_accelerators": 0},
        {"max_accelerators": True},
        {"max_accelerators": "8"},
        {"max_accelerators": 2**53},
        {"expires_in_s": 0},
        {"expires_in_s": 3_000_000 * 86_400},  # year 10240
        {"kid": ""},
        {"account": ""},
        {"regions": []},
        {"jti": ""},
        {"jti": "lic\u000042"},
        {"private_key": ec.generate_private_key(ec.SECP384R1())},
    ],
    ids=lambda o: "-".join(f"{k}={v!r}"[:30] for k, v in o.items()),
)
def test_issue_token_rejects_bad_input(keys: Keys, overrides: dict[str, Any]) -> None:
    """issue_token refuses to sign a token the gateway would reject."""
    with pytest.raises(ValueError):  # noqa: PT011 - each case has its own message
        _issue(keys, **overrides)


# --- KeyRing ------------------------------------------------------------------------------


def _jwk(keys: Keys, **overrides: Any) -> dict[str, Any]:
    jwk: dict[str, Any] = dict(OKPAlgorithm.to_jwk(keys.ed.public_key(), as_dict=True))
    jwk.update({"kid": "a", "alg": "EdDSA", "use": "sig"})
    jwk.update(overrides)
    return {k: v for k, v in jwk.items() if v is not None}


def _es_jwk(keys: Keys, **overrides: Any) -> dict[str, Any]:
    jwk: dict[str, Any] = dict(ECAlgorithm.to_jwk(keys.es.public_key(), as_dict=True))
    jwk.update({"kid": "b", "alg": "ES256"})
    jwk.update(overrides)
    return jwk


def test_a_jwk_without_alg_takes_the_one_its_key_type_signs_with(keys: Keys) -> None:
    """RFC 7517 makes "alg" optional: an Ed25519 key is EdDSA, a P-256 key ES256 (and the key
    is then bound to that algorithm as if the JWK had named it)."""
    ring = KeyRing.from_jwks(
        {"keys": [_jwk(keys, alg=None), _es_jwk(keys, alg=None)]}, "conf/jwks.json"
    )
    ed, es = ring.get("a"), ring.get("b")
    assert ed is not None and es is not None
    assert (ed.alg, es.alg) == ("EdDSA", "ES256")


def test_keyring_takes_a_key_whose_key_ops_allow_verify(keys: Keys) -> None:
    """A JWK may list its operations (RFC 7517 4.3): one that allows "verify" is a signing key."""
    ring = KeyRing.from_jwks({"keys": [_jwk(keys, key_ops=["verify"])]}, "conf/jwks.json")
    assert ring.kids == ("a",)


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda k: {"keys": {}}, "not a JWK Set"),
        (lambda k: {}, "not a JWK Set"),
        (lambda k: {"keys": ["x"]}, r"keys\[0\]: not a JSON object"),
        (lambda k: {"keys": [_jwk(k, kid=None)]}, r"keys\[0\]: missing 'kid'"),
        (
            lambda k: {"keys": [_jwk(k, alg=None, kty="RSA")]},
            r"keys\[0\] \(kid 'a'\): missing 'alg', and kty 'RSA'",
        ),
        (lambda k: {"keys": [_jwk(k, alg="RS256")]}, "alg 'RS256' is not accepted"),
        (lambda k: {"keys": [_jwk(k, alg="HS256", kty="oct")]}, "alg 'HS256'"),
        (lambda k: {"keys": [_jwk(k, alg="ES256")]}, "needs kty 'EC'"),
        (lambda k: {"keys": [_jwk(k, kty="EC")]}, "needs kty 'OKP'"),
        (lambda k: {"keys": [_es_jwk(k, crv="P-384")]}, "crv 'P-256'"),
        (lambda k: {"keys": [_jwk(k, use="enc")]}, "'use'"),
        (lambda k: {"keys": [_jwk(k, key_ops=["encrypt"])]}, "'key_ops'"),
        (lambda k: {"keys": [_jwk(k, key_ops="verify")]}, "'key_ops'"),
        (lambda k: {"keys": [_jwk(k, x="AAAA")]}, "not a valid Ed25519 public key"),
        (lambda k: {"keys": [_jwk(k, x=7)]}, "non-string x"),
        (lambda k: {"keys": [_es_jwk(k, y=_es_jwk(k)["x"])]}, "not a valid P-256"),
        (lambda k: {"keys": [_jwk(k), _es_jwk(k, kid="a")]}, r"keys\[1\]: duplicate kid 'a'"),
        (
            lambda k: {
                "keys": [dict(OKPAlgorithm.to_jwk(k.ed, as_dict=True), kid="a", alg="EdDSA")]
            },
            "private key material",
        ),
    ],
    ids=[
        "keys-not-array",
        "no-keys-member",
        "key-not-object",
        "no-kid",
        "no-alg",
        "rs256",
        "hs256",
        "eddsa-with-ec-shape",
        "es256-alg-on-okp",
        "p384",
        "use-enc",
        "key-ops-without-verify",
        "key-ops-not-a-list",
        "bad-x",
        "x-not-string",
        "point-not-on-curve",
        "duplicate-kid",
        "private-d",
    ],
)
def test_keyring_rejects_bad_jwks(keys: Keys, make: Callable[[Keys], Any], match: str) -> None:
    """Every JWK Set problem is a ConfigError naming the source and the key at fault."""
    with pytest.raises(ConfigError, match=rf"^conf/jwks\.json: .*{match}"):
        KeyRing.from_jwks(make(keys), "conf/jwks.json")


@pytest.mark.parametrize(
    ("text", "match"),
    [
        (None, "cannot read"),
        ("{nope", "not valid JSON"),
        ('{"keys": [], "keys": []}', "not valid JSON: duplicate key 'keys'"),
    ],
)
def test_keyring_file_errors_name_the_file(tmp_path: Path, text: str | None, match: str) -> None:
    """A missing or unparsable JWK Set file is a ConfigError naming the file."""
    path = tmp_path / "jwks.json"
    if text is not None:
        path.write_text(text)
    with pytest.raises(ConfigError, match=rf"jwks\.json: {match}"):
        KeyRing.from_jwks_file(path)


def test_keyring_lookup(keys: Keys) -> None:
    """kids lists the trusted keys in order; get() finds by kid and returns None otherwise."""
    assert keys.ring.kids == ("ed-1", "es-1")
    ed = keys.ring.get("ed-1")
    assert ed is not None
    assert ed.alg == "EdDSA"
    assert keys.ring.get("nope") is None


# --- verify: CONTRACT §3 rows 8-14 ----------------------------------------------------------

Case = tuple[Callable[[Keys], str], str]

FAILURES: dict[str, Case] = {
    # row 8: not a compact JWS, or an algorithm / header we never accept
    "empty": (lambda k: "", "token_invalid"),
    "two-parts": (lambda k: "eyJhbGciOiJFZERTQSJ9.e30", "token_invalid"),
    "four-parts": (lambda k: ed_token(k) + ".x", "token_invalid"),
    "bad-base64": (lambda k: "a!.b.c", "token_invalid"),
    "padded-base64": (lambda k: ed_token(k).replace(".", "=.", 1), "token_invalid"),
    "header-not-json": (lambda k: sign_raw(b"not json", base_claims(), k.ed), "token_invalid"),
    "header-array": (lambda k: sign_raw(b'["EdDSA"]', base_claims(), k.ed), "token_invalid"),
    "header-duplicate-alg": (
        lambda k: sign_raw(b'{"alg":"EdDSA","alg":"none","kid":"ed-1"}', base_claims(), k.ed),
        "token_invalid",
    ),
    "no-alg": (lambda k: sign_raw({"kid": "ed-1"}, base_claims(), k.ed), "token_invalid"),
    "alg-none": (
        lambda k: sign_raw({"alg": "none", "kid": "ed-1"}, base_claims(), None),
        "token_invalid",
    ),
    "alg-None-case": (lambda k: sign_raw({"alg": "None"}, base_claims(), None), "token_invalid"),
    "hs256-key-confusion": (
        lambda k: sign_raw({"alg": "HS256", "kid": "ed-1"}, base_claims(), public_pem(k)),
        "token_invalid",
    ),
    "rs256": (
        lambda k: sign_raw({"alg": "RS256", "kid": "ed-1"}, base_claims(), k.rsa),
        "token_invalid",
    ),
    "jku": (lambda k: ed_token(k, jku="https://evil.example/jwks.json"), "token_invalid"),
    "x5u": (lambda k: ed_token(k, x5u="https://evil.example/cert.pem"), "token_invalid"),
    "x5c": (lambda k: ed_token(k, x5c=["MIIB..."]), "token_invalid"),
    "crit": (lambda k: ed_token(k, crit=["exp"], exp=1), "token_invalid"),
    "b64-false": (lambda k: ed_token(k, b64=False, crit=["b64"]), "token_invalid"),
    "b64-without-crit": (lambda k: ed_token(k, b64=True), "token_invalid"),
    "embedded-jwk": (
        lambda k: sign_raw(
            {
                "alg": "EdDSA",
                "kid": "ed-1",
                "jwk": OKPAlgorithm.to_jwk(k.rogue_ed.public_key(), as_dict=True),
            },
            base_claims(),
            k.rogue_ed,
        ),
        "token_invalid",
    ),
    # row 9: no trusted key by that kid
    "no-kid": (lambda k: sign_raw({"alg": "EdDSA"}, base_claims(), k.ed), "token_unknown_key"),
    "kid-not-string": (lambda k: ed_token(k, kid=1), "token_unknown_key"),
    "kid-empty": (lambda k: ed_token(k, kid=""), "token_unknown_key"),
    "unknown-kid": (lambda k: ed_token(k, kid="2019-01"), "token_unknown_key"),
    # row 10: key for another alg, bad signature, bad claims
    "es256-kid-on-eddsa-token": (lambda k: ed_token(k, kid="es-1"), "token_invalid"),
    "eddsa-kid-on-es256-token": (
        lambda k: sign_raw({"alg": "ES256", "kid": "ed-1"}, base_claims(), k.es),
        "token_invalid",
    ),
    "untrusted-key-trusted-kid": (
        lambda k: sign_raw({"alg": "EdDSA", "kid": "ed-1"}, base_claims(), k.rogue_ed),
        "token_invalid",
    ),
    "tampered-payload": (lambda k: tamper_payload(ed_token(k)), "token_invalid"),
    "tampered-signature": (lambda k: tamper_signature(ed_token(k)), "token_invalid"),
    "tampered-es256-signature": (
        lambda k: tamper_signature(sign_raw({"alg": "ES256", "kid": "es-1"}, base_claims(), k.es)),
        "token_invalid",
    ),
    "empty-signature": (lambda k: ed_token(k).rsplit(".", 1)[0] + ".", "token_invalid"),
    "payload-not-json": (lambda k: ed_token(k, claims=b"hello"), "token_invalid"),
    "payload-array": (lambda k: ed_token(k, claims=b"[1]"), "token_invalid"),
    "payload-duplicate-key": (
        lambda k: ed_token(
            k,
            claims=json.dumps(base_claims())[:-1].encode() + b', "sub": "acct-1001"}',
        ),
        "token_invalid",
    ),
    "exp-NaN": (
        lambda k: ed_token(k, claims=json.dumps(base_claims(exp=float("nan"))).encode()),
        "token_invalid",
    ),
    "exp-Infinity": (
        lambda k: ed_token(k, claims=json.dumps(base_claims(exp=float("inf"))).encode()),
        "token_invalid",
    ),
    "exp-huge-int": (lambda k: ed_token(k, base_claims(exp=10**400)), "token_invalid"),
    **{
        f"missing-{name}": (lambda k, name=name: ed_token(k, without(name)), "token_invalid")  # type: ignore[misc]  # default binds the loop variable
        for name in ("iss", "aud", "sub", "jti", "iat", "exp", "skus", "max_accelerators")
    },
    **{
        f"wrong-type-{name}={value!r}": (
            lambda k, name=name, value=value: ed_token(k, base_claims(**{name: value})),  # type: ignore[misc]  # default binds the loop variables
            "token_invalid",
        )
        for name, value in [
            ("iss", 1),
            ("iss", None),
            ("aud", ["launchgate", 1]),
            ("aud", 5),
            ("aud", {"launchgate": True}),
            ("sub", 2001),
            ("sub", ["acct-2001"]),
            ("jti", ""),
            ("jti", 42),
            ("jti", "lic\u0000x"),  # no control character: `token revoke` could never name it
            ("jti", "lic-42\n"),
            ("iat", "2026-11-26"),
            ("iat", True),
            ("exp", "tomorrow"),
            ("exp", True),
            ("exp", None),
            ("nbf", "now"),
            ("nbf", False),
            ("skus", []),
            ("skus", "p5.48xlarge"),
            ("skus", [8]),
            ("max_accelerators", True),
            ("max_accelerators", 0),
            ("max_accelerators", -8),
            ("max_accelerators", "8"),
            ("max_accelerators", 8.0),
            ("max_accelerators", None),
            ("max_accelerators", 2**53),  # past I-JSON's exact integers (and, at 2**63, SQLite's)
            ("exp", 253_402_300_800),  # year 10000: no date can say it
            ("exp", -1),
            ("nbf", 1e300),
            ("regions", "us-east-1"),
            ("regions", [1]),
            ("regions", None),
            ("license_ref", 7),
        ]
    },
    # rows 11-14
    "expired-beyond-leeway": (
        lambda k: ed_token(k, base_claims(exp=NOW - LEEWAY - 1)),
        "token_expired",
    ),
    "nbf-beyond-leeway": (
        lambda k: ed_token(k, base_claims(nbf=NOW + LEEWAY + 1)),
        "token_not_yet_valid",
    ),
    "wrong-issuer": (lambda k: ed_token(k, base_claims(iss="someone.else")), "token_wrong_issuer"),
    "issuer-case-differs": (
        lambda k: ed_token(k, base_claims(iss=ISSUER.upper())),
        "token_wrong_issuer",
    ),
    "wrong-audience": (
        lambda k: ed_token(k, base_claims(aud="other-gateway")),
        "token_wrong_audience",
    ),
    "wrong-audience-list": (
        lambda k: ed_token(k, base_claims(aud=["a", "b"])),
        "token_wrong_audience",
    ),
    # "string or array": an empty array is well-formed and does not contain the audience.
    "wrong-audience-empty-list": (
        lambda k: ed_token(k, base_claims(aud=[])),
        "token_wrong_audience",
    ),
    # order between rows: the earliest failing row decides
    "order-unknown-kid-before-bad-claims": (
        lambda k: ed_token(k, without("sub"), kid="nope"),
        "token_unknown_key",
    ),
    "order-bad-signature-before-expiry": (
        lambda k: tamper_signature(ed_token(k, base_claims(exp=NOW - 1000))),
        "token_invalid",
    ),
    "order-bad-claim-before-expiry": (
        lambda k: ed_token(k, base_claims(exp=NOW - 1000, skus=[])),
        "token_invalid",
    ),
    "order-expired-before-nbf-issuer-audience": (
        lambda k: ed_token(k, base_claims(exp=NOW - 1000, nbf=NOW + 1000, iss="x", aud="y")),
        "token_expired",
    ),
    "order-nbf-before-issuer": (
        lambda k: ed_token(k, base_claims(nbf=NOW + 1000, iss="x", aud="y")),
        "token_not_yet_valid",
    ),
    "order-issuer-before-audience": (
        lambda k: ed_token(k, base_claims(iss="x", aud="y")),
        "token_wrong_issuer",
    ),
    # RFC 7519 7.2: the JSON is UTF-8 (found in review: json.loads guessed these, and verified)
    "claims-utf16": (
        lambda k: ed_token(k, json.dumps(base_claims()).encode("utf-16")),
        "token_invalid",
    ),
    "claims-utf8-bom": (
        lambda k: ed_token(k, b"\xef\xbb\xbf" + json.dumps(base_claims()).encode()),
        "token_invalid",
    ),
    "header-utf32": (
        lambda k: sign_raw(
            json.dumps({"alg": "EdDSA", "kid": "ed-1"}).encode("utf-32"), base_claims(), k.ed
        ),
        "token_invalid",
    ),
}


@pytest.mark.parametrize(("make", "reason"), list(FAILURES.values()), ids=list(FAILURES))
def test_verify_failures(
    keys: Keys, verifier: TokenVerifier, make: Callable[[Keys], str], reason: str
) -> None:
    """Each bad token fails with its CONTRACT row's reason, and the detail never holds it."""
    token = make(keys)
    with pytest.raises(TokenError) as caught:
        verifier.verify(token, now=NOW)
    assert caught.value.reason == reason
    assert caught.value.detail
    if token:
        assert token not in caught.value.detail
        assert token not in str(caught.value)
    signature = token.rsplit(".", 1)[-1]
    if len(signature) > 16:
        assert signature not in caught.value.detail


PASSES: dict[str, Callable[[Keys], str]] = {
    "exp-within-leeway": lambda k: ed_token(k, base_claims(exp=NOW - LEEWAY + 1)),
    "exp-exactly-at-leeway": lambda k: ed_token(k, base_claims(exp=NOW - LEEWAY)),
    "nbf-within-leeway": lambda k: ed_token(k, base_claims(nbf=NOW + LEEWAY - 1)),
    "nbf-past": lambda k: ed_token(k, base_claims(nbf=NOW - 10)),
    "aud-list-containing-audience": lambda k: ed_token(k, base_claims(aud=["x", "launchgate"])),
    "float-times": lambda k: ed_token(k, base_claims(iat=NOW - 0.5, exp=NOW + 0.5)),
    "empty-regions": lambda k: ed_token(k, base_claims(regions=[])),
    "unknown-extra-claim": lambda k: ed_token(k, base_claims(extra={"x": 1})),
    "es256": lambda k: sign_raw({"alg": "ES256", "kid": "es-1"}, base_claims(), k.es),
    "no-typ": lambda k: sign_raw({"alg": "EdDSA", "kid": "ed-1"}, base_claims(), k.ed),
}


@pytest.mark.parametrize("make", list(PASSES.values()), ids=list(PASSES))
def test_verify_passes(keys: Keys, verifier: TokenVerifier, make: Callable[[Keys], str]) -> None:
    """Edge cases that are valid tokens: leeway boundaries, audience lists, ES256."""
    lic = verifier.verify(make(keys), now=NOW)
    assert lic.jti == "lic-42"
    assert lic.sub == "acct-2001"


def test_verify_accepts_any_configured_issuer(keys: Keys) -> None:
    """iss may be any one of the configured issuers."""
    verifier = TokenVerifier(
        keys.ring, issuers=["other", ISSUER], audience="launchgate", leeway_s=LEEWAY
    )
    assert verifier.verify(ed_token(keys), now=NOW).iss == ISSUER


@given(st.text(max_size=300))
def test_verify_only_ever_raises_token_error(text: str) -> None:
    """Arbitrary input never escapes as anything but a TokenError (and peek never raises)."""
    verifier = TokenVerifier(KeyRing([]), issuers=[ISSUER], audience="launchgate", leeway_s=0)
    with pytest.raises(TokenError):
        verifier.verify(text, now=NOW)
    peek(text)


def test_verify_rejects_oversized_token(keys: Keys, verifier: TokenVerifier) -> None:
    """An absurdly long token is token_invalid before any parsing or caching."""
    token = ed_token(keys, base_claims(pad="x" * 20_000))
    with pytest.raises(TokenError) as caught:
        verifier.verify(token, now=NOW)
    assert caught.value.reason == "token_invalid"
    assert verifier.cached_tokens == 0


def test_failure_detail_is_readable(keys: Keys, verifier: TokenVerifier) -> None:
    """Details name the license and the time in words a compliance officer can use."""
    token = ed_token(keys, base_claims(exp=1_700_000_000))
    with pytest.raises(TokenError, match=r"license 'lic-42' expired at 2023-11-14T22:13:20Z"):
        verifier.verify(token, now=NOW)
    with pytest.raises(TokenError, match=r"no trusted key has kid 'zz'"):
        verifier.verify(ed_token(keys, kid="zz"), now=NOW)


# --- the verify cache ---------------------------------------------------------------------


@pytest.fixture
def signature_checks(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every signature check tokens.py performs (the real check still runs)."""
    calls: list[str] = []
    real = tokens._JWS.decode_complete

    def counting(token: str, *args: Any, **kwargs: Any) -> dict[str, Any]:
        calls.append(token)
        return real(token, *args, **kwargs)

    monkeypatch.setattr(tokens._JWS, "decode_complete", counting)
    return calls


def test_cache_skips_signature_check_on_repeat(
    keys: Keys, verifier: TokenVerifier, signature_checks: list[str]
) -> None:
    """A repeat of a verified token is served from the cache without a signature check."""
    token = ed_token(keys)
    first = verifier.verify(token, now=NOW)
    second = verifier.verify(token, now=NOW + 1)
    assert first == second
    assert len(signature_checks) == 1
    assert verifier.cached_tokens == 1


def test_cache_never_serves_past_expiry(
    keys: Keys, verifier: TokenVerifier, signature_checks: list[str]
) -> None:
    """A cached token checked later than exp + leeway is token_expired and leaves the cache."""
    token = ed_token(keys, base_claims(exp=NOW + 60))
    verifier.verify(token, now=NOW)
    verifier.verify(token, now=NOW + 60 + LEEWAY)  # still inside the leeway
    with pytest.raises(TokenError) as caught:
        verifier.verify(token, now=NOW + 60 + LEEWAY + 1)
    assert caught.value.reason == "token_expired"
    assert verifier.cached_tokens == 0
    assert len(signature_checks) == 1


def test_cache_rechecks_nbf_issuer_audience(keys: Keys, signature_checks: list[str]) -> None:
    """Rows 12-14 run on every call: a cached not-yet-valid token becomes valid later."""
    verifier = TokenVerifier(keys.ring, issuers=[ISSUER], audience="launchgate", leeway_s=0)
    token = ed_token(keys, base_claims(nbf=NOW + 100))
    with pytest.raises(TokenError, match="not valid before"):
        verifier.verify(token, now=NOW)
    with pytest.raises(TokenError, match="not valid before"):
        verifier.verify(token, now=NOW + 99)
    assert verifier.verify(token, now=NOW + 100).jti == "lic-42"
    assert len(signature_checks) == 1
    wrong_iss = ed_token(keys, base_claims(iss="rogue"))
    for _ in range(2):
        with pytest.raises(TokenError, match="rogue"):
            verifier.verify(wrong_iss, now=NOW)


def test_cache_keeps_no_invalid_tokens(
    keys: Keys, verifier: TokenVerifier, signature_checks: list[str]
) -> None:
    """A token that failed rows 8-11 is checked in full every time and never cached."""
    bad_sig = tamper_signature(ed_token(keys))
    expired = ed_token(keys, base_claims(exp=NOW - 1000))
    for _ in range(2):
        for token in (bad_sig, expired):
            with pytest.raises(TokenError):
                verifier.verify(token, now=NOW)
    assert len(signature_checks) == 4
    assert verifier.cached_tokens == 0


def test_cache_is_bounded_lru(keys: Keys, signature_checks: list[str]) -> None:
    """The cache holds at most cache_size tokens, evicting the least recently used."""
    verifier = TokenVerifier(
        keys.ring, issuers=[ISSUER], audience="launchgate", leeway_s=LEEWAY, cache_size=2
    )
    t1, t2, t3 = (ed_token(keys, base_claims(jti=f"lic-{i}")) for i in (1, 2, 3))
    for token in (t1, t2, t1, t3):  # t1 is used again, so t2 is the one evicted
        verifier.verify(token, now=NOW)
    assert verifier.cached_tokens == 2
    assert signature_checks == [t1, t2, t3]
    verifier.verify(t1, now=NOW)
    verifier.verify(t3, now=NOW)
    assert signature_checks == [t1, t2, t3]
    verifier.verify(t2, now=NOW)
    assert signature_checks == [t1, t2, t3, t2]
    assert verifier.cached_tokens == 2


def test_cache_size_zero_disables_cache(keys: Keys, signature_checks: list[str]) -> None:
    """cache_size=0 checks every signature."""
    verifier = TokenVerifier(
        keys.ring, issuers=[ISSUER], audience="launchgate", leeway_s=LEEWAY, cache_size=0
    )
    token = ed_token(keys)
    verifier.verify(token, now=NOW)
    verifier.verify(token, now=NOW)
    assert len(signature_checks) == 2
    assert verifier.cached_tokens == 0


def test_new_keyring_means_new_verifier_and_empty_cache(keys: Keys, tmp_path: Path) -> None:
    """After a reload drops a key, its tokens fail even though the old verifier cached them."""
    old = TokenVerifier(keys.ring, issuers=[ISSUER], audience="launchgate", leeway_s=LEEWAY)
    token = ed_token(keys)
    old.verify(token, now=NOW)
    jwks = json.loads(keys.jwks.read_text())
    reloaded = tmp_path / "jwks.json"
    reloaded.write_text(json.dumps({"keys": [k for k in jwks["keys"] if k["kid"] != "ed-1"]}))
    new = TokenVerifier(
        KeyRing.from_jwks_file(reloaded), issuers=[ISSUER], audience="launchgate", leeway_s=LEEWAY
    )
    with pytest.raises(TokenError) as caught:
        new.verify(token, now=NOW)
    assert caught.value.reason == "token_unknown_key"


# --- peek ---------------------------------------------------------------------------------


def test_peek_reads_header_and_claims_unverified(keys: Keys) -> None:
    """peek shows header and claims even when the signature is bad."""
    header, claims = peek(tamper_signature(ed_token(keys)))
    assert header == {"alg": "EdDSA", "typ": "JWT", "kid": "ed-1"}
    assert claims == base_claims()


@pytest.mark.parametrize(
    ("token", "want_header", "want_claims"),
    [
        ("", False, False),
        ("abc", False, False),
        ("a.b.c.d", False, False),
        (f"{b64(b'{}')}.{b64(b'nope')}.", True, False),
        (f"{b64(b'[]')}.{b64(b'{}')}.", False, True),
        (f"!!.{b64(b'{}')}.", False, True),
    ],
)
def test_peek_gives_none_for_parts_that_do_not_parse(
    token: str, want_header: bool, want_claims: bool
) -> None:
    """A part that is not a base64url JSON object is None; peek never raises."""
    header, claims = peek(token)
    assert (header is not None, claims is not None) == (want_header, want_claims)


def test_empty_key_set_trusts_nothing(tmp_path: Path) -> None:
    """An empty JWK Set loads (fresh install) and every token fails as token_unknown_key."""
    path = tmp_path / "jwks.json"
    path.write_text('{"keys": []}')
    ring = KeyRing.from_jwks_file(path)
    assert ring.kids == ()
