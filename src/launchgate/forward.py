"""What goes upstream and what comes back: headers both ways, and relaying the answer.

Requests keep their method, path, query, body and headers, less the hop-by-hop ones
(RFC 9110 section 7.6.1), the license-token header, and the forwarding headers that the
gateway sets itself. Responses come back as the upstream sent them, bytes untouched
(nothing is decompressed). The connections themselves are ``upstream.py``'s.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable
from typing import Final

from aiohttp import ClientError, hdrs, web
from multidict import CIMultiDictProxy

from launchgate.upstream import UpstreamResponse

HOP_BY_HOP: Final = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Connection",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)
GATEWAY_SET: Final = frozenset({"x-forwarded-for", "x-forwarded-proto", "forwarded"})


@functools.cache
def _never_forwarded(*extra: str) -> frozenset[str]:
    """Header names never passed on, as ``as_variable`` spells them: hop-by-hop, the gateway's
    own, ``extra``. Compared so, any mix of ``_`` and ``-`` matches, as CGI-style servers read
    both as one name (found in review: "X_Forwarded_For" went on beside the gateway's own)."""
    return frozenset(as_variable(name) for name in (*HOP_BY_HOP, *GATEWAY_SET, *extra))


def as_variable(name: str) -> str:
    """A header name as CGI-style servers read it: letter case and ``_`` or ``-`` alike."""
    return name.lower().replace("_", "-")


def connection_options(
    headers: CIMultiDictProxy[str], spell: Callable[[str], str] = as_variable
) -> frozenset[str]:
    """The names a message's ``Connection`` header lists, spelt by ``spell``."""
    listed = headers.getall(hdrs.CONNECTION, ())
    return frozenset(spell(token.strip()) for value in listed for token in value.split(",")) - {""}


def _dropped(
    headers: CIMultiDictProxy[str], always: frozenset[str], spell: Callable[[str], str]
) -> frozenset[str]:
    """``always`` plus the headers this message's ``Connection`` names as hop-by-hop, spelt
    by ``spell`` as ``always``'s names are."""
    if hdrs.CONNECTION not in headers:
        return always
    return always | connection_options(headers, spell)


def upstream_headers(
    request: web.Request, token_header: str, *, body_known: bool
) -> list[tuple[str, str]]:
    """Headers to send upstream: the client's, less hop-by-hop and token, plus forwarding."""
    # A body sent as bytes gets its length from the upstream client.
    always = (
        _never_forwarded(token_header, hdrs.CONTENT_LENGTH)
        if body_known
        else _never_forwarded(token_header)
    )
    headers = request.headers
    dropped = _dropped(headers, always, as_variable)
    kept = [
        (k, v)
        for k, v in headers.items()
        if as_variable(k) not in dropped and not ("_" in k and as_variable(k) == "content-length")
    ]
    peer = request.remote or "unknown"
    scheme = request.scheme
    forwarded_for = f'"[{peer}]"' if ":" in peer else peer
    element = f"for={forwarded_for};proto={scheme}"
    kept.append(("X-Forwarded-For", ", ".join([*headers.getall("X-Forwarded-For", ()), peer])))
    kept.append(("X-Forwarded-Proto", scheme))
    kept.append(("Forwarded", ", ".join([*headers.getall(hdrs.FORWARDED, ()), element])))
    return kept


def response_headers(upstream: UpstreamResponse, extra: dict[str, str]) -> list[tuple[str, str]]:
    """The upstream's answer headers, less hop-by-hop, plus ``extra`` (replacing any same)."""
    dropped = _dropped(upstream.headers, HOP_BY_HOP, str.lower)
    if extra:
        dropped = dropped | {name.lower() for name in extra}
    kept = [(k, v) for k, v in upstream.headers.items() if k.lower() not in dropped]
    kept.extend(extra.items())
    return kept


# An answer no longer than this, with its length given and already received whole, is sent
# in one write (status line, headers and body together); any other answer is streamed. Only
# what has arrived is sent at once, so nothing waits that streaming would have passed on.
SMALL_BODY_BYTES: Final = 64 * 1024


def received_whole(request: web.Request, upstream: UpstreamResponse) -> bool:
    """Whether the upstream's whole (short) answer is here already: send it in one write."""
    length = upstream.content_length
    return (
        length is not None
        and length <= SMALL_BODY_BYTES
        and request.method != hdrs.METH_HEAD
        and upstream.content.is_eof()
    )


_PHRASE: Final = re.compile(r"[^\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]*")


def _phrase(reason: str | None) -> str | None:
    """The upstream's reason phrase unless it holds a control character or undecodable bytes,
    else None (the status's own): aiohttp refuses to send a control character, and the
    client's connection was cut instead (found in review: "200 O\x01K" cost a launch its
    answer, counted as used all the same)."""
    return reason if reason is not None and _PHRASE.fullmatch(reason) else None


async def relay_response(
    request: web.Request,
    upstream: UpstreamResponse,
    extra: dict[str, str],
    body: bytes | None = None,
    broke_off: Callable[[str], None] | None = None,
) -> web.StreamResponse:
    """Relay the upstream's answer to the client, adding ``extra`` headers: ``body`` when the
    caller read it already (an answer received whole, sent in one write), else streamed;
    ``broke_off(error)`` hears of an answer that broke off mid-stream (the client's is cut)."""
    headers = response_headers(upstream, extra)
    reason = _phrase(upstream.reason)
    if body is not None:
        return web.Response(status=upstream.status, reason=reason, headers=headers, body=body)
    response = web.StreamResponse(status=upstream.status, reason=reason, headers=headers)
    try:
        await response.prepare(request)
    except ConnectionError:  # the client is gone: no fault of the upstream's
        return response
    content = upstream.content
    while True:
        try:
            chunk = await content.readany()
        except (ClientError, TimeoutError) as e:
            # The status line is gone already; all that is left is to cut the connection,
            # so the client sees a truncated body rather than a complete-looking one.
            if broke_off is not None:
                broke_off(type(e).__name__)
            if request.transport is not None:
                request.transport.close()
            return response
        if not chunk:
            break
        try:
            await response.write(chunk)
        except ConnectionError:  # the client is gone: no fault of the upstream's
            return response
    with contextlib.suppress(ConnectionError):  # (the client left at the very end)
        await response.write_eof()
    return response
