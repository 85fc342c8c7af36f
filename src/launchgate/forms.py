"""How upstream servers read a request as a form, for the launches the gateway judges as JSON.

An upstream that reads a launch's body or query as a form can launch a field the gateway never
judged (found by QA and in four reviews, each a p5.48xlarge launched for a restricted account
on a real upstream). Which bodies are forms, and which field a name is, differ from one parser
to the next; these readers are at least as wide as the common ones, so that a name any of them
reads as a judged field is found (coarser only ever refuses more, never less):

- a body is a form when its ``Content-Type``, cut as PHP cuts it (at ``,``, ``;`` or a blank),
  starts with the form type (as ASP.NET's System.Web matches it), or when it has none (Rack,
  and so Rails and Sinatra, read an untyped POST body as a form);
- pairs are split on ``&`` or ``;`` (Rack 2 splits a query on both, and so did Python's
  ``parse_qs``, and Django's reader of bodies, before CVE-2021-23336);
- a name is decoded once, ``%uXXXX`` escapes too (as IIS decodes them), cut at a NUL (PHP reads
  it with strlen) and folded as ``strict.fold_case`` folds;
- the top-level field of a name is its first run of characters other than brackets and dots,
  after any leading brackets (Rack strips them, qs reads ``[b]`` as ``b``, qs's ``allowDots``
  cuts at a dot), what a pair of brackets encloses (a wrapping key, as Rails'
  ``params[:instance]``, nests the field there), or the whole name (PHP makes
  ``instance.type`` and ``instance type`` ``instance_type``), each compared with only its
  letters and digits kept.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Final
from urllib.parse import unquote_plus

from launchgate.strict import MalformedLaunch, fold_case

FORM: Final = "application/x-www-form-urlencoded"
MULTIPART: Final = "multipart/"

_MEDIA_END = re.compile(r"[,;\s]")
# Every ASCII character but lower-case letters and digits, dropped by ``squash``.
_NOT_ALNUM: Final = {c: None for c in range(128) if not chr(c).islower() and not chr(c).isdigit()}
_U_ESCAPE = re.compile(r"%[uU]([0-9A-Fa-f]{4})")
# A pair's name, when it has one and a value: what the pair holds before its first "=". A name
# without a value launches nothing; a run of empty pairs is passed over by the regex engine.
_NAMED_PAIR = re.compile(r"(?:\A|(?<=[&;]))([^&;=]+)=")
_FIRST_RUN = re.compile(r"[\[\]]*([^\[\].]*)")
_ENCLOSED = re.compile(r"\[([^\[\]]*)\]")
# Past this many names, this many bracketed parts of one name, or this many escapes, a form is
# not read for a judged field but refused (bounded work on the event loop: a form of 1 MiB of
# "a=&" took 0.8 s to read whole, a name of 1 MiB of "[" 0.6 s, measured); a launch has a few.
# Rack reads at most 100 levels of brackets, qs 5.
MAX_NAMES: Final = 1000
MAX_ENCLOSED: Final = 128  # in one name
MAX_ENCLOSED_IN_ALL: Final = 4096  # in a form (found in review: 999 names of 128, 0.4 s)
MAX_ESCAPES: Final = 4096  # (decoding a name of 1 MiB of escapes took 176 ms)
_ESCAPE = re.compile(r"%(?:[0-9A-Fa-f]{2}|[uU][0-9A-Fa-f]{4})")


def media_type(content_type: str) -> str:
    """The media type as PHP reads it: cut at the first ``,``, ``;`` or blank, lower-cased
    (found in review: "application/x-www-form-urlencoded,text/plain" is a form to PHP)."""
    return _MEDIA_END.split(content_type.strip(), maxsplit=1)[0].lower()


def read_as_form(content_types: Iterable[str]) -> bool:
    """Whether some upstream reads a body with these ``Content-Type`` values as a form."""
    return media_read_as_form([media_type(value) for value in content_types])


def media_read_as_form(media: list[str]) -> bool:
    """``read_as_form`` for media types already read (``media_type``): one starts with the form
    type (found in review: System.Web takes "application/x-www-form-urlencodedX"), or none names
    any type (found in review: Rack reads a POST with no Content-Type, or an empty one, as a
    form)."""
    return any(m.startswith(FORM) for m in media) or not any(media)


def squash(name: str) -> str:
    """``name`` folded, with everything but ASCII letters and digits dropped (in C: a regular
    expression took 115 ms on a name of 1 MiB, this 5 ms)."""
    return fold_case(name).encode("ascii", "ignore").decode("ascii").translate(_NOT_ALNUM)


def decode_u_escapes(text: str) -> str:
    """``text`` with IIS's ``%uXXXX`` escapes decoded (found in review: System.Web reads
    ``%u0069nstance_type`` as ``instance_type``)."""
    if "%u" not in text and "%U" not in text:
        return text
    return _U_ESCAPE.sub(lambda m: chr(int(m.group(1), 16)), text)


def names(text: str) -> Iterator[str]:
    """The field name of each ``name=value`` pair of a form body (or of a query) that has a
    value, decoded once, cut at a NUL; MalformedLaunch past ``MAX_NAMES`` of them, or past
    ``MAX_ESCAPES`` percent signs."""
    if "=" not in text:
        return
    if text.count("%") > MAX_ESCAPES and len(_ESCAPE.findall(text)) > MAX_ESCAPES:
        # (escapes only: found in review, a script's "%s" and "%Y" in a JSON value were counted)
        raise MalformedLaunch(f"more than {MAX_ESCAPES} percent-escapes, read as a form")
    for count, match in enumerate(_NAMED_PAIR.finditer(text)):
        if count == MAX_NAMES:
            raise MalformedLaunch(f"more than {MAX_NAMES} named fields, read as a form")
        name = unquote_plus(decode_u_escapes(match.group(1)), errors="replace")
        yield name.partition("\0")[0]


class _Budget:
    """The bracketed parts a form's names may still have read (``MAX_ENCLOSED_IN_ALL``)."""

    def __init__(self) -> None:
        self.enclosed = MAX_ENCLOSED_IN_ALL


