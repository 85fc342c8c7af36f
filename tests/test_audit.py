"""The hash-chained decision log (CONTRACT section 5) and its verifier."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import itertools
import json
import os
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
from hypothesis import given
from hypothesis import strategies as st

from launchgate import audit
from launchgate.audit import (
    GENESIS_HASH,
    AuditLog,
    VerifyResult,
    canonical_json,
    hashed_line,
    record_hash,
    utc_timestamp,
    verify_file,
)
from launchgate.errors import ConfigError


def decision(n: int) -> dict[str, Any]:
    """A launch.decision record as the proxy writes it, distinct per ``n``."""
    return {
        "event": "launch.decision",
        "timestamp": utc_timestamp(1795667594.123456 + n),
        "decision_id": f"01JDEC{n:06d}",
        "outcome": "deny",
        "reason": "license_exhausted",
        "enforced": True,
        "mode": "enforce",
        "account": "acct-2001",
        "restricted": True,
        "sku": "p5.48xlarge",
        "count": 2,
        "accelerator": "H100-SXM5-80GB",
        "accelerators": 16,
        "eccn": "3A090.a",
        "controlled": True,
        "region": None,
        "license": {"jti": "lic-42", "kid": "2026-11", "iss": "compliance.example-cloud"},
        "method": "POST",
        "path": "/v1/instances",
        "note": "Zürich €",
    }


def write_chain(path: Path, n: int) -> list[dict[str, Any]]:
    """Append ``n`` decision records to a fresh log at ``path`` and close it."""
    log = AuditLog.open(path)
    try:
        return [log.append_sync(decision(i)) for i in range(1, n + 1)]
    finally:
        log.close()


def lines_of(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def seqs_in_file(path: Path) -> list[int]:
    return [json.loads(line)["seq"] for line in lines_of(path)]


# --- canonical form, hash, timestamp -------------------------------------------------


def test_canonical_json_sorts_keys_without_whitespace_in_utf8() -> None:
    """Canonical JSON sorts keys at every depth, has no whitespace and keeps non-ASCII as UTF-8."""
    record = {"b": [1, 2], "a": "ü", "c": {"z": None, "y": True}}
    assert canonical_json(record) == '{"a":"ü","b":[1,2],"c":{"y":true,"z":null}}'.encode()


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "\ud800"])
def test_canonical_json_refuses_what_has_no_single_encoding(value: object) -> None:
    """NaN, infinity and lone surrogates cannot be hashed: ValueError, not a silent encoding."""
    with pytest.raises(ValueError):  # noqa: PT011 - the type is the contract; messages are json's
        canonical_json({"v": value})


def test_record_hash_is_sha256_of_canonical_json_without_hash() -> None:
    """The hash is SHA-256 over the sorted, compact UTF-8 JSON, ignoring any ``hash`` field."""
    # sha256(b'{"a":"\xc3\xbc","b":[1,2],"seq":1}'), computed once by hand.
    expected = "c29b8fc40c377f62048145c1c89abf818463cba6585515ed7489eb180acdd4dc"
    assert record_hash({"seq": 1, "b": [1, 2], "a": "ü"}) == expected
    assert record_hash({"seq": 1, "b": [1, 2], "a": "ü", "hash": "f" * 64}) == expected


_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
    max_leaves=8,
)


@given(st.dictionaries(st.text().filter(lambda k: k != "hash"), _JSON_VALUES, max_size=8))
def test_hashed_line_is_the_canonical_line_with_the_record_hash(record: dict[str, Any]) -> None:
    """The one-encoding fast path writes exactly canonical JSON with the content's hash."""
    digest, line = hashed_line(record)
    assert digest == record_hash(record)
    assert line == canonical_json({**record, "hash": digest}) + b"\n"


@pytest.mark.parametrize(
    "record",
    [
        {"nested": {"hash": audit._PLACEHOLDER}},  # the placeholder's field twice
        {"a": 1, "z": {"hash": audit._PLACEHOLDER}},
        {"value": audit._PLACEHOLDER},
        {},
        {"hash_": 1},
        {"a": [{"hash": "x"}]},
    ],
)
def test_hashed_line_holds_for_records_that_look_like_its_placeholder(
    record: dict[str, Any],
) -> None:
    digest, line = hashed_line(record)
    assert digest == record_hash(record)
    assert line == canonical_json({**record, "hash": digest}) + b"\n"


