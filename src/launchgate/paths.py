"""Request-path normalization before route matching (CONTRACT section 6).

A launch must be recognised however its path is spelled, so the path is brought to one
form first: percent-encoded unreserved characters decoded (RFC 3986 section 2.3), other
escapes upper-cased, repeated slashes collapsed, ``.``/``..`` segments removed and a
trailing slash dropped. What could be read two ways by the upstream is refused instead:
an encoded slash, backslash or NUL, a bad escape, ``..`` above the root.
"""

from __future__ import annotations

import re
import string
from typing import Final
from urllib.parse import unquote

from launchgate.strict import fold_case

_UNRESERVED: Final = frozenset(string.ascii_letters + string.digits + "-._~")
_ESCAPE = re.compile(r"%(..)?", re.DOTALL)
_HEX: Final = frozenset(string.hexdigits)
# Escapes whose decoded form would change the path's structure for some upstream.
_REFUSED_ESCAPES: Final = frozenset({"2F", "5C", "00"})


class UnsafePath(ValueError):
    """A path that cannot be normalized safely; the gateway answers 400."""


def _unescape(match: re.Match[str]) -> str:
    pair = match.group(1)
    if pair is None or not set(pair) <= _HEX:
        raise UnsafePath("bad percent-escape in path")
    pair = pair.upper()
    if pair in _REFUSED_ESCAPES:
        raise UnsafePath(f"encoded %{pair} in path")
    char = chr(int(pair, 16))
    return char if char in _UNRESERVED else f"%{pair}"


# Anything that normalization could change or refuse; a path without any is already normal.
_NOT_PLAIN = re.compile(r"%|//|/\.|/;|.\Z(?<=/)|[\\\x00-\x20\x7f]")


def normalize_path(raw: str) -> str:
    """The one form of ``raw`` (a path without query) that routes are matched on."""
    if raw.startswith("/") and (raw == "/" or _NOT_PLAIN.search(raw) is None):
        return raw  # the common case, checked in one pass
    return normalize_path_slowly(raw)


def normalize_path_slowly(raw: str) -> str:
    """``normalize_path`` without its shortcut for paths that are already normal."""
    if not raw.startswith("/"):
        raise UnsafePath("path must start with '/'")
    if any(c == "\\" or ord(c) < 0x21 or ord(c) == 0x7F for c in raw):
        raise UnsafePath("path holds a backslash, space or control character")
    decoded = _ESCAPE.sub(_unescape, raw)
    segments: list[str] = []
    for segment in decoded.split("/"):
        if segment in ("", "."):
            continue
        if ";" in segment and segment.partition(";")[0] in ("", ".", ".."):
            # "..;x" or ";x": a name here; a dot segment, or an empty one that a repeated
            # slash collapses, to a server that cuts parameters first (Tomcat's reading).
            raise UnsafePath(f"a parameter on an empty or dot segment ({segment[:16]!r})")
        if segment == "..":
            if not segments:
                raise UnsafePath("'..' above the root")
            segments.pop()
        else:
            segments.append(segment)
    return "/" + "/".join(segments)


def without_parameters(path: str) -> str:
    """``path`` (normalized) with each segment's parameters cut (``;`` to the segment's end), as
    Tomcat, Jetty and Spring read a path before they route it."""
    return "/".join(segment.partition(";")[0] for segment in path.split("/"))


_MAX_DECODINGS: Final = 4

# What each second reading of a path (``second_readings``) stands for, in a launch's 400.
PARAMETERS: Final = "servers that cut path parameters (';') before they route"
AUTHORITY: Final = "URL parsers that read a target starting with '//' as a host name, then a path"
SCRIPT: Final = "front controllers that route the path after a script's name ('/index.php/...')"
# The first segment, in any case, that names a script whose front controller routes the rest of
# the path (PATH_INFO): PHP's, CGI's, ASP.NET's.
_SCRIPTS: Final = (
    r"\.(?:php\d*|phtml|pht|phar|cgi|fcgi|pl|py|wsgi|rb|lua|sh|aspx?|ashx|asmx|axd|svc|xamlx"
    r"|cshtml|vbhtml|cfml?|cfc|dll|exe|jsp|do)"
    # (then trailing dots or blanks, which Windows servers trim, or an NTFS stream name)
    r"[. ]*(?:::\$data)?"
)
_SCRIPT = re.compile(rf"/[^/]*{_SCRIPTS}(?=/|\Z)", re.IGNORECASE)
_SCRIPT_SEGMENT = re.compile(rf"[^/]*{_SCRIPTS}", re.IGNORECASE)


def names_a_script(path: str) -> bool:
    """Whether a segment of ``path`` names a script (``_SCRIPT``), after which a front
    controller routes the rest of the path, whatever came before it (found in review:
    Symfony under an Apache alias routes "/api/index.php/v1/servers" and
    "/x.py/api/index.php/v1/servers" as its "/v1/servers")."""
    return "." in path and _SCRIPT.search(path) is not None


LENIENT: Final = (
    "routers that ignore letter case, decode escapes before they route, or drop a format"
    " suffix ('.json')"
)


