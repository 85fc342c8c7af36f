"""How upstream servers read a request as a form, for the launches the gateway judges as JSON.

An upstream that reads a launch's body or query as a form can launch a field the gateway never
judged (found by QA and in three reviews, each a p5.48xlarge launched for a restricted account
on a real upstream). Which bodies are forms, and which field a name is, differ from one parser
to the next; these readers are at least as wide as the common ones, so that a name any of them
reads as a judged field is found (coarser only ever refuses more, never less):

- a body is a form when its ``Content-Type``, cut as PHP cuts it (at ``,``, ``;`` or a blank),
  names the form type, or when it has none (Rack, and so Rails and Sinatra, read an untyped
  POST body as a form);
- a name is cut at a NUL (PHP reads it with strlen) and folded as ``strict.fold_case`` folds;
- the top-level field of a name is any part of it between brackets and dots (``a[b]``, ``a.b``,
  ``]b``, ``[b]``: Rack strips leading brackets, qs reads ``[b]`` as ``b``, qs's ``allowDots``
  splits on dots, a wrapping key such as Rails' ``params[:instance]`` nests one), or the whole
  name, compared with blanks, dots, brackets, dashes and underscores dropped (PHP makes
  ``instance.type`` and ``instance type`` ``instance_type``).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from typing import Final
from urllib.parse import unquote_plus

from launchgate.strict import MalformedLaunch, fold_case

FORM: Final = "application/x-www-form-urlencoded"
MULTIPART: Final = "multipart/form-data"

_MEDIA_END = re.compile(r"[,;\s]")
_PARTS = re.compile(r"[\[\].]")
_NOT_ALNUM = re.compile(r"[^a-z0-9]")


def media_type(content_type: str) -> str:
    """The media type as PHP reads it: cut at the first ``,``, ``;`` or blank, lower-cased
    (found in review: "application/x-www-form-urlencoded,text/plain" is a form to PHP)."""
    return _MEDIA_END.split(content_type.strip(), maxsplit=1)[0].lower()


def read_as_form(content_types: Iterable[str]) -> bool:
    """Whether some upstream reads a body with these ``Content-Type`` values as a form: one
    names the form type, or none names any type (found in review: Rack reads a POST with no
    Content-Type, or an empty one, as a form)."""
    return media_read_as_form([media_type(value) for value in content_types])


def media_read_as_form(media: list[str]) -> bool:
    """``read_as_form`` for media types already read (``media_type``)."""
    return FORM in media or not any(media)


def squash(name: str) -> str:
    """``name`` folded, with everything but ASCII letters and digits dropped."""
    return _NOT_ALNUM.sub("", fold_case(name))


# A pair's name, when it has one and a value: what a pair holds before its first "=". A name
# without a value launches nothing; a run of empty pairs is passed over by the regex engine.
_NAMED_PAIR = re.compile(r"(?:\A|(?<=[&;]))([^&;=]+)=")
# Past this many names a form is not read for one judged field (bounded work on the event loop:
# a form of 1 MiB of "a=&" took 0.8 s to read whole before, measured); a launch has a few.
MAX_NAMES: Final = 1000


def names(text: str) -> Iterator[str]:
    """The field name of each ``name=value`` pair of a form (or a query) that has a value,
    decoded once, cut at a NUL; MalformedLaunch past ``MAX_NAMES`` of them."""
    if "=" not in text:
        return
    for count, match in enumerate(_NAMED_PAIR.finditer(text)):
        if count == MAX_NAMES:
            raise MalformedLaunch(f"more than {MAX_NAMES} named fields, read as a form")
        yield unquote_plus(match.group(1), errors="replace").partition("\0")[0]


def top_level_keys(name: str) -> set[str]:
    """Every top-level field some parser makes of form field ``name``, squashed."""
    keys = {squash(name)}
    keys.update(squash(part) for part in _PARTS.split(name))
    return keys


def judged_field_in(text: str, fields: frozenset[str]) -> str | None:
    """The first name of form ``text`` that some parser reads as one of ``fields`` (squashed),
    or None."""
    for name in names(text):
        if not top_level_keys(name).isdisjoint(fields):
            return name
    return None