@given(st.floats(min_value=0, max_value=4e9) | st.floats(min_value=1.7e9, max_value=1.9e9))
def test_utc_timestamp_matches_datetime(now: float) -> None:
    """The once-a-second cache gives exactly what datetime gives, microseconds included."""
    expected = datetime.fromtimestamp(now, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert utc_timestamp(now) == expected


@pytest.mark.parametrize(
    ("now", "text"),
    [
        (0, "1970-01-01T00:00:00.000000Z"),
        (1795667594.123456, "2026-11-26T04:33:14.123456Z"),
        (1795667594, "2026-11-26T04:33:14.000000Z"),
        (1795667594.5, "2026-11-26T04:33:14.500000Z"),
    ],
)
def test_utc_timestamp_has_six_fractional_digits_and_z(now: float, text: str) -> None:
    """Timestamps are UTC ISO 8601 with exactly six fractional digits and a ``Z``."""
    assert utc_timestamp(now) == text


# --- writing the chain ---------------------------------------------------------------


def test_chain_of_records_links_and_verifies(tmp_path: Path) -> None:
    """Records get seq 1..N, each prev_hash is the previous hash, and verify says ok."""
    path = tmp_path / "decisions.jsonl"
    records = write_chain(path, 20)

    assert [r["seq"] for r in records] == list(range(1, 21))
    assert records[0]["prev_hash"] == GENESIS_HASH
    for before, after in itertools.pairwise(records):
        assert after["prev_hash"] == before["hash"]
    for record in records:
        content = {key: value for key, value in record.items() if key != "hash"}
        assert record["hash"] == hashlib.sha256(canonical_json(content)).hexdigest()
    assert lines_of(path) == [canonical_json(r) + b"\n" for r in records]
    assert verify_file(path) == VerifyResult(
        ok=True, records=20, bad_seq=None, detail="chain intact"
    )
    assert verify_file(path).summary() == "ok 20 records"


def test_append_returns_a_new_dict_and_leaves_the_input_alone(tmp_path: Path) -> None:
    """append returns the record plus chain fields as a new dict; the caller's dict is unchanged."""
    log = AuditLog.open(tmp_path / "log.jsonl")
    record = decision(1)
    written = log.append_sync(record)
    log.close()
    assert written is not record
    assert record == decision(1)
    assert written == record | {"seq": 1, "prev_hash": GENESIS_HASH, "hash": written["hash"]}


def test_open_creates_missing_folders(tmp_path: Path) -> None:
    """open creates the log's parent folders and the file, starting the chain at seq 1."""
    path = tmp_path / "a" / "b" / "decisions.jsonl"
    log = AuditLog.open(path)
    assert log.path == path
    assert log.append_sync(decision(1))["seq"] == 1
    log.close()
    assert verify_file(path).ok


def test_restart_continues_the_chain(tmp_path: Path) -> None:
    """Reopening a log continues from its last record: next seq, prev_hash = last hash."""
    path = tmp_path / "decisions.jsonl"
    first = write_chain(path, 3)

    log = AuditLog.open(path)
    more = [log.append_sync(decision(i)) for i in (4, 5)]
    log.close()

    assert [r["seq"] for r in more] == [4, 5]
    assert more[0]["prev_hash"] == first[-1]["hash"]
    assert verify_file(path).summary() == "ok 5 records"


async def test_concurrent_appends_get_consecutive_seqs_in_file_order(tmp_path: Path) -> None:
    """500 appends racing through gather get seq 1..500 in call order, written in that order."""
    path = tmp_path / "decisions.jsonl"
    log = AuditLog.open(path)
    written = await asyncio.gather(*(log.append(decision(i)) for i in range(500)))
    await log.aclose()

    assert [r["seq"] for r in written] == list(range(1, 501))
    assert [r["decision_id"] for r in written] == [decision(i)["decision_id"] for i in range(500)]
    assert seqs_in_file(path) == list(range(1, 501))
    assert verify_file(path).summary() == "ok 500 records"


async def test_append_returns_after_the_line_is_in_the_file(tmp_path: Path) -> None:
    """When append returns, its record is already readable from the file by anyone."""
    path = tmp_path / "decisions.jsonl"
    log = AuditLog.open(path)
    for i in range(1, 4):
        record = await log.append(decision(i))
        assert lines_of(path)[-1] == canonical_json(record) + b"\n"
    await log.aclose()


async def test_cancelled_append_is_still_written(tmp_path: Path) -> None:
    """Cancelling a task waiting in append does not drop its record or break the chain."""
    path = tmp_path / "decisions.jsonl"
    log = AuditLog.open(path)
    with path.open("rb") as holder:
        # Another "process" holds the lock, so both appends are still waiting to be written.
        fcntl.flock(holder, fcntl.LOCK_EX)
        first = asyncio.create_task(log.append(decision(1)))
        second = asyncio.create_task(log.append(decision(2)))
        await asyncio.sleep(0)
        second.cancel()
        fcntl.flock(holder, fcntl.LOCK_UN)
    assert (await first)["seq"] == 1
    with pytest.raises(asyncio.CancelledError):
        await second
    await log.aclose()
    assert seqs_in_file(path) == [1, 2]
    assert verify_file(path).summary() == "ok 2 records"


async def test_two_logs_on_one_file_keep_one_chain(tmp_path: Path) -> None:
    """Two AuditLogs on one file (as two processes) appending in turn never fork the chain."""
    path = tmp_path / "decisions.jsonl"
    gateway = AuditLog.open(path)
    cli = AuditLog.open(path)
    written = []
    for i in range(10):
        written.append(await gateway.append(decision(i)))
        written.append(cli.append_sync({"event": "license.released", "n": i}))
    await gateway.aclose()
    cli.close()

    assert [r["seq"] for r in written] == list(range(1, 21))
    assert verify_file(path).summary() == "ok 20 records"


def test_two_processes_appending_at_once_keep_one_chain(tmp_path: Path) -> None:
    """Two real processes appending concurrently to one file leave a single intact chain."""
    path = tmp_path / "decisions.jsonl"
    script = textwrap.dedent(
        """
        import sys
        from pathlib import Path
        from launchgate.audit import AuditLog
        log = AuditLog.open(Path(sys.argv[1]))
        for i in range(300):
            log.append_sync({"event": "launch.decision", "writer": sys.argv[2], "i": i})
        log.close()
        """
    )
    writers = [subprocess.Popen([sys.executable, "-c", script, str(path), name]) for name in "ab"]
    assert [w.wait(timeout=60) for w in writers] == [0, 0]

    assert verify_file(path).summary() == "ok 600 records"
    by_writer = [json.loads(line)["writer"] for line in lines_of(path)]
    assert by_writer.count("a") == by_writer.count("b") == 300


def test_mixed_sync_and_async_appends_share_one_chain(tmp_path: Path) -> None:
    """append_sync and append on one AuditLog continue the same chain."""
    path = tmp_path / "decisions.jsonl"
    log = AuditLog.open(path)
    log.append_sync(decision(1))
    asyncio.run(log.append(decision(2)))
    log.append_sync(decision(3))
    log.close()
    assert seqs_in_file(path) == [1, 2, 3]
    assert verify_file(path).ok


@pytest.mark.parametrize("field", ["seq", "prev_hash", "hash"])
def test_a_record_may_not_set_chain_fields(tmp_path: Path, field: str) -> None:
    """The log owns seq, prev_hash and hash; a record that sets one is refused."""
    log = AuditLog.open(tmp_path / "log.jsonl")
    with pytest.raises(ValueError, match=field):
        log.append_sync(decision(1) | {field: 1})
    log.close()


def test_unencodable_record_is_refused_and_the_chain_goes_on(tmp_path: Path) -> None:
    """A record that cannot be canonical JSON is not written and does not use up a seq."""
    path = tmp_path / "log.jsonl"
    log = AuditLog.open(path)
    log.append_sync(decision(1))
    with pytest.raises(ValueError, match="JSON"):
        log.append_sync({"event": "x", "value": float("nan")})
    assert log.append_sync(decision(2))["seq"] == 2
    log.close()
    assert verify_file(path).summary() == "ok 2 records"


def test_append_after_close_is_refused(tmp_path: Path) -> None:
    """A closed log refuses appends rather than losing them."""
    log = AuditLog.open(tmp_path / "log.jsonl")
    log.close()
    log.close()
    with pytest.raises(ValueError, match="closed"):
        log.append_sync(decision(1))


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
async def test_write_error_is_raised_to_the_caller() -> None:
    """A failed write (disk full) raises OSError out of append, so the caller fails closed."""
    log = AuditLog.open(Path("/dev/full"))
    with pytest.raises(OSError, match="No space"):
        await log.append(decision(1))
    await log.aclose()


# --- opening a damaged log -----------------------------------------------------------


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(lambda data: data[:-40], id="cut-mid-record"),
        pytest.param(lambda data: data + b'{"seq":4,"pre\n', id="half-record-then-newline"),
        pytest.param(lambda data: data + b"\n", id="blank-last-line"),
        pytest.param(lambda data: data.replace(b"acct-2001", b"acct-2002"), id="altered-record"),
    ],
)
def test_open_refuses_a_log_whose_last_line_is_not_intact(tmp_path: Path, damage: Any) -> None:
    """A torn or altered last record stops open with ConfigError naming the file and the fix."""
    path = tmp_path / "decisions.jsonl"
    write_chain(path, 3)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ConfigError, match="launchgate audit verify") as caught:
        AuditLog.open(path)
    assert str(path) in str(caught.value)


