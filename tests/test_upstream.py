"""The upstream client over real sockets: reuse, bodies both ways, HEAD/1xx, errors, timeouts."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientError, ClientPayloadError, ServerDisconnectedError, StreamReader, web
from aiohttp.base_protocol import BaseProtocol
from multidict import CIMultiDict
from yarl import URL

from conftest import RawAnswer, read_request, replying, start_raw_server, tls_certificates, tls_site
from launchgate.upstream import (
    BadAnswer,
    BadRequestHead,
    ConnectFailed,
    RequestBodyFailed,
    UpstreamClient,
    UpstreamResponse,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Upstream:
    """An aiohttp server that counts the connections it was asked on."""

    def __init__(self) -> None:
        self.peers: set[Any] = set()
        self.seen: list[tuple[str, str, CIMultiDict[str], bytes]] = []
        self.url = URL()

    def wrap(self, handler: Handler) -> Handler:
        async def counted(request: web.Request) -> web.StreamResponse:
            assert request.transport is not None
            self.peers.add(request.transport.get_extra_info("peername"))
            body = await request.read()
            self.seen.append((request.method, request.raw_path, request.headers.copy(), body))
            return await handler(request)

        return counted


@pytest.fixture
async def upstream() -> AsyncIterator[Callable[[Handler], Awaitable[Upstream]]]:
    runners: list[web.AppRunner] = []

    async def start(handler: Handler) -> Upstream:
        state = Upstream()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", state.wrap(handler))
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        state.url = URL(f"http://127.0.0.1:{port}")
        return state

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    c = UpstreamClient()
    yield c
    await c.close()


async def send(
    client: UpstreamClient,
    url: URL,
    target: str = "/",
    *,
    method: str = "GET",
    headers: list[tuple[str, str]] | None = None,
    body: Any = None,
    read_timeout_s: float = 5,
) -> UpstreamResponse:
    return await client.request(
        method,
        url,
        target,
        headers or [],
        body,
        connect_timeout_s=2,
        read_timeout_s=read_timeout_s,
    )


async def fetch(client: UpstreamClient, url: URL, target: str = "/", **kw: Any) -> bytes:
    response = await send(client, url, target, **kw)
    try:
        return await response.read()
    finally:
        response.release()


async def hello(request: web.Request) -> web.StreamResponse:
    return web.Response(text=f"hello {request.method} {request.raw_path}")


async def stalls(request: web.Request) -> web.StreamResponse:
    """Half of a 10-byte answer, then nothing."""
    response = web.StreamResponse(headers={"Content-Length": "10"})
    await response.prepare(request)
    await response.write(b"12345")
    await asyncio.sleep(5)
    return response


async def test_one_connection_serves_requests_one_after_another(
    upstream: Any, client: UpstreamClient
) -> None:
    up = await upstream(hello)
    for i in range(5):
        assert await fetch(client, up.url, f"/n/{i}?q=1") == f"hello GET /n/{i}?q=1".encode()
    assert len(up.peers) == 1


async def test_concurrent_requests_take_their_own_connections_then_reuse_them(
    upstream: Any, client: UpstreamClient
) -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.05)
        return web.Response(text="ok")

    up = await upstream(slow)
    await asyncio.gather(*(fetch(client, up.url) for _ in range(4)))
    await asyncio.gather(*(fetch(client, up.url) for _ in range(4)))
    assert len(up.peers) == 4


async def test_an_answer_not_read_to_its_end_closes_its_connection(
    upstream: Any, client: UpstreamClient
) -> None:
    async def big(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"x" * 300_000)

    up = await upstream(big)
    response = await send(client, up.url)
    assert response.status == 200
    response.release()  # body unread: the connection cannot carry another answer
    assert await fetch(client, up.url) == b"x" * 300_000
    assert len(up.peers) == 2


async def test_the_path_prefix_host_and_headers_are_sent_as_given(
    upstream: Any, client: UpstreamClient
) -> None:
    up = await upstream(hello)
    await fetch(client, up.url / "api", "/v1/x?a=%2F", headers=[("X-One", "1"), ("x-two", "é")])
    method, raw_path, headers, _ = up.seen[-1]
    assert (method, raw_path) == ("GET", "/api/v1/x?a=%2F")
    assert headers["Host"] == f"127.0.0.1:{up.url.port}"
    assert headers["X-One"] == "1"
    assert headers["X-Two"] == "é"
    await fetch(client, up.url, headers=[("Host", "api.example")])
    assert up.seen[-1][2]["Host"] == "api.example"


async def test_a_line_break_in_a_header_or_target_is_refused_before_sending(
    upstream: Any, client: UpstreamClient
) -> None:
    up = await upstream(hello)
    with pytest.raises(BadRequestHead):
        await send(client, up.url, headers=[("X-A", "1\r\nX-Evil: 1")])
    with pytest.raises(BadRequestHead):
        await send(client, up.url, "/a\nb")
    assert up.seen == []


async def test_a_bytes_body_goes_with_its_length(upstream: Any, client: UpstreamClient) -> None:
    up = await upstream(hello)
    await fetch(client, up.url, method="POST", body=b'{"a": 1}')
    _, _, headers, body = up.seen[-1]
    assert body == b'{"a": 1}'
    assert headers["Content-Length"] == "8"
    assert "Transfer-Encoding" not in headers


class _Unpaced(BaseProtocol):
    """The protocol of a client connection that stays open, without flow control."""

    @property
    def connected(self) -> bool:
        return True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self, resume_parser: bool = True) -> None:
        pass


def open_body(*chunks: bytes) -> StreamReader:
    """A client's request body as it arrives: ``chunks`` so far, and more to come."""
    loop = asyncio.get_running_loop()
    reader = StreamReader(_Unpaced(loop), 2**16, loop=loop)
    for chunk in chunks:
        reader.feed_data(chunk)
    return reader


