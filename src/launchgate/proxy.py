"""The proxy: request -> dialect -> facts -> decision -> ledger -> record -> forward.

Every request goes through ``handle``. Non-launches stream to the upstream untouched;
launches are read whole (within ``max_body_bytes``), judged, recorded, and forwarded
only when allowed (or in shadow mode). Any unexpected error answers a problem and
never forwards.

Idempotent retries (``idempotency.py``): a licensed launch with a key reserves under it;
a retry of a launch already counted is forwarded without reserving again (its record
says ``replay_of``).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import re
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final
from urllib.parse import unquote_plus

import structlog
from aiohttp import ClientError, web
from multidict import CIMultiDictProxy

from launchgate.admin import GATEWAY_KEY
from launchgate.audit import utc_timestamp
from launchgate.config import Config
from launchgate.dialects import Launch, LaunchRequest, Route, mount_head
from launchgate.dialects.query import unwrapped
from launchgate.errors import StoreUnavailable
from launchgate.forms import decode_u_escapes
from launchgate.forward import (
    as_variable,
    connection_options,
    received_whole,
    relay_response,
    upstream_headers,
)
from launchgate.gateway import Gateway
from launchgate.idempotency import (
    IDEMPOTENCY_HEADER,
    fingerprint,
    idempotency_key,
    replay_sent_on,
)
from launchgate.ids import new_ulid
from launchgate.ledger import Ledger, ReserveOutcome, ReserveResult, Then
from launchgate.paths import (
    UnsafePath,
    decoded_and_folded,
    fold_path,
    has_dot_segments,
    normalize_path,
    second_readings,
)
from launchgate.policy import (
    Decision,
    after_reservation,
    decide,
    malformed,
    refused,
    store_unavailable,
    verdict,
    within_token,
)
from launchgate.problems import DECISION_HEADER, problem
from launchgate.records import decision_record
from launchgate.strict import MalformedLaunch, fold_case
from launchgate.tokens import License, TokenVerifier
from launchgate.upstream import (
    BadAnswer,
    BadRequestHead,
    ConnectFailed,
    Prefixed,
    RequestBodyFailed,
)

log = structlog.get_logger("launchgate")

METHOD_OVERRIDES = ("X-HTTP-Method-Override", "X-HTTP-Method", "X-Method-Override")
_OVERRIDE_VARIABLES = frozenset(name.lower() for name in METHOD_OVERRIDES)


class BodyTooLarge(Exception):
    def __init__(self, read: bytes = b"") -> None:
        super().__init__()
        self.read = read  # the part of the body read before it proved too large


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole body (chunked or not), refusing more than ``limit`` bytes."""
    if request.content_length is not None and request.content_length > limit:
        raise BodyTooLarge
    content = request.content
    if content.is_eof():  # the whole body came with the head (a launch's usually does)
        body = content.read_nowait()
        if len(body) > limit:
            raise BodyTooLarge(body)
        return body
    chunks, size = [], 0
    async for chunk in content.iter_any():
        size += len(chunk)
        chunks.append(chunk)
        if size > limit:
            raise BodyTooLarge(b"".join(chunks))
    return b"".join(chunks)


async def fail_closed(request: web.Request) -> web.StreamResponse:
    """``handle``, with any unexpected error turned into a 500 problem; nothing is forwarded
    on it. (The route's handler itself rather than a middleware: aiohttp wraps each request
    in two more coroutines for a middleware.)"""
    try:
        return await handle(request)
    except web.HTTPException:
        raise
    except Exception:
        log.exception("gateway.error", method=request.method, path=request.path)
        return problem("internal_error", 500, "the gateway failed to handle this request")


