"""A lean HTTP/1.1 client for the upstream: pooled keep-alive connections, streaming both ways.

aiohttp's ``ClientSession`` does much per request that a reverse proxy never needs (URL
building, cookies, redirects, tracing hooks, a connector's bookkeeping); profiled under
load it was a fifth of the gateway's event-loop time. Without it, the benchmark's GET
pass-through went from 0.89x to 1.3x the reference proxy's requests/s.

This client writes the request head itself and reads the answer with aiohttp's own client
protocol (``ResponseHandler`` and its C parser), which is what ``ClientSession`` reads
with, so answers keep aiohttp's semantics: HEAD, 1xx and 204/304 handling, chunked
decoding, the read timeout between reads (``sock_read``), flow control, and payload
errors as ``ClientPayloadError``.

The protocol is aiohttp's internal API: the package pins aiohttp's minor version, and
``tests/test_upstream.py`` covers every behaviour this module relies on. Besides the
protocol's public face (``read``, ``set_response_params``, ``start_timeout``,
``should_close``, ``closed``), it uses ``_payload``, ``_drop_timeout`` and
``_drain_helper``: re-check those when upgrading aiohttp.
"""

from __future__ import annotations

import asyncio
import functools
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Final

from aiohttp import (
    ClientError,
    ClientOSError,
    ClientPayloadError,
    ServerDisconnectedError,
    SocketTimeoutError,
    StreamReader,
)
from aiohttp.client_proto import ResponseHandler
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDictProxy
from yarl import URL

# A connection idle longer than this is closed rather than reused: below the 5 s for which
# common servers (uvicorn, Node.js) keep an idle connection, so the upstream seldom closes
# one just as a request goes out on it.
IDLE_S: Final = 4.0
# At most this many idle connections are kept per upstream; more are closed.
MAX_IDLE: Final = 256
_READ_BUFSIZE: Final = 2**16
# Sent again once on a new connection when a reused one turns out closed (as aiohttp does),
# unless the caller says the answer settles something (a launch's reservation).
_IDEMPOTENT: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
# Methods whose bodiless requests go without a Content-Length; others get "0" (as aiohttp).
_BODILESS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})


# Interim (1xx) answers taken before the final one: 100 Continue and 103 Early Hints come once
# or a few times; more is an upstream that never gets to its answer.
_MAX_INTERIM_ANSWERS: Final = 16


class ConnectFailed(Exception):
    """No connection to the upstream could be made: nothing reached it."""

    def __init__(self, message: str, *, timed_out: bool) -> None:
        super().__init__(message)
        self.timed_out = timed_out


class BadRequestHead(ValueError):
    """A header name, value or target would break the request head (CR, LF)."""


class BadAnswer(ClientError):
    """The upstream's answer head is not valid HTTP/1.1."""


class RequestBodyFailed(ClientError):
    """The client's streamed request body could not be read to its end (the client left):
    the request was cut off on its way upstream."""


@dataclass(frozen=True, slots=True)
class Origin:
    """Where requests for one upstream URL go, and the path prefix they carry."""

    host: str
    port: int
    ssl: ssl.SSLContext | None
    host_header: str
    prefix: str


@functools.lru_cache(maxsize=16)
def origin_of(url: URL) -> Origin:
    """The origin of an upstream URL (computed once per configured URL)."""
    host = url.raw_host or ""
    port = url.port or (443 if url.scheme == "https" else 80)
    context = ssl.create_default_context() if url.scheme == "https" else None
    bracketed = f"[{host}]" if ":" in host else host
    host_header = bracketed if url.is_default_port() else f"{bracketed}:{port}"
    return Origin(host, port, context, host_header, url.raw_path.rstrip("/"))


@dataclass(frozen=True, slots=True)
class Prefixed:
    """A streamed body whose first bytes were read already: ``head``, then the rest of
    ``rest`` (a launch body found too large to judge, forwarded in shadow mode)."""

    head: bytes
    rest: StreamReader


Streamed = StreamReader | Prefixed
Body = bytes | Streamed | None


async def _chunks(body: Streamed) -> AsyncIterator[bytes]:
    if isinstance(body, Prefixed):
        yield body.head
        body = body.rest
    async for chunk in body.iter_any():
        yield chunk


