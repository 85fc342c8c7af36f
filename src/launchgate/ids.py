"""Decision ids: ULIDs (time-ordered, 26 Crockford base32 characters)."""

from __future__ import annotations

import base64
import os
import time
from typing import Final

# RFC 4648 "base32hex" digits map one to one, in order, onto Crockford's: encode with the C
# codec, then translate.
_TO_CROCKFORD: Final = bytes.maketrans(
    b"0123456789ABCDEFGHIJKLMNOPQRSTUV", b"0123456789ABCDEFGHJKMNPQRSTVWXYZ"
)


def new_ulid(now: float | None = None) -> str:
    """A fresh ULID: 48 bits of milliseconds since the epoch, then 80 random bits."""
    millis = int((time.time() if now is None else now) * 1000)
    value = (millis << 80) | int.from_bytes(os.urandom(10), "big")
    # 20 bytes are 32 digits of 5 bits with no padding; the ULID's 130 bits (two leading zero
    # bits) are the last 26 of them.
    digits = base64.b32hexencode(value.to_bytes(20, "big"))[6:]
    return digits.translate(_TO_CROCKFORD).decode("ascii")
