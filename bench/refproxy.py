"""A minimal reference pass-through proxy on aiohttp, the yardstick for launchgate's overhead.

It does what any aiohttp reverse proxy must: one pooled client session, hop-by-hop headers
dropped, bodies streamed both ways, no decompression. No judging, no logging.

    python bench/refproxy.py --listen 127.0.0.1:8180 --upstream http://127.0.0.1:9000
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from aiohttp import ClientSession, ClientTimeout, TCPConnector, web
from multidict import CIMultiDict
from yarl import URL

HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
}


def create_app(upstream: str) -> web.Application:
    app = web.Application()
    base = upstream.rstrip("/")
    sessions: list[ClientSession] = []

    async def session_ctx(app: web.Application) -> Any:
        sessions.append(
            ClientSession(
                connector=TCPConnector(limit=0),
                auto_decompress=False,
                timeout=ClientTimeout(total=60),
            )
        )
        yield
        await sessions[0].close()

    async def handle(request: web.Request) -> web.StreamResponse:
        headers = CIMultiDict((k, v) for k, v in request.headers.items() if k.lower() not in HOP)
        data = request.content if request.body_exists else None
        async with sessions[0].request(
            request.method,
            URL(base + request.raw_path, encoded=True),
            headers=headers,
            data=data,
            allow_redirects=False,
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        ) as upstream_response:
            response = web.StreamResponse(status=upstream_response.status)
            response.headers.extend(
                (k, v) for k, v in upstream_response.headers.items() if k.lower() not in HOP
            )
            await response.prepare(request)
            async for chunk in upstream_response.content.iter_any():
                await response.write(chunk)
            await response.write_eof()
            return response

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", default="127.0.0.1:8180")
    parser.add_argument("--upstream", default="http://127.0.0.1:9000")
    args = parser.parse_args()
    host, port = args.listen.rsplit(":", 1)
    try:  # the same event loop launchgate serve uses, so the comparison is of the proxies
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    except ImportError:
        loop = asyncio.new_event_loop()
    web.run_app(
        create_app(args.upstream), host=host, port=int(port), access_log=None, print=None, loop=loop
    )


if __name__ == "__main__":
    main()