def test_append_refuses_to_fork_after_another_writer_tore_the_tail(tmp_path: Path) -> None:
    """If another writer left a torn line, append raises OSError instead of forking the chain."""
    path = tmp_path / "decisions.jsonl"
    log = AuditLog.open(path)
    log.append_sync(decision(1))
    with path.open("ab") as other:
        other.write(b'{"seq":2,"prev')
    with pytest.raises(OSError, match="audit verify"):
        log.append_sync(decision(2))
    log.close()


def test_open_finds_the_last_record_beyond_one_read_block(tmp_path: Path) -> None:
    """The tail is found even when the last record is longer than the backwards read block."""
    path = tmp_path / "decisions.jsonl"
    log = AuditLog.open(path)
    log.append_sync(decision(1))
    big = log.append_sync({"event": "x", "blob": "y" * 200_000})
    log.close()
    log = AuditLog.open(path)
    following = log.append_sync(decision(3))
    log.close()
    assert following["prev_hash"] == big["hash"]
    assert verify_file(path).summary() == "ok 3 records"


# --- verify --------------------------------------------------------------------------


def test_verify_empty_file_is_ok_with_zero_records(tmp_path: Path) -> None:
    """An empty log is an intact chain of 0 records."""
    path = tmp_path / "empty.jsonl"
    path.touch()
    assert verify_file(path).summary() == "ok 0 records"