async def handle(request: web.Request) -> web.StreamResponse:
    gateway = request.app[GATEWAY_KEY]
    # One configuration and its verifier for the whole request, whatever reloads do meanwhile
    # (found by QA: the verifier was read after the body, so a reload while it arrived judged
    # the token by the new keys and the account by the old registry).
    config, verifier = gateway.config, gateway.verifier
    raw = request.raw_path
    raw_path, _, query = raw.partition("?")
    if _overrides_method(request.headers) or _overrides_method_in(query):
        return await refuse_override(request, gateway, config)
    if "#" in raw:  # RFC 9112 has no fragment in a request target; an upstream would drop it
        return problem("malformed_request", 400, "the request target carries a fragment ('#')")
    try:
        path = normalize_path(raw_path)
    except UnsafePath as e:
        # The CONTRACT's one 400 reason: a path with no one safe meaning is a malformed request.
        return problem("malformed_request", 400, f"the path cannot be normalized safely: {e}")
    method = request.method
    claim = _claim(config, method, path, request.headers)
    try:
        readings = second_readings(raw_path, path)
    except UnsafePath as e:
        return problem("malformed_request", 400, f"the path cannot be read safely: {e}")
    for reading, who in readings:
        # A launch path, or another route's, as common upstream servers read this one: two
        # meanings, recorded, malformed (found by QA: "POST /v1/instances;x" went upstream
        # unjudged, to Tomcat, Jetty and Spring a launch; found in review: so did "/batch;x/..."
        # under an aws-ec2 route mounted at "/", and Nova's "/servers;x"; found by QA:
        # "//evil/v1/instances" and "/V1/Instances").
        other = _other_route(_claim(config, method, reading, request.headers), claim, method, path)
        if other is not None:
            detail = f"to {who}, this path is {reading!r}, which another route judges"
            return await handle_launch(
                request, gateway, config, verifier, other, path, query, two_meanings=detail
            )
    routing = _routing_headers(request.headers)
    if routing:
        try:
            other_reading = _routed_by_header(config, method, path, claim, request.headers, routing)
        except UnsafePath as e:
            return problem("malformed_request", 400, str(e))
        if other_reading is not None:
            route, detail = other_reading
            return await handle_launch(
                request, gateway, config, verifier, route, path, query, two_meanings=detail
            )
    if method == "POST":
        overrides = _launches_by_override(config, path, readings, claim[0] if claim else None)
        if overrides:
            route, launched_by = overrides[0]
            if len(overrides) == 1 and (claim is None or _read_by(route, claim[0])):
                # Judged as the launch it becomes there (and by what a catch-all route mounted
                # above reads in it, as any launch of that route): an opaque mount's POST
                # actions pass for an account known and unrestricted (found in review: ARM
                # deployments' validate was 400 for every account).
                return await handle_launch(
                    request, gateway, config, verifier, route, path, query, as_method=launched_by
                )
            detail = (
                "a POST here is another launch as well to upstreams that take the method from a"
                " body or query field, which another route judges"
            )
            owner = claim[0] if claim is not None else route
            return await handle_launch(
                request, gateway, config, verifier, owner, path, query, two_meanings=detail
            )
    if claim is not None:  # (claimed by a header only: recorded, malformed)
        return await handle_launch(
            request, gateway, config, verifier, claim[0], path, query, two_meanings=claim[1]
        )
    if has_dot_segments(raw_path) and _may_reach_a_route(config, raw_path):
        # Sent as judged, normalized (dot segments resolved, repeated slashes collapsed):
        # sent as written, an upstream that keeps dot segments could read another resource
        # into it, a launch (found in review: ".../virtualMachines/.." and
        # ".../zones/../instances" launched on the stub).
        return await forward(request, gateway, config, _read_as_sent(raw_path, path, query), None)
    return await forward(request, gateway, config, raw, None)


def _read_as_sent(raw_path: str, path: str, query: str) -> str:
    """The target for a request that launches nothing, sent on the path read (``path``,
    normalized) rather than as written: with the trailing slash it was written with, which
    normalizing drops and which names the same resource as far as any route is concerned
    (CONTRACT section 6: its path unchanged; found by QA: "GET /ec2/?Action=Describe..." went
    upstream as "/ec2")."""
    if raw_path.endswith("/") and path != "/":
        path += "/"
    return path + (f"?{query}" if query else "")


def _may_reach_a_route(config: Config, raw_path: str) -> bool:
    """Whether an upstream could read ``raw_path``, a path with dot segments that no route
    claims normalized, as a path under a route's mount: a route is mounted at "/", or the
    first segment of its mount is in the path, decoded and folded (an upstream that keeps dot
    segments, or resolves them otherwise, reads a path made of its segments). Any other such
    request goes on unchanged, as CONTRACT section 6 has it (found by QA: "GET /a/../b" went
    upstream as "/b")."""
    text = decoded_and_folded(raw_path)
    return any(not (head := mount_head(r.dialect.path)) or head in text for r in config.routes)


# Headers that some upstreams route by instead of the request's path (IIS's URL Rewrite,
# Symfony before CVE-2018-14773, Zend Framework before ZF2018-01), as ``as_variable`` spells
# them: CGI-style servers read "X_Original_URL" as the same variable (found in review).
_ROUTING_HEADERS: Final = ("X-Original-URL", "X-Rewrite-URL")
_ROUTING_VARIABLES: Final = frozenset(as_variable(name) for name in _ROUTING_HEADERS)
# A URL's scheme and authority, which Zend strips from such a header's value (found in review).
_SCHEME_AND_HOST = re.compile(r"\A[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")


def _routing_headers(headers: CIMultiDictProxy[str]) -> list[tuple[str, str]]:
    """Every routing header of the request, in any spelling, with its value."""
    found = [(name, value) for name in _ROUTING_HEADERS for value in headers.getall(name, ())]
    if any("_" in key for key in headers):
        found += [
            (key, value)
            for key, value in headers.items()
            if "_" in key and as_variable(key) in _ROUTING_VARIABLES
        ]
    return found


def _routed_by_header(
    config: Config,
    method: str,
    path: str,
    own: tuple[Route, str | None] | None,
    headers: CIMultiDictProxy[str],
    routing: list[tuple[str, str]],
) -> tuple[Route, str] | None:
    """The route that claims a path a routing header names (read as an upstream routing by it
    would read it) other than the request's own ``path``, with why the request is then
    malformed (found by QA: "X-Original-URL: /v1/instances" on a POST elsewhere went unjudged;
    found in review: on the route's own path, another launch call of it, a bulkInsert named on
    an insert); ``own``: the request's own claim. UnsafePath for a value that cannot be read
    safely: no one meaning."""
    for name, value in routing:
        # The path: no scheme and host (Zend strips them), no query, no fragment (found in
        # review: "/v1/instances#x", to a router that drops the fragment).
        target = re.split("[?#]", _SCHEME_AND_HOST.sub("", value.strip()), maxsplit=1)[0] or "/"
        try:
            reading = normalize_path(target)
        except UnsafePath as e:
            detail = f"its {name} header names a path that cannot be read safely: {e}"
            raise UnsafePath(detail) from None
        if reading == path:  # the request's own (IIS's ARR sets it so): read with the request
            continue
        for named in (reading, *(other for other, _ in second_readings(target, reading))):
            other = _claim(config, method, named, headers)
            if other is None and method == "POST":
                # (found in review: with "_method=PUT" in its body, older Symfony launched
                # there by PUT)
                overridden = _launches_by_override(config, named, [], None)
                if overridden:
                    route, by = overridden[0]
                    detail = f"its {name} header names {named!r}, where a route launches by {by}"
                    return route, detail
            if other is None:
                continue
            if own is not None and other[0] is own[0] and fold_path(named) == fold_path(path):
                continue  # the request's own path, to a route that ignores case (review)
            return other[0], f"its {name} header names {named!r}, which a route judges"
    return None