def reads_as_field(
    name: str, fields: frozenset[str], budget: _Budget | None = None, *, dotted: bool = False
) -> bool:
    """Whether some parser reads form field ``name`` as one of ``fields`` (squashed) at the top
    level, or nested under a wrapping key; MalformedLaunch when it has more bracketed parts
    than can be read in time. ``dotted``: a part after a dot counts too (``_dotted_part_in``),
    as it does for a reader that may refuse more (a judged field under a dotted prefix, as
    ``?filter.region=``, is no field: found in review, refusing it was a false alarm)."""
    whole = squash(name)
    if not any(field in whole for field in fields):  # (nor then in any part of it)
        return False
    if whole in fields:
        return True
    first = _FIRST_RUN.match(name)
    if first is not None and squash(first.group(1)) in fields:
        return True
    shortest = min(len(field) for field in fields)
    if dotted and "." in name and _dotted_part_in(name, fields, shortest):
        return True
    budget = budget or _Budget()
    for count, enclosed in enumerate(_ENCLOSED.finditer(name)):
        budget.enclosed -= 1
        if count == MAX_ENCLOSED or budget.enclosed < 0:
            raise MalformedLaunch("a form with more bracketed parts in its names than can be read")
        part = enclosed.group(1)
        # (Shorter, a part cannot squash to a field: folding makes a character at most three,
        # and squashing only drops them.)
        if 3 * len(part) >= shortest and squash(part) in fields:
            return True
    return False


def _dotted_part_in(name: str, fields: frozenset[str], shortest: int) -> bool:
    """Whether a part of ``name`` after a dot reads as one of ``fields``: qs with ``allowDots``
    nests ``req.Action`` under a wrapping key, and ASP.NET's model binding reads
    ``request.Action`` and ``[0].Action`` as a property (found in review). The first
    ``MAX_ENCLOSED`` parts and the last one, each up to a bracket (``req.Action[]``)."""
    for part in (*name.split(".", MAX_ENCLOSED)[1:], name.rpartition(".")[2]):
        run = _FIRST_RUN.match(part)
        if run is not None and 3 * len(run.group(1)) >= shortest and squash(run.group(1)) in fields:
            return True
    return False


def judged_field_in(text: str, fields: frozenset[str]) -> str | None:
    """The first name of form ``text`` (a body or a query) that some parser reads as one of
    ``fields`` (squashed), or None."""
    budget = _Budget()
    for name in names(text):
        if reads_as_field(name, fields, budget):
            return name
    return None