def stream_of(*chunks: bytes) -> StreamReader:
    """A client's request body that has arrived whole: ``chunks``, then its end."""
    reader = open_body(*chunks)
    reader.feed_eof()
    return reader


def trickled() -> tuple[StreamReader, asyncio.Task[None]]:
    """A 30-byte body arriving 5 bytes every 0.1 s, and the task feeding it."""
    body = open_body()

    async def trickle() -> None:
        for _ in range(6):
            body.feed_data(b"12345")
            await asyncio.sleep(0.1)
        body.feed_eof()

    return body, asyncio.ensure_future(trickle())


async def test_a_streamed_body_goes_chunked_or_with_the_given_length(
    upstream: Any, client: UpstreamClient
) -> None:
    up = await upstream(hello)
    await fetch(client, up.url, method="PUT", body=stream_of(b"abc", b"", b"defg"))
    _, _, headers, body = up.seen[-1]
    assert (body, headers["Transfer-Encoding"]) == (b"abcdefg", "chunked")
    big = b"y" * 1_000_000
    await fetch(
        client,
        up.url,
        method="PUT",
        headers=[("Content-Length", str(len(big)))],
        body=stream_of(big[:400_000], big[400_000:]),
    )
    _, _, headers, body = up.seen[-1]
    assert body == big
    assert "Transfer-Encoding" not in headers
    assert len(up.peers) == 1


async def test_chunked_answers_are_decoded_and_204_head_have_no_body(
    upstream: Any, client: UpstreamClient
) -> None:
    async def varied(request: web.Request) -> web.StreamResponse:
        if request.path == "/chunked":
            response = web.StreamResponse()
            response.enable_chunked_encoding()
            await response.prepare(request)
            for part in (b"one ", b"two ", b"three"):
                await response.write(part)
            await response.write_eof()
            return response
        if request.path == "/empty":
            return web.Response(status=204)
        return web.Response(body=b"z" * 10)

    up = await upstream(varied)
    assert await fetch(client, up.url, "/chunked") == b"one two three"
    head = await send(client, up.url, "/sized", method="HEAD")
    assert (head.status, head.content_length, await head.read()) == (200, 10, b"")
    head.release()
    empty = await send(client, up.url, "/empty")
    assert (empty.status, await empty.read()) == (204, b"")
    empty.release()
    assert await fetch(client, up.url, "/sized") == b"z" * 10
    assert len(up.peers) == 1


async def raw_server(answer: RawAnswer) -> tuple[asyncio.Server, URL]:
    """``start_raw_server``, with its URL as the client takes it."""
    server, url = await start_raw_server(answer)
    return server, URL(url)


async def test_interim_1xx_answers_are_skipped(client: UpstreamClient) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n")
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()

    server, url = await raw_server(answer)
    async with server:
        response = await send(client, url)
        assert (response.status, await response.read()) == (201, b"ok")
        response.release()


