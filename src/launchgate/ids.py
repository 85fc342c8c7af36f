"""Decision ids: ULIDs (time-ordered, 26 Crockford base32 characters)."""

from __future__ import annotations

import os
import time
from typing import Final

_CROCKFORD: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# Every 10-bit value as its two digits: a ULID's 130 bits (two leading zero bits, 48 bits of
# milliseconds, 80 random bits) are 13 of them, most significant first.
_PAIRS: Final = tuple(a + b for a in _CROCKFORD for b in _CROCKFORD)
_SHIFTS: Final = tuple(range(120, -1, -10))


def ulid_time(ulid: str) -> float:
    """The POSIX time a ULID was made at (its first 48 bits, in milliseconds); ValueError for
    a string that is not a ULID."""
    if len(ulid) != 26:
        raise ValueError(f"not a ULID: {ulid!r}")
    millis = 0
    for char in ulid[:10]:
        digit = _CROCKFORD.find(char)
        if digit < 0:
            raise ValueError(f"not a ULID: {ulid!r}")
        millis = millis * 32 + digit
    return millis / 1000


def new_ulid(now: float | None = None) -> str:
    """A fresh ULID: 48 bits of milliseconds since the epoch, then 80 random bits."""
    millis = int((time.time() if now is None else now) * 1000)
    value = (millis << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join([_PAIRS[(value >> shift) & 0x3FF] for shift in _SHIFTS])
