"""Strict readers (launchgate.strict): what they accept has exactly one reading.

Property tests (hypothesis) over generated JSON texts and bytes, and table tests for the
framing helpers the JSON dialects share (Content-Encoding, Content-Type, the query).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict, CIMultiDictProxy

from launchgate.strict import (
    MalformedLaunch,
    fold_case,
    loads_json,
    parse_count,
    parse_query,
    require_identity_encoding,
    require_json_content_type,
    require_utf8_charset,
    single_params,
)

PROPERTY = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@dataclass(frozen=True)
class Obj:
    """A JSON object as written: its members in order, duplicates and all."""

    members: tuple[tuple[str, bool, Any], ...]  # (key, write the key \\u-escaped?, value)


def render(node: Any) -> str:
    """The JSON text of a generated tree; keys optionally written as \\u escapes."""
    if isinstance(node, Obj):
        parts = []
        for key, escaped, value in node.members:
            written = (
                '"' + "".join(f"\\u{ord(c):04x}" for c in key) + '"' if escaped else json.dumps(key)
            )
            parts.append(f"{written}: {render(value)}")
        return "{" + ", ".join(parts) + "}"
    if isinstance(node, list):
        return "[" + ", ".join(render(v) for v in node) + "]"
    return json.dumps(node)


def has_duplicate(node: Any) -> bool:
    if isinstance(node, Obj):
        keys = [key for key, _, _ in node.members]
        return len(keys) != len(set(keys)) or any(has_duplicate(v) for _, _, v in node.members)
    if isinstance(node, list):
        return any(has_duplicate(v) for v in node)
    return False


def typed(value: Any) -> Any:
    """A comparable form that keeps JSON's types apart (True is not 1, 1 is not 1.0)."""
    if isinstance(value, dict):
        return ("object", tuple((k, typed(v)) for k, v in value.items()))
    if isinstance(value, list):
        return ("array", tuple(typed(v) for v in value))
    return (type(value).__name__, value)


def first_wins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        obj.setdefault(key, value)
    return obj


def last_wins(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    return dict(pairs)


# A tiny key alphabet (with a quote, a backslash and a non-ASCII letter) makes duplicates,
# escaped duplicates and awkward escapes common.
KEYS = st.text(alphabet='ab"\\\u00e9', max_size=2)
FINITE = st.floats(allow_nan=False, allow_infinity=False)
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), FINITE, st.text(max_size=4))
TREES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.lists(st.tuples(KEYS, st.booleans(), inner), max_size=4).map(lambda m: Obj(tuple(m))),
    ),
    max_leaves=20,
)
# Valid values: what json.dumps can write and a reader must give back unchanged.
VALUES = st.recursive(
    SCALARS,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=3), inner, max_size=4)
    ),
    max_leaves=20,
)


@PROPERTY
@given(TREES)
def test_accepted_json_has_one_reading(tree: Any) -> None:
    """Accepted iff no object repeats a key; then first-wins, last-wins and bytes readers agree."""
    text = render(tree)
    try:
        value = loads_json(text.encode())
    except MalformedLaunch:
        assert has_duplicate(tree)
        return
    assert not has_duplicate(tree)
    expected = typed(value)
    assert typed(json.loads(text, object_pairs_hook=first_wins)) == expected
    assert typed(json.loads(text, object_pairs_hook=last_wins)) == expected
    assert typed(json.loads(text.encode())) == expected  # Python's own bytes reader


@PROPERTY
@given(st.binary(max_size=64))
def test_accepted_bytes_are_utf8_json_with_one_reading(data: bytes) -> None:
    """Whatever bytes are accepted decode as UTF-8 (no BOM) and read the same every way."""
    try:
        value = loads_json(data)
    except MalformedLaunch:
        return
    assert not data.startswith(b"\xef\xbb\xbf")
    text = data.decode("utf-8")
    assert typed(json.loads(text, object_pairs_hook=first_wins)) == typed(value)
    assert typed(json.loads(text, object_pairs_hook=last_wins)) == typed(value)


@PROPERTY
@given(VALUES, st.booleans())
def test_round_trip(value: Any, ascii_only: bool) -> None:
    """loads_json(json.dumps(v)) == v for every JSON value, escaped or raw UTF-8."""
    try:
        data = json.dumps(value, ensure_ascii=ascii_only).encode()
    except UnicodeEncodeError:  # a lone surrogate has no UTF-8 form; only \\u escapes carry it
        data = json.dumps(value).encode()
    assert typed(loads_json(data)) == typed(value)


@PROPERTY
@given(VALUES, st.sampled_from(["utf-8-sig", "utf-16", "utf-16-le", "utf-16-be", "utf-32"]))
def test_boms_and_other_encodings_are_never_accepted(value: Any, encoding: str) -> None:
    """A BOM, UTF-16 or UTF-32 body is refused, though Python's json.loads(bytes) reads them."""
    try:
        data = json.dumps(value, ensure_ascii=False).encode(encoding)
    except UnicodeEncodeError:
        data = json.dumps(value).encode(encoding)
    with pytest.raises(MalformedLaunch):
        loads_json(data)


