"""``aws-ec2``: the EC2 Query protocol, dispatched on ``Action`` (CONTRACT §9).

Parameters come from the query string (GET), or the query string and an
``application/x-www-form-urlencoded`` body together (POST), read strictly by
``dialects.query``. EC2 serves its API on any path, so the route claims every request
under its ``path`` (default ``/``), whatever its method: the Query protocol is GET and POST,
but an upstream (or a stand-in) that took a PUT or a HEAD carrying ``Action=RunInstances``
as a launch must not get it unjudged (found by QA: PUT, PATCH, DELETE, OPTIONS and HEAD
launched on the stub and left no record). Other methods are read like a GET. An Action that
cannot launch anything is no launch (``parse`` returns None) and is forwarded unjudged, and
so is a request with no body that names no Action in any way an upstream reads one (another
API's read beside EC2 on "/"; see ``parse``).

Items per Action (reference launch_apis.md §1):

- ``RunInstances``: ``InstanceType`` x max(``MinCount``, ``MaxCount``), and every
  ``ElasticGpuSpecification.N.Type`` / ``ElasticInferenceAccelerator.N.Type`` it attaches;
- ``RequestSpotInstances``: ``LaunchSpecification.InstanceType`` x ``InstanceCount`` (1);
- ``CreateFleet`` / ``RequestSpotFleet``: every override or launch specification type x
  the target capacity (divided by a ``WeightedCapacity`` below 1, which launches more
  instances than the target);
- ``ModifyInstanceAttribute`` changing the type: that type x 1;
- ``CreateLaunchTemplate(Version)``: ``LaunchTemplateData.InstanceType`` x 0;
- ``CreateCapacityReservation``: ``InstanceType`` x ``InstanceCount``.

What the request does not resolve (a template without a type, ``InstanceRequirements``,
capacity in vCPU or MiB, a fleet or reservation changed by id, a fleet that launches Spot
replacements beyond its target, Auto Scaling group capacity) is ``unresolvable``.

``ClientToken``, EC2's idempotency token (the SDKs send one with every launch and keep it
over retries), is the launch's ``client_token``.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any, Final, NoReturn
from urllib.parse import unquote_plus

from launchgate.dialects import (
    EVERY_METHOD,
    Item,
    Launch,
    LaunchRequest,
    check_keys,
    route_path,
    route_region,
    under_mount_in_any_case,
)
from launchgate.dialects.query import DECODINGS, Node, decoded, nest, parse_params
from launchgate.forms import FORM, decode_u_escapes, read_as_form, reads_as_field, squash
from launchgate.forward import as_variable
from launchgate.strict import (
    MAX_COUNT,
    MalformedLaunch,
    fold_case,
    parse_count,
    require_identity_encoding,
)

_KEYS: Final = frozenset({"path", "region"})
_ACTION = re.compile(r"[A-Za-z][A-Za-z0-9]{0,127}")
_HOST = re.compile(r"ec2\.(?P<region>[a-z]{2}(?:-[a-z]+)+-[0-9]{1,2})\.amazonaws\.com")
_WEIGHT = re.compile(r"[0-9]{1,6}(?:\.[0-9]{1,6})?")


@dataclass(frozen=True, slots=True)
class AwsEc2:
    path: str
    region: str | None
    name: str = "aws-ec2"
    prefix: bool = True  # EC2 ignores the path: every request under it is an EC2 call
    shaped: bool = False
    methods: frozenset[str] = field(default=EVERY_METHOD)

    def claims(self, method: str, path: str) -> bool:
        # In any letter case: EC2 ignores the path, so whatever the provider's router sends it
        # (found in review: with aws-ec2 on /ec2, "/EC2?Action=RunInstances&..." went unjudged
        # to an upstream that routes paths case-insensitively).
        return under_mount_in_any_case(path, self.path)

    def launch_action(self, request: LaunchRequest) -> str | None:
        """The launch Action that a request another route takes carries for EC2, which serves
        its Query API on any path (found in review: with aws-ec2 on "/", a Nova server action or
        an ARM PATCH with "?Action=RunInstances&..." reached an EC2-style upstream unjudged):
        in its query string, and in its body when an upstream reads it as a form, whatever the
        method (``forms.read_as_form``: a Content-Type naming one as PHP reads it, or none, as
        Rack reads it; found in review, both launched p5.48xlarges on an EC2-style upstream).
        Not in a body of another type (EC2 and the stub read no other; found in review: a JSON
        startup script calling EC2 was refused). And in a cookie, which PHP's ``$_REQUEST``
        (with no ``request_order``, as PHP's images ship) and System.Web's ``Request[...]`` read
        among the parameters (found in review). See ``_launch_actions_in`` for how."""
        return _launch_actions(request)[0]

    def parse(self, request: LaunchRequest) -> Launch | None:
        """The items of a launch Action; None for an Action that launches nothing.

        Raises MalformedLaunch when the request has no one meaning (see ``dialects.query``).
        """
        # A launch Action named anywhere else, as the most lenient upstream reads names and
        # values, gives the request a second meaning (found in review: Rack took the last of
        # "Action=DescribeInstances&Action]=RunInstances", and launched unjudged).
        _, named, action_names = _launch_actions(request)
        if not request.body and not action_names and _names_no_launch(request.path):
            # No EC2 call: no body, and nothing an upstream reads as an Action (another API's
            # read beside EC2 on "/", as ARM's "?api-version=", found by QA: it was 400).
            return None
        params = parse_params(request.query, _form_body(request))
        action = params.get("Action")
        reader = None if action is None else _READERS.get(action)
        if named > (1 if reader is not None else 0):
            raise MalformedLaunch(
                "a parameter, cookie or X-Amz-Target other than Action names an EC2 launch"
                " Action, which some servers read as the Action"
            )
        if not params:
            return None  # names no Action: EC2 answers MissingAction
        if action is None:
            raise MalformedLaunch("parameters without an Action")
        if not _ACTION.fullmatch(action):
            raise MalformedLaunch("Action is not a plain operation name")
        if reader is None:
            if action.lower() in _FOLDED_ACTIONS:
                raise MalformedLaunch(f"Action {action} differs only in letter case from a launch")
            return None
        _refuse_cookie_parameters(request)
        _refuse_case_variants(params)
        reading = _Reading()
        tree = nest(params)
        reader(tree, reading)
        if not reading.items and not reading.unresolved:
            return None
        unresolvable = "; ".join(reading.unresolved) or None
        region = self.region or _host_region(request)
        return Launch(tuple(reading.items), region, unresolvable, _client_token(tree))


@dataclass(slots=True)
class _Reading:
    """What one request launches, gathered by an Action's reader."""

    items: list[Item] = field(default_factory=list)
    unresolved: list[str] = field(default_factory=list)

    def add(self, sku: str, count: int) -> None:
        if count > MAX_COUNT:
            raise MalformedLaunch(f"{sku} would be launched {count} times, over {MAX_COUNT}")
        self.items.append(Item(sku, count))


def _type(node: Node, key: str) -> str | None:
    value = node.value(key)
    if value == "":
        raise MalformedLaunch(f"{node.name or 'request'}: {key} is empty")
    return value


def _count(node: Node, key: str, *, allow_zero: bool = False) -> int | None:
    """A count parameter: ASCII digits only, 1..MAX_COUNT (0 too when ``allow_zero``)."""
    value = node.value(key)
    if value is None:
        return None
    where = f"{node.name}.{key}" if node.name else key
    return parse_count(value, where, allow_zero=allow_zero, digit_strings=True)


def _need(node: Node, key: str, what: str) -> Node:
    child = node.node(key)
    if child is None:
        raise MalformedLaunch(f"{what} without {key}")
    return child


def _weighted(total: int, node: Node) -> int:
    """Instances one entry can add: the target, or more when its weight is below 1."""
    raw = node.value("WeightedCapacity")
    if raw is None:
        return total
    if not _WEIGHT.fullmatch(raw) or Decimal(raw) == 0:
        raise MalformedLaunch(f"{node.name}.WeightedCapacity must be a positive decimal")
    weight = Decimal(raw)
    return total if weight >= 1 else math.ceil(Decimal(total) / weight)


def _unit(spec: Node, reading: _Reading) -> None:
    unit = spec.value("TargetCapacityUnitType")
    if unit is not None and unit != "units":
        reading.unresolved.append(f"capacity in {unit!r} units, not instances")


def _attachments(node: Node, count: int, reading: _Reading) -> None:
    """Accelerators attached beside the instance type (deprecated but still in the model)."""
    for _, spec in node.members("ElasticGpuSpecification"):
        reading.add(_type(spec, "Type") or _missing(spec, "Type"), count)
    for _, spec in node.members("ElasticInferenceAccelerator"):
        each = _count(spec, "Count") or 1
        reading.add(_type(spec, "Type") or _missing(spec, "Type"), count * each)


def _client_token(t: Node) -> str | None:
    """The Action's ``ClientToken`` (RequestSpotFleet: ``SpotFleetRequestConfig.ClientToken``),
    EC2's idempotency token; None when absent or empty."""
    config = t.node("SpotFleetRequestConfig")
    token = t.value("ClientToken") or (config.value("ClientToken") if config else None)
    return token or None


def _missing(node: Node, key: str) -> NoReturn:
    raise MalformedLaunch(f"{node.name} without {key}")


def _run_instances(t: Node, reading: _Reading) -> None:
    count = max(_count(t, "MinCount") or 1, _count(t, "MaxCount") or 1)
    sku = _type(t, "InstanceType")
    if sku is not None:
        reading.add(sku, count)  # a request-level type overrides the template's
    elif "LaunchTemplate" in t:
        reading.unresolved.append("RunInstances takes its instance type from a launch template")
    else:
        reading.unresolved.append("RunInstances names no InstanceType (the default applies)")
    _attachments(t, count, reading)


def _request_spot_instances(t: Node, reading: _Reading) -> None:
    count = _count(t, "InstanceCount") or 1
    spec = t.node("LaunchSpecification")
    sku = _type(spec, "InstanceType") if spec is not None else None
    if sku is None:
        reading.unresolved.append("RequestSpotInstances names no LaunchSpecification.InstanceType")
    else:
        reading.add(sku, count)


def _overrides(config: Node, total: int, reading: _Reading) -> None:
    overrides = list(config.members("Overrides"))
    if not overrides:
        reading.unresolved.append(f"{config.name} takes its instance type from a launch template")
    for _, override in overrides:
        _typed_entry(override, total, reading)


def _typed_entry(entry: Node, total: int, reading: _Reading) -> None:
    if "InstanceRequirements" in entry:
        reading.unresolved.append(f"{entry.name} selects types by InstanceRequirements")
    sku = _type(entry, "InstanceType")
    if sku is not None:
        reading.add(sku, _weighted(total, entry))
    elif "InstanceRequirements" not in entry:
        reading.unresolved.append(f"{entry.name} names no InstanceType")


def _create_fleet(t: Node, reading: _Reading) -> None:
    spec = _need(t, "TargetCapacitySpecification", "CreateFleet")
    total = _count(spec, "TotalTargetCapacity", allow_zero=True)
    if total is None:
        raise MalformedLaunch("CreateFleet without TotalTargetCapacity")
    # The most it can launch: the parts, were they not held to the total (found by QA: 2 on
    # demand + 2 Spot under a total of 3 counted 3).
    parts = (
        _count(spec, k, allow_zero=True) or 0
        for k in ("OnDemandTargetCapacity", "SpotTargetCapacity")
    )
    total = max(total, sum(parts))
    _unit(spec, reading)
    spot = t.node("SpotOptions")
    _replacements(spot.node("MaintenanceStrategies") if spot else None, reading)
    configs = list(t.members("LaunchTemplateConfigs"))
    if not configs:
        reading.unresolved.append("CreateFleet names no LaunchTemplateConfigs")
    for _, config in configs:
        _overrides(config, total, reading)


def _request_spot_fleet(t: Node, reading: _Reading) -> None:
    config = _need(t, "SpotFleetRequestConfig", "RequestSpotFleet")
    total = _count(config, "TargetCapacity", allow_zero=True)
    if total is None:
        raise MalformedLaunch("RequestSpotFleet without SpotFleetRequestConfig.TargetCapacity")
    total = max(total, _count(config, "OnDemandTargetCapacity", allow_zero=True) or 0)
    _unit(config, reading)
    _replacements(config.node("SpotMaintenanceStrategies"), reading)
    specs = list(config.members("LaunchSpecifications"))
    templates = list(config.members("LaunchTemplateConfigs"))
    if not specs and not templates:
        reading.unresolved.append("RequestSpotFleet names no launch specification or template")
    for _, spec in specs:
        _typed_entry(spec, total, reading)
    for _, template in templates:
        _overrides(template, total, reading)


def _replacements(strategies: Node | None, reading: _Reading) -> None:
    """A fleet that launches a replacement for each Spot Instance AWS signals at risk
    (``CapacityRebalance.ReplacementStrategy``) can run more instances than its target, by
    as many as there are signals (found in review): ``launch`` leaves the old ones running,
    ``launch-before-terminate`` keeps them until its delay ends. No request bounds that."""
    rebalance = strategies.node("CapacityRebalance") if strategies is not None else None
    if rebalance is not None and "ReplacementStrategy" in rebalance:
        reading.unresolved.append(
            f"{rebalance.name}.ReplacementStrategy launches replacements beyond the target"
        )


def _keeps_capacity(action: str) -> Callable[[Node, _Reading], None]:
    """Auto Scaling calls that take instances out of a group: unless the group's desired
    capacity goes down with them, it launches as many again, and those taken out run on
    (``DetachInstances``) or can come back (``EnterStandby``)."""

    def read(t: Node, reading: _Reading) -> None:
        decrement = t.value("ShouldDecrementDesiredCapacity")
        if decrement is None or decrement.lower() != "true":
            reading.unresolved.append(
                f"Auto Scaling {action} without ShouldDecrementDesiredCapacity=true launches"
                " replacements"
            )

    return read


def _modify_instance_attribute(t: Node, reading: _Reading) -> None:
    direct = t.node("InstanceType")
    sku = None
    if direct is not None:
        sku = _type(direct, "Value") or _missing(direct, "Value")
    attribute = t.value("Attribute")
    if attribute is not None and attribute.lower() == "instancetype":
        if attribute != "instanceType":
            raise MalformedLaunch(f"Attribute {attribute} is not spelled 'instanceType'")
        if sku is not None:
            raise MalformedLaunch("the instance type is given both as InstanceType.Value and Value")
        sku = _type(t, "Value") or _missing(t, "Value")
    if sku is not None:
        reading.add(sku, 1)


def _create_launch_template(t: Node, reading: _Reading) -> None:
    data = t.node("LaunchTemplateData")
    if data is None:
        return  # a version copied from a judged one, or no template at all
    if "InstanceRequirements" in data:
        reading.unresolved.append("the launch template selects types by InstanceRequirements")
    sku = _type(data, "InstanceType")
    if sku is not None:
        reading.add(sku, 0)  # a template launches nothing, but needs a covering license
    _attachments(data, 0, reading)


def _create_capacity_reservation(t: Node, reading: _Reading) -> None:
    sku = _type(t, "InstanceType")
    if sku is None:
        reading.unresolved.append("CreateCapacityReservation names no InstanceType")
    else:
        reading.add(sku, _count(t, "InstanceCount") or 1)


def _by_reference(why: str) -> Callable[[Node, _Reading], None]:
    def read(_: Node, reading: _Reading) -> None:
        reading.unresolved.append(why)

    return read


# Auto Scaling speaks the same protocol (reference §1.6, §7 item 5): should an endpoint behind
# this route serve it too, group capacity is never readable from one request.
_AUTO_SCALING: Final = (
    "CreateAutoScalingGroup", "UpdateAutoScalingGroup", "SetDesiredCapacity",
    "PutScheduledUpdateGroupAction", "BatchPutScheduledUpdateGroupAction", "ExecutePolicy",
    "PutWarmPool", "StartInstanceRefresh", "AttachInstances", "CreateLaunchConfiguration",
    "PutScalingPolicy", "RollbackInstanceRefresh",
)  # fmt: skip
_READERS: Final[Mapping[str, Callable[[Node, _Reading], None]]] = {
    "RunInstances": _run_instances,
    "RequestSpotInstances": _request_spot_instances,
    "CreateFleet": _create_fleet,
    "RequestSpotFleet": _request_spot_fleet,
    "ModifyInstanceAttribute": _modify_instance_attribute,
    "CreateLaunchTemplate": _create_launch_template,
    "CreateLaunchTemplateVersion": _create_launch_template,
    "CreateCapacityReservation": _create_capacity_reservation,
    # Capacity named only by id or offering (reference §1.3, §1.5, §1.8, §7 items 3 and 9).
    "ModifyFleet": _by_reference("ModifyFleet changes a fleet by id"),
    "ModifySpotFleetRequest": _by_reference("ModifySpotFleetRequest changes a fleet by id"),
    "ModifyCapacityReservation": _by_reference("ModifyCapacityReservation changes one by id"),
    "CreateCapacityReservationFleet": _by_reference("a capacity reservation fleet"),
    "ModifyCapacityReservationFleet": _by_reference("a capacity reservation fleet changed by id"),
    "PurchaseCapacityBlock": _by_reference("a capacity block bought by offering id"),
    "AllocateHosts": _by_reference("dedicated hosts hold an unknown number of instances"),
    "RunScheduledInstances": _by_reference("scheduled instances launched by id"),
    "PurchaseScheduledInstances": _by_reference("scheduled capacity bought by id"),
    "ImportInstance": _by_reference("an imported instance"),
    **{
        action: _by_reference(f"Auto Scaling {action} sets group capacity")
        for action in _AUTO_SCALING
    },
    "DetachInstances": _keeps_capacity("DetachInstances"),
    "EnterStandby": _keeps_capacity("EnterStandby"),
}
_FOLDED_ACTIONS: Final = frozenset(action.lower() for action in _READERS)
# Every name part the readers look at; a part spelled otherwise in case is malformed.
_READ_PARTS: Final = (
    "Action", "InstanceType", "MinCount", "MaxCount", "LaunchTemplate", "ElasticGpuSpecification",
    "ElasticInferenceAccelerator", "Type", "Count", "InstanceCount", "LaunchSpecification",
    "TargetCapacitySpecification", "TotalTargetCapacity", "OnDemandTargetCapacity",
    "SpotTargetCapacity", "TargetCapacityUnitType", "LaunchTemplateConfigs", "Overrides",
    "InstanceRequirements", "WeightedCapacity", "SpotFleetRequestConfig", "TargetCapacity",
    "LaunchSpecifications", "Attribute", "Value", "LaunchTemplateData", "ClientToken",
    "SpotOptions", "MaintenanceStrategies", "SpotMaintenanceStrategies", "CapacityRebalance",
    "ReplacementStrategy", "ShouldDecrementDesiredCapacity",
)  # fmt: skip
_FOLDED_PARTS: Final = {part.lower(): part for part in _READ_PARTS}


def _refuse_case_variants(params: Mapping[str, str]) -> None:
    """A name part that differs only in case from one the dialect reads is malformed:
    EC2 names are case-sensitive, but a backend or proxy that folds case would launch."""
    for name in params:
        for part in name.split("."):
            expected = _FOLDED_PARTS.get(part.lower())
            if expected is not None and part != expected:
                raise MalformedLaunch(f"parameter {name}: {part!r} is not spelled {expected!r}")


# Bounds on the work of one second reading, past which a request has no one meaning it can
# read in time (a request of 1 MiB could otherwise hold the event loop for a second).
_MAX_ESCAPES: Final = 4096  # percent signs in the query, or in the body
_MAX_CANDIDATES: Final = 64  # parameters that could be an Action, per decoding
_MAX_PART: Final = 512  # longer, the value of a parameter read as Action is malformed
# Longer, a text with escaped separators is not decoded again and again (found in review: one
# escape nested 8 deep before 1 MiB of filler took 0.5-0.65 s).
_MAX_DECODED: Final = 64 * 1024
# A parameter whose name could be "Action": holds it, or an escape; and a separator or "=" that
# one more decoding would make (an upstream that decodes before it splits). Searched in the
# folded text, where a dotless i or a Kelvin sign is already ASCII.
# (The look-ahead and the possessive quantifiers keep the search linear in the text's length.)
_CANDIDATE = re.compile(r"(?:^|[&;])(?=[^&;=]*(?:action|%))([^&;=]*+)=([^&;]*+)")
_HIDDEN_SEPARATOR = re.compile(r"%(?:25|26|3b|3d)")
_ACTION_NAME: Final = frozenset({"action"})
# Every launch Action squashed (folded, letters and digits only), to its name.
_SQUASHED: Final = {squash(action): action for action in _READERS}


def _decoded(text: str) -> str:
    """``text`` percent-decoded (``+`` as a space, ``%uXXXX`` too) until it no longer changes,
    at most ``DECODINGS`` times: as the most lenient upstream may read a name or a value."""
    return decoded(text, lambda once: decode_u_escapes(unquote_plus(once)))


def _reads_as_action(name: str) -> bool:
    """Whether some framework reads the parameter ``name`` as ``Action``: decoded, cut at a
    NUL, as a form's names are read (``forms.reads_as_field``: ``[Action]`` and ``Action[]``
    with qs, ``Action]`` with Rack, a padded ``Action`` with PHP; found in review, each
    launched p5.48xlarges where the gateway read no Action), and after a dot (``req.Action``
    with qs's ``allowDots``, ``request.Action`` with ASP.NET's model binding)."""
    return reads_as_field(_decoded(name).partition("\x00")[0], _ACTION_NAME, dotted=True)


def _action_named(value: str) -> str | None:
    """The launch Action that the value of a parameter read as ``Action`` names, or None:
    decoded, folded, with all but letters and digits dropped (a value padded with blanks that
    an upstream trims, ``run_instances``), cut at a NUL or not. MalformedLaunch for a value
    too long to be an Action's but for padding (found in review: 171 "%20" before
    RunInstances, trimmed as Laravel trims every value)."""
    if len(value) > _MAX_PART:
        raise MalformedLaunch(
            f"under an EC2 mount, a parameter read as Action has a value over {_MAX_PART}"
            " characters"
        )
    value = _decoded(value)
    return _SQUASHED.get(squash(value)) or _SQUASHED.get(squash(value.partition("\x00")[0]))


def _launch_actions_in(text: str) -> tuple[str | None, int, int]:
    """The first launch Action named in ``text`` by a parameter some upstream reads as
    ``Action`` (``_reads_as_action``, ``_action_named``), how many such parameters name one,
    and how many are read as ``Action`` whatever their value, in the reading that finds the
    most: split on ``&`` or ``;`` and then decoded, or decoded first and then split, once or
    several times over. MalformedLaunch when that would take too long."""
    if text.count("%") > _MAX_ESCAPES:
        raise MalformedLaunch(
            "under an EC2 mount, a query or body with more than"
            f" {_MAX_ESCAPES} percent-escapes cannot be read for an EC2 Action in time"
        )
    first: str | None = None
    most = most_names = 0
    for _ in range(DECODINGS):
        folded = fold_case(text)
        hidden = _HIDDEN_SEPARATOR.search(folded) is not None
        if "=" not in folded and not hidden:  # no parameter, now or after decoding
            break
        found = names = 0
        for n, match in enumerate(_CANDIDATE.finditer(folded)):
            if n >= _MAX_CANDIDATES:
                raise MalformedLaunch(
                    f"under an EC2 mount, more than {_MAX_CANDIDATES} parameters could be an"
                    " EC2 Action"
                )
            name, value = match.groups()
            if not _reads_as_action(name):
                continue
            names += 1
            action = _action_named(value)
            if action is not None:
                first = first or action
                found += 1
        most, most_names = max(most, found), max(most_names, names)
        if not hidden:
            break
        if len(text) > _MAX_DECODED:
            raise MalformedLaunch(
                f"under an EC2 mount, a query or body over {_MAX_DECODED} characters with escaped"
                " separators cannot be read for an EC2 Action in time"
            )
        text = unquote_plus(text)
    return first, most, most_names


_READ_FIELDS: Final = frozenset(squash(part) for part in _READ_PARTS)
_MAX_COOKIES: Final = 1000


def _cookies(request: LaunchRequest) -> str:
    """The request's ``Cookie`` headers as one text of ``;``-separated pairs."""
    return "; ".join(request.headers.getall("Cookie", []))


def _refuse_cookie_parameters(request: LaunchRequest) -> None:
    """MalformedLaunch for a launch call carrying a cookie whose name some upstream reads as a
    parameter this dialect judges (``InstanceType``, ``MaxCount``, ``LaunchTemplateConfigs``...):
    PHP's ``$_REQUEST`` (with no ``request_order``, as PHP's images ship) and System.Web's
    ``Request[...]`` read cookies among the parameters, the cookie winning (found in review: a
    judged g4dn.xlarge x 1 launched p5.48xlarge x 8). EC2 and its SDKs send no cookies."""
    pairs = _cookies(request).split(";")
    if len(pairs) > _MAX_COOKIES:
        raise MalformedLaunch(f"a launch call with more than {_MAX_COOKIES} cookies")
    for pair in pairs:
        name = _decoded(pair.partition("=")[0]).partition("\x00")[0].strip()
        if name and reads_as_field(name, _READ_FIELDS):
            raise MalformedLaunch(
                f"cookie {name[:64]!r} reads as a parameter of the launch to some servers"
            )


def _launch_actions(request: LaunchRequest) -> tuple[str | None, int, int]:
    """``_launch_actions_in`` over the request's query, its body when an upstream reads it as a
    form (``forms.read_as_form``), and its cookies: the first launch Action named, how many
    values name one, and how many parameters are read as ``Action`` whatever their value. An
    ``X-Amz-Target`` header counts as a parameter read as ``Action``, and names the launch its
    last dotted part names: an upstream built on a generic AWS framework takes the operation
    from it when no ``Action`` parameter names one (as moto's server does), under any name a
    CGI-style server reads as it (found in review: gunicorn gave moto "X_Amz_Target")."""
    # The cookies as one text, read within one budget (found in review: 120 Cookie headers of
    # nested escapes, each read alone, held the event loop for a third of a second).
    texts = [request.query, _cookies(request)]
    if read_as_form(request.headers.getall("Content-Type", [])):
        # As UTF-8 (found in review: a raw "Act\u0131on", which .NET folds to "ACTION", read as
        # Latin-1 was "Act\u00c4\u00b1on", and went unread); no Latin-1 character folds to ASCII.
        texts.append(request.body.decode("utf-8", "replace"))
    first: str | None = None
    named = action_names = 0
    for text in texts:
        action, count, names = _launch_actions_in(text)
        first, named, action_names = first or action, named + count, action_names + names
    targets = (v for k, v in request.headers.items() if as_variable(k) == "x-amz-target")
    for target in targets:
        action_names += 1
        action = _SQUASHED.get(squash(_decoded(target).rpartition(".")[2]))
        if action is not None:
            first, named = first or action, named + 1
    return first, named, action_names


def _names_no_launch(path: str) -> bool:
    """Whether ``path`` names no launch Action anywhere, as an upstream that routes operations
    by path could read one: decoded, folded, with all but letters and digits dropped, the
    whole path holds no launch Action's name (coarser than any router: found in review, Jetty
    cut "RunInstances;x=1" to "RunInstances", as Rails and Spring cut ".json")."""
    whole = squash(_decoded(path))
    return not any(action in whole for action in _SQUASHED)


def _form_body(request: LaunchRequest) -> str | None:
    """The form body of a POST as text (None for a GET); malformed when it is anything else."""
    require_identity_encoding(request.headers)
    if request.method != "POST":
        if request.body:
            raise MalformedLaunch(f"a {request.method} request with a body")
        return None
    types = request.headers.getall("Content-Type", [])
    if not request.body and not types:
        return None
    if len(types) != 1 or not _is_form(types[0]):
        raise MalformedLaunch(f"an EC2 POST body must be {FORM} (UTF-8)")
    try:
        return request.body.decode("ascii")
    except UnicodeDecodeError:
        raise MalformedLaunch("form body holds bytes that are not percent-encoded") from None


def _is_form(content_type: str) -> bool:
    media, *options = (part.strip().lower() for part in content_type.split(";"))
    return media == FORM and all(o.replace('"', "") == "charset=utf-8" for o in options)


def _host_region(request: LaunchRequest) -> str | None:
    """The region of an ``ec2.<region>.amazonaws.com`` Host (``ec2.amazonaws.com``: us-east-1)."""
    hosts = request.headers.getall("Host", [])
    if len(hosts) != 1:
        return None
    host, _, port = hosts[0].strip().lower().rpartition(":")
    if not (host and port.isdigit()):
        host = hosts[0].strip().lower()
    if host == "ec2.amazonaws.com":
        return "us-east-1"
    match = _HOST.fullmatch(host)
    return match.group("region") if match else None


def build(table: Mapping[str, Any], where: str) -> AwsEc2:
    """The ``aws-ec2`` route of ``table``; ConfigError names ``where`` and the key at fault."""
    check_keys(table, _KEYS, where, "aws-ec2")
    return AwsEc2(path=route_path(table, where, "/"), region=route_region(table, where))