def _other_route(
    other: tuple[Route, str | None] | None,
    claim: tuple[Route, str | None] | None,
    method: str,
    path: str,
) -> Route | None:
    """The route of ``other``, the claim on a second reading of a request, when it is another
    than ``claim``'s, the request's own on ``path``, and does not take ``path`` itself (a mount
    that holds both readings, such as aws-ec2 on "/", judges either by its own rules)."""
    if other is None or (claim is not None and other[0] is claim[0]):
        return None
    return None if other[0].matches(method, path) else other[0]


def _claim(
    config: Config, method: str, path: str, headers: CIMultiDictProxy[str]
) -> tuple[Route, str | None] | None:
    """The route that claims a request, and, when it claims it only by a header (Nova's version
    parameter), why such a launch is malformed; None when no route claims it."""
    for route in config.routes:
        if route.matches(method, path):
            return route, None
    for route, by_header in config.header_routes:
        detail = by_header(method, path, headers)
        if detail is not None:
            return route, detail
    return None


async def refuse_override(
    request: web.Request, gateway: Gateway, config: Config
) -> web.StreamResponse:
    """400 for a request that carries a method-override header, launch route or not (in shadow
    mode too: the gateway cannot tell which method the upstream would act on). On a launch
    route it is a launch decision, recorded like any other."""
    detail = "method overrides (headers, or a _method parameter) are not accepted"
    try:
        path = normalize_path(request.raw_path.partition("?")[0])
    except UnsafePath:
        return problem("malformed_request", 400, detail)
    if not any(route.matches(request.method, path) for route in config.routes):
        return problem("malformed_request", 400, detail)
    started = time.perf_counter()
    decision_id = new_ulid()
    decision = malformed(detail, *_presented(request, config))
    # Refused in shadow mode too, so recorded as enforced whatever the mode.
    await _record_refusal(
        gateway, config, request, path, decision, decision_id, started, enforced=True
    )
    return problem(decision.reason, 400, detail, decision_id)


def _launches_by_override(
    config: Config, path: str, readings: list[tuple[str, str]], claimed_by: Route | None
) -> list[tuple[Route, str]]:
    """Each route, other than ``claimed_by``, that launches on ``path`` (or a second reading of
    it) by a method that a POST there can ask for in a field, with that method (PUT where it
    is one: an API's strictest reading). Upstreams with method-override middleware read such a
    POST as that launch (found in review: with ``_method=PUT`` in a form body, a POST launched
    an H100 VM through an ARM-style PUT route on a Rack upstream, unjudged; a search of the
    body for the field was passed by how parsers spell it: Rack unquotes ``_\\method`` in a
    multipart name, PHP makes ``.method`` ``_method``, a gzipped or UTF-7 body, RFC 2047
    names, ASP.NET's ``X-HTTP-Method-Override`` field; and when an aws-ec2 route at "/" took
    the POST). One such route: the POST is judged as its launch, whatever its body says; more
    than one, or one beside a route that reads the POST otherwise, is two meanings (found in
    review: a PATCH route beside a PUT one was judged by the PUT's pointers only)."""
    paths = [path, *(reading for reading, _ in readings)]
    # Any method a route launches by (found in review: Symfony and Laravel take any "[A-Z]+",
    # Express any of node's methods, Rack LINK too: a MERGE route launched so), each taken by
    # the route a request of that method would go to (found in review: a PUT under an opaque
    # PUT mount counted both, and a legitimate POST there was 400).
    if not config.override_methods:
        return []
    found: list[tuple[Route, str]] = []
    for candidate in paths:
        # (Only the routes whose mount starts as the path does: each claim costs 2-6 us.)
        head = mount_head(candidate) if candidate.isascii() and "%" not in candidate else None
        near = [r for r, mount in config.override_routes if head is None or mount in ("", head)]
        for method in config.override_methods:
            route = next((r for r in near if r.matches(method, candidate)), None)
            if route is None or route is claimed_by:
                continue
            known = next((i for i, (r, _) in enumerate(found) if r is route), None)
            if known is None:
                found.append((route, method))
            elif method == "PUT":
                found[known] = (route, method)
    return found


def _read_by(route: Route, claimer: Route) -> bool:
    """Whether what ``claimer`` (a route that takes every request under its mount) reads in a
    request is read with ``route``'s launches too (aws-ec2's Action, a second reading); an
    opaque route's reading, unresolvable, is not (found in review: judged only as the other
    route's launch, an opaque POST launched 8 p5.48xlarge)."""
    reading = getattr(claimer.dialect, "launch_action", None)
    return reading is not None and reading in route.second_readings