def test_verify_missing_file_is_a_user_error(tmp_path: Path) -> None:
    """A log that cannot be read raises ConfigError naming it (exit 2), not a traceback."""
    path = tmp_path / "missing.jsonl"
    with pytest.raises(ConfigError, match=r"missing\.jsonl"):
        verify_file(path)


def flip(data: bytes, at: int) -> bytes:
    """``data`` with one bit of the byte at ``at`` flipped."""
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


@pytest.mark.parametrize(
    ("needle", "offset"),
    [
        pytest.param(b'"acct-2001"', 5, id="inside-a-string-value"),
        pytest.param(b'"accelerators":16', 16, id="inside-a-number"),
        pytest.param(b'"enforced":true', 12, id="inside-a-boolean"),
        pytest.param(b'"account"', 3, id="in-a-key"),
        pytest.param(b'"jti"', 2, id="in-a-nested-key"),
        pytest.param(b'"hash":"', 10, id="in-the-hash"),
        pytest.param(b'"prev_hash":"', 20, id="in-the-prev-hash"),
        pytest.param(b'"seq":', 6, id="in-the-seq"),
        pytest.param(b"{", 0, id="opening-brace"),
        pytest.param("Zürich".encode(), 2, id="inside-utf8-sequence"),
    ],
)
@pytest.mark.parametrize("seq", [1, 3, 5])
def test_flipping_one_byte_breaks_the_chain_at_that_record(
    tmp_path: Path, needle: bytes, offset: int, seq: int
) -> None:
    """One flipped byte anywhere in record N makes verify fail with bad_seq N."""
    path = tmp_path / "decisions.jsonl"
    write_chain(path, 5)
    lines = lines_of(path)
    at = lines[seq - 1].index(needle) + offset
    lines[seq - 1] = flip(lines[seq - 1], at)
    path.write_bytes(b"".join(lines))

    result = verify_file(path)
    assert (result.ok, result.bad_seq, result.records) == (False, seq, seq - 1)
    assert result.summary() == str(seq)


def test_flipping_any_byte_of_a_record_is_detected(tmp_path: Path) -> None:
    """Exhaustively: every single-bit flip of every byte of record 2 is caught at seq 2."""
    path = tmp_path / "decisions.jsonl"
    write_chain(path, 3)
    lines = lines_of(path)
    for at in range(len(lines[1])):
        for bit in (0x01, 0x20, 0x80):
            damaged = lines[1][:at] + bytes([lines[1][at] ^ bit]) + lines[1][at + 1 :]
            path.write_bytes(lines[0] + damaged + lines[2])
            result = verify_file(path)
            assert (result.ok, result.bad_seq) == (False, 2), (at, bit, damaged)


def test_deleting_a_record_is_detected(tmp_path: Path) -> None:
    """Removing a record from the middle fails at the record after it, the first bad record:
    its seq on stdout (CONTRACT; found by QA: the seq of its line was printed), and on stderr
    the line and the seq that went missing."""
    path = tmp_path / "decisions.jsonl"
    write_chain(path, 5)
    lines = lines_of(path)
    path.write_bytes(b"".join(lines[:2] + lines[3:]))
    result = verify_file(path)
    assert (result.ok, result.bad_seq, result.records) == (False, 4, 2)
    assert result.detail == (
        "line 3: found the record of seq 4 where seq 3 belongs"
        " (a record is missing, repeated or out of order)"
    )
    assert result.summary() == "4"  # the only number on stdout (QA)


def test_swapping_two_records_is_detected(tmp_path: Path) -> None:
    """Reordering two records fails at the first record out of place (seq 4, on line 2)."""
    path = tmp_path / "decisions.jsonl"
    write_chain(path, 5)
    lines = lines_of(path)
    lines[1], lines[3] = lines[3], lines[1]
    path.write_bytes(b"".join(lines))
    result = verify_file(path)
    assert (result.bad_seq, result.detail[:7]) == (4, "line 2:")


def test_a_record_given_another_seq_and_hashed_again_is_named_by_its_seq(tmp_path: Path) -> None:
    """Found by QA: record 3 renumbered 50 and hashed again was reported as seq 3, its line."""
    path = tmp_path / "decisions.jsonl"
    records = write_chain(path, 5)
    forged = {k: v for k, v in records[2].items() if k != "hash"} | {"seq": 50}
    forged["hash"] = record_hash(forged)
    lines = lines_of(path)
    lines[2] = canonical_json(forged) + b"\n"
    path.write_bytes(b"".join(lines))
    result = verify_file(path)
    assert (result.ok, result.bad_seq, result.records) == (False, 50, 2)
    assert result.detail.startswith("line 3: found the record of seq 50 where seq 3 belongs")


