"""The gateway's own error answers: ``application/problem+json`` (RFC 9457, CONTRACT section 3),
on the proxy port and on the admin listener alike."""

from __future__ import annotations

import json
from typing import Any, Final

from aiohttp import web

from launchgate.policy import TITLES

DECISION_HEADER: Final = "Launchgate-Decision-Id"

# Seconds a client is asked to wait before it tries a 503 again: a gateway that lost its ledger
# tries it again at once for each launch and recovers within a second of its return.
RETRY_AFTER_S: Final = "1"

# The admin listener's own (no launch decision is made there).
_ADMIN_TITLES: Final = {"not_found": "Not found", "method_not_allowed": "Method not allowed"}


def problem(reason: str, status: int, detail: str, decision_id: str | None = None) -> web.Response:
    """An ``application/problem+json`` answer of the gateway's own (RFC 9457)."""
    body: dict[str, Any] = {
        "type": f"urn:launchgate:problem:{reason}",
        "title": TITLES.get(reason) or _ADMIN_TITLES.get(reason, reason),
        "status": status,
        "detail": detail,
        "reason": reason,
        "decision_id": decision_id,
    }
    # The media type alone, as RFC 9457 registers it (JSON is UTF-8 by definition, RFC 8259).
    response = web.Response(
        body=json.dumps(body).encode(),
        status=status,
        headers={"Content-Type": "application/problem+json"},
    )
    if decision_id:
        response.headers[DECISION_HEADER] = decision_id
    if status == 503:  # the ledger is away: worth asking again soon, not at once (RFC 9110 10.2.3)
        response.headers["Retry-After"] = RETRY_AFTER_S
    return response