async def handle_launch(
    request: web.Request,
    gateway: Gateway,
    config: Config,
    verifier: TokenVerifier,
    route: Route,
    path: str,
    query: str,
    *,
    two_meanings: str | None = None,
    as_method: str | None = None,
) -> web.StreamResponse:
    """Judge a launch ``route`` claims; ``two_meanings``: why one it claims only by a header is
    malformed (it is judged so once its body is read); ``as_method``: the method it is read
    as, a POST that becomes a PUT upstream (``_launches_by_override``)."""
    started = time.perf_counter()
    decision_id = new_ulid()
    account, token = _presented(request, config)
    try:
        body = await read_body(request, config.max_body_bytes)
    except BodyTooLarge as e:
        limit = f"launch bodies are limited to {config.max_body_bytes} bytes"
        decision = refused("body_too_large", 413, limit, account, token)
        await _record_refusal(gateway, config, request, path, decision, decision_id, started)
        if config.enforcing:
            return problem(decision.reason, 413, decision.detail, decision_id)
        # Shadow mode forwards whatever the outcome: what was read, then the rest as it comes.
        target = path + (f"?{query}" if query else "")
        streamed = Prefixed(e.read, request.content)
        return await forward(request, gateway, config, target, streamed, decision_id=decision_id)

    launch_request = LaunchRequest(as_method or request.method, path, query, request.headers, body)
    try:
        if two_meanings is not None:
            raise MalformedLaunch(two_meanings)
        _one_identity(request.headers, config)
        for second_reading in route.second_readings:  # one meaning or none
            action = second_reading(launch_request)
            if action is not None:
                raise MalformedLaunch(
                    f"the request also reads as an EC2 {action} call, which a route mounted"
                    f" above {route.dialect.path} judges"
                )
        launch = route.dialect.parse(launch_request)
        if launch is not None:  # (a request that launches nothing goes on as any other)
            _nothing_read_is_dropped(request.headers, config)
    except MalformedLaunch as e:
        decision = malformed(e.detail, account, token)
    else:
        if launch is None:  # claimed, but the body shows it launches nothing: not judged
            # Sent on the path read to find that (found by QA: the raw path went, and with
            # "%2e%2e" segments it could name another resource than the one read).
            target = _read_as_sent(request.raw_path.partition("?")[0], path, query)
            return await forward(request, gateway, config, target, body)
        now = time.time()
        decision = decide(launch, account, token, config, lambda t: verifier.verify(t, now=now))
    result: ReserveResult | None = None
    recorded = False
    if decision.reason == "licensed" and decision.license is not None and launch is not None:
        decision, result, recorded = await reserve_license(
            gateway, config, decision, decision.license, decision_id, launch_request, launch
        )
    reserved = result is not None and result.outcome is ReserveOutcome.RESERVED
    if not recorded:
        try:
            await gateway.recorder.write(
                launch_record(config, decision, decision_id, request.method, path, result)
            )
        except BaseException:
            if reserved:  # nothing was forwarded: give the units back
                await asyncio.shield(gateway.ledger.release(decision_id, now=time.time()))
            raise
    count_decision(gateway, decision, started)
    if not decision.allowed and config.enforcing:
        return problem(decision.reason, decision.status or 403, decision.detail, decision_id)
    target = path + (f"?{query}" if query else "")
    return await forward(
        request,
        gateway,
        config,
        target,
        body,
        decision_id=decision_id,
        reserved=reserved,
        replay_of=_replay_of(result),
    )


def _presented(request: web.Request, config: Config) -> tuple[str | None, str | None]:
    """The account and the license token the request presents (None for none)."""
    headers = request.headers
    # Blanks as HTTP has them (SP, HTAB): a value judged must be the value forwarded, and an
    # upstream would not take "acct-1001\u3000" for acct-1001.
    account = headers.get(config.account_header, "").strip(" \t") or None
    return account, headers.get(config.token_header, "").strip(" \t") or None


async def _record_refusal(
    gateway: Gateway,
    config: Config,
    request: web.Request,
    path: str,
    decision: Decision,
    decision_id: str,
    started: float,
    *,
    enforced: bool | None = None,
) -> None:
    """Record and count a launch refused before it was judged (nothing was reserved)."""
    await gateway.recorder.write(
        launch_record(config, decision, decision_id, request.method, path, None, enforced)
    )
    count_decision(gateway, decision, started)


# Fields a launch is judged by, beside its account and token headers, which the gateway reads
# by their own names only.
_JUDGED_BY: Final = ("Content-Type", "Content-Encoding", IDEMPOTENCY_HEADER)
_JUDGED_VARIABLES: Final = {as_variable(name): name for name in _JUDGED_BY}


def _one_identity(headers: CIMultiDictProxy[str], config: Config) -> None:
    """MalformedLaunch for a launch with two account headers or two token headers: the gateway
    would judge one while the upstream might act on the other (one meaning or none). A name
    spelt with ``_`` for ``-`` counts too: CGI-style servers read both as one variable. So
    does one such spelling of another field it is judged by (found in review: with
    "Content_Type: application/x-www-form-urlencoded" beside or without "Content-Type", Puma
    before 5.6.9 read a form type the gateway never judged)."""
    names = {as_variable(name): name for name in (config.account_header, config.token_header)}
    seen: set[str] = set()
    for key, _ in headers.items():  # every field line (keys() folds repeats into one)
        variable = as_variable(key)
        if variable in names:
            if variable in seen:
                raise MalformedLaunch(f"more than one {names[variable]} header")
            seen.add(variable)
        elif "_" in key and variable in _JUDGED_VARIABLES:
            raise MalformedLaunch(
                f"a {key} header, which servers read as {_JUDGED_VARIABLES[variable]}"
            )


