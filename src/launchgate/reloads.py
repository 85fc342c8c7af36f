"""A reload (SIGHUP) asked for before the gateway handles it: remembered, not lost.

``launchgate serve`` reads its files, then starts the gateway, which handles SIGHUP from then
on. A SIGHUP between the two would be lost if ignored (found by QA: a worker started again
kept a retired key while its siblings reloaded), and would end the process if not handled
at all. ``remember_until_served`` is called before the files are read, so a SIGHUP before
it came before the read, and the read sees what it asked for.
"""

from __future__ import annotations

import signal
from types import FrameType

_asked = False


def remember_until_served() -> None:
    """From now until the gateway takes SIGHUP over, note a reload asked for."""
    signal.signal(signal.SIGHUP, _remember)


def _remember(signum: int, frame: FrameType | None) -> None:
    global _asked
    _asked = True


def asked_meanwhile() -> bool:
    """Whether a reload was asked for since ``remember_until_served`` (once: then forgotten)."""
    global _asked
    asked, _asked = _asked, False
    return asked
