"""Strict readers for launch bodies: one meaning or none (CONTRACT sections 6 and 9).

A body that two parsers could read two ways (duplicate keys, a byte-order mark,
non-UTF-8 bytes, NaN, trailing data) is refused rather than guessed at.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable
from typing import Any, Final
from urllib.parse import unquote_to_bytes

from multidict import MultiMapping

MAX_COUNT: Final = 100_000


class MalformedLaunch(Exception):
    """A launch body that cannot be read one way only; ``detail`` says why (never a token)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise MalformedLaunch(f"duplicate key {key!r} in a JSON object")
        obj[key] = value
    return obj


def _no_constant(name: str) -> Any:
    raise MalformedLaunch(f"{name} is not a JSON number")


# Built once: json.loads with hooks builds a decoder on every call (1.4 of its 2.6 µs for a
# launch body, measured).
_DECODER: Final = json.JSONDecoder(object_pairs_hook=_no_duplicates, parse_constant=_no_constant)


def loads_json(body: bytes) -> Any:
    """Decode a JSON body strictly; MalformedLaunch on anything ambiguous."""
    if body.startswith((b"\xef\xbb\xbf", b"\xfe\xff", b"\xff\xfe")):
        raise MalformedLaunch("body starts with a byte-order mark")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedLaunch("body is not valid UTF-8") from None
    try:
        return _DECODER.decode(text)
    except json.JSONDecodeError as e:
        raise MalformedLaunch(f"body is not valid JSON: {e.msg} at offset {e.pos}") from None
    except ValueError:  # an integer of more digits than int() takes (4300 by default)
        raise MalformedLaunch("body holds a number too long to read") from None
    except RecursionError:
        raise MalformedLaunch("body nests too deeply") from None


def parse_pointer(pointer: str) -> tuple[str, ...]:
    """Split an RFC 6901 JSON Pointer into reference tokens; ValueError if it is not one."""
    if pointer == "":
        return ()
    if not pointer.startswith("/"):
        raise ValueError(f"JSON Pointer must be empty or start with '/': {pointer!r}")
    tokens = []
    for raw in pointer[1:].split("/"):
        if "~" in raw.replace("~0", "").replace("~1", ""):
            raise ValueError(f"bad escape in JSON Pointer {pointer!r}")
        tokens.append(raw.replace("~1", "/").replace("~0", "~"))
    return tuple(tokens)


_MISSING: Final = object()


def resolve_pointer(document: Any, tokens: tuple[str, ...]) -> Any:
    """The value at ``tokens`` in ``document``, or ``MISSING`` when there is none.

    MalformedLaunch when an object on the way has a key that differs from the one read only in
    letter case (present or not): an upstream that folds case could read that one instead.
    """
    node = document
    for part in tokens:
        if isinstance(node, dict):
            folded = _folds(part)
            for key in node:
                if key != part and not folded.isdisjoint(_folds(key)):
                    raise MalformedLaunch(f"{key!r} differs from {part!r} only in letter case")
            if part not in node:
                return _MISSING
            node = node[part]
        elif isinstance(node, list):
            if not part.isdigit() or (part != "0" and part.startswith("0")):
                return _MISSING
            index = int(part)
            if index >= len(node):
                return _MISSING
            node = node[index]
        else:
            return _MISSING
    return node


MISSING: Final = _MISSING


def _folds(text: str) -> frozenset[str]:
    """``text`` as the ways of ignoring case that upstreams use would see it: Unicode case
    folding, upper case then folded (Java's equalsIgnoreCase takes a dotless i, U+0131, for
    'i'), and each character's own lower case (U+0130, a dotted capital I, is 'i')."""
    if len(text) <= _CACHED_KEY_CHARS:
        return _cached_folds(text)
    return _uncached_folds(text)


# Short keys' folds are kept: the same few, launch after launch. A long key (a body's own,
# up to max_body_bytes) is folded each time, so bodies cannot fill memory through the cache.
_CACHED_KEY_CHARS: Final = 64


def _uncached_folds(text: str) -> frozenset[str]:
    if text.isascii():
        return frozenset((text.lower(),))
    return frozenset(
        (text.casefold(), text.upper().casefold(), "".join(c.lower()[:1] for c in text))
    )


_cached_folds: Final = functools.lru_cache(maxsize=4096)(_uncached_folds)


def fold_case(text: str) -> str:
    """One spelling per case-insensitive name, at least as coarse as every upstream's way of
    ignoring case: .NET's ``OrdinalIgnoreCase`` (upper-casing takes the dotless i, U+0131,
    and the long s, U+017F, to ``I`` and ``S``), Unicode lower-casing (the Kelvin sign,
    U+212A, is ``k``) and Python's ``re.IGNORECASE``, which also matches the dotted capital
    I, U+0130, with ``i`` (as the stub backend does). Coarser than an upstream only ever
    judges more, never less."""
    if text.isascii():
        return text.lower()
    # U+0130 is the one character whose lower case is two ("i" and a combining dot above).
    return text.upper().lower().replace("i\u0307", "i")