# The fields a launch is judged by, beside the account header: those above, and its Host
# (EC2's region) and Accept (Nova's version, by a parameter).
_READ_TO_JUDGE: Final = frozenset({*_JUDGED_VARIABLES, as_variable("Host"), as_variable("Accept")})


def _nothing_read_is_dropped(headers: CIMultiDictProxy[str], config: Config) -> None:
    """MalformedLaunch for a launch whose ``Connection`` header lists a field it is judged by:
    that field would be dropped on the way upstream, as HTTP has it (found in review:
    ``Connection: Idempotency-Key`` sent a counted launch's retries on without their key,
    uncounted, to an upstream deduplicating on it). Other fields it lists are dropped as
    hop-by-hop, as on any request (found by QA: ``Connection: X-Trace-Hop`` made an allowed
    launch 400, where CONTRACT section 6 forwards it less its hop-by-hop headers)."""
    listed = connection_options(headers) & (_READ_TO_JUDGE | {as_variable(config.account_header)})
    if listed:
        raise MalformedLaunch(
            f"the Connection header lists {min(listed)!r}, which would not reach the upstream"
        )


def _overrides_method(headers: CIMultiDictProxy[str]) -> bool:
    """Whether the request carries a method-override header, also spelt with ``_`` for ``-``
    (CGI-style servers read both as one variable; found by QA: "X_HTTP_Method_Override" went
    through)."""
    for name in METHOD_OVERRIDES:
        if name in headers:
            return True
    return any("_" in key and as_variable(key) in _OVERRIDE_VARIABLES for key in headers)


_SEPARATORS = re.compile(r"[&;]")
# Longer, a name is not "_method" however often it is escaped (each escape adds 2 characters).
_MAX_OVERRIDE_NAME: Final = 64
# Names still escaped once decoded (escaped twice over, which no client needs) read per pass;
# past this many the query has no one meaning that can be read in time (a query of 8 KB of
# them took 24 ms, read without a bound).
_MAX_OVERRIDE_CANDIDATES: Final = 64


def _overrides_method_in(query: str) -> bool:
    """Whether the query has a ``_method`` parameter, as a router that overrides the method by
    one may read it (found in review: Nova's, the routes library's middleware, took
    ``PUT /v2.1/servers?_method=POST`` as a create; Rails and Laravel read one too), or an
    override header's name (``_names_an_override``): split on ``&`` or ``;``, as sent or
    decoded whole once or twice, each name decoded (``%uXXXX`` too, as IIS does), cut at a
    NUL, blanks and letter case ignored. True as well for a query with more names to read so
    than can be read in time."""
    if "%" not in query and "method" not in query.lower():
        return False
    text = query
    for _ in range(3):
        candidates = 0
        for part in _SEPARATORS.split(text):
            name = part.partition("=")[0]
            if len(name) > _MAX_OVERRIDE_NAME or ("%" not in name and "method" not in name.lower()):
                continue
            once = unquote_plus(name)
            if "%" in once:  # escaped twice over: decoded further within a bound
                candidates += 1
                if candidates > _MAX_OVERRIDE_CANDIDATES:
                    return True
            if _names_an_override(unwrapped(decode_u_escapes(once))):
                return True
        decoded = unquote_plus(text)
        if decoded == text:
            break
        text = decoded
    return False


# Fields that override the method to some reader: "_method" (Rack, Laravel, Symfony, the routes
# library) and the override headers' names (ASP.NET reads X-HTTP-Method-Override from form and
# query fields too; found in review), "-" and "_" alike.
_OVERRIDE_FIELDS: Final = frozenset(
    {"_method", *(name.lower().replace("-", "_") for name in METHOD_OVERRIDES)}
)
_PHP_MANGLED = re.compile(r"[ .\[]")


def _names_an_override(name: str) -> bool:
    """Whether ``name`` (read by ``unwrapped``) is a method-override field to some reader, as
    written or as PHP renames it (found in review: ``.method`` is ``$_GET['_method']``)."""
    name = fold_case(name)  # (found in review: .NET reads a dotless i as "I")
    return any(
        candidate.replace("-", "_") in _OVERRIDE_FIELDS
        for candidate in (name, _PHP_MANGLED.sub("_", name))
    )


def _replay_of(result: ReserveResult | None) -> str | None:
    if result is not None and result.outcome is ReserveOutcome.REPLAYED:
        return result.replay_of
    return None


