"""``launchgate serve``: the proxy and admin listeners, signals, graceful stop."""

from __future__ import annotations

import asyncio
import gc
import signal
from pathlib import Path
from typing import Final

import structlog
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest

from launchgate.admin import create_admin_app
from launchgate.config import Config
from launchgate.gateway import Gateway
from launchgate.problems import problem
from launchgate.proxy import create_app
from launchgate.reloads import asked_meanwhile
from launchgate.workers import tell_supervisor

log = structlog.get_logger("launchgate")


async def serve(
    config: Config,
    *,
    shutdown_timeout_s: float = 30.0,
    worker: int | None = None,
    create_store: bool = True,
) -> None:
    """Run until SIGTERM/SIGINT: then stop accepting, finish in-flight requests, flush.

    As one of several workers (``worker`` set), the proxy port is shared through
    SO_REUSEPORT and only worker 0 serves the admin listener, with metrics summed over
    all workers. Without ``create_store`` (a worker started again after one died) a SQLite
    ledger that is not there is unavailable rather than made anew: its siblings may have
    seen it removed, and an empty one would forget what every license has spent.
    """
    gateway = Gateway(config, create_store=create_store)
    proxy_runner = GatewayRunner(
        create_app(gateway),
        access_log=None,
        shutdown_timeout=shutdown_timeout_s,
        auto_decompress=False,  # judge and forward the bytes as sent, never inflated
    )
    admin_runner = GatewayRunner(create_admin_app(gateway), access_log=None)
    await proxy_runner.setup()
    await admin_runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    reloads: set[asyncio.Task[bool]] = set()

    def reload() -> None:
        task = asyncio.create_task(gateway.reload(Path(config.source)))
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    if asked_meanwhile():  # after ``launchgate serve`` read the files, before now
        reload()
    tune_gc()  # before listening: no connection's objects are frozen with start-up's
    try:
        proxy_site = web.TCPSite(
            proxy_runner,
            config.listen.host,
            config.listen.port,
            reuse_address=True,
            reuse_port=worker is not None,
        )
        await proxy_site.start()
        if worker in (None, 0):
            admin = config.admin_listen
            await web.TCPSite(admin_runner, admin.host, admin.port, reuse_address=True).start()
        if worker is not None:
            tell_supervisor()  # a worker that served is started again at once if it dies
        log.info(
            "gateway.started",
            worker=worker,
            listen=_bound(proxy_runner),
            admin_listen=_bound(admin_runner),
            mode=config.mode,
            upstream=str(config.upstream_url),
            store=_redact(config.store_url),
        )
        await stop.wait()
        log.info("gateway.stopping")
    finally:
        # Signal handlers stay installed until in-flight requests are done, so a second
        # SIGTERM during the graceful stop cannot kill the process half-way.
        await admin_runner.cleanup()
        await proxy_runner.cleanup()  # stops accepting, waits for in-flight, then gateway.stop()
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        log.info("gateway.stopped")


class _RequestHandler(RequestHandler):
    """aiohttp's connection handler, but for the answer to a request it cannot parse."""

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp quotes the offending bytes of a malformed request head (a license token's
        header line among them) in its text/plain answer and in its log line. Answer a
        problem+json that quotes nothing, and log only what kind of error it was."""
        if not isinstance(exc, HttpProcessingError) or request.writer.output_size > 0:
            return super().handle_error(request, status, exc, message)
        log.info("http.bad_request", status=status, error=type(exc).__name__ if exc else None)
        response = problem("malformed_request", status, "the request's HTTP framing is malformed")
        response.force_close()
        return response


class _Server(web.Server):
    def __call__(self) -> RequestHandler:
        return _RequestHandler(self, loop=self._loop, **self._kwargs)


class GatewayRunner(web.AppRunner):
    """``web.AppRunner`` whose connections answer unparseable requests with ``_RequestHandler``."""

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _Server  # the same server; only the handler it makes differs
        return server


# Collections every 50,000 new container objects rather than 700: a launch allocates a
# few hundred and makes no cycles worth chasing at once (reference counting frees the rest).
GC_THRESHOLDS: Final = (50_000, 20, 100)


def tune_gc() -> None:
    """Once started: freeze what start-up made (modules, configuration, catalog, keys) out of
    the collector's scans, and collect less often. Worth 3-10 % of requests/s measured."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def _bound(runner: web.AppRunner) -> list[str]:
    return [f"{a[0]}:{a[1]}" for a in runner.addresses if isinstance(a, tuple)]


def _redact(url: str) -> str:
    """A store URL without its password."""
    scheme, sep, rest = url.partition("://")
    if sep and "@" in rest:
        creds, _, host = rest.rpartition("@")
        return f"{scheme}://{creds.split(':', 1)[0]}@{host}"
    return url


def run(config: Config, *, worker: int | None = None, create_store: bool = True) -> None:
    try:
        import uvloop
    except ImportError:  # uvloop is optional on platforms without it
        asyncio.run(serve(config, worker=worker, create_store=create_store))
    else:
        uvloop.run(serve(config, worker=worker, create_store=create_store))
