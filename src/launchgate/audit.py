"""The decision log: append-only, hash-chained JSON lines (CONTRACT section 5), and its verifier.

Each line is one record's canonical JSON. ``seq`` counts from 1, ``prev_hash`` is the
previous record's ``hash`` (64 zeros for the first) and ``hash`` is the SHA-256 of the
record's canonical JSON without ``hash``. Changing, removing or reordering a record
breaks the chain at that record, or at the next one; ``verify_file`` finds the first break.
What the chain cannot show alone (found by QA): records cut from the end, or a record changed
with every later hash recomputed, since no secret is involved. It takes a copy of a recent
head kept elsewhere: every line also goes to stdout (and so to the provider's log store),
where the last ``hash`` can be compared.

Several processes may append to one file (a gateway and ``launchgate licenses
release``). Every append holds an exclusive ``flock`` on the file and, when the file
has grown since this process last wrote, continues from the record another writer
left at the end, so the chain never forks.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import functools
import hashlib
import json
import math
import os
import stat
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final

import structlog

from launchgate.errors import ConfigError
from launchgate.files import cannot_make, file_id, short_of_space, still_at
from launchgate.jobthread import JobThread

log = structlog.get_logger("launchgate")

GENESIS_HASH: Final = "0" * 64
CHAIN_FIELDS: Final = frozenset({"seq", "prev_hash", "hash"})

_TAIL_BLOCK: Final = 64 * 1024
# A bound on how far back open() searches for the last line, so a log whose end is
# garbage without newlines cannot make it read gigabytes into memory.
_MAX_RECORD_BYTES: Final = 16 * 1024 * 1024
# /readyz: a filesystem with less free than this takes no more than a few batches of records
# (a record is under 2 KiB). Not _MAX_RECORD_BYTES: found by QA, a log on an 8 MB tmpfs with
# 8 MB free was called full.
_LOW_SPACE_BYTES: Final = 64 * 1024
_HEX_DIGITS: Final = frozenset("0123456789abcdef")


_ENCODER: Final = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
)


def _unencodable(value: object) -> Any:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


# The C encoder ``_ENCODER.encode`` builds anew on every call, built once: keys sorted, no
# whitespace, no ASCII escaping, NaN refused, and no check for reference cycles (a record is
# a tree of fresh dicts and lists). Falls back to ``_ENCODER`` where the C speedups are absent.
_MAKE_C_ENCODER: Any = getattr(json.encoder, "c_make_encoder", None)  # not in typeshed
_C_ENCODE: Final = (
    None
    if _MAKE_C_ENCODER is None
    else _MAKE_C_ENCODER(
        None, _unencodable, json.encoder.encode_basestring, None, ":", ",", True, False, False
    )
)


def _encode(record: dict[str, Any]) -> str:
    if _C_ENCODE is None:
        return _ENCODER.encode(record)
    return "".join(_C_ENCODE(record, 0))


def canonical_json(record: Mapping[str, Any]) -> bytes:
    """The record as canonical JSON: keys sorted, no whitespace, UTF-8.

    Raises ValueError for NaN or infinity and for strings that are not valid Unicode
    (lone surrogates), TypeError for values JSON cannot represent.
    """
    return _encode(record if isinstance(record, dict) else dict(record)).encode("utf-8")


def record_hash(record: Mapping[str, Any]) -> str:
    """Lowercase hex SHA-256 of the record's canonical JSON without its ``hash`` field."""
    content = {key: value for key, value in record.items() if key != "hash"}
    return hashlib.sha256(canonical_json(content)).hexdigest()


# Stands in for the hash while a record is encoded: 64 hex digits like a hash, random per
# process, so no value in a record can be mistaken for it (and ``hashed_line`` checks).
_PLACEHOLDER: Final = os.urandom(32).hex()
_MARK: Final = f'"hash":"{_PLACEHOLDER}"'