def parse_count(
    value: object, where: str, *, allow_zero: bool = False, digit_strings: bool = False
) -> int:
    """A launch count: an integer in 1..MAX_COUNT (0 too when ``allow_zero``).

    ``digit_strings`` also takes a string of ASCII digits, for APIs that accept one.
    Booleans, fractions (``2.0`` included) and negative numbers are malformed, never rounded.
    """
    if (
        digit_strings
        and isinstance(value, str)
        and value.isascii()
        and value.isdigit()
        and len(value) <= 7
    ):
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise MalformedLaunch(f"{where} must be a positive integer, got {value!r}")
    low = 0 if allow_zero else 1
    if not low <= value <= MAX_COUNT:
        raise MalformedLaunch(f"{where} must be an integer from {low} to {MAX_COUNT}, got {value}")
    return value


# ---------------------------------------------------------------------------------------
# Framing shared by the JSON dialects: what the body is, and the query beside it.

_JSON_TYPES: Final = frozenset({"application/json"})
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def require_identity_encoding(headers: MultiMapping[str]) -> None:
    """MalformedLaunch unless every ``Content-Encoding`` is identity (or there is none).

    The gateway judges the bytes it sees; a body the upstream would decompress first
    would be judged on bytes that mean nothing.
    """
    for value in headers.getall("Content-Encoding", ()):
        for coding in value.split(","):
            coding = coding.strip().lower()
            if coding not in ("", "identity"):
                raise MalformedLaunch(f"Content-Encoding {coding!r} is not decoded by the gateway")


def require_json_content_type(headers: MultiMapping[str]) -> None:
    """MalformedLaunch unless ``Content-Type`` is absent or one ``application/json``.

    A ``charset`` parameter, when given, must be UTF-8: the body is judged as UTF-8, and
    an upstream told another charset (or another media type, such as Google's
    ``application/json+protobuf``) would read other values from the same bytes.
    """
    media = require_utf8_charset(headers)
    if media is not None and media.lower() not in _JSON_TYPES:
        raise MalformedLaunch(f"Content-Type {media!r} is not application/json")


# A charset parameter wherever it stands in a Content-Type: after ";" as RFC 9110 has it, after
# "," or a blank, where System.Web finds one too (found in review: with
# "application/x-www-form-urlencoded, charset=utf-7", ASP.NET read "+AGk-nstance_type" as
# "instance_type"), or inside another word, where Tomcat finds one ("indexOf("charset=")";
# found in review: "xcharset=IBM037"). Its name may carry RFC 2231's "*" and section numbers.
_CHARSET = re.compile(r"charset([^=;,\s]*)\s*=\s*\"?([^\";,\s]*)", re.IGNORECASE)


def require_utf8_charset(headers: MultiMapping[str]) -> str | None:
    """MalformedLaunch unless ``Content-Type`` is absent or one header whose ``charset``, if
    any, is UTF-8; returns its media type (None without one). The body is judged as UTF-8:
    an upstream told UTF-7 reads ``+AGk-nstance_type`` as a second ``instance_type`` key
    (found by QA: the gateway judged an m7i.large, the upstream launched 4 p5.48xlarge)."""
    values = headers.getall("Content-Type", ())
    if not values:
        return None
    if len(values) > 1:
        raise MalformedLaunch("more than one Content-Type header")
    for match in _CHARSET.finditer(values[0]):
        extra, value = match.group(1), match.group(2).lower()
        if extra:
            # RFC 2231 (charset*=utf-8''utf-7, charset*0=...): Python's email package, and so
            # http.server, reads it as the charset (found by QA: utf-7 passed this way).
            detail = f"a 'charset{extra}' parameter: only a plain charset=utf-8 is read"
            raise MalformedLaunch(detail)
        if value not in ("utf-8", "utf8"):
            raise MalformedLaunch(f"charset {value!r} is not UTF-8")
    return values[0].split(";", 1)[0].strip()


def _unquote(text: str) -> str:
    if _BAD_ESCAPE.search(text):
        raise MalformedLaunch("bad percent-escape in the query")
    try:
        return unquote_to_bytes(text.replace("+", " ")).decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedLaunch("the query is not UTF-8 once percent-decoded") from None


def parse_query(query: str) -> tuple[tuple[str, str], ...]:
    """The query's ``(name, value)`` pairs, each percent-decoded exactly once.

    ``&`` separates pairs and empty pairs are skipped. A ``;`` anywhere, a bad escape,
    or bytes that are not UTF-8 once decoded make the query malformed: some servers
    split on ``;`` too, and a lax decoder would read other names than a strict one.
    Repeated names are the caller's to judge (see ``single_params``).
    """
    if ";" in query:
        raise MalformedLaunch("';' in the query (some servers separate parameters with it)")
    pairs = []
    for part in query.split("&"):
        if not part:
            continue
        name, _, value = part.partition("=")
        pairs.append((_unquote(name), _unquote(value)))
    return tuple(pairs)


def single_params(
    pairs: tuple[tuple[str, str], ...], fold: Callable[[str], str] = str.lower
) -> dict[str, tuple[str, str]]:
    """``fold(name) -> (name, value)``; MalformedLaunch when two names fold alike.

    A parameter given twice, or twice in spellings the upstream may treat as one
    (letter case, by default), has no one meaning.
    """
    seen: dict[str, tuple[str, str]] = {}
    for name, value in pairs:
        key = fold(name)
        if key in seen:
            raise MalformedLaunch(f"query parameter {name!r} is given more than once")
        seen[key] = (name, value)
    return seen