async def reserve_license(
    gateway: Gateway,
    config: Config,
    decision: Decision,
    license: License,
    decision_id: str,
    request: LaunchRequest,
    launch: Launch,
) -> tuple[Decision, ReserveResult | None, bool]:
    """Rows 18-21 for a licensed launch, under its idempotency key when it has one.

    Returns the decision, the ledger's answer (None when nothing could be asked) and
    whether the decision record is written: the ledger writes it right after the
    reservation commits, off the event loop, in the same thread hop. Raises when that
    write failed, after giving back what was reserved (nothing is forwarded).
    """
    try:
        key = idempotency_key(request.headers, launch)
    except MalformedLaunch as e:
        return verdict(decision, "malformed_request", 400, e.detail), None, False
    # The key is the Idempotency-Key header unless it is the dialect's own client token (which
    # the API it belongs to deduplicates on by its own terms; a header repeating it changes
    # nothing upstream).
    from_header = key is not None and key != launch.client_token
    now = time.time()  # one time for the reservation and for both judgements of its answer

    def judged(result: ReserveResult) -> Decision:
        result = within_token(result, license.max_accelerators)
        # A retry of a launch already counted goes on only to an upstream that will not launch
        # it again: see ``idempotency.replay_sent_on``.
        sent_on = result.replay_of is not None and replay_sent_on(
            from_header,
            config.upstream_idempotency_key_window_s,
            result.replay_of,
            now,
        )
        return after_reservation(decision, result, replay_sent_on=sent_on)

    written = _WrittenByLedger(gateway)

    def record(result: ReserveResult) -> None:  # on the ledger's thread
        final = judged(result)
        written.write_off_loop(
            launch_record(config, final, decision_id, request.method, request.path, result)
        )

    reserving = asyncio.ensure_future(
        gateway.ledger.reserve(
            jti=license.jti,
            account=license.sub,
            max_accelerators=license.max_accelerators,
            expires=license.exp,
            amount=decision.reserve,
            decision_id=decision_id,
            now=now,
            idempotency_key=key,
            fingerprint=None if key is None else fingerprint(request, launch.region),
            then=record,
        )
    )
    try:
        result = await asyncio.shield(reserving)
    except StoreUnavailable as e:
        if e.late and config.enforcing:
            # The call may still reach the store (a stalled connection delivers it late) and
            # reserve what nobody would settle: make sure it holds nothing, in the background.
            # (Shadow mode forwards the launch all the same: a reservation that lands is then
            # left for the sweeper to count as used, the outcome being unknown.)
            gateway.keep(_abandon(gateway, decision_id, license.jti))
        return store_unavailable(decision), None, False
    except asyncio.CancelledError:
        # Nothing will be forwarded: once the reservation is made, give it back.
        reserving.add_done_callback(functools.partial(_give_back, gateway, decision_id))
        raise
    if written.failure is not None:
        if result.outcome is ReserveOutcome.RESERVED:  # nothing was forwarded: give it back
            await asyncio.shield(gateway.ledger.release(decision_id, now=time.time()))
        raise written.failure
    held = within_token(result, license.max_accelerators)
    if held is not result:  # past this token's own quantity: not a reservation after all
        await asyncio.shield(gateway.ledger.release(decision_id, now=time.time()))
    return judged(result), held, written.written


def _give_back(
    gateway: Gateway, decision_id: str, reserving: asyncio.Future[ReserveResult]
) -> None:
    if reserving.cancelled() or reserving.exception() is not None:
        return
    if reserving.result().outcome is ReserveOutcome.RESERVED:
        gateway.keep(_release_quietly(gateway, decision_id))


async def _release_quietly(gateway: Gateway, decision_id: str) -> None:
    try:
        await gateway.ledger.release(decision_id, now=time.time())
    except StoreUnavailable as e:  # the sweeper settles it as used after the TTL
        log.error("store.release_failed", decision_id=decision_id, error=str(e))


# Background retries of a ledger write that failed: the first pause, and the longest.
_RETRY_FIRST_S = 0.5
_RETRY_MAX_S = 10.0
# At most this many at once. Past it (failures at full load for long), a write is left to the
# sweeper, which counts an open reservation as used: the safe side, and a bounded backlog.
_MAX_RETRYING = 1000


async def _abandon(gateway: Gateway, decision_id: str, jti: str) -> None:
    """Abandon the reservation a failed reserve call may still make (``Ledger.abandon``)."""
    note = "the reservation call failed; nothing was forwarded"
    await _keep_trying(
        gateway,
        lambda: gateway.ledger.abandon(decision_id, jti, now=time.time(), note=note),
        ("store.reservation_abandoned", "store.abandon_failed"),
        decision_id=decision_id,
    )


async def _keep_trying(
    gateway: Gateway,
    attempt: Callable[[], Awaitable[None]],
    events: tuple[str, str],
    **fields: Any,
) -> None:
    """Await ``attempt()`` until it succeeds, again after each ``StoreUnavailable`` (0.5 s
    later, then doubling to 10 s), and log ``events[0]`` or, on giving up, ``events[1]``.

    Gives up only after one last attempt once the gateway stops (its stop waits for this):
    the gateway's own sweeper waits for these (``Gateway.retrying``), so an outage longer than
    ``reservation_ttl_s`` does not count as used a launch whose outcome it knows (found by QA:
    retries gave up at the TTL, and the sweeper then settled 5 refused launches as used).
    """
    if gateway.retrying >= _MAX_RETRYING:
        log.error(events[1], attempts=0, error="too many retries under way", **fields)
        return
    gateway.retrying += 1
    try:
        delay = _RETRY_FIRST_S
        attempts = 1
        while True:
            try:
                await attempt()
            except StoreUnavailable as e:
                if not gateway.running:
                    log.error(events[1], attempts=attempts, error=str(e), **fields)
                    return
                await _pause(gateway, delay)
                delay = min(delay * 2, _RETRY_MAX_S)
                attempts += 1
            else:
                log.info(events[0], attempts=attempts, **fields)
                return
    finally:
        gateway.retrying -= 1