def hashed_line(record: Mapping[str, Any]) -> tuple[str, bytes]:
    """The record's ``hash`` and its canonical JSON line with that hash, encoded once.

    The record is encoded with a placeholder hash in its place among the sorted keys; the
    hashed content is that line without the placeholder's field, and the line is that line
    with the digest put in the placeholder's place.
    """
    marked = _encode({**record, "hash": _PLACEHOLDER})
    at = marked.find(_MARK)
    if at < 0 or marked.find(_MARK, at + 1) >= 0:  # never seen: the placeholder in a value
        return _hashed_line_in_halves(record)
    before, after = marked[:at], marked[at + len(_MARK) :]
    if after[0] == ",":  # a field follows: the hashed content drops the comma after "hash"
        content = before + after[1:]
    elif before[-1] == ",":  # the last field
        content = before[:-1] + after
    else:  # the only one
        content = before + after
    digest = hashlib.sha256(content.encode("utf-8")).hexdigest()
    return digest, f'{before}"hash":"{digest}"{after}\n'.encode()


def _hashed_line_in_halves(record: Mapping[str, Any]) -> tuple[str, bytes]:
    """``hashed_line`` by encoding the keys before ``hash`` and after it apart."""
    before = _encode({k: v for k, v in record.items() if k < "hash"}).encode("utf-8")
    after = _encode({k: v for k, v in record.items() if k > "hash"}).encode("utf-8")
    inner = [part for part in (before[1:-1], after[1:-1]) if part]
    digest = hashlib.sha256(b"{" + b",".join(inner) + b"}").hexdigest()
    inner.insert(1 if before != b"{}" else 0, b'"hash":"' + digest.encode() + b'"')
    return digest, b"{" + b",".join(inner) + b"}\n"


_stamp: tuple[int, str] = (-1, "")  # the last second formatted, and its text


def utc_timestamp(now: float) -> str:
    """A POSIX time as the record's ``timestamp``: ``2026-11-26T04:33:14.123456Z``."""
    global _stamp
    # As datetime.fromtimestamp rounds: the fraction alone, to the nearest microsecond.
    fraction, whole = math.modf(now)
    second, micros = int(whole), round(fraction * 1_000_000)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    elif micros < 0:
        second, micros = second - 1, micros + 1_000_000
    cached, prefix = _stamp  # one tuple, so threads never see a second with another's text
    if second != cached:
        prefix = datetime.fromtimestamp(second, tz=UTC).strftime("%Y-%m-%dT%H:%M:%S")
        _stamp = (second, prefix)
    return f"{prefix}.{micros:06d}Z"


