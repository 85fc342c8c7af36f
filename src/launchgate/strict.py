"""Strict readers for launch bodies: one meaning or none (CONTRACT sections 6 and 9).

A body that two parsers could read two ways (duplicate keys, a byte-order mark,
non-UTF-8 bytes, NaN, trailing data) is refused rather than guessed at.
"""

from __future__ import annotations

import json
from typing import Any, Final

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


def loads_json(body: bytes) -> Any:
    """Decode a JSON body strictly; MalformedLaunch on anything ambiguous."""
    if body.startswith((b"\xef\xbb\xbf", b"\xfe\xff", b"\xff\xfe")):
        raise MalformedLaunch("body starts with a byte-order mark")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedLaunch("body is not valid UTF-8") from None
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise MalformedLaunch(f"body is not valid JSON: {e.msg} at offset {e.pos}") from None
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
    """The value at ``tokens`` in ``document``, or ``MISSING`` when there is none."""
    node = document
    for part in tokens:
        if isinstance(node, dict):
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