def test_rehashed_forgery_is_detected_by_the_next_record(tmp_path: Path) -> None:
    """An altered record whose own hash was recomputed still breaks the next record's prev_hash."""
    path = tmp_path / "decisions.jsonl"
    records = write_chain(path, 4)
    forged = {k: v for k, v in records[1].items() if k != "hash"} | {"outcome": "allow"}
    forged["hash"] = record_hash(forged)
    lines = lines_of(path)
    lines[1] = canonical_json(forged) + b"\n"
    path.write_bytes(b"".join(lines))
    result = verify_file(path)
    assert (result.ok, result.bad_seq) == (False, 3)
    assert "prev_hash" in result.detail


@pytest.mark.parametrize("cut", [2, 10, 100])
def test_truncating_mid_record_is_detected(tmp_path: Path, cut: int) -> None:
    """A file cut short inside its last record fails at that record's seq (one byte less is
    only the optional final newline: see the test after the next)."""
    path = tmp_path / "decisions.jsonl"
    write_chain(path, 4)
    data = path.read_bytes()
    path.write_bytes(data[:-cut])
    result = verify_file(path)
    assert (result.ok, result.bad_seq, result.records) == (False, 4, 3)


@pytest.mark.parametrize(
    ("line", "complaint"),
    [
        pytest.param(b"[1,2]\n", "not a JSON object", id="array"),
        pytest.param(b"\xff\xfe{}\n", "UTF-8", id="not-utf8"),
        pytest.param(b"\n", "not valid JSON", id="blank-line"),
        pytest.param(b'{"seq":1,"seq":1}\n', "duplicate key", id="duplicate-key"),
        pytest.param(b'{"seq":true}\n', "seq", id="boolean-seq"),
        pytest.param(b'{"seq":1,"x":NaN}\n', "NaN", id="nan"),
        pytest.param(b'{"seq":1,"prev_hash":"00","hash":"00"}\n', "prev_hash", id="short-hash"),
    ],
)
def test_verify_rejects_lines_that_are_not_records(
    tmp_path: Path, line: bytes, complaint: str
) -> None:
    """A first line that is not a well-formed record fails at seq 1 and says why."""
    path = tmp_path / "decisions.jsonl"
    path.write_bytes(line)
    result = verify_file(path)
    assert (result.ok, result.bad_seq, result.records) == (False, 1, 0)
    assert complaint in result.detail


def test_verify_accepts_a_chain_written_by_another_implementation(tmp_path: Path) -> None:
    """The chain is over canonical content, so a log with other key order and spacing verifies."""
    path = tmp_path / "decisions.jsonl"
    prev = GENESIS_HASH
    out = []
    for seq in (1, 2):
        record: dict[str, Any] = {"seq": seq, "prev_hash": prev, "event": "launch.decision"}
        record["hash"] = prev = record_hash(record)
        out.append(json.dumps(record, indent=None) + "\n")
    path.write_text("".join(out), encoding="utf-8")
    result = verify_file(path)
    assert result.summary() == "ok 2 records"
    # ... with a note that its lines are not spelt as the gateway writes them
    assert (result.not_canonical, result.first_not_canonical) == (2, 1)
    assert "2 record(s), the first seq 1" in (result.note() or "")