def _escaped(value: Any) -> Any:
    """``value`` with the lone surrogates in its strings (a header's bytes that were not
    UTF-8, or a JSON ``\\udcff`` escape) written as backslash escapes, so that a decision
    about such a request is recorded like any other."""
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, dict):
        return {_escaped(key): _escaped(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_escaped(item) for item in value]
    return value


@dataclass(frozen=True, slots=True)
class VerifyResult:
    """The outcome of checking a log's chain.

    ``records`` is the number of records that checked out (all of them when ``ok``);
    ``bad_seq`` is the first bad record's seq: its own when the record is intact but out of
    place (one before it cut out, records swapped), else (it was altered, it cannot be read)
    the seq that belongs at its line; ``detail`` says why, and on which line.
    """

    ok: bool
    records: int
    bad_seq: int | None
    detail: str
    # The good records whose line is not byte for byte what the gateway writes, and the first.
    not_canonical: int = 0
    first_not_canonical: int | None = None

    def summary(self) -> str:
        """One line for ``launchgate audit verify``'s stdout: ``ok N records``, or the first bad
        record's seq and nothing else, as the CONTRACT words it (a reader taking the line, its
        first or its last number gets it; found by QA: the reason, which names other numbers,
        followed it)."""
        if self.ok:
            return f"ok {self.records} records"
        return str(self.bad_seq)

    def reason(self) -> str | None:
        """Why the first bad record is bad, for stderr (None when ok)."""
        return None if self.ok else f"bad record seq {self.bad_seq}: {self.detail}"

    def note(self) -> str | None:
        """A line for stderr when some records hash right but are not spelt as the gateway
        writes them (found by QA: "1.402" spelt "1.4020000000000000000001" verified, and a
        reader that keeps number spellings shows the longer one). The CONTRACT defines a
        record by its content's hash, so this is a note, not a failure."""
        if not self.not_canonical:
            return None
        return (
            f"note: {self.not_canonical} record(s), the first seq {self.first_not_canonical},"
            " are not spelt byte for byte as the gateway writes them (canonical JSON); their"
            " content hashes match, but a reader that keeps spellings may show them differently"
        )


class _BadRecord(ValueError):
    """A line of the log is not a well-formed, self-consistent record; the message says why."""


def _object_without_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # A record with a key twice could be read two ways; refuse it rather than pick one.
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise _BadRecord(f"duplicate key {key!r}")
        obj[key] = value
    return obj


def _reject_constant(name: str) -> Any:
    raise _BadRecord(f"{name} is not a JSON number")


def _is_digest(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and set(value) <= _HEX_DIGITS


def _parse_record(line: bytes) -> tuple[dict[str, Any], bool]:
    """Parse one line (without its newline) and check its own hash; raise _BadRecord. Also
    whether the line holds the record byte for byte as the gateway writes it (canonical JSON,
    its hash in place): a line can differ and still hash right (keys in another order, blanks,
    escapes, another spelling of a number), and a reader may show it differently."""
    try:
        record = json.loads(
            line.decode("utf-8"),
            object_pairs_hook=_object_without_duplicates,
            parse_constant=_reject_constant,
        )
    except UnicodeDecodeError:
        raise _BadRecord("not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise _BadRecord(f"not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:  # (found by QA: a traceback from verify, check and serve)
        raise _BadRecord("nested too deeply to read") from None
    if not isinstance(record, dict):
        raise _BadRecord("not a JSON object")
    seq = record.get("seq")
    if type(seq) is not int or seq < 1:  # type() also rejects True, which is an int
        raise _BadRecord("seq is missing or not a positive integer")
    for field in ("prev_hash", "hash"):
        if not _is_digest(record.get(field)):
            raise _BadRecord(f"{field} is missing or not 64 lowercase hex digits")
    try:  # (one encoding gives both the hash and the canonical line)
        expected, canonical = hashed_line(record)
    except ValueError as e:
        raise _BadRecord(f"cannot be put in canonical form ({e})") from None
    except RecursionError:
        raise _BadRecord("nested too deeply to read") from None
    if record["hash"] != expected:
        raise _BadRecord("hash does not match the record's content (the record was altered)")
    return record, canonical == line + b"\n"


def _read_last_line(fd: int, size: int) -> bytes:
    """The file's last line without its newline, read backwards from the end; raise _BadRecord.
    (The last line's newline is optional, as in JSON Lines: see ``_terminated``.)"""
    end = size - 1 if os.pread(fd, 1, size - 1) == b"\n" else size
    pos = end
    chunks: list[bytes] = []
    while pos > 0:
        if end - pos > _MAX_RECORD_BYTES:
            raise _BadRecord(f"the last line is longer than {_MAX_RECORD_BYTES} bytes")
        start = max(0, pos - _TAIL_BLOCK)
        block = os.pread(fd, pos - start, start)
        if len(block) != pos - start:
            raise _BadRecord("the file shrank while its last line was read")
        cut = block.rfind(b"\n")
        if cut >= 0:
            chunks.append(block[cut + 1 :])
            break
        chunks.append(block)
        pos = start
    return b"".join(reversed(chunks))


def _chain_head(fd: int, size: int) -> tuple[int, str]:
    """The last record's seq and hash (0 and GENESIS_HASH if empty); raise _BadRecord."""
    if size == 0:
        return 0, GENESIS_HASH
    record, _ = _parse_record(_read_last_line(fd, size))
    return record["seq"], record["hash"]


def _terminated(fd: int, path: Path, size: int) -> int:
    """The size of the log once its last line ends in a newline, writing one if it does not
    (under the caller's exclusive lock). A JSON Lines file may end without one (a log built
    by hand, found by QA: `audit verify` refused a chain intact but for it); a record
    appended after that line must not join it."""
    if size == 0 or os.pread(fd, 1, size - 1) == b"\n":
        return size
    _write_all(fd, b"\n")
    log.warning("audit.newline_added", path=str(path))
    return size + 1


@contextmanager
def _exclusive_lock(fd: int) -> Iterator[None]:
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _truncate_quietly(fd: int, size: int) -> None:
    # Undo a partly written line so one failed write (a full disk) does not leave a torn
    # tail that stops every later append. If this fails too, the caller's error is the
    # one to report, and the next append or open() refuses the torn tail.
    with suppress(OSError):
        os.ftruncate(fd, size)


def _open_chain(path: Path) -> tuple[int, int, str, int]:
    """Open (creating it and its folders if missing) the log at ``path`` to append: its file
    descriptor, the last record's seq and hash, and the file's size. ConfigError names the
    file when it cannot be opened or its last line is not an intact record."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o640)
    except OSError as e:
        raise ConfigError(f"{path}: cannot open the audit log: {e.strerror or e}") from e
    try:
        with _exclusive_lock(fd):
            seq, head, size = _head_of(fd, path)
            size = _terminated(fd, path, size)
    except BaseException:
        os.close(fd)
        raise
    return fd, seq, head, size


def check_log(path: Path) -> None:
    """ConfigError for what ``AuditLog.open`` would refuse, found without creating or changing
    anything (``check``): a path that is not a file it can append to, or whose last record
    is not intact. A log not there yet is fine: it is created at start."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
    except FileNotFoundError:
        if why := cannot_make(path):
            raise ConfigError(why) from None
        return
    except OSError as e:
        raise ConfigError(f"{path}: cannot open the audit log: {e.strerror or e}") from e
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)  # a batch being appended is not a torn line
        _head_of(fd, path)
    finally:
        os.close(fd)  # (and the lock with it)


def _head_of(fd: int, path: Path) -> tuple[int, str, int]:
    """The open log's last seq and hash, and its size; ConfigError naming the file."""
    try:
        size = os.fstat(fd).st_size
        seq, head = _chain_head(fd, size)
    except _BadRecord as e:
        raise ConfigError(
            f"{path}: the audit log's last record is not intact ({e}); "
            f"run `launchgate audit verify {path}` before appending to it"
        ) from e
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the audit log: {e.strerror or e}") from e
    return seq, head, size


# Called once per write with the records just written and their lines, in order.
Written = Callable[[list[dict[str, Any]], list[bytes]], None]
_Batch = list[tuple[dict[str, Any], asyncio.Future[dict[str, Any]]]]
# What ``append_later`` calls back with: the chained record, or why it was not written.
Done = Callable[[dict[str, Any] | Exception], None]


class AuditLog:
    """Append-only, hash-chained JSON-lines decision log.

    ``append`` records are written by one dedicated thread, in call order, each line
    flushed to the operating system (not fsynced) before ``append`` returns. Appends made
    in one turn of the event loop, and those that arrive while a write is under way, are
    written together (group commit): one lock, one size check and one ``write`` for the
    batch. ``append_sync`` writes on
    the calling thread; a lock keeps both in one chain. ``append_later`` inside ``group()``
    gathers records a thread makes in a row (the SQLite ledger's, for the launches whose
    transaction just committed) into one such write.
    """

    def __init__(
        self, path: Path, fd: int, seq: int, head: str, size: int, on_written: Written | None = None
    ) -> None:
        """Use ``AuditLog.open``."""
        self._path = path
        self._on_written = on_written
        self._pending: list[tuple[dict[str, Any], asyncio.Future[dict[str, Any]]]] = []
        self._idle: asyncio.Future[None] | None = None  # set while a batch is being written
        self._fd = fd
        self._fd_id = file_id(fd)
        # The chain as this process last saw it: the last record's seq and hash, and the
        # file size just after it. A different size means another writer appended.
        self._seq = seq
        self._head = head
        self._size = size
        self._closed = False
        self._writer = JobThread("launchgate-audit")
        # Held while a batch is written: the writer thread's, or another thread's append_sync.
        self._write_lock = threading.Lock()
        self._groups = threading.local()  # .pending: a thread's group() gathering appends

    @classmethod
    def open(cls, path: Path, *, on_written: Written | None = None) -> AuditLog:
        """Open (creating it and its folders if missing) the log at ``path`` to append.

        ``on_written(records, lines)`` is called on the writing thread after each write,
        with the records it put in the file (the gateway echoes them to its structured log
        there, off the loop).

        Continues the chain from the file's last record. Raises ConfigError naming the
        file when it cannot be opened or its last line is not an intact record (a torn
        write): appending then would fork the chain, so staff should run
        ``launchgate audit verify`` first.
        """
        return cls(path, *_open_chain(path), on_written)

    @property
    def path(self) -> Path:
        """The log file."""
        return self._path

    def writable(self) -> str | None:
        """Why the next record could not be written at the log's path, or None: the path is
        not a regular file, or the file or its filesystem refuses writes (permissions, the
        immutable flag, a read-only mount, no space). For /readyz, off the event loop. Found by
        QA: /readyz said ready while every launch failed on a folder put at the path."""
        path = self._path
        try:
            status = path.stat()
        except FileNotFoundError:  # the next write starts the file anew, and its folders
            folder = path.parent
            while not folder.exists() and folder != folder.parent:
                folder = folder.parent
            if not folder.is_dir() or not os.access(folder, os.W_OK | os.X_OK):
                return f"{path}: missing, and {folder} takes no new file"
            return None
        except OSError as e:
            return f"{path}: {e.strerror or e}"
        if not stat.S_ISREG(status.st_mode):
            return f"{path}: not a regular file"
        if not os.access(path, os.W_OK):
            return f"{path}: not writable"
        if short_of_space(path, _LOW_SPACE_BYTES):
            return f"{path}: less than {_LOW_SPACE_BYTES // 1024} KiB free on its filesystem"
        return None

    async def append(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Append ``record``; return a new dict, the record plus ``seq``, ``prev_hash``, ``hash``.

        Returns only once the line is in the file. Concurrent calls get consecutive seqs
        in call order. Cancelling the caller does not stop the write. Raises OSError
        when the write fails or the file's last record is no longer intact, ValueError
        for a record that sets a chain field, is not JSON (NaN) or after close,
        TypeError for values JSON cannot represent.
        """
        entry = self._prepare(record)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[dict[str, Any]] = loop.create_future()
        self._pending.append((entry, done))
        if self._idle is None:
            # Written at the end of this turn of the loop, with every append made in it.
            self._idle = loop.create_future()
            loop.call_soon(self._write_pending, loop)
        # Once asked for, a record is written even if the caller is cancelled (a client
        # hanging up) and ``done`` with it: the batch takes every pending entry regardless.
        return await done

    def _write_pending(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hand every pending record to the writer thread as one batch."""
        batch, self._pending = self._pending, []
        try:
            self._writer.submit(functools.partial(self._write_and_answer, loop, batch))
        except RuntimeError:  # closed meanwhile: its callers hear so rather than wait forever
            closed = ValueError(f"{self._path}: the audit log is closed")
            self._batch_written(loop, batch, [closed] * len(batch))

    def _write_and_answer(self, loop: asyncio.AbstractEventLoop, batch: _Batch) -> None:
        """On the writer thread: write the batch, then answer its callers on the loop."""
        results: list[dict[str, Any] | Exception]
        try:
            results = self._write_batch([entry for entry, _ in batch])
        except BaseException as e:  # the whole write failed: every caller hears of it
            failure = e if isinstance(e, Exception) else RuntimeError(f"write failed: {e!r}")
            results = [failure] * len(batch)
        with suppress(RuntimeError):  # the loop is closed: nobody is waiting
            loop.call_soon_threadsafe(self._batch_written, loop, batch, results)

    def _batch_written(
        self,
        loop: asyncio.AbstractEventLoop,
        batch: _Batch,
        results: list[dict[str, Any] | Exception],
    ) -> None:
        """On the loop: answer the batch's callers, then write what queued up meanwhile."""
        for (entry, done), result in zip(batch, results, strict=True):
            if done.done():  # its caller was cancelled: nobody else would hear of a failure
                if isinstance(result, Exception):
                    log.error(
                        "audit.write_failed",
                        record_event=entry.get("event"),
                        decision_id=entry.get("decision_id"),
                        error=str(result),
                    )
                continue
            if isinstance(result, Exception):
                done.set_exception(result)
            else:
                done.set_result(result)
        if self._pending:
            self._write_pending(loop)
        elif self._idle is not None:
            self._idle.set_result(None)
            self._idle = None

    def append_sync(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """``append`` for blocking callers, on any thread but the event loop's: written on
        the calling thread, in the chain with every other append. CLI commands use it, and
        the SQLite ledger writes a launch's records with it on its own thread, right after
        its transaction (one thread hop for both)."""
        result = self._write_batch([self._prepare(record)])[0]
        if isinstance(result, Exception):
            raise result
        return result

    @contextmanager
    def group(self) -> Iterator[None]:
        """On a thread other than the event loop's: the ``append_later`` calls this thread
        makes inside are written together, in order, when the block ends (one lock and one
        ``write`` for all), each then told with its ``done``. Not reentrant."""
        pending: list[tuple[dict[str, Any], Done]] = []
        self._groups.pending = pending
        try:
            yield
        finally:
            self._groups.pending = None
            if pending:
                self._write_now(pending)

    def append_later(self, record: Mapping[str, Any], done: Done) -> None:
        """``append_sync`` that reports through ``done(record or error)`` instead of returning
        or raising: at once, or, inside ``group()`` on this thread, when the group ends."""
        try:
            entry = self._prepare(record)
        except ValueError as e:
            done(e)
            return
        pending: list[tuple[dict[str, Any], Done]] | None = getattr(self._groups, "pending", None)
        if pending is None:
            self._write_now([(entry, done)])
        else:
            pending.append((entry, done))

    def _write_now(self, entries: list[tuple[dict[str, Any], Done]]) -> None:
        results: list[dict[str, Any] | Exception]
        try:
            results = self._write_batch([entry for entry, _ in entries])
        except Exception as e:  # the whole write failed: every caller hears of it
            results = [e] * len(entries)
        for (_, done), result in zip(entries, results, strict=True):
            done(result)

    def close(self) -> None:
        """Finish the appends already asked for, then close the file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._writer.stop(wait=True)
        with self._write_lock:  # an append_sync on another thread finishes first
            os.close(self._fd)
            self._fd = -1

    async def aclose(self) -> None:
        """Write what is pending, then ``close`` without blocking the event loop."""
        if self._idle is not None:
            await asyncio.shield(self._idle)
        await asyncio.to_thread(self.close)

    def _prepare(self, record: Mapping[str, Any]) -> dict[str, Any]:
        # Copy now, so a caller that reuses its dict after the call cannot change
        # what is written later on the writer thread.
        if self._closed:
            raise ValueError(f"{self._path}: the audit log is closed")
        clash = CHAIN_FIELDS & record.keys()
        if clash:
            raise ValueError(f"a record may not set the chain fields {sorted(clash)}")
        return dict(record)

    def _write_batch(self, entries: list[dict[str, Any]]) -> list[dict[str, Any] | Exception]:
        # The chain head is computed here, under both locks, because only there is it
        # certain which record is last in the file.
        with self._write_lock:
            return self._write_locked(entries)

    def _reopen(self) -> None:
        """The file was removed or renamed (rotated) since it was opened: records written to it
        now would be lost to whoever reads the path. Continue in the file at the path, as a
        restart would: its chain, or a new one in a new file."""
        try:
            fd, seq, head, size = _open_chain(self._path)
        except ConfigError as e:
            raise OSError(errno.EIO, str(e)) from e
        os.close(self._fd)
        self._fd, self._seq, self._head, self._size = fd, seq, head, size
        self._fd_id = file_id(fd)
        log.warning("audit.reopened", path=str(self._path), seq=seq)

    @contextmanager
    def _locked_at_path(self) -> Iterator[None]:
        """The exclusive lock on the file now at the path: reopened first if it has moved (and
        again if it moved while this waited for the lock, another worker writing). Checked
        once the lock is held, which is where it matters: one ``stat`` a batch."""
        for _ in range(3):
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            if still_at(self._path, self._fd_id):
                break
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            self._reopen()
        else:  # moved three times over: write where it stands now
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _write_locked(self, entries: list[dict[str, Any]]) -> list[dict[str, Any] | Exception]:
        if self._fd < 0:
            raise ValueError(f"{self._path}: the audit log is closed")
        with self._locked_at_path():
            size = os.fstat(self._fd).st_size
            if size != self._size:
                try:
                    self._seq, self._head = _chain_head(self._fd, size)
                    size = _terminated(self._fd, self._path, size)
                except _BadRecord as e:
                    raise OSError(
                        errno.EIO,
                        f"{self._path}: cannot continue the chain, the last record is not "
                        f"intact ({e}); run `launchgate audit verify {self._path}`",
                    ) from e
                self._size = size
            seq, head = self._seq, self._head
            lines: list[bytes] = []
            results: list[dict[str, Any] | Exception] = []
            for entry in entries:
                chained = {**entry, "seq": seq + 1, "prev_hash": head}
                try:  # one record JSON cannot represent must not cost the others their write
                    try:
                        digest, line = hashed_line(chained)
                    except UnicodeEncodeError:  # a request's bytes that were not UTF-8
                        chained = _escaped(chained)
                        digest, line = hashed_line(chained)
                except (ValueError, TypeError, RecursionError) as e:
                    results.append(e)
                    continue
                if len(line) > _MAX_RECORD_BYTES:
                    # Never a line the log's reader refuses at the next start (found by QA: a
                    # launch body of 6 MB made an 18 MB record, and the gateway could not restart).
                    results.append(ValueError(f"the record is over {_MAX_RECORD_BYTES} bytes"))
                    continue
                chained["hash"] = digest
                seq, head = seq + 1, digest
                lines.append(line)
                results.append(chained)
            data = b"".join(lines)
            try:
                _write_all(self._fd, data)
            except OSError:
                _truncate_quietly(self._fd, size)
                raise
            self._seq, self._head, self._size = seq, head, size + len(data)
        if self._on_written is not None and lines:
            try:
                self._on_written([r for r in results if not isinstance(r, Exception)], lines)
            except Exception:  # the records are in the file: their callers are not failed
                with suppress(Exception):  # (stdout itself may be what broke)
                    log.exception("audit.echo_failed")
        return results


def verify_file(path: Path) -> VerifyResult:
    """Check the hash chain of the log at ``path``, reading it one line at a time.

    Every line must be a JSON object without duplicate keys, with ``seq`` one more
    than the line before (1 first), ``prev_hash`` the previous ``hash`` (GENESIS_HASH
    first) and ``hash`` its own content's hash, and must end with a newline. Stops at
    the first line that does not. An empty file is a valid, empty chain. Raises
    ConfigError naming the file when it cannot be read.
    """
    good = 0
    head = GENESIS_HASH
    not_canonical, first_not_canonical = 0, None
    try:
        with path.open("rb") as lines:
            for line in lines:
                expected = good + 1
                line = line.removesuffix(b"\n")
                try:  # (only the last line can lack its newline: optional, as in JSON Lines)
                    record, canonical = _parse_record(line)
                except _BadRecord as e:  # damaged itself: its seq is the one of its place
                    return VerifyResult(
                        ok=False, records=good, bad_seq=expected, detail=f"line {expected}: {e}"
                    )
                # Intact but out of place: the first bad record is this one, with its own seq
                # (CONTRACT: "the first bad record's seq"; found by QA: the seq of its line was
                # printed, 3 for the record of seq 4 after record 3 was cut out).
                problem = None
                if record["seq"] != expected:
                    problem = (
                        f"found the record of seq {record['seq']} where seq {expected}"
                        " belongs (a record is missing, repeated or out of order)"
                    )
                elif record["prev_hash"] != head:
                    problem = "prev_hash is not the previous record's hash"
                if problem is not None:
                    return VerifyResult(
                        ok=False,
                        records=good,
                        bad_seq=record["seq"],
                        detail=f"line {expected}: {problem}",
                    )
                if not canonical:
                    not_canonical += 1
                    first_not_canonical = first_not_canonical or expected
                head = record["hash"]
                good = expected
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the audit log: {e.strerror or e}") from e
    return VerifyResult(
        ok=True,
        records=good,
        bad_seq=None,
        detail="chain intact",
        not_canonical=not_canonical,
        first_not_canonical=first_not_canonical,
    )