@PROPERTY
@given(VALUES, VALUES, st.sampled_from([" ", "\n", "\t", "\r\n", "", "x", ",", "]", "}"]))
def test_trailing_data_is_never_accepted(first: Any, second: Any, separator: str) -> None:
    """A second document, or any junk, after the first value is refused."""
    data = json.dumps(first) + separator + json.dumps(second)
    if separator == "":
        # Run together, two documents can form one ("1" "2" -> "12"); that is one value.
        try:
            json.loads(data)
        except ValueError:
            pass
        else:
            return
    with pytest.raises(MalformedLaunch):
        loads_json(data.encode())


@PROPERTY
@given(
    VALUES,
    st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    st.integers(min_value=0, max_value=3),
)
def test_non_numbers_are_never_accepted(value: Any, bad: float, where: int) -> None:
    """NaN, Infinity and -Infinity are refused wherever they stand."""
    doc = [bad, {"k": bad}, [value, bad], {"v": value, "n": [bad]}][where]
    with pytest.raises(MalformedLaunch):
        loads_json(json.dumps(doc).encode())


@PROPERTY
@given(st.binary(min_size=1, max_size=32))
def test_invalid_utf8_is_never_accepted(junk: bytes) -> None:
    """A body that is not valid UTF-8 is refused, wherever the bad bytes are."""
    try:
        junk.decode("utf-8")
    except UnicodeDecodeError:
        with pytest.raises(MalformedLaunch):
            loads_json(b'{"k": "' + junk + b'"}')


def test_deep_nesting_is_malformed_not_a_crash() -> None:
    """A body nested past the recursion limit is malformed, not an internal error."""
    with pytest.raises(MalformedLaunch):
        loads_json(b"[" * 100_000 + b"]" * 100_000)


@pytest.mark.parametrize(
    ("value", "kwargs", "expected"),
    [
        (3, {}, 3),
        ("0008", {"digit_strings": True}, 8),
        (0, {"allow_zero": True}, 0),
        (100_000, {}, 100_000),
    ],
)
def test_parse_count_accepts(value: object, kwargs: dict[str, bool], expected: int) -> None:
    """Whole numbers in range, and digit strings where the API takes them, are counts."""
    assert parse_count(value, "count", **kwargs) == expected


@pytest.mark.parametrize(
    ("value", "kwargs"),
    [
        (2.0, {}),
        (True, {}),
        (-1, {}),
        (0, {}),
        (100_001, {}),
        ("8", {}),
        ("8.0", {"digit_strings": True}),
        ("1e3", {"digit_strings": True}),
        ("-1", {"digit_strings": True}),
        (" 8", {"digit_strings": True}),
        ("\u0668", {"digit_strings": True}),  # ARABIC-INDIC DIGIT EIGHT: a digit to str.isdigit
        ("00000008", {"digit_strings": True}),
    ],
)
def test_parse_count_refuses(value: object, kwargs: dict[str, bool]) -> None:
    """Fractions, booleans, negatives, zero, huge counts and non-ASCII digits are malformed."""
    with pytest.raises(MalformedLaunch):
        parse_count(value, "count", **kwargs)


# --- the framing helpers ---------------------------------------------------------------


def headers(*pairs: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(pairs))


@pytest.mark.parametrize(
    ("pairs", "ok"),
    [
        ((), True),
        ((("Content-Encoding", "identity"),), True),
        ((("Content-Encoding", "IDENTITY"),), True),
        ((("Content-Encoding", "gzip"),), False),
        ((("Content-Encoding", "identity, gzip"),), False),
        ((("Content-Encoding", "identity"), ("content-encoding", "br")), False),
    ],
)
def test_require_identity_encoding(pairs: tuple[tuple[str, str], ...], ok: bool) -> None:
    """Only identity (or no Content-Encoding at all) is read; any coding in any header is not."""
    if ok:
        require_identity_encoding(headers(*pairs))
    else:
        with pytest.raises(MalformedLaunch):
            require_identity_encoding(headers(*pairs))


@pytest.mark.parametrize(
    ("pairs", "ok"),
    [
        ((), True),
        ((("Content-Type", "application/json"),), True),
        ((("Content-Type", "Application/JSON; charset=UTF-8"),), True),
        ((("Content-Type", 'application/json; charset="utf-8"'),), True),
        ((("Content-Type", "application/json; charset=utf-16"),), False),
        ((("Content-Type", "text/plain"),), False),
        ((("Content-Type", "application/json+protobuf"),), False),
        ((("Content-Type", "application/json"), ("Content-Type", "text/plain")), False),
    ],
)
def test_require_json_content_type(pairs: tuple[tuple[str, str], ...], ok: bool) -> None:
    """JSON in UTF-8, or no Content-Type, is read; another type or charset is not."""
    if ok:
        require_json_content_type(headers(*pairs))
    else:
        with pytest.raises(MalformedLaunch):
            require_json_content_type(headers(*pairs))


