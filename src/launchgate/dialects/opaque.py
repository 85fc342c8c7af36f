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

from launchgate.dialects import (
    Launch,
    LaunchRequest,
    check_keys,
    route_path,
    route_region,
    under_mount,
    under_mount_in_any_case,
    with_head,
)
from launchgate.errors import ConfigError

_KEYS: Final = frozenset({"path", "methods", "region", "ignore_case"})


@dataclass(frozen=True, slots=True)
class Opaque:
    path: str
    methods: frozenset[str]
    region: str | None
    ignore_case: bool = False
    name: str = "opaque"
    prefix: bool = True
    shaped: bool = False  # every request under its path with one of its methods

    def claims(self, method: str, path: str) -> bool:
        if method not in self.methods:
            return False
        if self.ignore_case:
            return under_mount_in_any_case(path, self.path)
        return under_mount(path, self.path)

    def parse(self, request: LaunchRequest) -> Launch:
        """Always a launch that cannot be resolved to SKUs; never malformed."""
        why = f"opaque route: {request.method} {request.path} cannot be read"
        return Launch((), self.region, unresolvable=why)


def build(table: Mapping[str, Any], where: str) -> Opaque:
    """The ``opaque`` route of ``table``: ``path`` and ``methods`` required; ``region`` and
    ``ignore_case`` optional.

    ConfigError names ``where`` and the key at fault.
    """
    check_keys(table, _KEYS, where, "opaque")
    path = route_path(table, where, None)
    methods = table.get("methods")
    if (
        not isinstance(methods, list)
        or not methods
        or not all(isinstance(m, str) and m.isascii() and m.isalpha() for m in methods)
    ):
        raise ConfigError(f"{where}.methods: must be a non-empty list of HTTP methods")
    region = route_region(table, where)
    ignore_case = table.get("ignore_case", False)
    if not isinstance(ignore_case, bool):
        raise ConfigError(f"{where}.ignore_case: must be true or false")
    return Opaque(
        path=path,
        methods=with_head(frozenset(m.upper() for m in methods)),
        region=region,
        ignore_case=ignore_case,
    )
