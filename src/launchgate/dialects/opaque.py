"""``opaque``: launches the gateway recognises but cannot read (CONTRACT §9).

Every request under ``path`` whose method is in ``methods`` (batch envelopes, template
deployments, …) is a launch with no readable items: denied as ``unresolvable_launch``
for any account not known to be unrestricted. The body is never parsed.

``ignore_case = true`` matches the path without regard to letter case, for APIs that
route that way (Azure Resource Manager: ``/BATCH`` is ``/batch``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from launchgate.dialects import Launch, LaunchRequest
from launchgate.errors import ConfigError
from launchgate.paths import UnsafePath, normalize_path

_KEYS: Final = frozenset({"path", "methods", "region", "ignore_case"})


@dataclass(frozen=True, slots=True)
class Opaque:
    path: str
    methods: frozenset[str]
    region: str | None
    ignore_case: bool = False
    name: str = "opaque"
    prefix: bool = True

    def claims(self, method: str, path: str) -> bool:
        if method not in self.methods:
            return False
        mount = self.path.lower() if self.ignore_case else self.path
        path = path.lower() if self.ignore_case else path
        return path == mount or path.startswith(mount.rstrip("/") + "/")

    def parse(self, request: LaunchRequest) -> Launch:
        """Always a launch that cannot be resolved to SKUs; never malformed."""
        why = f"opaque route: {request.method} {request.path} cannot be read"
        return Launch((), self.region, unresolvable=why)


def build(table: Mapping[str, Any], where: str) -> Opaque:
    """The ``opaque`` route of ``table``: ``path`` and ``methods`` required; ``region`` and
    ``ignore_case`` optional.

    ConfigError names ``where`` and the key at fault.
    """
    unknown = sorted(set(table) - _KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} for dialect opaque")
    path = table.get("path")
    try:
        normal = normalize_path(path) if isinstance(path, str) else None
    except UnsafePath:
        normal = None
    if normal is None or normal != path:
        raise ConfigError(f"{where}.path: must be a normalized absolute path, got {path!r}")
    methods = table.get("methods")
    if (
        not isinstance(methods, list)
        or not methods
        or not all(isinstance(m, str) and m.isascii() and m.isalpha() for m in methods)
    ):
        raise ConfigError(f"{where}.methods: must be a non-empty list of HTTP methods")
    region = table.get("region")
    if region is not None and (not isinstance(region, str) or not region.strip()):
        raise ConfigError(f"{where}.region: must be a non-empty string")
    ignore_case = table.get("ignore_case", False)
    if not isinstance(ignore_case, bool):
        raise ConfigError(f"{where}.ignore_case: must be true or false")
    return Opaque(
        path=normal,
        methods=frozenset(m.upper() for m in methods),
        region=region,
        ignore_case=ignore_case,
    )
