"""The few exception types launchgate has, each with one purpose."""

from __future__ import annotations


class ConfigError(Exception):
    """A configuration problem, shown to staff verbatim: it names the file and key at fault."""


class TokenError(Exception):
    """A license token failed verification; ``reason`` is a CONTRACT reason code."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


class StoreUnavailable(Exception):
    """The ledger cannot be reached; restricted launches fail closed on it.

    ``late`` says whether what was asked may still take effect: a statement sent on a
    connection that then stalled can reach the database after the caller gave up. False when
    the call was refused before anything was sent, or was rolled back for certain.
    """

    def __init__(self, message: str, *, late: bool = True) -> None:
        super().__init__(message)
        self.late = late