async def _pause(gateway: Gateway, seconds: float) -> None:
    """Sleep ``seconds``, or until the gateway begins to stop."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(seconds):
            await gateway.stopping.wait()


def launch_record(
    config: Config,
    decision: Decision,
    decision_id: str,
    method: str,
    path: str,
    result: ReserveResult | None,
    enforced: bool | None = None,
) -> dict[str, Any]:
    """The ``launch.decision`` record, with ``replay_of`` for a retry counted before;
    ``enforced`` is the mode's unless given (a refusal shadow mode makes too)."""
    record = decision_record(
        decision,
        decision_id=decision_id,
        mode=config.mode,
        enforced=config.enforcing if enforced is None else enforced,
        method=method,
        path=path,
        now=time.time(),
    )
    replay_of = _replay_of(result)
    if replay_of:
        record["replay_of"] = replay_of
    return record


def count_decision(gateway: Gateway, decision: Decision, started: float) -> None:
    gateway.metrics.count_decision(decision.outcome, decision.reason, time.perf_counter() - started)


async def forward(
    request: web.Request,
    gateway: Gateway,
    config: Config,
    target: str,
    body: bytes | Prefixed | None,
    *,
    decision_id: str | None = None,
    reserved: bool = False,
    replay_of: str | None = None,
) -> web.StreamResponse:
    """Send the request upstream and relay the answer; settle a launch's reservation.

    A reservation becomes use on a 2xx, is released on another status or when no
    connection could be made, and is settled as used when the outcome is unknown (the
    upstream took the request, then timed out or vanished). A retry (``replay_of``) that
    gets a 2xx confirms the earlier reservation as used if its outcome was unknown.
    """
    started = time.perf_counter()
    headers = upstream_headers(request, config.token_header, body_known=isinstance(body, bytes))
    data = body if body is not None else (request.content if request.body_exists else None)
    try:
        upstream = await gateway.upstream.request(
            request.method,
            config.upstream_url,
            target,
            headers,
            data,
            connect_timeout_s=config.connect_timeout_s,
            read_timeout_s=config.timeout_s,
            # A second answer to the same launch must not settle its reservation.
            resend=not reserved,
        )
    except ConnectFailed as e:
        # No connection was made: nothing reached the upstream, so nothing launched.
        reason = "upstream_timeout" if e.timed_out else "upstream_unavailable"
        await _finish(gateway, decision_id, reserved, "release", None, started, reason)
        gateway.metrics.count_upstream_error("connect")
        return problem(
            reason, 504 if e.timed_out else 502, "the upstream could not be reached", decision_id
        )
    except RequestBodyFailed as e:  # the client's own body broke off: no upstream fault
        # (A launch's body is read whole before it is judged: nothing reserved streams.)
        await _finish(gateway, decision_id, reserved, "unknown", None, started, "RequestBodyFailed")
        return problem("malformed_request", 400, str(e), decision_id)
    except BadRequestHead as e:  # nothing was sent
        await _finish(gateway, decision_id, reserved, "release", None, started, "BadRequestHead")
        return problem(
            "malformed_request", 400, f"the request cannot be forwarded: {e}", decision_id
        )
    except (TimeoutError, ClientError) as e:
        timed_out = isinstance(e, TimeoutError)
        reason = "upstream_timeout" if timed_out else "upstream_unavailable"
        await _finish(gateway, decision_id, reserved, "unknown", None, started, reason)
        gateway.metrics.count_upstream_error("timeout" if timed_out else "disconnect")
        if timed_out:
            detail = "the upstream did not answer in time"
        elif isinstance(e, BadAnswer):
            detail = "the upstream's answer is not valid HTTP"
        else:
            detail = "the upstream dropped the request"
        return problem(reason, 504 if timed_out else 502, detail, decision_id)
    except BaseException:
        await _settle(gateway, decision_id, reserved, "unknown")
        raise
    try:
        status = upstream.status
        how = "commit" if 200 <= status < 300 else "release"
        await _finish(gateway, decision_id, reserved, how, status, started, None, replay_of)
        extra = {DECISION_HEADER: decision_id} if decision_id else {}
        # An answer already here whole is read at once (no waiting) and sent in one write.
        whole = await upstream.read() if received_whole(request, upstream) else None

        def broke_off(error: str) -> None:
            # The completion record is written already; this log line is the trace.
            gateway.metrics.count_upstream_error("body")
            log.warning("upstream.body_failed", decision_id=decision_id, error=error)

        return await relay_response(request, upstream, extra, whole, broke_off)
    finally:
        upstream.release()


async def _finish(
    gateway: Gateway,
    decision_id: str | None,
    reserved: bool,
    how: str,
    status: int | None,
    started: float,
    error: str | None,
    replay_of: str | None = None,
) -> None:
    """For a launch: settle its reservation by ``how``, then write its ``launch.completed``
    record (by the ledger, right after the settlement, when it can)."""
    if decision_id is None:
        return
    completion = _Completion(gateway, decision_id, status, started, error)
    settlement = await _settle(
        gateway, decision_id, reserved, how, completion if replay_of is None else None
    )
    if replay_of is not None and how == "commit":
        settlement = await _confirm(gateway, replay_of, decision_id)
    await completion.write(settlement)


