"""Decision ids: ULIDs (time-ordered, 26 Crockford base32 characters)."""

from __future__ import annotations

import os
import time
from typing import Final

_ALPHABET: Final = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
# Two base32 digits at a time: 13 table look-ups instead of 26 divisions per id.
_PAIRS: Final = tuple(a + b for a in _ALPHABET for b in _ALPHABET)


def new_ulid(now: float | None = None) -> str:
    """A fresh ULID: 48 bits of milliseconds since the epoch, then 80 random bits."""
    millis = int((time.time() if now is None else now) * 1000)
    value = (millis << 80) | int.from_bytes(os.urandom(10), "big")
    return "".join(_PAIRS[(value >> shift) & 0x3FF] for shift in range(120, -1, -10))
