"""``openstack-nova``: server create and resize on the Compute API v2.1 (CONTRACT §9).

Claims POST ``{path}/servers`` and ``{path}/{project_id}/servers`` (create), and
``…/servers/{id}/action`` (one action, named by the body's single key; only ``resize``
launches anything). Nova routes ``os-volumes_boot`` as a clone of ``servers``
(``nova/api/openstack/compute/routes.py``), so it is claimed the same way.

- create: ``server.flavorRef`` x max(``min_count``, ``max_count``, 1); the flavor is read
  as Nova reads it (``common.get_id_from_href``: the last path segment of the reference),
  counts are integers or digit strings (schema ``positive_integer``);
- resize: ``resize.flavorRef`` x 1, taken verbatim as Nova's resize does;
- region: the route's ``region``.

Bodies are strict JSON (``strict.loads_json``); a key that differs only in case from one
read here is malformed.

Nova also picks the API version by a ``version`` parameter of ``Content-Type`` or ``Accept``
when the path names none (``nova/api/openstack/urlmap.py``: ``_content_type_strategy``,
``_accept_strategy``): ``POST /servers`` with ``Content-Type: application/json; version=2.1``
creates servers on the v2.1 API, path unchanged. Such a request, under the parent of this
route's mount, that would be a launch under the mount, is malformed (``claimed_by_header``):
the gateway judges a Nova call by its path alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal
from urllib.parse import urlsplit

from multidict import CIMultiDictProxy

from launchgate.dialects import (
    Item,
    Launch,
    LaunchRequest,
    check_keys,
    route_path,
    route_region,
    under_mount,
)
from launchgate.forward import as_variable
from launchgate.strict import (
    MalformedLaunch,
    loads_json,
    parse_count,
    require_identity_encoding,
    require_json_content_type,
)

_KEYS: Final = frozenset({"path", "region"})
_COLLECTIONS: Final = frozenset({"servers", "os-volumes_boot"})
_SERVER_KEYS: Final = ("flavorRef", "min_count", "max_count")

Shape = Literal["create", "action"]


def shape_of(base: str, path: str) -> Shape | None:
    """Which Nova call ``path`` is under ``base``: a create, a server action, or neither."""
    if path == base or not path.startswith(base.rstrip("/") + "/"):
        return None
    parts = path[len(base.rstrip("/")) + 1 :].split("/")
    if len(parts) in (3, 4) and parts[-1] == "action":
        parts = parts[:-2]  # drop "{id}/action"
        shape: Shape = "action"
    else:
        shape = "create"
    if len(parts) in (1, 2) and parts[-1] in _COLLECTIONS:
        return shape
    return None


@dataclass(frozen=True, slots=True)
class OpenstackNova:
    path: str
    region: str | None
    name: str = "openstack-nova"
    prefix: bool = True  # claims calls under ``path``
    shaped: bool = True
    methods: frozenset[str] = field(default=frozenset({"POST"}))

    def claims(self, method: str, path: str) -> bool:
        return method == "POST" and shape_of(self.path, path) is not None

    def claimed_by_header(
        self, method: str, path: str, headers: CIMultiDictProxy[str]
    ) -> str | None:
        """For a request no route claims by its path: why it is a launch here all the same, or
        None. Nova's URL map sends a request whose path names no API version to the one that
        a ``version`` parameter of its ``Content-Type`` or ``Accept`` names, path unchanged
        (found in review: ``POST /servers`` with ``Content-Type: application/json;
        version=2.1/x`` created 5 GPU servers on the stub, unjudged). Whatever the version
        named: Nova may map any of them to an API that launches."""
        if method != "POST" or self.path == "/":
            return None
        root = self.path.rpartition("/")[0] or "/"  # (a normalized path: no trailing slash)
        if not under_mount(path, root):
            return None
        if shape_of(self.path, self.path + path[len(root.rstrip("/")) :]) is None:
            return None
        if not _names_a_version(headers):
            return None
        return (
            "a version parameter in Content-Type or Accept would make this a Nova launch"
            f" under {self.path}; send it on its versioned path"
        )

    def parse(self, request: LaunchRequest) -> Launch | None:
        """A create's or resize's items; None for any other server action.

        Raises MalformedLaunch when the body has no one meaning.
        """
        require_identity_encoding(request.headers)
        require_json_content_type(request.headers)
        body = loads_json(request.body)
        if not isinstance(body, dict):
            raise MalformedLaunch("body must be a JSON object")
        create = shape_of(self.path, request.path) == "create"
        item = _create(body) if create else _resize(body)
        return None if item is None else Launch((item,), self.region)


_VERSIONED: Final = frozenset({"content-type", "accept"})


def _names_a_version(headers: CIMultiDictProxy[str]) -> bool:
    """Whether a ``Content-Type`` or ``Accept`` field may carry a ``version`` parameter: the
    word anywhere in it, in any letter case (a stricter reading could miss a spelling Nova's
    parser takes). A name spelt with ``_`` counts too: uwsgi and other CGI-style servers read
    ``Content_Type`` as ``CONTENT_TYPE``, which Nova's URL map reads (found in review)."""
    return any(
        "version" in value.lower()
        for name, value in headers.items()
        if as_variable(name) in _VERSIONED
    )


def _create(body: dict[str, Any]) -> Item:
    _refuse_case_variants(body, ("server",), "body")
    server = body.get("server")
    if not isinstance(server, dict):
        raise MalformedLaunch("server must be a JSON object")
    _refuse_case_variants(server, _SERVER_KEYS, "server")
    ref = _reference(server, "server")
    try:
        flavor = urlsplit(ref).path.split("/")[-1]
    except ValueError:
        raise MalformedLaunch("server.flavorRef is not a flavor id or URL") from None
    if not flavor:
        raise MalformedLaunch("server.flavorRef names no flavor")
    counts = [
        parse_count(server[key], f"server.{key}", digit_strings=True)
        for key in ("min_count", "max_count")
        if key in server
    ]
    return Item(flavor, max([1, *counts]))


def _resize(body: dict[str, Any]) -> Item | None:
    _refuse_case_variants(body, ("resize",), "body")
    if len(body) != 1:  # Nova's action_peek refuses these too ("too many body keys")
        raise MalformedLaunch("a server action body must have exactly one key")
    if "resize" not in body:
        return None
    resize = body["resize"]
    if not isinstance(resize, dict):
        raise MalformedLaunch("resize must be a JSON object")
    _refuse_case_variants(resize, ("flavorRef",), "resize")
    return Item(_reference(resize, "resize"), 1)


def _reference(obj: dict[str, Any], where: str) -> str:
    """``flavorRef`` as the text Nova makes of it (schema: a non-empty string or an integer)."""
    ref = obj.get("flavorRef")
    if isinstance(ref, bool) or not isinstance(ref, str | int) or ref == "":
        raise MalformedLaunch(f"{where}.flavorRef must be a flavor id or URL")
    return str(ref)


def _refuse_case_variants(obj: Mapping[str, Any], read: tuple[str, ...], where: str) -> None:
    folded = {key.lower(): key for key in read}
    for key in obj:
        expected = folded.get(key.lower())
        if expected is not None and key != expected:
            raise MalformedLaunch(f"{where}: key {key!r} is not spelled {expected!r}")


def build(table: Mapping[str, Any], where: str) -> OpenstackNova:
    """The ``openstack-nova`` route of ``table``; ConfigError names ``where`` and the key."""
    check_keys(table, _KEYS, where, "openstack-nova")
    return OpenstackNova(path=route_path(table, where, "/v2.1"), region=route_region(table, where))