def second_readings(raw: str, path: str) -> list[tuple[str, str]]:
    """The other paths that common upstream servers read in a request path ``raw``, normalized
    as ``path``: each with who reads it so (``PARAMETERS``, ``AUTHORITY``, ``LENIENT``,
    ``SCRIPT``). A launch route that claims one of them where it does not claim ``path`` would
    see its launch go upstream unjudged (found by QA: ``POST //evil/v1/instances`` launched on
    an upstream that routes on WHATWG's ``new URL(target, base)``, ``/V1/Instances`` on a
    case-insensitive router such as Express's default). Cheap for the common path: lower case,
    no ``;``, not starting with ``//``, no format suffix, no escape, no script: none.
    UnsafePath when a path names scripts in more ways than can be read in time."""
    if (
        raw[1:2] != "/"
        and ";" not in path
        and "%" not in path
        and path.isascii()
        and path.lower() == path
        and "." not in path.rpartition("/")[2]
        and not names_a_script(path)
    ):
        return []  # (the common path, in one pass of each kind)
    readings: list[tuple[str, str]] = []
    bases = [(path, "")]
    if raw.startswith("//"):
        # "//host/path", or, as WHATWG reads special URLs, any run of slashes then the host.
        for rest in (raw[2:], raw.lstrip("/")):
            tail = rest.partition("/")[2]
            try:
                reading = normalize_path("/" + tail)
            except UnsafePath:
                continue
            if reading != path and (reading, AUTHORITY) not in readings:
                readings.append((reading, AUTHORITY))
                bases.append((reading, AUTHORITY))
    for base, who in bases:
        _add(readings, path, _other_forms(base, who))
    # A front controller routes what follows a script's name, whatever came before it (found in
    # review: Symfony and Laravel take the script's path off as their base URL, under mod_php,
    # php-fpm and php -S, and under an alias or behind a decoy script name too): each script
    # segment of each reading so far, without what precedes it, or some of it.
    for base in [path, *(reading for reading, _ in readings)]:
        for reading in _after_scripts(base):
            _add(readings, path, [(reading, SCRIPT), *_other_forms(reading, SCRIPT)])
            if len(readings) > _MAX_READINGS:
                raise UnsafePath(f"the path names scripts in more than {_MAX_READINGS} ways")
    return readings


_MAX_READINGS: Final = 64


def _add(readings: list[tuple[str, str]], path: str, found: list[tuple[str, str]]) -> None:
    for reading, who in found:
        if reading != path and all(reading != seen for seen, _ in readings):
            readings.append((reading, who))


def _other_forms(base: str, who: str) -> list[tuple[str, str]]:
    """``base`` with its parameters cut, and as a lenient router reads it (``LENIENT``)."""
    forms = []
    if ";" in base and (cut := without_parameters(base)) != base:
        forms.append((cut, who or PARAMETERS))
    lenient = decoded_and_folded(base)
    if ";" in lenient:  # (an escaped ';' decoded)
        lenient = without_parameters(lenient)
    if lenient != base:  # decoded: its dots and slashes read as such (found in review)
        lenient = _tidied(lenient)
    head, _, last = lenient.rpartition("/")
    if "." in last and (stem := last.partition(".")[0]):
        # Any suffix after the segment's first dot: Rails' format is any run of characters
        # but "./?", Spring MVC's suffix match any "*" (found in review: ".-", ".a.b").
        lenient = f"{head}/{stem}"
    if lenient != base:
        forms.append((lenient, who or LENIENT))
    return forms


def _after_scripts(path: str) -> list[str]:
    """What a front controller routes in ``path``: for each segment naming a script, the
    segments after it, with none, some or all of those before it."""
    if not names_a_script(path):
        return []
    segments = path.split("/")[1:]
    found = []
    for i, segment in enumerate(segments):
        if _SCRIPT_SEGMENT.fullmatch(segment):
            rest = segments[i + 1 :]
            found += ["/" + "/".join(segments[j:i] + rest) for j in range(i + 1)]
    return found


def _tidied(path: str) -> str:
    """``path`` with ``.`` and ``..`` segments resolved (none above the root), repeated slashes
    collapsed and a trailing slash dropped, whatever it holds: the path a server that decodes
    it, then normalizes, routes on."""
    segments: list[str] = []
    for segment in path.split("/"):
        if segment == "..":
            if segments:
                segments.pop()
        elif segment not in ("", "."):
            segments.append(segment)
    return "/" + "/".join(segments)


def decoded_segment(segment: str) -> str:
    """A path segment with every percent-escape decoded, as an upstream that routes on the
    decoded path reads it (found by review: "%C5%BFubscriptions", a long s, went unjudged to
    an ARM upstream, which ignores case). Normalization leaves escapes of non-ASCII bytes
    encoded, and these can decode to a letter that matches an ASCII one in another case."""
    return unquote(segment, errors="replace") if "%" in segment else segment


_DOT_SEGMENT = re.compile(r"(?:^|/)(?:\.|%2e){1,2}(?=/|$)", re.IGNORECASE)


def has_dot_segments(raw: str) -> bool:
    """Whether ``raw`` (a path) has a ``.`` or ``..`` segment, however its dots are escaped:
    normalization removes them, and an upstream might not."""
    return ("." in raw or "%" in raw) and _DOT_SEGMENT.search(raw) is not None


def decoded_and_folded(raw: str) -> str:
    """``raw`` (a path) as a router that decodes it (as often as ``second_readings`` reads) and
    ignores letter case reads it, dot segments and all."""
    text = fold_path(raw)
    for _ in range(_MAX_DECODINGS):  # escaped more than once: read by layers that decode
        if "%" not in text or (again := fold_path(text)) == text:  # each once more
            break
        text = again
    return text


def fold_path(path: str) -> str:
    """``path`` as a router that decodes it and ignores case would match it: each segment
    decoded (``decoded_segment``), then folded (``fold_case``)."""
    if "%" not in path and path.isascii():
        return path.lower()
    return "/".join(fold_case(decoded_segment(segment)) for segment in path.split("/"))