async def test_a_closed_idle_connection_is_not_reused(client: UpstreamClient) -> None:
    connections = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")  # keep-alive, then gone
        await writer.drain()

    server, url = await raw_server(answer)
    async with server:
        assert await fetch(client, url) == b"ok"
        await asyncio.sleep(0.05)  # the upstream's FIN arrives
        assert await fetch(client, url) == b"ok"
    assert connections == 2


async def test_no_connection_is_connect_failed(client: UpstreamClient) -> None:
    async def nothing(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pass

    server, url = await raw_server(nothing)
    server.close()
    await server.wait_closed()
    with pytest.raises(ConnectFailed) as caught:
        await send(client, url)
    assert not caught.value.timed_out


async def test_a_connect_that_hangs_is_connect_failed_within_the_timeout(
    client: UpstreamClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = asyncio.get_running_loop()

    async def hang(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(60)

    monkeypatch.setattr(loop, "create_connection", hang)
    started = loop.time()
    with pytest.raises(ConnectFailed) as caught:
        await client.request(
            "GET", URL("http://127.0.0.1:9"), "/", [], None, connect_timeout_s=0.2, read_timeout_s=5
        )
    assert caught.value.timed_out
    assert loop.time() - started < 2


async def test_a_silent_upstream_times_out_between_reads(
    upstream: Any, client: UpstreamClient
) -> None:
    async def silent(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(5)
        return web.Response()

    up = await upstream(silent)
    with pytest.raises(TimeoutError):
        await send(client, up.url, read_timeout_s=0.2)
    up = await upstream(stalls)
    response = await send(client, up.url, read_timeout_s=0.2)
    with pytest.raises(TimeoutError):
        await response.read()
    response.release()


async def test_an_answer_that_breaks_off_fails_its_reader(client: UpstreamClient) -> None:
    answer = replying(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
    server, url = await raw_server(answer)
    async with server:
        response = await send(client, url)
        with pytest.raises(ClientPayloadError):
            await response.read()
        response.release()


async def test_idle_connections_are_capped_and_expire(upstream: Any) -> None:
    async def handler(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.02)
        return web.Response(text="ok")

    url = (await upstream(handler)).url
    capped = UpstreamClient(max_idle=2)
    expiring = UpstreamClient(idle_s=0.05)
    try:
        await asyncio.gather(*(fetch(capped, url) for _ in range(5)))
        assert sum(len(idle) for idle in capped._idle.values()) == 2
        await fetch(expiring, url)
        await asyncio.sleep(0.1)
        await fetch(expiring, url)  # opens a new one; the expired one is closed on return
        assert sum(len(idle) for idle in expiring._idle.values()) == 1
    finally:
        await capped.close()
        await expiring.close()


async def test_close_ends_connections_in_use_and_refuses_new_ones(upstream: Any) -> None:
    up = await upstream(stalls)
    client = UpstreamClient()
    response = await send(client, up.url)
    await client.close()
    with pytest.raises(ClientPayloadError):
        await response.read()
    response.release()
    with pytest.raises(ConnectFailed):
        await send(client, up.url)


async def test_a_client_body_that_fails_midway_fails_the_request(
    upstream: Any, client: UpstreamClient
) -> None:
    up = await upstream(hello)
    body = open_body(b"part of it")
    sending = asyncio.ensure_future(
        send(client, up.url, method="PUT", headers=[("Content-Length", "100")], body=body)
    )
    await asyncio.sleep(0.05)
    body.set_exception(ConnectionResetError("the client went away"))
    with pytest.raises(RequestBodyFailed) as caught:
        await asyncio.wait_for(sending, 2)
    assert isinstance(caught.value.__cause__, ConnectionResetError)
    assert up.seen == []  # the upstream never got a whole request


async def test_an_early_answer_ends_an_unfinished_upload(client: UpstreamClient) -> None:
    hung_up = asyncio.Event()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 7\r\n\r\ntoo big")
        await writer.drain()
        while await reader.read(2**16):  # until the gateway hangs up
            pass
        hung_up.set()

    server, url = await raw_server(answer)
    body = open_body(b"x" * 1000)  # more is promised, never sent
    async with server:
        response = await send(
            client, url, method="PUT", headers=[("Content-Length", "10000000")], body=body
        )
        assert (response.status, await response.read()) == (413, b"too big")
        response.release()
        assert not any(client._idle.values())  # the connection is closed, not kept
        await asyncio.wait_for(hung_up.wait(), 2)


# --- what the review of this client found (each of these failed before its fix) -------------


async def test_an_interim_answer_does_not_stop_the_read_timeout(client: UpstreamClient) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # then nothing
        await writer.drain()
        await reader.read()

    server, url = await raw_server(answer)
    loop = asyncio.get_running_loop()
    async with server:
        started = loop.time()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(send(client, url, read_timeout_s=0.2), 3)
        assert loop.time() - started < 1.5  # the read timeout, not wait_for's


async def test_an_answer_without_a_length_ends_with_the_connection(
    client: UpstreamClient,
) -> None:
    answer = replying(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nthe whole body")
    server, url = await raw_server(answer)
    async with server:
        assert await fetch(client, url) == b"the whole body"
        assert await fetch(client, url) == b"the whole body"  # on a new connection


@pytest.mark.parametrize(
    "answer_head",
    [b"HTTP/1.1 2xx Broken\r\n\r\n", b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 9000 + b"\r\n\r\n"],
    ids=["bad-status-line", "header-too-long"],
)
async def test_an_answer_that_is_not_http_is_a_client_error(
    client: UpstreamClient, answer_head: bytes
) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answer_head)
        await writer.drain()
        await reader.read()

    server, url = await raw_server(answer)
    async with server:
        with pytest.raises(BadAnswer) as caught:
            await send(client, url)
    assert isinstance(caught.value, ClientError)


async def test_a_bad_chunk_mid_body_fails_the_body_instead_of_hanging(
    client: UpstreamClient,
) -> None:
    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"zz-not-a-size\r\n")
        await writer.drain()
        await reader.read()

    server, url = await raw_server(answer)
    async with server:
        response = await send(client, url, read_timeout_s=30)
        with pytest.raises(ClientPayloadError):
            await asyncio.wait_for(response.read(), 3)
        response.release()


async def test_a_slow_upload_the_upstream_reads_is_not_a_timeout(
    upstream: Any, client: UpstreamClient
) -> None:
    up = await upstream(hello)
    body, feeding = trickled()
    data = await fetch(client, up.url, method="PUT", body=body, read_timeout_s=0.25)
    await feeding
    assert data == b"hello PUT /"
    assert up.seen[-1][3] == b"12345" * 6


async def test_an_upload_the_upstream_stops_reading_times_out(client: UpstreamClient) -> None:
    done = asyncio.Event()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await done.wait()  # reads nothing more: the gateway's writes back up

    server, url = await raw_server(answer)
    big = b"u" * (64 * 2**20)
    async with server:
        started = asyncio.get_running_loop().time()
        with pytest.raises(TimeoutError):
            await send(
                client,
                url,
                method="PUT",
                headers=[("Content-Length", str(len(big)))],
                body=stream_of(big),
                read_timeout_s=0.3,
            )
        assert asyncio.get_running_loop().time() - started < 2.5
        # The unsent megabytes are dropped with the connection, not waited for.
        await asyncio.wait_for(client.close(), 2)
        assert not client._open
        done.set()


async def test_a_bodiless_request_that_may_carry_one_says_its_length_is_zero(
    upstream: Any, client: UpstreamClient
) -> None:
    up = await upstream(hello)
    await fetch(client, up.url, method="POST")
    assert up.seen[-1][2]["Content-Length"] == "0"
    await fetch(client, up.url, method="DELETE")
    assert up.seen[-1][2]["Content-Length"] == "0"
    await fetch(client, up.url, method="GET")
    assert "Content-Length" not in up.seen[-1][2]


async def test_an_idle_connection_past_its_time_is_not_taken(upstream: Any) -> None:
    up = await upstream(hello)
    client = UpstreamClient(idle_s=0.1)
    try:
        await fetch(client, up.url)
        await asyncio.sleep(0.2)
        await fetch(client, up.url)
    finally:
        await client.close()
    assert len(up.peers) == 2


def _closes_on_second_request() -> tuple[Any, list[int]]:
    """A server that answers a connection's first request, then hangs up on its second
    without answering: a kept connection the upstream closed as the request went out."""
    connections: list[int] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")  # the next request: no answer

    return answer, connections


@pytest.mark.parametrize("method", ["GET", "PUT", "POST"])
async def test_only_an_idempotent_request_is_sent_again_when_a_kept_connection_closed(
    client: UpstreamClient, method: str
) -> None:
    """A POST may have reached the upstream: the caller decides (a launch is then counted)."""
    answer, connections = _closes_on_second_request()
    server, url = await raw_server(answer)
    body = None if method == "GET" else b"{}"
    async with server:
        assert await fetch(client, url, method=method, body=body) == b"ok"
        if method == "POST":
            with pytest.raises(ServerDisconnectedError):
                await fetch(client, url, method=method, body=body)
        else:  # the kept one hangs up: sent again, on a new one
            assert await fetch(client, url, method=method, body=body) == b"ok"
    assert len(connections) == (1 if method == "POST" else 2)


# --- what the second review found ---------------------------------------------------------


async def test_a_retry_that_cannot_connect_reports_the_first_failure(
    client: UpstreamClient,
) -> None:
    """The first attempt may have reached the upstream: its failure (outcome unknown) is the
    answer, not the retry's "cannot connect" (which would mean nothing arrived)."""
    answer, connections = _closes_on_second_request()
    server, url = await raw_server(answer)
    async with server:
        assert await fetch(client, url, method="PUT", body=b"{}") == b"ok"
        server.close()  # no new connections; the kept one still reaches the upstream
        await server.wait_closed()
        with pytest.raises(ServerDisconnectedError):
            await fetch(client, url, method="PUT", body=b"{}")
    assert len(connections) == 1


async def test_an_interim_and_final_answer_together_leave_no_timer_behind(
    client: UpstreamClient,
) -> None:
    """103 and 200 in one read, then a slow upload on the same kept connection: no stray
    read timer from the first request fires during the second."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 103 Early Hints\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        )
        await writer.drain()
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(30)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\ngot!")
        await writer.drain()
        await reader.read()

    server, url = await raw_server(answer)
    async with server:
        assert await fetch(client, url, read_timeout_s=0.3) == b"ok"
        await asyncio.sleep(0.1)
        body, feeding = trickled()
        got = await fetch(
            client,
            url,
            method="PUT",
            headers=[("Content-Length", "30")],
            body=body,
            read_timeout_s=0.3,
        )
        await feeding
    assert got == b"got!"


async def test_closing_the_client_fails_a_body_that_would_end_with_the_connection(
    client: UpstreamClient,
) -> None:
    started = asyncio.Event()

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npart1")
        await writer.drain()
        started.set()
        await reader.read()

    server, url = await raw_server(answer)
    async with server:
        response = await send(client, url)
        await started.wait()
        assert await response.content.readany() == b"part1"
        await client.close()
        with pytest.raises(ClientPayloadError):
            await response.read()
        response.release()


# --- what the third review found ----------------------------------------------------------


async def test_an_idempotent_request_whose_answer_settles_something_is_not_sent_again(
    client: UpstreamClient,
) -> None:
    answer, connections = _closes_on_second_request()
    server, url = await raw_server(answer)
    async with server:
        assert await fetch(client, url, method="PUT", body=b"{}") == b"ok"
        with pytest.raises(ServerDisconnectedError):
            await client.request(
                "PUT", url, "/", [], b"{}", connect_timeout_s=2, read_timeout_s=5, resend=False
            )
    assert len(connections) == 1


async def test_a_connect_that_ends_after_close_sends_nothing(
    upstream: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    up = await upstream(hello)
    loop = asyncio.get_running_loop()
    real = loop.create_connection

    async def slow(*args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(0.1)
        return await real(*args, **kwargs)

    monkeypatch.setattr(loop, "create_connection", slow)
    client = UpstreamClient()
    sending = asyncio.ensure_future(send(client, up.url))
    await asyncio.sleep(0.02)
    await client.close()
    with pytest.raises(ConnectFailed):
        await sending
    await asyncio.sleep(0.05)
    assert up.seen == []
    assert not client._open


# --- https upstreams ---------------------------------------------------------------------------


async def test_an_https_upstream_is_reached_over_tls_by_its_name_on_one_connection(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client: UpstreamClient
) -> None:
    """The certificate is checked against the system's trust store (here SSL_CERT_FILE) and the
    URL's host name (SNI); the connection is kept like a plain one."""
    ca, cert, key = tls_certificates(tmp_path)
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    peers: set[Any] = set()

    async def seen(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        peers.add(request.transport.get_extra_info("peername"))
        assert request.secure
        return web.Response(text=f"{request.host} {request.raw_path}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", seen)
    async with tls_site(app, cert, key) as port:
        url = URL(f"https://localhost:{port}/base")
        assert await fetch(client, url, "/a?x=1") == f"localhost:{port} /base/a?x=1".encode()
        assert await fetch(client, url, "/b") == f"localhost:{port} /base/b".encode()
    assert len(peers) == 1


@pytest.mark.parametrize("trusted", [True, False], ids=["wrong-name", "untrusted"])
async def test_an_https_upstream_whose_certificate_does_not_check_out_is_not_reached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, client: UpstreamClient, trusted: bool
) -> None:
    """A certificate for another name, or from no trusted issuer: ConnectFailed (nothing was
    sent), so a launch's units go back."""
    _, cert, key = tls_certificates(tmp_path)
    other_ca, other_cert, other_key = tls_certificates(tmp_path, "other.example")
    # Trusted: the authority is, but it certified another name. Untrusted: the name is right,
    # but its authority is not one the client trusts.
    monkeypatch.setenv("SSL_CERT_FILE", str(other_ca))
    if trusted:
        cert, key = other_cert, other_key
    requests: list[str] = []

    async def counted(request: web.Request) -> web.StreamResponse:
        requests.append(request.raw_path)
        return web.Response()

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", counted)
    async with tls_site(app, cert, key) as port:
        why = "Hostname mismatch" if trusted else "unable to get local issuer certificate"
        with pytest.raises(ConnectFailed, match=why) as caught:
            await send(client, URL(f"https://localhost:{port}"), "/x")
    assert not caught.value.timed_out
    assert requests == []


# --- a review of the client's answers (each failed before its fix) ----------------------------
async def _trickling_head(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """A raw upstream that sends its answer's head a byte every 50 ms, for about 6 s."""
    await reader.readuntil(b"\r\n\r\n")
    for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 100:
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(0.05)


async def test_a_switch_of_protocols_is_a_bad_answer(client: UpstreamClient) -> None:
    """The gateway forwards no Upgrade: a 101 was relayed, and the client's connection then
    stayed HTTP while a front proxy would tunnel it (found in review)."""
    answer = replying(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\nRAW")
    server, url = await raw_server(answer)
    async with server:
        with pytest.raises(BadAnswer, match="101"):
            await send(client, url)


async def test_endless_interim_answers_are_a_bad_answer(client: UpstreamClient) -> None:
    """An upstream that sends 100 Continue over and over never gets to its answer."""
    answer = replying(b"HTTP/1.1 100 Continue\r\n\r\n" * 17 + b"HTTP/1.1 200 OK\r\n\r\n")
    server, url = await raw_server(answer)
    async with server:
        with pytest.raises(BadAnswer, match="interim answers"):
            await send(client, url)


async def test_a_head_trickled_byte_by_byte_is_due_within_the_read_timeout(
    client: UpstreamClient,
) -> None:
    """The read timer restarts at every byte: an upstream trickling its answer's head held a
    launch (and its reservation) for as long as it went on (found in review). With the body
    sent whole, as a launch's is, the head is due within the read timeout in all."""

    server, url = await raw_server(_trickling_head)
    loop = asyncio.get_running_loop()
    async with server:
        started = loop.time()
        with pytest.raises(TimeoutError):
            await send(client, url, method="POST", body=b"{}", read_timeout_s=0.5)
        assert loop.time() - started < 2.0  # not the 6 s the trickle takes


async def test_a_bodiless_request_sent_whole_has_its_head_due_too(
    client: UpstreamClient,
) -> None:
    """An EC2 launch is a GET with no body: b"" is a body sent whole, and its answer's head is
    due within the read timeout in all (found in review: it waited out a 16 s trickle)."""

    server, url = await raw_server(_trickling_head)
    loop = asyncio.get_running_loop()
    async with server:
        started = loop.time()
        with pytest.raises(TimeoutError):
            await send(client, url, body=b"", read_timeout_s=0.5)
        assert loop.time() - started < 2.0


async def test_a_connection_that_carried_expect_serves_no_other_request(
    client: UpstreamClient,
) -> None:
    """Expect goes upstream (CONTRACT section 6: headers intact) but the body goes at once: an
    upstream that answered early and then read the body as a request of its own would answer
    that next on the connection, so it is not kept (found in review)."""
    answer = replying(b"HTTP/1.1 417 Expectation Failed\r\nContent-Length: 0\r\n\r\n")
    server, url = await raw_server(answer)
    async with server:
        response = await send(
            client,
            url,
            method="POST",
            headers=[("Expect", "100-continue")],
            body=b"GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        )
        assert response.status == 417
        await response.read()
        response.release()
        assert not any(client._idle.values())
