"""Idempotent retries: which key a launch carries, and what a retry must repeat.

A licensed launch carrying an ``Idempotency-Key`` header (else the dialect's own client
token: EC2 ``ClientToken``, GCE ``requestId``) reserves under that key, scoped to the
account, with a fingerprint of the request. The ledger then tells a first attempt from a
retry (counted once), a reuse of the key for another request, or a first attempt still in
flight (both 409 ``idempotency_conflict``; see ``policy.after_reservation``).
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Final

from multidict import CIMultiDictProxy

from launchgate.dialects import Launch, LaunchRequest
from launchgate.ids import ulid_time
from launchgate.strict import MalformedLaunch

IDEMPOTENCY_HEADER: Final = "Idempotency-Key"
# How long after a first attempt the APIs whose client tokens serve as keys are taken to still
# deduplicate a retry: Compute Engine promises at least 60 minutes for a requestId, and EC2 is
# held to the same (its documentation names no window). A retry later than that could launch
# again, uncounted: it is refused instead (409).
CLIENT_TOKEN_WINDOW_S: Final = 3000.0  # the hour, less 10 minutes for the retry's own way
# there and for clocks that differ between replicas sharing a ledger
MAX_IDEMPOTENCY_KEY_CHARS: Final = 255
_PRINTABLE_ASCII: Final = re.compile(r"[\x20-\x7e]*")


def idempotency_key(headers: CIMultiDictProxy[str], launch: Launch) -> str | None:
    """The launch's idempotency key: the ``Idempotency-Key`` header, else the dialect's client
    token; None when neither is given (or empty).

    Raises MalformedLaunch for a header given twice, a key over 255 characters, or one with a
    character outside printable ASCII (an ``sf-string``, as the IETF Idempotency-Key draft has
    it; a header's bytes that were not UTF-8 among them).
    """
    values = headers.getall(IDEMPOTENCY_HEADER, [])
    if len(values) > 1:
        raise MalformedLaunch(f"{IDEMPOTENCY_HEADER} is given more than once")
    # HTTP's blanks only: the key checked is the key forwarded ("k" and "k\u00a0" are two keys
    # to an upstream that deduplicates on the exact value).
    key = (values[0].strip(" \t") if values else "") or launch.client_token
    if key and len(key) > MAX_IDEMPOTENCY_KEY_CHARS:
        raise MalformedLaunch(f"the idempotency key is over {MAX_IDEMPOTENCY_KEY_CHARS} characters")
    if key and not _PRINTABLE_ASCII.fullmatch(key):
        raise MalformedLaunch("the idempotency key must be printable ASCII")
    return key or None


def replay_sent_on(
    from_header: bool, header_window_s: float | None, first: str, now: float
) -> bool:
    """Whether a retry of a launch already counted (decision ``first``, a ULID) may go to the
    upstream without reserving: only if the upstream will not launch it again, so only within
    the time it deduplicates the key for. Under the Idempotency-Key header, the configured
    ``header_window_s`` (None: the upstream does not deduplicate on it); under a client
    token, the API's window. A later retry is refused (found by QA: a header key's retry was
    sent on, uncounted, however long after the first attempt; providers keep keys for a day
    or so)."""
    window = header_window_s if from_header else CLIENT_TOKEN_WINDOW_S
    if window is None:
        return False
    try:
        return now - ulid_time(first) <= window
    except ValueError:
        return False


def fingerprint(request: LaunchRequest, region: str | None) -> str:
    """SHA-256 (hex) over the method, the normalized path, the raw query, the region the launch
    was judged in and the body: what a retry must repeat exactly. Headers are left out (the
    token header, tracing, dates), but not the region one of them may name (EC2's Host): an
    API deduplicates a client token within one region, so the same call to another is
    another launch."""
    digest = hashlib.sha256()
    # Method, path and query hold no newline (HTTP forbids it), so the parts cannot run
    # together; the region is written as JSON, newlines escaped.
    digest.update(f"{request.method}\n{request.path}\n{request.query}\n".encode())
    digest.update(f"{json.dumps(region)}\n".encode())
    digest.update(request.body)
    return digest.hexdigest()