class UpstreamResponse:
    """The upstream's answer: status, headers and the body as a stream (``content``).

    ``release()`` must be called once done with it: the connection goes back to the pool
    when the body was read to its end, and is closed otherwise.
    """

    __slots__ = (
        "_client",
        "_closed",
        "_conn",
        "_keep",
        "_origin",
        "_upload",
        "content",
        "headers",
        "reason",
        "status",
    )

    def __init__(
        self,
        status: int,
        reason: str,
        headers: CIMultiDictProxy[str],
        content: StreamReader,
        conn: ResponseHandler,
        client: UpstreamClient,
        origin: Origin,
        upload: _Upload | None,
        keep: bool = True,
    ) -> None:
        self.status = status
        self.reason = reason
        self.headers = headers
        self.content = content
        self._conn: ResponseHandler | None = conn
        self._client = client
        self._origin = origin
        self._upload = upload
        self._keep = keep  # whether the connection may serve another request afterwards
        # A body the parser gives up on (a bad chunk) would otherwise wait for bytes forever:
        # when the connection goes, an unfinished body fails. (``closed`` is None only once
        # the connection is lost, and _connect asks for it before that.)
        self._closed = conn.closed
        if self._closed is not None and not content.is_eof():
            self._closed.add_done_callback(self._lost)

    def _lost(self, _: object) -> None:
        if not self.content.is_eof() and self.content.exception() is None:
            self.content.set_exception(
                ClientPayloadError("the upstream connection closed before the answer's end")
            )

    @property
    def content_length(self) -> int | None:
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    async def read(self) -> bytes:
        """The whole body."""
        return await self.content.read()

    def release(self) -> None:
        """Done with the answer: its connection goes back to the pool if the body was read to
        its end and the request's upload is over; else it is dropped."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._closed is not None:
            self._closed.remove_done_callback(self._lost)
        upload = self._upload
        if upload is not None and not upload.done:  # the upload is unfinished: abandon it
            upload.cancel()
            conn.abort()  # (close() would wait for the unsent bytes to drain)
        elif self.content.is_eof() and self._keep:
            self._client.put(self._origin, conn)
        else:
            conn.close()


class UpstreamClient:
    """Keep-alive connections to upstream origins, one request at a time on each."""

    def __init__(self, *, idle_s: float = IDLE_S, max_idle: int = MAX_IDLE) -> None:
        self._idle: dict[Origin, deque[tuple[float, ResponseHandler]]] = {}
        self._open: set[ResponseHandler] = set()
        self._idle_s = idle_s
        self._max_idle = max_idle
        self._closed = False

    async def request(
        self,
        method: str,
        url: URL,
        target: str,
        headers: Sequence[tuple[str, str]],
        body: Body,
        *,
        connect_timeout_s: float,
        read_timeout_s: float,
        resend: bool = True,
    ) -> UpstreamResponse:
        """Send ``method target`` (path and query, as received) to the upstream at ``url``.

        ``headers`` go as given, plus Host when absent; a ``bytes`` body gets its
        Content-Length; a streamed one keeps the Content-Length in ``headers``, or else
        goes chunked. An idempotent request whose kept connection turns out closed is sent
        once more on a new one, unless ``resend`` is false (its answer settles something
        that a second answer to the same request could settle wrongly).

        Raises ``BadRequestHead`` (nothing sent) for a line break in a header or the target,
        ``ConnectFailed`` when no connection could be made (nothing sent), and aiohttp's
        ``ClientError`` / ``TimeoutError`` once the request may have arrived.
        """
        origin = origin_of(url)
        head, chunked = _request_head(method, origin, target, headers, body)
        conn = self._take(origin)  # (ResponseHandler defines __len__: test `is None`, not `or`)
        if conn is not None and resend and method in _IDEMPOTENT and not isinstance(body, Streamed):
            # A kept connection the upstream closed just as this request went out fails
            # before any answer: an idempotent request is sent again on a new one.
            try:
                return await self._exchange(
                    conn, origin, method, head, body, read_timeout_s, chunked
                )
            except (ServerDisconnectedError, ClientOSError) as first:
                try:
                    conn = await self._connect(origin, connect_timeout_s)
                except ConnectFailed:  # the first may have arrived: that is what happened
                    raise first from None
        if conn is None:
            conn = await self._connect(origin, connect_timeout_s)
        return await self._exchange(conn, origin, method, head, body, read_timeout_s, chunked)

    async def _exchange(
        self,
        conn: ResponseHandler,
        origin: Origin,
        method: str,
        head: bytes,
        body: Body,
        read_timeout_s: float,
        chunked: bool,
    ) -> UpstreamResponse:
        """One request on ``conn``, up to the final answer's head; ``conn`` is closed on any
        failure (or cancellation) on the way."""
        upload: _Upload | None = None
        try:
            conn._drop_timeout()  # a kept connection's timer is the last request's business
            conn.set_response_params(
                skip_payload=method == "HEAD",
                read_until_eof=True,  # an answer without a length ends when the connection does
                auto_decompress=False,
                read_timeout=read_timeout_s or None,
                read_bufsize=_READ_BUFSIZE,
            )
            transport = conn.transport
            if transport is None:  # (not after _take or _connect; nothing was sent)
                raise ConnectFailed("the upstream closed the connection", timed_out=False)
            if isinstance(body, Streamed):
                transport.write(head)
                # The read timeout starts once the body is sent, as the upload's own end.
                upload = _Upload(conn, body, chunked, read_timeout_s)
            else:
                transport.write(head + body if body else head)
                conn.start_timeout()
            # With a body sent whole (every launch's, b"" for a GET), the final answer's head
            # is due within the read timeout in all: the timer alone restarts at every byte,
            # and an upstream trickling its head or sending interim answers held a launch, and
            # its reservation, for as long as it went on (found in review). Other requests keep
            # the per-read timer alone, as proxies do: the deadline costs 3 us, measured.
            deadline = (
                asyncio.get_running_loop().time() + read_timeout_s
                if isinstance(body, bytes) and read_timeout_s
                else None
            )
            interim = 0
            while True:
                try:
                    if deadline is None:  # (the context costs 1.7 us even without a deadline)
                        message, payload = await conn.read()
                    else:
                        async with asyncio.timeout_at(deadline):
                            message, payload = await conn.read()
                except HttpProcessingError as e:
                    raise BadAnswer(f"the upstream's answer is not HTTP/1.1: {e.message}") from e
                if message.code == 101:
                    # The gateway forwards no Upgrade, so no switch was asked for: the bytes
                    # that follow are no HTTP it can relay (found in review: the 101 went to
                    # the client, whose connection then stayed HTTP).
                    raise BadAnswer("the upstream switched protocols (101), which was not asked")
                if not 100 <= message.code < 200:
                    break
                interim += 1
                if interim > _MAX_INTERIM_ANSWERS:
                    raise BadAnswer(
                        f"the upstream sent over {_MAX_INTERIM_ANSWERS} interim answers"
                    )
                # aiohttp stops the read timer at an interim answer: the final one is still due
                # (unless it is queued already, its body read and its timer stopped).
                if (upload is None or upload.done) and not len(conn):
                    conn.start_timeout()
        except BaseException:
            if upload is not None:
                upload.cancel()
            conn.abort()  # (close() would wait for any unsent bytes to drain)
            raise
        if upload is not None:
            upload.answered = True
        if payload.is_eof():  # nothing more to read on this request: no timer may outlive it
            conn._drop_timeout()
        # A request that asked to be told to go on gets its body sent at once all the same: an
        # upstream that answered early and then read that body as a request of its own would
        # answer it next on this connection, so it serves no other (found in review).
        keep = b"\r\nexpect:" not in head.lower()
        return UpstreamResponse(
            message.code, message.reason, message.headers, payload, conn, self, origin, upload, keep
        )

    def _take(self, origin: Origin) -> ResponseHandler | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        fresh = time.monotonic() - self._idle_s
        while idle:
            since, conn = idle.pop()  # the most recently used: the least likely to be stale
            if since >= fresh and conn.is_connected() and not conn.should_close:
                return conn
            conn.close()  # (the older ones are staler still: all closed)
        return None

    def put(self, origin: Origin, conn: ResponseHandler) -> None:
        """Take back a connection whose answer was read whole."""
        if self._closed or conn.should_close or not conn.is_connected():
            conn.close()
            return
        idle = self._idle.get(origin)
        if idle is None:
            idle = self._idle[origin] = deque()
        now = time.monotonic()
        idle.append((now, conn))
        stale = now - self._idle_s
        while idle and (idle[0][0] < stale or len(idle) > self._max_idle):
            idle.popleft()[1].close()

    async def _connect(self, origin: Origin, timeout_s: float) -> ResponseHandler:
        if self._closed:
            raise ConnectFailed("the upstream client is closed", timed_out=False)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout_s or None):
                _, conn = await loop.create_connection(
                    lambda: ResponseHandler(loop),
                    origin.host,
                    origin.port,
                    ssl=origin.ssl,
                    server_hostname=origin.host if origin.ssl is not None else None,
                )
        except TimeoutError:
            raise ConnectFailed(
                f"connecting to {origin.host_header} took over {timeout_s:g} s", timed_out=True
            ) from None
        except OSError as e:
            raise ConnectFailed(
                f"cannot connect to {origin.host_header}: {e.strerror or e}", timed_out=False
            ) from e
        if self._closed:  # closed while connecting: nothing was sent
            conn.abort()
            raise ConnectFailed("the upstream client is closed", timed_out=False)
        closed = conn.closed
        if closed is None:  # lost already
            raise ConnectFailed(f"{origin.host_header} closed the connection", timed_out=False)
        self._open.add(conn)
        closed.add_done_callback(functools.partial(_forget, self._open, conn))
        return conn

    async def close(self) -> None:
        """Close every connection, idle or in use (an answer being read fails)."""
        self._closed = True
        self._idle.clear()
        waiting = []
        for conn in list(self._open):
            closed = conn.closed
            if closed is not None:
                waiting.append(closed)
            _cut(conn)
        if waiting:  # aborted transports are gone within a loop iteration or two
            await asyncio.wait(waiting, timeout=5)


def _cut(conn: ResponseHandler) -> None:
    """Drop ``conn`` from this side, unsent bytes and all: a body still being read fails
    (ClientPayloadError) rather than ending cleanly, as one that ends with the connection
    otherwise would."""
    payload = conn._payload
    if payload is not None and not payload.is_eof():
        payload.set_exception(ClientPayloadError("the upstream connection was closed"))
    conn.abort()


def _forget(
    open_: set[ResponseHandler], conn: ResponseHandler, closed: asyncio.Future[None]
) -> None:
    open_.discard(conn)
    if not closed.cancelled():
        closed.exception()  # a connection lost uncleanly is no news: the reader heard of it


def _request_head(
    method: str,
    origin: Origin,
    target: str,
    headers: Sequence[tuple[str, str]],
    body: Body,
) -> tuple[bytes, bool]:
    """The request's head, and whether its (streamed) body goes chunked."""
    lines = [f"{method} {origin.prefix}{target} HTTP/1.1"]
    has_host = has_length = False
    for name, value in headers:
        lines.append(f"{name}: {value}")
        lowered = name.lower()
        has_host = has_host or lowered == "host"
        has_length = has_length or lowered == "content-length"
    if not has_host:
        lines.append(f"Host: {origin.host_header}")
    if isinstance(body, bytes) and not has_length:
        lines.append(f"Content-Length: {len(body)}")
    elif body is None and not has_length and method not in _BODILESS:
        lines.append("Content-Length: 0")
    chunked = isinstance(body, Streamed) and not has_length
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    lines.append("\r\n")
    text = "\r\n".join(lines)
    # Each element is one line: a CR or LF inside one would smuggle in another header.
    if text.count("\n") != len(lines) or text.count("\r") != len(lines):
        raise BadRequestHead("a header or the target holds a line break")
    return text.encode("utf-8", "surrogateescape"), chunked