async def _settle(
    gateway: Gateway,
    decision_id: str | None,
    reserved: bool,
    how: str,
    completion: _Completion | None = None,
) -> str | None:
    """Apply ``how`` to the launch's reservation; shielded so a cancelled request still settles.
    ``completion`` is written by the ledger once the settlement commits."""
    if decision_id is None or not reserved:
        return None
    settled = {"commit": "used", "release": "released"}.get(how, "used_unknown")
    # The record says what happened: a reservation no longer reserved (the sweeper settled it
    # as used meanwhile) is not "released" (found by QA: the record said so, the ledger used).
    then = (
        None
        if completion is None
        else (lambda moved: completion.settled(settled if moved else _SETTLED_ELSEWHERE))
    )
    try:
        await asyncio.shield(_apply(gateway.ledger, decision_id, how, then))
    except StoreUnavailable as e:
        # The reservation stays open for now. Settled again in the background, it is not left
        # for the sweeper to count as used whatever the answer was; settling is a no-op on a
        # reservation no longer reserved, so trying again is safe.
        log.error("store.settle_failed", decision_id=decision_id, settlement=settled, error=str(e))

        async def settle_and_record() -> None:
            if not await _apply(gateway.ledger, decision_id, how, None):
                # Settled meanwhile (the sweeper counts it as used, and records that itself).
                log.warning("store.settled_elsewhere", decision_id=decision_id)
                return
            # The completion record says "pending": the log says how it ended (found by QA:
            # only stdout did, and usage rebuilt from the log fell short of the ledger's).
            try:
                await gateway.recorder.event(
                    "reservation.settled",
                    decision_id=decision_id,
                    settlement=settled,
                    note="settled on a retry, after the store had failed",
                )
            except (OSError, ValueError) as e:
                log.error("audit.write_failed", decision_id=decision_id, error=str(e))

        gateway.keep(
            _keep_trying(
                gateway,
                settle_and_record,
                ("store.settled_on_retry", "store.settle_retry_failed"),
                decision_id=decision_id,
                settlement=settled,
            )
        )
        return "pending"
    return settled


# The ``settlement`` of a completion record whose reservation had already been settled by
# another (the sweeper, as used, once ``reservation_ttl_s`` had passed).
_SETTLED_ELSEWHERE: Final = "settled_elsewhere"


def _apply(ledger: Ledger, decision_id: str, how: str, then: Then | None) -> Awaitable[bool]:
    """Settle the reservation of ``decision_id`` by ``how`` (commit, release, else unknown);
    whether it was still reserved."""
    now = time.time()
    if how == "commit":
        return ledger.commit(decision_id, now=now, then=then)
    if how == "release":
        return ledger.release(decision_id, now=now, then=then)
    return ledger.settle_unknown(decision_id, now=now, note="upstream outcome unknown", then=then)


async def _confirm(gateway: Gateway, replay_of: str, decision_id: str) -> str | None:
    """A retry got a 2xx: the earlier reservation, if settled as used for want of an answer,
    is confirmed used. Failing to is harmless (it is counted as used either way)."""
    note = f"confirmed by retry {decision_id}"
    try:
        confirmed = await asyncio.shield(
            gateway.ledger.confirm(replay_of, now=time.time(), note=note)
        )
    except StoreUnavailable as e:
        log.warning("store.confirm_failed", decision_id=replay_of, error=str(e))
        return None
    return "confirmed" if confirmed else None


class _WrittenByLedger:
    """A record the ledger writes on its own thread right after a commit (a ``then``): whether
    it was written, or why not, for the event loop to read once the ledger call returns."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.written = False
        self.failure: Exception | None = None

    def write_off_loop(self, record: dict[str, Any]) -> None:
        """Write ``record`` from the ledger's thread: at once, or with the other records of
        the ledger's batch when it runs its ``then`` callbacks in a group."""
        self.gateway.recorder.write_later(record, self._done)

    def _done(self, result: dict[str, Any] | Exception) -> None:
        if isinstance(result, Exception):  # handed to the event loop, raised there
            self.failure = result
        else:
            self.written = True


class _Completion(_WrittenByLedger):
    """A forwarded launch's ``launch.completed`` record, written once: by the ledger right
    after the reservation is settled (``settled``, one thread hop for both), or else from
    the event loop (``write``)."""

    def __init__(
        self,
        gateway: Gateway,
        decision_id: str,
        status: int | None,
        started: float,
        error: str | None,
    ) -> None:
        super().__init__(gateway)
        self.decision_id = decision_id
        self.status = status
        self.started = started
        self.error = error

    def record(self, settlement: str | None) -> dict[str, Any]:
        return {
            "event": "launch.completed",
            "timestamp": utc_timestamp(time.time()),
            "decision_id": self.decision_id,
            "upstream_status": self.status,
            "duration_ms": round((time.perf_counter() - self.started) * 1000, 3),
            "settlement": settlement,
            "error": self.error,
        }

    def settled(self, settlement: str) -> None:
        """On the ledger's thread, once the settlement has committed."""
        self.write_off_loop(self.record(settlement))

    async def write(self, settlement: str | None) -> None:
        if self.failure is not None:
            raise self.failure
        if not self.written:
            await self.gateway.recorder.write(self.record(settlement))


def create_app(gateway: Gateway) -> web.Application:
    """The proxy application; ``gateway`` is started and stopped with it."""
    app = web.Application(client_max_size=2**63)
    app[GATEWAY_KEY] = gateway

    async def lifecycle(app: web.Application) -> Any:
        await gateway.start()
        yield
        await gateway.stop()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_route("*", "/{tail:.*}", fail_closed)
    return app
