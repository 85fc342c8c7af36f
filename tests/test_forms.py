"""How upstream servers read a request as a form (``launchgate.forms``)."""

from __future__ import annotations

import pytest

from launchgate.forms import (
    MAX_ENCLOSED,
    MAX_ESCAPES,
    MAX_NAMES,
    decode_u_escapes,
    judged_field_in,
    media_type,
    names,
    read_as_form,
    reads_as_field,
    squash,
)
from launchgate.strict import MalformedLaunch

FIELDS = frozenset(squash(f) for f in ("instance_type", "count", "region"))


@pytest.mark.parametrize(
    ("content_types", "form"),
    [
        ([], True),  # Rack reads an untyped POST body as a form (found in a third review)
        ([""], True),
        ([" \t"], True),
        (["application/x-www-form-urlencoded"], True),
        (["Application/X-WWW-Form-Urlencoded; charset=utf-8"], True),
        (["application/x-www-form-urlencoded,text/plain"], True),  # as PHP cuts it
        (["application/x-www-form-urlencoded text/plain"], True),
        (["application/x-www-form-urlencodedX"], True),  # as System.Web matches it (review)
        (["application/json"], False),
        (["text/plain"], False),
        (["multipart/form-data; boundary=b"], False),  # (refused apart)
        (["application/json", "application/x-www-form-urlencoded"], True),
    ],
)
def test_which_bodies_upstreams_read_as_forms(content_types: list[str], form: bool) -> None:
    assert read_as_form(content_types) is form


def test_media_type_is_cut_as_php_cuts_it() -> None:
    assert media_type(" Multipart/Form-Data;boundary=x") == "multipart/form-data"
    assert media_type("application/json,text/plain") == "application/json"


def test_names_are_those_with_a_value_decoded_once_and_cut_at_a_nul() -> None:
    text = "a=1&b;c=2;=3&d=e=f&&x&%5Bi%5D=1&n%00x=1&p+q=1&%2541=1&%u0069d=1"
    assert list(names(text)) == ["a", "c", "d", "[i]", "n", "p q", "%41", "id"]
    assert list(names("no pairs at all")) == []


def test_iis_u_escapes_are_decoded() -> None:
    assert decode_u_escapes("%u0069nstance_type%U005F") == "instance_type_"
    assert decode_u_escapes("100%") == "100%"


@pytest.mark.parametrize(
    "name",
    [
        "instance_type",
        "INSTANCE_TYPE",
        "\u0131nstance_type",  # the dotless i, folded as .NET folds it
        "instance.type",  # PHP: $_POST['instance_type']
        "instance type",
        " instance_type",
        "instance[type",
        "]instance_type",  # Rack 2 strips leading brackets
        "[instance_type]",  # qs reads it as instance_type
        "instance[instance_type]",  # nested under a wrapping key (Rails' wrap_parameters)
        "instance_type[]",
        "count.x",  # qs's allowDots: count, then x under it
        "Region",
    ],
)
def test_names_read_as_a_judged_field(name: str) -> None:
    assert reads_as_field(name, FIELDS)


@pytest.mark.parametrize(
    "name",
    [
        "instance",
        "type",
        "account_id",
        "discount",
        "regions",
        "filter.region",  # (found in review: refused, though no parser reads it as region)
        '{"instance_type": "p5',  # a JSON body's text before its first "=", as one name
        '", "count": 1, "note": "R',
        '{"tags":["a"],"instances":[{"type":"x"}],"user_data":"A',
    ],
)
def test_names_read_as_no_judged_field(name: str) -> None:
    assert not reads_as_field(name, FIELDS)


def test_the_first_judged_name_of_a_form_is_found() -> None:
    body = '{"a":"&x=1&%5Binstance_type%5D=p5.48xlarge&","instance_type":"m7i.large"}'
    assert judged_field_in(body, FIELDS) == "[instance_type]"
    assert judged_field_in('{"instance_type":"m7i.large","note":"R&D; a=b"}', FIELDS) is None


def test_the_reading_is_bounded() -> None:
    """A form of 1 MiB of ``a=&`` took 0.8 s of the event loop to read whole, a name of 1 MiB
    of "[" 0.6 s (measured): past ``MAX_NAMES`` names, or ``MAX_ENCLOSED`` bracketed parts of
    a name that holds a judged field's letters, a form is refused; empty pairs cost no names,
    and a name without a field's letters is not taken apart."""
    assert judged_field_in("a=1&" * MAX_NAMES, FIELDS) is None
    with pytest.raises(MalformedLaunch, match="more than 1000 named fields"):
        judged_field_in("a=&" * (MAX_NAMES + 1), FIELDS)
    assert judged_field_in("&=" * 500_000 + "&x=1", FIELDS) is None
    assert judged_field_in("[" * 1_000_000 + "=1", FIELDS) is None
    assert judged_field_in("[x]" * 300_000 + "=1", FIELDS) is None
    with pytest.raises(MalformedLaunch, match="more bracketed parts"):
        judged_field_in("[x]" * MAX_ENCLOSED + "[count]=1", FIELDS)
    # ... and in a whole form (found in review: 999 names of 127 parts each took 0.4 s)
    name = "a" + "[\u0130\u0130]" * 100 + "[b]instance_typeX"
    with pytest.raises(MalformedLaunch, match="more bracketed parts"):
        judged_field_in("&".join([f"{name}=1"] * 50), FIELDS)
    assert judged_field_in("&".join([f"{name}=1"] * 40), FIELDS) is None
    with pytest.raises(MalformedLaunch, match="more than 4096 percent-escapes"):
        judged_field_in("%5B" * (MAX_ESCAPES + 1) + "count=1", FIELDS)
    assert judged_field_in("%5B" * MAX_ESCAPES + "count=1", FIELDS) == "[" * MAX_ESCAPES + "count"
    # only escapes count (found in review: a script's "%s" and "%Y" in a JSON value did)
    assert judged_field_in("%s %Y" * MAX_ESCAPES + "&x=1", FIELDS) is None


@pytest.mark.parametrize("name", ["request.Action", "[0].Action", "a.b.Action", "req.Action[]"])
def test_a_dotted_reading_takes_the_parts_after_a_dot(name: str) -> None:
    """For a reader that may refuse more (the EC2 Action): qs with ``allowDots`` and ASP.NET's
    model binding read ``request.Action`` as ``Action`` (found in review); a judged field's
    reading does not (``filter.region``, above, is no field)."""
    action = frozenset({"action"})
    assert reads_as_field(name, action, dotted=True)
    assert not reads_as_field(name, action)
    assert not reads_as_field("x.Actions", action, dotted=True)
    # bounded: a name of a million dots is read in milliseconds
    assert reads_as_field("a." * 500_000 + "Action", action, dotted=True)