def test_verify_notes_a_record_respelt_with_the_same_content(tmp_path: Path) -> None:
    """Found by QA: a line respelt (an escape, a longer spelling of a number) hashes as before,
    so the chain holds, yet a reader that keeps spellings may show it differently. `audit
    verify` says ok (the CONTRACT defines a record by its content's hash) and notes which
    records are not byte for byte as written, on stderr."""
    path = tmp_path / "decisions.jsonl"
    write_chain(path, 3)
    assert verify_file(path).note() is None  # as the gateway writes them
    lines = lines_of(path)
    lines[1] = lines[1].replace(b'"acct-2001"', b'"\\u0061cct-2001"')
    path.write_bytes(b"".join(lines))
    result = verify_file(path)
    assert result.summary() == "ok 3 records"
    assert (result.not_canonical, result.first_not_canonical) == (1, 2)
    done = subprocess.run(
        [sys.executable, "-m", "launchgate", "audit", "verify", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert (done.returncode, done.stdout) == (0, "ok 3 records\n")
    assert done.stderr.startswith("note: 1 record(s), the first seq 2,")


def test_a_record_nested_too_deeply_is_a_bad_record_not_a_traceback(tmp_path: Path) -> None:
    """Found by QA: a line nested 1000 deep made verify, check and serve fail with a Python
    RecursionError. It is a bad record: verify names its seq, and a log ending in one is
    refused at open with the reason."""
    path = tmp_path / "decisions.jsonl"
    write_chain(path, 2)
    lines = lines_of(path)
    lines[1] = lines[1].replace(b'"region":null', b'"region":' + b"[" * 1000 + b"]" * 1000)
    path.write_bytes(b"".join(lines))
    result = verify_file(path)
    assert (result.ok, result.bad_seq) == (False, 2)
    assert "nested too deeply" in result.detail
    with pytest.raises(ConfigError, match="nested too deeply"):
        AuditLog.open(path)


def test_a_record_too_long_to_reopen_is_refused_and_the_chain_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by QA: a launch body of 6 MB (max_body_bytes raised) made an 18 MB record, longer
    than the gateway reads back at start, and it could not restart. Such a record is refused
    (the launch fails closed); the chain goes on and the log reopens."""
    monkeypatch.setattr(audit, "_MAX_RECORD_BYTES", 4096)
    path = tmp_path / "decisions.jsonl"
    log = AuditLog.open(path)
    try:
        log.append_sync(decision(1))
        with pytest.raises(ValueError, match="over 4096 bytes"):
            log.append_sync({**decision(2), "sku": "x" * 5000})
        assert log.append_sync(decision(3))["seq"] == 2
    finally:
        log.close()
    AuditLog.open(path).close()
    assert verify_file(path).summary() == "ok 2 records"


def test_a_log_without_its_final_newline_is_intact_and_continued(tmp_path: Path) -> None:
    """The final newline is optional, as in JSON Lines (found by QA: a chain built by hand with
    "\\n".join was refused by verify, and by the gateway at start). The gateway adds it before
    the next record, and the chain goes on."""
    path = tmp_path / "decisions.jsonl"
    write_chain(path, 2)
    path.write_bytes(path.read_bytes()[:-1])
    assert verify_file(path).summary() == "ok 2 records"
    with structlog.testing.capture_logs() as logs:
        log = AuditLog.open(path)
    assert [e["event"] for e in logs] == ["audit.newline_added"]
    log.append_sync(decision(3))
    log.close()
    assert verify_file(path).summary() == "ok 3 records"
    assert path.read_bytes().count(b"\n") == 3


def test_another_writer_s_line_without_its_newline_is_continued(tmp_path: Path) -> None:
    """A record another process appended without its newline (the log in use) is followed by
    one before this process's next record, not joined by it."""
    path = tmp_path / "decisions.jsonl"
    write_chain(path, 2)
    log = AuditLog.open(path)
    other = AuditLog.open(path)
    other.append_sync(decision(3))
    other.close()
    path.write_bytes(path.read_bytes()[:-1])
    log.append_sync(decision(4))
    log.close()
    assert verify_file(path).summary() == "ok 4 records"


async def test_a_bad_record_in_a_batch_fails_alone(tmp_path: Path) -> None:
    """Appends written together: one record JSON cannot hold fails, the others are written."""
    path = tmp_path / "decisions.jsonl"
    log = AuditLog.open(path)
    results = await asyncio.gather(
        log.append(decision(1)),
        log.append({"event": "x", "value": float("nan")}),
        log.append(decision(2)),
        return_exceptions=True,
    )
    await log.aclose()
    assert isinstance(results[1], ValueError)
    assert [r["seq"] for r in (results[0], results[2]) if isinstance(r, dict)] == [1, 2]
    assert verify_file(path).summary() == "ok 2 records"


async def test_on_written_sees_each_line_as_written(tmp_path: Path) -> None:
    """The on_written hook gets every record with the exact line that went into the file."""
    path = tmp_path / "decisions.jsonl"
    seen: list[tuple[int, bytes]] = []

    def on_written(records: list[dict[str, Any]], lines: list[bytes]) -> None:
        seen.extend((r["seq"], line) for r, line in zip(records, lines, strict=True))

    log = AuditLog.open(path, on_written=on_written)
    await asyncio.gather(*(log.append(decision(i)) for i in range(1, 6)))
    await log.aclose()
    assert [seq for seq, _ in seen] == [1, 2, 3, 4, 5]
    assert b"".join(line for _, line in seen) == path.read_bytes()


async def test_a_record_with_text_that_is_not_unicode_is_written_escaped(tmp_path: Path) -> None:
    """A lone surrogate (a request's bytes that were not UTF-8) cannot be encoded as UTF-8:
    the record is written with it as a backslash escape rather than not at all."""
    path = tmp_path / "decisions.jsonl"
    log = AuditLog.open(path)
    written = await log.append({**decision(1), "account": "acct-\udcff", "\udc80key": ["x\ud800"]})
    with log.group():
        log.append_later({"event": "x", "account": "\udcfe"}, lambda result: None)
    await log.aclose()
    first, second = (json.loads(line) for line in path.read_bytes().splitlines())
    assert (first["account"], first["\\udc80key"]) == ("acct-\\udcff", ["x\\ud800"])
    assert written["account"] == "acct-\\udcff" and second["account"] == "\\udcfe"
    assert verify_file(path).summary() == "ok 2 records"


async def test_an_echo_that_fails_does_not_fail_the_write(tmp_path: Path) -> None:
    """The lines are in the file before ``on_written`` runs: a broken stdout is logged, and the
    callers get their records."""

    def broken(records: list[dict[str, Any]], lines: list[bytes]) -> None:
        raise BrokenPipeError("stdout is gone")

    path = tmp_path / "decisions.jsonl"
    log = AuditLog.open(path, on_written=broken)
    written = await asyncio.gather(*(log.append(decision(i)) for i in (1, 2)))
    told: list[dict[str, Any] | Exception] = []
    with log.group():
        log.append_later(decision(3), told.append)
    await log.aclose()
    assert [r["seq"] for r in written] == [1, 2]
    assert [r["seq"] for r in told if isinstance(r, dict)] == [3]
    assert verify_file(path).summary() == "ok 3 records"


class Writes:
    """An on_written hook counting the writes (each a batch of lines) and the records."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __call__(self, records: list[dict[str, Any]], lines: list[bytes]) -> None:
        self.batches.append([r["seq"] for r in records])


def test_appends_in_a_group_are_written_together_when_it_ends(tmp_path: Path) -> None:
    """``append_later`` inside ``group()``: nothing is written (nor reported) until the block
    ends, then every record in one write, in order, each caller told its own record."""
    path = tmp_path / "decisions.jsonl"
    writes = Writes()
    log = AuditLog.open(path, on_written=writes)
    told: list[dict[str, Any] | Exception] = []
    with log.group():
        for i in (1, 2, 3):
            log.append_later(decision(i), told.append)
        assert told == [] and path.read_bytes() == b""
    assert writes.batches == [[1, 2, 3]]
    assert [r["decision_id"] for r in told if isinstance(r, dict)] == [
        decision(i)["decision_id"] for i in (1, 2, 3)
    ]
    log.append_later(decision(4), told.append)  # outside a group: written at once
    assert writes.batches == [[1, 2, 3], [4]] and len(told) == 4
    log.close()
    assert verify_file(path).summary() == "ok 4 records"


def test_a_bad_record_in_a_group_fails_alone(tmp_path: Path) -> None:
    path = tmp_path / "decisions.jsonl"
    log = AuditLog.open(path)
    told: list[dict[str, Any] | Exception] = []
    with log.group():
        log.append_later(decision(1), told.append)
        log.append_later({"event": "x", "value": float("nan")}, told.append)
        log.append_later({"event": "x", "seq": 7}, told.append)  # refused at once
        log.append_later(decision(2), told.append)
    log.close()
    assert isinstance(told[0], ValueError) and "chain fields" in str(told[0])
    assert isinstance(told[2], ValueError)
    assert [r["seq"] for r in told if isinstance(r, dict)] == [1, 2]
    assert verify_file(path).summary() == "ok 2 records"


def test_a_failed_group_write_is_told_to_every_caller(tmp_path: Path) -> None:
    """A write that fails (here: the file's tail torn by another writer) reaches each
    ``done`` as the error; nothing is written."""
    path = tmp_path / "decisions.jsonl"
    log = AuditLog.open(path)
    log.append_sync(decision(1))
    with path.open("ab") as f:
        f.write(b'{"torn')
    told: list[dict[str, Any] | Exception] = []
    with log.group():
        log.append_later(decision(2), told.append)
        log.append_later(decision(3), told.append)
    log.close()
    assert len(told) == 2 and all(isinstance(e, OSError) for e in told)


def test_append_later_after_close_is_told_so(tmp_path: Path) -> None:
    log = AuditLog.open(tmp_path / "decisions.jsonl")
    log.close()
    told: list[dict[str, Any] | Exception] = []
    log.append_later(decision(1), told.append)
    assert len(told) == 1 and isinstance(told[0], ValueError)


class StreamWrites:  # the writes a stream was given, one entry a call
    def __init__(self) -> None:
        self.calls: list[str] = []

    def write(self, text: str) -> int:
        self.calls.append(text)
        return len(text)

    def flush(self) -> None:
        pass


def test_the_echo_reaches_stdout_in_whole_lines_of_at_most_pipe_buf_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers share stdout: a write of at most PIPE_BUF bytes to a pipe is never split, so the
    echo of a batch goes out in such writes, each of whole lines (and every log line in one
    write, newline included: print() writes the newline apart)."""
    import select

    import structlog

    from launchgate.logsetup import configure_logging
    from launchgate.records import Recorder

    out = StreamWrites()
    monkeypatch.setattr("sys.stdout", out)
    configure_logging()
    try:
        recorder = Recorder(tmp_path / "decisions.jsonl")
        told: list[Any] = []
        with recorder.audit.group():
            for i in range(1, 21):
                recorder.write_later(decision(i), told.append)
        recorder.audit.close()
        structlog.get_logger("launchgate").info("after")
    finally:
        structlog.reset_defaults()
    *echo, after = out.calls
    assert len(echo) > 1 and all(len(c.encode()) <= select.PIPE_BUF for c in echo)
    assert all(c.endswith("\n") for c in out.calls)
    assert "".join(echo).encode() == (tmp_path / "decisions.jsonl").read_bytes()
    assert json.loads(after)["event"] == "after"


# --- the file taken away under a running log ---------------------------------------------------


async def test_a_log_removed_while_in_use_continues_in_a_new_file_at_its_path(
    tmp_path: Path,
) -> None:
    """Deleting the log's folder under a running gateway left it writing to the unlinked file:
    every record after was lost. The next append now starts the file (and folder) anew, as a
    restart would, with a new chain."""
    path = tmp_path / "data" / "decisions.jsonl"
    log = AuditLog.open(path)
    try:
        await log.append(decision(1))
        (tmp_path / "data" / "decisions.jsonl").unlink()
        (tmp_path / "data").rmdir()
        written = await log.append(decision(2))
        assert written["seq"] == 1 and written["prev_hash"] == "0" * 64
        assert seqs_in_file(path) == [1]
        assert verify_file(path).ok
    finally:
        log.close()


async def test_a_rotated_log_continues_in_the_file_now_at_its_path(tmp_path: Path) -> None:
    """A log renamed away (logrotate without copytruncate) keeps what it has; records after go
    to the file at the path, continuing its chain when one is there."""
    path = tmp_path / "decisions.jsonl"
    log = AuditLog.open(path)
    try:
        await log.append(decision(1))
        await log.append(decision(2))
        path.rename(tmp_path / "decisions.1.jsonl")
        await log.append(decision(3))
        assert seqs_in_file(tmp_path / "decisions.1.jsonl") == [1, 2]
        assert seqs_in_file(path) == [1]
        log.append_sync(decision(4))
        assert seqs_in_file(path) == [1, 2]
        assert verify_file(path).ok and verify_file(tmp_path / "decisions.1.jsonl").ok
    finally:
        log.close()


def test_check_log_waits_for_a_batch_being_written(tmp_path: Path) -> None:
    """`check` reads the last line under a shared lock: a writer's batch half in the file is
    not taken for a torn line (found by review)."""
    path = tmp_path / "log.jsonl"
    write_chain(path, 2)
    line = lines_of(path)[-1]
    fd = os.open(path, os.O_RDWR | os.O_APPEND)
    checked: list[BaseException | None] = []

    def check() -> None:
        try:
            audit.check_log(path)
            checked.append(None)
        except BaseException as e:  # handed to the test's thread
            checked.append(e)

    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a writer, half way through its batch
        os.write(fd, line[:40])
        checker = threading.Thread(target=check)
        checker.start()
        time.sleep(0.2)
        assert checker.is_alive() and not checked
        os.write(fd, line[40:])  # the batch's line whole (a repeat: only its shape is read)
        fcntl.flock(fd, fcntl.LOCK_UN)
        checker.join(5)
    finally:
        os.close(fd)
    assert checked == [None]


def test_a_log_rotated_while_an_append_waits_for_the_lock_goes_to_the_new_file(
    tmp_path: Path,
) -> None:
    """Another writer (a worker) holds the lock while the log is rotated away: the waiting
    append, once it has the lock, writes to the file now at the path, not the rotated one."""
    path = tmp_path / "decisions.jsonl"
    log = AuditLog.open(path)
    log.append_sync(decision(1))
    other = os.open(path, os.O_RDWR | os.O_APPEND)
    try:
        fcntl.flock(other, fcntl.LOCK_EX)
        appending = threading.Thread(target=log.append_sync, args=(decision(2),))
        appending.start()
        time.sleep(0.2)  # waiting for the lock, past its check of the path
        path.rename(tmp_path / "decisions.1.jsonl")
        fcntl.flock(other, fcntl.LOCK_UN)
        appending.join(5)
    finally:
        os.close(other)
        log.close()
    assert seqs_in_file(tmp_path / "decisions.1.jsonl") == [1]
    assert seqs_in_file(path) == [1]  # a new chain in the new file


def test_library_logs_leave_as_one_json_line_each(monkeypatch: pytest.MonkeyPatch) -> None:
    """Found by QA: during a database outage asyncpg wrote multi-line plain-text tracebacks to
    stderr. What libraries log through `logging` (warnings and above) is a JSON line on stdout
    like every other event, traceback and all; their info lines are not."""
    import logging

    import structlog

    from launchgate.logsetup import configure_logging

    out = StreamWrites()
    monkeypatch.setattr("sys.stdout", out)
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    configure_logging()
    try:
        pool = logging.getLogger("asyncpg.pool")
        pool.info("not this")
        try:
            raise ConnectionRefusedError("connection refused")
        except ConnectionRefusedError:
            pool.warning("Failed to restore the %s; retrying", "pool", exc_info=True)
        pool.log(35, "a level of its own")  # found in review: lost, with a traceback on stderr
    finally:
        structlog.reset_defaults()
        root.handlers[:], root.level = handlers, level
    line, own = out.calls
    assert (json.loads(own)["message"], json.loads(own)["level"]) == (
        "a level of its own",
        "warning",
    )
    assert line.endswith("\n") and "\n" not in line[:-1]
    event = json.loads(line)
    assert (event["event"], event["logger"], event["level"]) == (
        "library.log",
        "asyncpg.pool",
        "warning",
    )
    assert event["message"] == "Failed to restore the pool; retrying"
    assert "ConnectionRefusedError: connection refused" in event["exception"]