class _Upload:
    """A streamed request body on its way to the upstream, beside the wait for the answer.

    Its own flow control: a write waits while the upstream is not reading, for at most the
    read timeout. Once the body is sent and no answer has come yet, the read timeout starts.
    On any failure the connection is closed, so the answer fails too rather than waiting.
    """

    def __init__(
        self, conn: ResponseHandler, body: Streamed, chunked: bool, read_timeout_s: float
    ) -> None:
        self.answered = False
        self._task = asyncio.ensure_future(self._send(conn, body, chunked, read_timeout_s or None))

    @property
    def done(self) -> bool:
        return self._task.done()

    def cancel(self) -> None:
        self._task.cancel()

    async def _send(
        self, conn: ResponseHandler, body: Streamed, chunked: bool, timeout_s: float | None
    ) -> None:
        transport = conn.transport
        try:
            async for chunk in _chunks(body):
                if not chunk:  # an empty chunk would end a chunked body
                    continue
                if transport is None or transport.is_closing():
                    return
                transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk) if chunked else chunk)
                if conn.writing_paused:
                    try:
                        async with asyncio.timeout(timeout_s):
                            await conn._drain_helper()
                    except TimeoutError:
                        _cut(conn)
                        conn.set_exception(
                            SocketTimeoutError("the upstream stopped reading the request body")
                        )
                        return
            if transport is None or transport.is_closing():
                return
            if chunked:
                transport.write(b"0\r\n\r\n")
            if not self.answered and not len(conn):  # no answer yet, not even queued
                conn.start_timeout()
        except Exception as e:  # (not CancelledError: release() cancels, and drops the connection)
            _cut(conn)
            failed = RequestBodyFailed(f"the request body could not be read: {e}")
            failed.__cause__ = e
            conn.set_exception(failed)
