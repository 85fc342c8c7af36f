"""Decision ids are ULIDs: 26 Crockford base32 characters, ordered by time."""

from __future__ import annotations

from launchgate.ids import new_ulid

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


def test_ulid_encodes_every_bit_in_crockford_order() -> None:
    """The encoding is the plain base32 of the 128-bit value, most significant digit first."""
    for now in (0.0, 1_795_000_000.123, 281_474_976_710.655):  # down to 0, up to 2**48 - 1 ms
        for _ in range(200):
            ulid = new_ulid(now)
            value = decode(ulid)
            assert value >> 80 == int(now * 1000)
            expected = "".join(CROCKFORD[(value >> s) & 31] for s in range(125, -1, -5))
            assert ulid == expected
