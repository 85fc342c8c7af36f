"""Decision ids are ULIDs: 26 Crockford base32 characters, ordered by time."""

from __future__ import annotations

import pytest

from launchgate.ids import new_ulid, ulid_time

CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"


def decode(ulid: str) -> int:
    value = 0
    for char in ulid:
        value = value * 32 + CROCKFORD.index(char)
    return value


def test_ulid_carries_the_millisecond_timestamp() -> None:
    """The first 48 bits are the milliseconds since the epoch; the id is 26 characters."""
    ulid = new_ulid(1_795_000_000.123)
    assert len(ulid) == 26 and set(ulid) <= set(CROCKFORD)
    assert decode(ulid) >> 80 == 1_795_000_000_123


def test_ulids_sort_by_time_and_are_unique() -> None:
    """Later ids sort after earlier ones; random bits keep ids of one millisecond apart."""
    ids = [new_ulid(1_795_000_000 + i) for i in range(50)]
    assert ids == sorted(ids)
    assert len({new_ulid(1_795_000_000.0) for _ in range(1000)}) == 1000


def test_ulid_keeps_its_timestamp_at_both_ends_of_its_range() -> None:
    """From the epoch to the last 48-bit millisecond, every id is 26 Crockford digits whose
    first 48 bits are the time (``decode`` refuses any other character)."""
    for now in (0.0, 1_795_000_000.123, 281_474_976_710.655):  # 0 and 2**48 - 1 ms
        for _ in range(200):
            ulid = new_ulid(now)
            assert len(ulid) == 26
            assert decode(ulid) >> 80 == int(now * 1000)


def test_a_ulid_tells_when_it_was_made() -> None:
    assert ulid_time(new_ulid(1_795_000_000.123)) == 1_795_000_000.123
    for bad in ("", "0" * 25, "U" * 26, "01M8C8NBD2CRQY0SZVRA9VENE6x"):
        with pytest.raises(ValueError, match="not a ULID"):
            ulid_time(bad)
