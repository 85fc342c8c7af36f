"""The admin listener: /healthz, /readyz and Prometheus /metrics, never on the proxy port."""

from __future__ import annotations

import asyncio
import os

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest, multiprocess

from launchgate.errors import StoreUnavailable
from launchgate.gateway import Gateway
from launchgate.problems import problem

GATEWAY_KEY = web.AppKey("gateway", Gateway)


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY_KEY]
    # CONTRACT section 6: ready when configuration, keys and store are usable. A JWK Set that
    # did not load is a configuration error already; an empty one leaves no key to use.
    trusted = len(gateway.config.keyring.kids)
    checks: dict[str, str] = {"config": "ok", "keys": "ok" if trusted else "no trusted keys"}
    try:
        await gateway.ledger.ping()
        checks["store"] = "ok"
    except StoreUnavailable as e:
        checks["store"] = f"unavailable: {e}"
    # No launch can be decided without its record: a log that cannot be written is not ready.
    unwritable = await asyncio.to_thread(gateway.recorder.audit.writable)
    checks["audit"] = "ok" if unwritable is None else f"unwritable: {unwritable}"
    ready = all(v == "ok" for v in checks.values()) and gateway.running
    body = {"ready": ready, "checks": checks, "trusted_keys": trusted}
    return web.json_response(body, status=200 if ready else 503)


async def metrics(request: web.Request) -> web.Response:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):  # several workers: sum over all of them
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]  # untyped in prometheus-client
    else:
        registry = request.app[GATEWAY_KEY].metrics.registry
    return web.Response(
        body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST}
    )


@web.middleware
async def problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The listener's own errors (an unknown path, a method a path does not take) as
    problem+json, like every error the gateway answers (CONTRACT section 3; found by QA:
    text/plain)."""
    try:
        return await handler(request)
    except web.HTTPNotFound:
        return problem("not_found", 404, f"no {request.path} here: /healthz, /readyz, /metrics")
    except web.HTTPMethodNotAllowed as e:
        allowed = sorted(e.allowed_methods)
        response = problem("method_not_allowed", 405, f"{request.path} takes {', '.join(allowed)}")
        response.headers["Allow"] = ",".join(allowed)
        return response


def create_admin_app(gateway: Gateway) -> web.Application:
    app = web.Application(middlewares=[problems])
    app[GATEWAY_KEY] = gateway
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    return app