@pytest.mark.parametrize(
    ("pairs", "media"),
    [
        ((), None),
        ((("Content-Type", "text/plain"),), "text/plain"),
        ((("Content-Type", "application/json; charset=UTF8"),), "application/json"),
        ((("Content-Type", "application/json; charset=utf-7"),), MalformedLaunch),
        ((("Content-Type", "text/plain; q=1; charset=latin1"),), MalformedLaunch),
        # RFC 2231 forms, which Python's email package reads as the charset (found by QA)
        ((("Content-Type", "application/json; charset*=utf-8''utf-7"),), MalformedLaunch),
        ((("Content-Type", "application/json; charset*0=utf-7"),), MalformedLaunch),
        ((("Content-Type", "text/plain"), ("Content-Type", "text/plain")), MalformedLaunch),
    ],
)
def test_require_utf8_charset(
    pairs: tuple[tuple[str, str], ...], media: str | type[MalformedLaunch] | None
) -> None:
    """Any media type, one header at most, and a charset, if any, of UTF-8."""
    if media is MalformedLaunch:
        with pytest.raises(MalformedLaunch):
            require_utf8_charset(headers(*pairs))
    else:
        assert require_utf8_charset(headers(*pairs)) == media


PARAM_TEXT = st.text(st.characters(codec="utf-8"), max_size=6)


@PROPERTY
@given(st.lists(st.tuples(PARAM_TEXT, PARAM_TEXT), max_size=5))
def test_parse_query_reads_what_was_encoded(pairs: list[tuple[str, str]]) -> None:
    """Encoded pairs come back as they were, each decoded exactly once (empty names skipped)."""
    query = "&".join(f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in pairs)
    assert parse_query(query) == tuple(pairs)


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("", ()),
        ("a=1&&b", (("a", "1"), ("b", ""))),
        ("Instance%54ype=p5&x=a+b", (("InstanceType", "p5"), ("x", "a b"))),
        ("x=%2554", (("x", "%54"),)),
    ],
)
def test_parse_query_examples(query: str, expected: tuple[tuple[str, str], ...]) -> None:
    """Percent-escapes and '+' decode once; an escaped '%' stays a '%'."""
    assert parse_query(query) == expected


@pytest.mark.parametrize("query", ["a=1;b=2", "a=%zz", "a=%4", "a=%ff", "%c3%28=1"])
def test_parse_query_refuses_ambiguous_queries(query: str) -> None:
    """';', bad escapes and bytes that are not UTF-8 make the query malformed."""
    with pytest.raises(MalformedLaunch):
        parse_query(query)


def test_single_params_refuses_repeats_up_to_the_fold() -> None:
    """A name given twice, or twice up to letter case, has no one meaning."""
    assert single_params((("a", "1"), ("b", "2"))) == {"a": ("a", "1"), "b": ("b", "2")}
    with pytest.raises(MalformedLaunch):
        single_params((("a", "1"), ("a", "1")))
    with pytest.raises(MalformedLaunch):
        single_params((("api-version", "1"), ("API-VERSION", "2")))
    assert single_params((("a", "1"), ("A", "2")), fold=str) == {"a": ("a", "1"), "A": ("A", "2")}


def test_a_number_too_long_to_read_is_malformed() -> None:
    """Python's int() takes at most 4300 digits: a longer number is malformed, not a 500."""
    with pytest.raises(MalformedLaunch, match="too long"):
        loads_json(b'{"count": ' + b"9" * 5000 + b"}")


def test_only_short_keys_have_their_case_folds_kept() -> None:
    """Keys come from request bodies: a long one is folded each time, never kept, so bodies
    cannot fill memory through the cache (each entry would hold the key three times over)."""
    from launchgate import strict

    long_key = "\u0390" * 10_000
    before = strict._cached_folds.cache_info().currsize
    with pytest.raises(MalformedLaunch, match="only in letter case"):
        strict.resolve_pointer({long_key: 1, long_key.upper(): 2}, (long_key,))
    assert strict._cached_folds.cache_info().currsize == before
    assert strict.resolve_pointer({"a-short-key-7f3a": 1}, ("a-short-key-7f3a",)) == 1
    assert strict._cached_folds.cache_info().currsize == before + 1


@pytest.mark.parametrize(
    ("text", "folded"),
    [
        ("Microsoft.Compute", "microsoft.compute"),
        ("\u017fubscriptions", "subscriptions"),  # long s: upper-cased, S (.NET)
        ("M\u0131crosoft", "microsoft"),  # dotless i: upper-cased, I (.NET)
        ("subscr\u0130ptions", "subscriptions"),  # dotted capital I: i (re.IGNORECASE)
        ("\u212aelvin", "kelvin"),  # the Kelvin sign: lower-cased, k
        ("Stra\u00dfe", "strasse"),
    ],
)
def test_fold_case_is_as_coarse_as_the_upstreams(text: str, folded: str) -> None:
    """One spelling per name however an upstream ignores case (found in review: letters that
    .NET or Python match with ASCII ones made ARM paths that went unjudged)."""
    assert fold_case(text) == folded
    assert fold_case(folded) == folded
