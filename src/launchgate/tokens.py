"""License tokens: signing keys, the trusted key ring (JWK Set), issuing and verifying.

A license token is a compact JWS signed with EdDSA (Ed25519) or ES256 (CONTRACT §4).
Verification follows CONTRACT §3 rows 8-14 in order and raises ``TokenError`` with the
row's reason code; it never returns a flag someone could forget to check. The algorithm
used to check a signature always comes from the trusted key, never from the token.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import os
import re
import tempfile
import time
import uuid
from collections import OrderedDict
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Final, TypeAlias

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from jwt.algorithms import ECAlgorithm, OKPAlgorithm

from launchgate.errors import ConfigError, TokenError

ALLOWED_ALGS: frozenset[str] = frozenset({"EdDSA", "ES256"})

PrivateKey: TypeAlias = Ed25519PrivateKey | ec.EllipticCurvePrivateKey
PublicKey: TypeAlias = Ed25519PublicKey | ec.EllipticCurvePublicKey

# Header members that point at, or embed, key material or extensions we do not
# implement. A gateway that honoured any of them would let the token pick its own key.
_FORBIDDEN_HEADERS = ("jku", "x5u", "jwk", "x5c", "crit", "b64")
# Far beyond any real license token (a few hundred bytes); bounds parsing and the cache.
_MAX_TOKEN_CHARS = 16_384
# The largest integer every JSON implementation reads exactly (I-JSON, RFC 7493 §2.2), far
# beyond any licence, and well inside the stores' 64-bit counters.
MAX_ACCELERATORS: Final = 2**53 - 1
# 9999-12-31T23:59:59Z: the last second a date can be written in (the CLI, the records).
MAX_TIMESTAMP: Final = 253_402_300_799
_KID_FILE_RE = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")
_DURATION_RE = re.compile(r"([0-9]{1,15}(?:\.[0-9]{1,6})?)([smhd])")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
_JWK_SHAPE = {"EdDSA": ("OKP", "Ed25519"), "ES256": ("EC", "P-256")}

# Only the two accepted algorithms are registered, so even a bug upstream of the
# signature check cannot reach HMAC, RSA or "none".
_JWS = jwt.PyJWS(algorithms=sorted(ALLOWED_ALGS))


# --- keys -----------------------------------------------------------------------------


def generate_key(kid: str, out_dir: Path, alg: str = "EdDSA") -> Path:
    """Create ``out_dir/KID.pem`` and add its public key to ``out_dir/jwks.json``.

    The private key is PKCS#8 PEM, unencrypted, created with mode 0600 and ``O_EXCL``
    (never overwritten, never readable by others even briefly). The public key goes into
    the JWK Set with ``kid``, ``alg`` and ``use: "sig"``; other keys are kept and the set
    is replaced atomically. Returns the PEM path. Raises ``ConfigError`` naming the file
    or kid for a bad kid or alg, an existing PEM, a kid already in the set, or a JWK Set
    that cannot be read.
    """
    if not _KID_FILE_RE.fullmatch(kid):
        raise ConfigError(
            f"key id {kid!r} must be 1-128 characters of letters, digits, '.', '_' or '-'"
            " and must not start with '.'"
        )
    if alg not in ALLOWED_ALGS:
        raise ConfigError(f"--alg {alg!r}: must be one of {', '.join(sorted(ALLOWED_ALGS))}")
    pem_path = out_dir / f"{kid}.pem"
    jwks_path = out_dir / "jwks.json"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"{out_dir}: cannot create directory: {e.strerror}") from e

    if os.path.lexists(pem_path):  # named first: the CONTRACT's refusal (found by QA: a second
        # run named jwks.json). O_EXCL below still refuses one made meanwhile.
        raise ConfigError(f"{pem_path}: already exists; refusing to overwrite a key")
    jwks = _read_jwks_for_update(jwks_path)
    if any(isinstance(k, Mapping) and k.get("kid") == kid for k in jwks["keys"]):
        raise ConfigError(f"{jwks_path}: key id {kid!r} is already present")

    private_key: PrivateKey = (
        Ed25519PrivateKey.generate() if alg == "EdDSA" else ec.generate_private_key(ec.SECP256R1())
    )
    pem = private_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    try:
        fd = os.open(pem_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError as e:
        raise ConfigError(f"{pem_path}: already exists; refusing to overwrite a key") from e
    except OSError as e:
        raise ConfigError(f"{pem_path}: cannot create: {e.strerror}") from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
            f.flush()
            os.fsync(f.fileno())
        jwks["keys"].append(_public_jwk(private_key.public_key(), kid, alg))
        _write_json_atomically(jwks_path, jwks)
    except BaseException:
        # A PEM whose public half never reached the JWK Set is useless and confusing.
        pem_path.unlink(missing_ok=True)
        raise
    return pem_path


def _read_jwks_for_update(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {"keys": []}
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read JWK Set: {e}") from e
    try:
        data = _strict_json(text)
    except ValueError as e:
        raise ConfigError(f"{path}: not valid JSON: {e}") from e
    if not isinstance(data, dict) or not isinstance(data.get("keys"), list):
        raise ConfigError(f"{path}: not a JWK Set (expected an object with a 'keys' array)")
    return data


def _public_jwk(key: PublicKey, kid: str, alg: str) -> dict[str, Any]:
    jwk: dict[str, Any]
    if isinstance(key, Ed25519PublicKey):
        jwk = dict(OKPAlgorithm.to_jwk(key, as_dict=True))
    else:
        jwk = dict(ECAlgorithm.to_jwk(key, as_dict=True))
    jwk.update({"kid": kid, "alg": alg, "use": "sig"})
    return jwk


def _write_json_atomically(path: Path, data: Mapping[str, Any]) -> None:
    try:
        mode = path.stat().st_mode & 0o777
    except FileNotFoundError:
        mode = 0o644  # public keys: the gateway may run as another user
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp_name, mode)
        os.replace(tmp_name, path)
    except OSError as e:
        Path(tmp_name).unlink(missing_ok=True)
        raise ConfigError(f"{path}: cannot write JWK Set: {e.strerror}") from e


def load_private_key(path: Path) -> PrivateKey:
    """Load an unencrypted PEM signing key; ``ConfigError`` naming the file if it is
    unreadable, encrypted, or not an Ed25519 or P-256 key."""
    try:
        data = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read private key: {e.strerror}") from e
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as e:
        raise ConfigError(f"{path}: not an unencrypted PEM private key") from e
    if isinstance(key, Ed25519PrivateKey):
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return key
    raise ConfigError(f"{path}: private key must be Ed25519 (EdDSA) or P-256 (ES256)")


def parse_duration(text: str) -> int:
    """``'90d'`` ``'12h'`` ``'1.5h'`` ``'45s'`` -> seconds (a positive int); ``ValueError``
    otherwise, and for a fraction that is not a whole number of seconds (``'1.5s'``)."""
    match = _DURATION_RE.fullmatch(text)
    seconds = None if match is None else Decimal(match.group(1)) * _DURATION_UNITS[match[2]]
    if seconds is None or seconds <= 0 or seconds != seconds.to_integral_value():
        raise ValueError(
            f"duration {text!r}: expected a positive number followed by s, m, h or d"
            " (e.g. 90d, 12h, 1.5h) that makes whole seconds"
        )
    return int(seconds)


# --- issuing --------------------------------------------------------------------------


def issue_token(
    *,
    private_key: PrivateKey,
    kid: str,
    issuer: str,
    account: str,
    skus: Sequence[str],
    max_accelerators: int,
    expires_in_s: int,
    audience: str = "launchgate",
    regions: Sequence[str] | None = None,
    license_ref: str | None = None,
    not_before: int | None = None,
    now: float | None = None,
    jti: str | None = None,
) -> str:
    """Sign a license token (compact JWS) with the CONTRACT §4 claims.

    The algorithm follows the key (Ed25519 -> EdDSA, P-256 -> ES256); the header is
    ``{alg, typ: "JWT", kid}``. ``jti`` defaults to ``"lic-"`` + a random hex id.
    Raises ``ValueError`` on input that would make a token the gateway rejects.
    """
    alg = _alg_of_private_key(private_key)
    for name, value in (("kid", kid), ("issuer", issuer), ("account", account)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string")
    if jti is not None and not license_id_ok(jti):
        raise ValueError("jti must be a non-empty string of printable characters")
    if isinstance(skus, str) or not skus or not all(isinstance(s, str) and s for s in skus):
        raise ValueError("skus must be a non-empty list of non-empty strings")
    if isinstance(max_accelerators, bool) or not isinstance(max_accelerators, int):
        raise ValueError("max_accelerators must be an integer")
    if not 1 <= max_accelerators <= MAX_ACCELERATORS:
        raise ValueError(f"max_accelerators must be from 1 to {MAX_ACCELERATORS}")
    if isinstance(expires_in_s, bool) or not isinstance(expires_in_s, int) or expires_in_s < 1:
        raise ValueError("expires_in_s must be a positive integer")
    if (time.time() if now is None else now) + expires_in_s > MAX_TIMESTAMP or (
        not_before is not None and not 0 <= not_before <= MAX_TIMESTAMP
    ):
        raise ValueError("the token's times must fall between 1970 and 9999")
    if regions is not None and (
        isinstance(regions, str) or not regions or not all(isinstance(r, str) for r in regions)
    ):
        raise ValueError("regions, when given, must be a non-empty list of strings")

    iat = int(time.time() if now is None else now)
    claims: dict[str, Any] = {
        "iss": issuer,
        "aud": audience,
        "sub": account,
        "jti": jti if jti is not None else f"lic-{uuid.uuid4().hex}",
        "iat": iat,
        "exp": iat + expires_in_s,
    }
    if not_before is not None:
        claims["nbf"] = not_before
    claims["skus"] = list(skus)
    claims["max_accelerators"] = max_accelerators
    if regions is not None:
        claims["regions"] = list(regions)
    if license_ref is not None:
        claims["license_ref"] = license_ref
    payload = json.dumps(claims, separators=(",", ":")).encode()
    return _JWS.encode(payload, private_key, algorithm=alg, headers={"kid": kid, "typ": "JWT"})


def check_signing_kid(private_key: PrivateKey, kid: str, jwks_path: Path) -> None:
    """``ConfigError`` naming ``kid`` and the file unless the JWK Set at ``jwks_path`` holds
    ``kid`` with this private key's public half: a token signed under a kid the set does not
    hold, or holds for another key, is refused by every gateway trusting that set (CONTRACT
    section 1: an unknown key id is a user error)."""
    trusted = KeyRing.from_jwks_file(jwks_path).get(kid)
    if trusted is None:
        raise ConfigError(f"--kid {kid!r}: unknown key id, not in {jwks_path}")
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if trusted.key.public_bytes(*spki) != private_key.public_key().public_bytes(*spki):
        raise ConfigError(f"--kid {kid!r}: {jwks_path} holds another public key under this key id")


def _alg_of_private_key(key: PrivateKey) -> str:
    if isinstance(key, Ed25519PrivateKey):
        return "EdDSA"
    if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP256R1):
        return "ES256"
    raise ValueError("private key must be Ed25519 (EdDSA) or P-256 (ES256)")


# --- the key ring ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrustedKey:
    """One public key the gateway accepts license signatures from."""

    kid: str
    alg: str
    key: PublicKey


class KeyRing:
    """Trusted public keys from a JWK Set. Immutable after construction."""

    __slots__ = ("_keys",)

    def __init__(self, keys: Sequence[TrustedKey]) -> None:
        self._keys: Mapping[str, TrustedKey] = {k.kid: k for k in keys}

    @classmethod
    def from_jwks_file(cls, path: Path) -> KeyRing:
        """Load a JWK Set file; ``ConfigError`` naming the file (and key) on any problem."""
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: cannot read JWK Set: {e}") from e
        try:
            data = _strict_json(text)
        except ValueError as e:
            raise ConfigError(f"{path}: not valid JSON: {e}") from e
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: not a JWK Set (expected a JSON object)")
        return cls.from_jwks(data, str(path))

    @classmethod
    def from_jwks(cls, jwks: Mapping[str, Any], source: str) -> KeyRing:
        """Build from a parsed JWK Set. ``ConfigError`` naming ``source`` and the key for:
        no keys, a key without ``kid``, an ``alg`` other than EdDSA/ES256 (a key without one
        takes the one its ``kty``/``crv`` sign with),
        ``kty``/``crv`` not matching ``alg``, a duplicate ``kid``, private key material."""
        keys = jwks.get("keys")
        if not isinstance(keys, list):
            raise ConfigError(f"{source}: not a JWK Set (expected a 'keys' array)")
        # An empty set is valid (a fresh install before `keys generate`): every token
        # then fails as token_unknown_key, and /readyz reports the missing keys.
        trusted: list[TrustedKey] = []
        seen: set[str] = set()
        for index, jwk in enumerate(keys):
            key = _trusted_key_from_jwk(jwk, f"{source}: keys[{index}]")
            if key.kid in seen:
                raise ConfigError(f"{source}: keys[{index}]: duplicate kid {key.kid!r}")
            seen.add(key.kid)
            trusted.append(key)
        return cls(trusted)

    def get(self, kid: str) -> TrustedKey | None:
        """The trusted key with this kid, or None."""
        return self._keys.get(kid)

    @property
    def kids(self) -> tuple[str, ...]:
        """Every trusted kid, in JWK Set order."""
        return tuple(self._keys)


def _trusted_key_from_jwk(jwk: Any, where: str) -> TrustedKey:
    if not isinstance(jwk, Mapping):
        raise ConfigError(f"{where}: not a JSON object")
    kid = jwk.get("kid")
    if not isinstance(kid, str) or not kid:
        raise ConfigError(f"{where}: missing 'kid'")
    where = f"{where} (kid {kid!r})"
    if "d" in jwk:
        raise ConfigError(f"{where}: holds private key material ('d'); publish public keys only")
    alg = jwk.get("alg")
    if alg is None:
        # "alg" is optional in a JWK (RFC 7517 section 4.4). Each accepted key shape signs with
        # exactly one accepted algorithm, so the shape names it; any other shape is refused.
        shape = (jwk.get("kty"), jwk.get("crv"))
        alg = next((name for name, known in _JWK_SHAPE.items() if known == shape), None)
        if alg is None:
            raise ConfigError(
                f"{where}: missing 'alg', and kty {shape[0]!r} with crv {shape[1]!r} is neither"
                " an Ed25519 (EdDSA) nor a P-256 (ES256) key"
            )
    if alg not in ALLOWED_ALGS:
        raise ConfigError(f"{where}: alg {alg!r} is not accepted (EdDSA or ES256)")
    kty, crv = _JWK_SHAPE[alg]
    if jwk.get("kty") != kty or jwk.get("crv") != crv:
        raise ConfigError(
            f"{where}: alg {alg} needs kty {kty!r} and crv {crv!r},"
            f" not {jwk.get('kty')!r} and {jwk.get('crv')!r}"
        )
    if jwk.get("use", "sig") != "sig":
        raise ConfigError(f"{where}: 'use' is {jwk.get('use')!r}, expected 'sig'")
    key_ops = jwk.get("key_ops")
    if key_ops is not None and (not isinstance(key_ops, list) or "verify" not in key_ops):
        # (found in review: a key for "encrypt" only still verified tokens)
        raise ConfigError(f"{where}: 'key_ops' is {key_ops!r}, which does not allow 'verify'")
    coordinates = ("x",) if kty == "OKP" else ("x", "y")
    if not all(isinstance(jwk.get(c), str) for c in coordinates):
        raise ConfigError(f"{where}: missing or non-string {' / '.join(coordinates)}")
    try:
        key: Any = (
            OKPAlgorithm.from_jwk(dict(jwk)) if kty == "OKP" else ECAlgorithm.from_jwk(dict(jwk))
        )
    except (jwt.InvalidKeyError, ValueError, TypeError) as e:
        raise ConfigError(f"{where}: not a valid {crv} public key: {e}") from e
    if not isinstance(key, Ed25519PublicKey | ec.EllipticCurvePublicKey):
        raise ConfigError(f"{where}: not a {crv} public key")
    return TrustedKey(kid=kid, alg=alg, key=key)


# --- verifying ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class License:
    """The verified claims of a license token, plus the key that signed it."""

    jti: str
    sub: str
    iss: str
    aud: tuple[str, ...]
    iat: float
    exp: float
    nbf: float | None
    skus: tuple[str, ...]
    max_accelerators: int
    regions: tuple[str, ...] | None
    license_ref: str | None
    kid: str
    alg: str


class TokenVerifier:
    """Checks license tokens against one key ring and the ``[tokens]`` settings.

    Tokens that passed the signature and claim-shape checks are kept in a bounded LRU
    cache keyed by the exact token string; time, issuer and audience are re-checked on
    every call. A reloaded key ring needs a new verifier (and so starts with an empty
    cache).
    """

    def __init__(
        self,
        keyring: KeyRing,
        *,
        issuers: Collection[str],
        audience: str,
        leeway_s: float,
        cache_size: int = 4096,
    ) -> None:
        if cache_size < 0:
            raise ValueError("cache_size must not be negative")
        self._keyring = keyring
        self._issuers = frozenset(issuers)
        self._audience = audience
        self._leeway_s = leeway_s
        self._cache_size = cache_size
        self._cache: OrderedDict[str, License] = OrderedDict()

    @property
    def cached_tokens(self) -> int:
        """How many tokens the cache holds now."""
        return len(self._cache)

    def verify(self, token: str, *, now: float) -> License:
        """Return the token's License, or raise ``TokenError`` with the reason of the first
        failing CONTRACT §3 row among 8-14 (rows 15-17 are the policy's). Details are
        meant for a compliance officer and never contain the token."""
        lic = self._cache.get(token)
        if lic is None:
            lic = self._verify_signed(token)
            if now > lic.exp + self._leeway_s:
                raise _expired(lic)
            if self._cache_size:
                self._cache[token] = lic
                if len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        else:
            if now > lic.exp + self._leeway_s:
                # Never serve a license from the cache past its expiry.
                del self._cache[token]
                raise _expired(lic)
            self._cache.move_to_end(token)
        self._check_time_and_parties(lic, now)
        return lic

    def _check_time_and_parties(self, lic: License, now: float) -> None:
        # Row 11 (expiry) is checked by the caller, which also evicts from the cache.
        if lic.nbf is not None and now + self._leeway_s < lic.nbf:
            raise TokenError(
                "token_not_yet_valid",
                f"license {_show(lic.jti)} is not valid before {_iso(lic.nbf)}",
            )
        if lic.iss not in self._issuers:
            raise TokenError(
                "token_wrong_issuer",
                f"license {_show(lic.jti)} was issued by {_show(lic.iss)},"
                " which is not a trusted issuer",
            )
        if self._audience not in lic.aud:
            raise TokenError(
                "token_wrong_audience",
                f"license {_show(lic.jti)} is for audience {_show(list(lic.aud))},"
                f" not {self._audience!r}",
            )

    def _verify_signed(self, token: str) -> License:
        """Rows 8-10: shape and header, key lookup, signature and claim types."""
        header = _parse_header(token)
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise TokenError("token_unknown_key", "license token header names no key id (kid)")
        trusted = self._keyring.get(kid)
        if trusted is None:
            raise TokenError("token_unknown_key", f"no trusted key has kid {_show(kid)}")
        if header["alg"] != trusted.alg:
            raise TokenError(
                "token_invalid",
                f"license token is signed with {header['alg']}, but key {_show(kid)}"
                f" is an {trusted.alg} key",
            )
        try:
            payload = _JWS.decode_complete(token, key=trusted.key, algorithms=[trusted.alg])[
                "payload"
            ]
        except jwt.PyJWTError as e:
            raise TokenError(
                "token_invalid", f"license token signature does not verify with key {_show(kid)}"
            ) from e
        try:
            claims = _strict_json(payload)
        except (ValueError, RecursionError) as e:
            raise TokenError("token_invalid", "license token claims are not valid JSON") from e
        if not isinstance(claims, dict):
            raise TokenError("token_invalid", "license token claims are not a JSON object")
        return _license_from_claims(claims, trusted)


def _parse_header(token: str) -> dict[str, Any]:
    """Row 8: a compact JWS with a JSON-object header, an accepted alg, and no key hints."""
    if not isinstance(token, str) or len(token) > _MAX_TOKEN_CHARS:
        raise TokenError("token_invalid", "license token is not a compact JWS (too long)")
    parts = token.split(".")
    if len(parts) != 3:
        raise TokenError(
            "token_invalid",
            "license token is not a compact JWS (expected three dot-separated parts)",
        )
    try:
        for part in parts:
            _b64url_decode(part)
        header = _strict_json(_b64url_decode(parts[0]))
    except (ValueError, RecursionError) as e:
        raise TokenError("token_invalid", "license token is not a well-formed compact JWS") from e
    if not isinstance(header, dict):
        raise TokenError("token_invalid", "license token header is not a JSON object")
    alg = header.get("alg")
    if alg is None:
        raise TokenError("token_invalid", "license token header names no algorithm (alg)")
    if not isinstance(alg, str) or alg not in ALLOWED_ALGS:
        raise TokenError(
            "token_invalid",
            f"license token algorithm {_show(alg)} is not accepted (only EdDSA and ES256)",
        )
    for name in _FORBIDDEN_HEADERS:
        if name in header:
            raise TokenError(
                "token_invalid",
                f"license token header carries {name!r}; keys and extensions are never"
                " taken from the token",
            )
    return header


def license_id_ok(jti: object) -> bool:
    """Whether ``jti`` can be a license id: a non-empty string of printable characters (no
    control characters: a NUL could never be given to ``token revoke``)."""
    return isinstance(jti, str) and bool(jti) and jti.isprintable()


def _license_from_claims(claims: dict[str, Any], trusted: TrustedKey) -> License:
    """Row 10 (claims): every required claim present and of its CONTRACT §4 type."""

    def invalid(name: str, expected: str) -> TokenError:
        state = "missing" if name not in claims else "invalid"
        return TokenError(
            "token_invalid", f"license token claim {name!r} is {state}: must be {expected}"
        )

    def string(name: str, *, non_empty: bool = False) -> str:
        value = claims.get(name)
        if not isinstance(value, str) or (non_empty and not value):
            raise invalid(name, "a non-empty string" if non_empty else "a string")
        return value

    def number(name: str) -> float:
        value = claims.get(name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise invalid(name, "a number")
        try:
            as_float = float(value)
        except OverflowError:
            as_float = math.inf
        if not math.isfinite(as_float):
            raise invalid(name, "a finite number")
        if not 0 <= as_float <= MAX_TIMESTAMP:
            raise invalid(name, "a time between 1970 and 9999 (seconds since the epoch)")
        return as_float

    def strings(name: str, *, non_empty: bool) -> tuple[str, ...]:
        value = claims.get(name)
        if (
            not isinstance(value, list)
            or (non_empty and not value)
            or not all(isinstance(v, str) for v in value)
        ):
            raise invalid(
                name, "a non-empty array of strings" if non_empty else "an array of strings"
            )
        return tuple(value)

    iss = string("iss")
    aud_claim = claims.get("aud")
    # An empty array is an array without our audience: row 14, not a malformed claim.
    aud = (aud_claim,) if isinstance(aud_claim, str) else strings("aud", non_empty=False)
    sub = string("sub")
    jti = string("jti", non_empty=True)
    if not license_id_ok(jti):  # a license id staff must be able to type, list and revoke
        raise invalid("jti", "a non-empty string of printable characters")
    iat = number("iat")
    exp = number("exp")
    nbf = number("nbf") if "nbf" in claims else None
    skus = strings("skus", non_empty=True)
    max_accelerators = claims.get("max_accelerators")
    if (
        isinstance(max_accelerators, bool)
        or not isinstance(max_accelerators, int)
        or not 1 <= max_accelerators <= MAX_ACCELERATORS
    ):
        raise invalid("max_accelerators", f"an integer from 1 to {MAX_ACCELERATORS}")
    regions = strings("regions", non_empty=False) if "regions" in claims else None
    license_ref = string("license_ref") if "license_ref" in claims else None
    return License(
        jti=jti,
        sub=sub,
        iss=iss,
        aud=aud,
        iat=iat,
        exp=exp,
        nbf=nbf,
        skus=skus,
        max_accelerators=max_accelerators,
        regions=regions,
        license_ref=license_ref,
        kid=trusted.kid,
        alg=trusted.alg,
    )


def _expired(lic: License) -> TokenError:
    return TokenError("token_expired", f"license {_show(lic.jti)} expired at {_iso(lic.exp)}")


def peek(token: str) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The token's header and claims, UNVERIFIED, for display and logging. Never raises;
    a part that does not parse as a JSON object (or the token not being three
    dot-separated parts) gives None for that part."""
    if not isinstance(token, str) or len(token) > _MAX_TOKEN_CHARS:
        return None, None
    parts = token.split(".")
    if len(parts) != 3:
        return None, None
    return _peek_part(parts[0]), _peek_part(parts[1])


def _peek_part(part: str) -> dict[str, Any] | None:
    try:
        value = _strict_json(_b64url_decode(part))
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


# --- parsing helpers ------------------------------------------------------------------


_B64URL_RE = re.compile(r"[A-Za-z0-9_-]*")


def _b64url_decode(part: str) -> bytes:
    """Strict unpadded base64url (RFC 7515 §2): one spelling per byte string."""
    if not _B64URL_RE.fullmatch(part) or len(part) % 4 == 1:
        raise ValueError("not base64url")
    try:
        data = base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))
    except binascii.Error as e:
        raise ValueError("not base64url") from e
    # Reject non-canonical encodings (stray low bits in the last character).
    if base64.urlsafe_b64encode(data).rstrip(b"=").decode() != part:
        raise ValueError("not canonical base64url")
    return data


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _strict_json(data: str | bytes) -> Any:
    """JSON with no duplicate object keys and no NaN/Infinity: one meaning or none. Bytes are
    UTF-8 without a byte-order mark (RFC 7519 7.2; found in review: json.loads guessed UTF-16
    and UTF-32 too); ValueError otherwise."""
    if isinstance(data, bytes):
        if data.startswith(b"\xef\xbb\xbf"):
            raise ValueError("starts with a byte-order mark")
        data = data.decode("utf-8")  # UnicodeDecodeError is a ValueError
    return json.loads(data, object_pairs_hook=_reject_duplicates, parse_constant=_reject_constant)


def _show(value: Any) -> str:
    """A value from a token, bounded for messages (token fields are attacker-chosen)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _iso(timestamp: float) -> str:
    try:
        return datetime.fromtimestamp(timestamp, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    except (OverflowError, ValueError, OSError):
        return str(timestamp)
