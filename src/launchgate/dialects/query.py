"""Strict reading of the AWS Query protocol's wire syntax: one meaning or none (CONTRACT §9).

A query string or ``application/x-www-form-urlencoded`` body is read as ``name=value``
pairs joined by ``&``, ``+`` meaning a space and each ``%XX`` decoded exactly once to
UTF-8. Whatever two parsers could read two ways is refused with ``MalformedLaunch``
instead of guessed at (reference launch_apis.md §7.4):

- a name given twice, or two names that differ only in letter case;
- ``;`` (a separator to some legacy stacks), a raw space, control or non-ASCII byte;
- a pair without ``=``, an empty name, a bad or non-UTF-8 escape, NUL in a value;
- a name outside ``[A-Za-z0-9._-]`` once decoded (so ``Instance%2554ype``, double
  encoded, can never become ``InstanceType`` further on).

``nest`` then reads the Query protocol's dotted names (``Struct.Member``, ``List.N``) as a
tree, refusing a name that is both a value and a structure, and list indices that two
readers could number differently (``01`` next to ``1``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Final
from urllib.parse import quote, unquote_plus, unquote_to_bytes

from launchgate.strict import MalformedLaunch

MAX_NAME_CHARS: Final = 256
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_INDEX = re.compile(r"0|[1-9][0-9]{0,5}")
# What a query or form may hold raw: printable ASCII less space and ';' (bypass 27).
_RAW = re.compile(r"[\x21-\x3a\x3c-\x7e]*")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")


def _decode(raw: str, what: str) -> str:
    """``+`` to space, then every ``%XX`` once, then UTF-8; MalformedLaunch otherwise."""
    if "%" not in raw:
        return raw.replace("+", " ")  # ASCII already (see parse_pairs): nothing to decode
    if _BAD_ESCAPE.search(raw):
        raise MalformedLaunch(f"bad percent-escape in {what}")
    try:
        return unquote_to_bytes(raw.replace("+", " ")).decode("utf-8")
    except UnicodeDecodeError:
        raise MalformedLaunch(f"{what} is not UTF-8 once percent-decoded") from None


def parse_pairs(text: str, where: str) -> list[tuple[str, str]]:
    """The decoded ``(name, value)`` pairs of one query string or form body, in order.

    Empty segments (``a=1&&b=2``, a trailing ``&``) carry nothing and are skipped, as
    every reader does. Raises MalformedLaunch for anything another reader could take
    differently; ``where`` ("query", "form body") names the part in the message.
    """
    if not _RAW.fullmatch(text):
        raise MalformedLaunch(f"{where} holds ';', a space or a byte that is not encoded")
    pairs = []
    for segment in text.split("&"):
        if not segment:
            continue
        raw_name, eq, raw_value = segment.partition("=")
        if not eq:
            raise MalformedLaunch(f"{where} holds a parameter without '='")
        name = _decode(raw_name, f"a {where} parameter name")
        if len(name) > MAX_NAME_CHARS or not _NAME.fullmatch(name):
            raise MalformedLaunch(f"{where} parameter name {name[:64]!r} is not a plain name")
        value = _decode(raw_value, f"the {where} value of {name}")
        if "\x00" in value:
            raise MalformedLaunch(f"the {where} value of {name} holds NUL")
        pairs.append((name, value))
    return pairs


def unique(pairs: Iterable[tuple[str, str]]) -> Mapping[str, str]:
    """The pairs as a read-only mapping; a repeated or case-variant name is malformed."""
    params: dict[str, str] = {}
    folded: dict[str, str] = {}
    for name, value in pairs:
        if name in params:
            raise MalformedLaunch(f"parameter {name} is given more than once")
        other = folded.setdefault(name.lower(), name)
        if other != name:
            raise MalformedLaunch(f"parameters {other} and {name} differ only in letter case")
        params[name] = value
    return MappingProxyType(params)


def parse_params(query: str, body: str | None = None) -> Mapping[str, str]:
    """The parameters of a query string and, for a POST, its form body, read together.

    A name present in both is repeated, hence malformed (bypass 23).
    """
    pairs = parse_pairs(query, "query")
    if body is not None:
        pairs += parse_pairs(body, "form body")
    return unique(pairs)


def encode_params(params: Mapping[str, str]) -> str:
    """The canonical encoding: names sorted, everything but unreserved characters escaped."""
    return "&".join(
        f"{quote(name, safe='')}={quote(value, safe='')}" for name, value in sorted(params.items())
    )


@dataclass(frozen=True, slots=True)
class Node:
    """One level of dotted names: each child is a value (str) or a deeper Node."""

    children: Mapping[str, str | Node]
    name: str  # the dotted prefix of this level, for messages ("" at the root)

    def __contains__(self, key: str) -> bool:
        return key in self.children

    def _path(self, key: str) -> str:
        return f"{self.name}.{key}" if self.name else key

    def value(self, key: str) -> str | None:
        """The value named ``key``, None when absent; malformed if it is a structure."""
        child = self.children.get(key)
        if isinstance(child, Node):
            raise MalformedLaunch(f"{self._path(key)} must be a value, not a structure")
        return child

    def node(self, key: str) -> Node | None:
        """The structure named ``key``, None when absent; malformed if it is a value.

        An empty value stands for an empty structure, as the .NET SDK sends empty lists.
        """
        child = self.children.get(key)
        if isinstance(child, str):
            if child:
                raise MalformedLaunch(f"{self._path(key)} must be a structure, not a value")
            return Node({}, self._path(key))
        return child

    def members(self, key: str) -> Iterator[tuple[str, Node]]:
        """The entries of the list ``key`` (``key.N.…``), in index order.

        An index is ``0`` or digits without a leading zero, so no two names share one.
        """
        listing = self.node(key)
        if listing is None:
            return
        entries = []
        for index in listing.children:
            if not _INDEX.fullmatch(index):
                raise MalformedLaunch(f"{listing._path(index)}: list index is not canonical")
            entry = listing.node(index)
            if entry is not None:
                entries.append((int(index), index, entry))
        for _, index, entry in sorted(entries):
            yield index, entry


_Level = dict[str, "str | _Level"]


def nest(params: Mapping[str, str]) -> Node:
    """The dotted names of ``params`` as a tree; malformed when one name is both value and
    structure (``A=1&A.B=2``) or has an empty component (``A..B``)."""
    root: _Level = {}
    for name, value in params.items():
        parts = name.split(".")
        if "" in parts:
            raise MalformedLaunch(f"parameter name {name} has an empty component")
        level = root
        for depth, part in enumerate(parts[:-1]):
            child = level.setdefault(part, {})
            if isinstance(child, str):
                prefix = ".".join(parts[: depth + 1])
                raise MalformedLaunch(f"{prefix} is both a value and a structure")
            level = child
        if parts[-1] in level:
            raise MalformedLaunch(f"{name} is both a value and a structure")
        level[parts[-1]] = value
    return _freeze(root, "")


def _freeze(level: _Level, name: str) -> Node:
    children: dict[str, str | Node] = {}
    for key, child in level.items():
        path = f"{name}.{key}" if name else key
        children[key] = child if isinstance(child, str) else _freeze(child, path)
    return Node(MappingProxyType(children), name)


# How many times over a name may be decoded before it is read: an upstream may decode twice
# (found in review: "%2541ction" got past one decoding, and the stub, which decodes twice,
# launched), and a router behind it again.
DECODINGS: Final = 8


def decoded(text: str, decode: Callable[[str], str] = unquote_plus) -> str:
    """``text`` decoded by ``decode`` (percent-decoding, ``+`` as a space) until it no longer
    changes, at most ``DECODINGS`` times."""
    for _ in range(DECODINGS):
        once = decode(text)
        if once == text:
            break
        text = once
    return text


def unwrapped(text: str) -> str:
    """``text`` percent-decoded (``+`` as a space) until it no longer changes, at most
    ``DECODINGS`` times, cut at a NUL, without surrounding blanks, lower-cased: a name as the
    most lenient reader may take it."""
    return decoded(text).split("\x00", 1)[0].strip().lower()
