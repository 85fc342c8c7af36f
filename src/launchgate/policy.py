"""The decision table of CONTRACT section 3, as pure functions over facts.

``decide`` applies rows 2-17 (row 1, a malformed body, is the dialect's verdict and
enters through ``malformed``); the ledger rows 18-21 need I/O, so the shell reserves
and hands the result to ``after_reservation`` (or ``store_unavailable``).
A denial is an outcome, never an exception.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Literal

from launchgate.catalog import Catalog
from launchgate.config import Config
from launchgate.dialects import Launch
from launchgate.errors import TokenError
from launchgate.ledger import LicenseState, ReserveOutcome, ReserveResult
from launchgate.tokens import License, peek

TITLES: Mapping[str, str] = {
    "malformed_request": "Malformed launch request",
    "missing_account": "Missing account",
    "unknown_account": "Unknown account",
    "unknown_sku": "Unknown SKU",
    "unresolvable_launch": "Unresolvable launch",
    "license_required": "License required",
    "token_invalid": "Invalid license token",
    "token_unknown_key": "Unknown signing key",
    "token_expired": "License token expired",
    "token_not_yet_valid": "License token not yet valid",
    "token_wrong_issuer": "License token from an untrusted issuer",
    "token_wrong_audience": "License token for another audience",
    "token_account_mismatch": "License token for another account",
    "token_sku_not_covered": "SKU not covered by the license",
    "token_region_not_covered": "Region not covered by the license",
    "store_unavailable": "License ledger unavailable",
    "license_revoked": "License revoked",
    "license_exhausted": "License exhausted",
    "body_too_large": "Request body too large",
    "upstream_unavailable": "Upstream unavailable",
    "upstream_timeout": "Upstream timeout",
    "idempotency_conflict": "Idempotency key reused with another request",
}


@dataclass(frozen=True, slots=True)
class ItemFacts:
    """One launch item with what the catalog says of its SKU (None where unknown)."""

    sku: str
    count: int
    accelerator: str | None
    per_instance: int
    eccn: str | None
    controlled: bool | None  # None: SKU not in the catalog

    @property
    def accelerators(self) -> int | None:
        return None if self.controlled is None else self.count * self.per_instance

    def as_record(self) -> dict[str, object]:
        return {
            "sku": self.sku,
            "count": self.count,
            "accelerator": self.accelerator,
            "accelerators": self.accelerators,
            "eccn": self.eccn,
            "controlled": self.controlled,
        }


@dataclass(frozen=True, slots=True)
class LicenseRef:
    """What a decision record says of the presented license (never the token itself)."""

    jti: str | None
    kid: str | None
    iss: str | None


@dataclass(frozen=True, slots=True)
class Decision:
    outcome: Literal["allow", "deny"]
    reason: str
    status: int | None  # the HTTP status of a denial
    detail: str
    account: str | None = None
    restricted: bool | None = None
    items: tuple[ItemFacts, ...] = ()
    deciding: ItemFacts | None = None
    region: str | None = None
    license_ref: LicenseRef | None = None
    license: License | None = None
    reserve: int = 0  # accelerators a licensed launch reserves

    @property
    def allowed(self) -> bool:
        return self.outcome == "allow"


def verdict(base: Decision, reason: str, status: int | None, detail: str) -> Decision:
    """``base``'s facts with this outcome: allowed when ``status`` is None, else denied."""
    outcome: Literal["allow", "deny"] = "allow" if status is None else "deny"
    return replace(base, outcome=outcome, reason=reason, status=status, detail=detail)


def classify_items(
    launch: Launch, catalog: Catalog, controlled_eccns: frozenset[str]
) -> tuple[ItemFacts, ...]:
    facts = []
    for item in launch.items:
        sku = catalog.sku(item.sku, fold_case=item.fold_case)
        if sku is None:
            facts.append(ItemFacts(item.sku, item.count, None, 0, None, None))
            continue
        acc = sku.accelerator
        eccn = acc.eccn if acc is not None else None
        controlled = eccn is not None and eccn in controlled_eccns
        name = acc.name if acc is not None else None
        # The catalog's spelling: the token is checked and the record written with it.
        per = sku.accelerators_per_instance
        facts.append(ItemFacts(sku.name, item.count, name, per, eccn, controlled))
    return tuple(facts)


def malformed(detail: str, account: str | None, token: str | None = None) -> Decision:
    """Row 1: the body is not what the dialect expects."""
    return refused("malformed_request", 400, detail, account, token)


def refused(
    reason: str, status: int, detail: str, account: str | None, token: str | None
) -> Decision:
    """A denial before the decision table looks at the launch (row 1, an oversized body); the
    token, when one was presented, is recorded as presented."""
    ref = None if not token else _license_ref(token, None)
    return Decision("deny", reason, status, detail, account=account, license_ref=ref)


def _license_ref(token: str, license: License | None) -> LicenseRef:
    if license is not None:
        return LicenseRef(license.jti, license.kid, license.iss)
    header, claims = peek(token)

    def text(part: Mapping[str, object] | None, key: str) -> str | None:
        value = part.get(key) if part else None
        return value[:200] if isinstance(value, str) else None

    return LicenseRef(text(claims, "jti"), text(header, "kid"), text(claims, "iss"))


def decide(
    launch: Launch,
    account_id: str | None,
    token: str | None,
    config: Config,
    verify: Callable[[str], License],
) -> Decision:
    """Rows 2-17 of the decision table, for each item in turn: the first item that denies
    decides (CONTRACT section 9, "Items"; found by QA: the rows were applied across all items
    at once, so a later item's unknown SKU outranked an earlier item's missing license).

    A launch that cannot be resolved to SKUs, in whole or in part (row 6b), is denied so where
    row 6 stands (CONTRACT section 9) for its first item that rows 3-5 let through, or, when
    none is, after them all: an unknown SKU comes first (found in review: it had lost to row
    6b), a missing license after. When no part denies, the launch is
    ``licensed`` (reserving count x accelerators over its controlled items) if a license was
    needed, else allowed as its deciding item says: the first controlled item, else the first
    that row 3 does not allow. Rows 18-21 need the ledger: see ``after_reservation``.

    ``verify`` checks a token's signature and rows 8-14, raising TokenError; it is called at
    most once, and only when a restricted account launches something controlled.
    """
    items = classify_items(launch, config.catalog, config.controlled_eccns)
    controlled = [i for i in items if i.controlled]
    # The facts gathered so far; each row's verdict is one Decision built from them.
    deciding = items[0] if items else None
    restricted: bool | None = None
    license: License | None = None
    license_ref: LicenseRef | None = None

    def judged(reason: str, status: int | None, detail: str, reserve: int = 0) -> Decision:
        nonlocal license_ref
        if license_ref is None and token:  # decided before the token rows: as presented
            license_ref = _license_ref(token, None)
        return Decision(
            "allow" if status is None else "deny",
            reason,
            status,
            detail,
            account=account_id,
            restricted=restricted,
            items=items,
            deciding=deciding,
            region=launch.region,
            license_ref=license_ref,
            license=license,
            reserve=reserve,
        )

    if not account_id:
        return judged("missing_account", 400, "the request carries no account id")
    account = config.accounts.get(account_id)
    # Known before row 3 decides, so its record says whether the account is restricted.
    restricted = None if account is None else config.jurisdictions.is_restricted(account)

    unresolved = launch.unresolvable is not None or not items
    # The items, then (None) what cannot be resolved: judged there when no item reached row 6b.
    parts: list[ItemFacts | None] = [*items, None] if unresolved else list(items)
    first_judged: ItemFacts | None = None  # the first part row 3 does not allow
    for part in parts:
        if part is not None and part.controlled is False:
            continue  # row 3
        if part is not None:
            deciding = part
            first_judged = first_judged or part
        elif controlled:
            deciding = controlled[0]
        if account is None:
            return judged("unknown_account", 403, f"account {account_id!r} is not in the registry")
        if not restricted:
            continue  # row 4
        if part is not None and part.controlled is None:
            return judged("unknown_sku", 403, f"SKU {part.sku!r} is not in the catalog")
        if part is None or launch.unresolvable is not None:  # row 6b, where row 6 stands
            why = launch.unresolvable or "the launch names no SKU"
            return judged("unresolvable_launch", 403, f"cannot tell what this launch starts: {why}")
        if not token:
            countries = ", ".join(config.jurisdictions.restricted_countries_of(account))
            needs = f"{part.sku} needs a license token"
            detail = f"account {account_id} is restricted ({countries}); {needs}"
            return judged("license_required", 403, detail)
        if license is None:
            try:
                license = verify(token)
            except TokenError as e:
                return judged(e.reason, 403, e.detail)
            license_ref = _license_ref(token, license)
        jti = license.jti
        if license.sub != account_id:
            return judged("token_account_mismatch", 403, f"license {jti} is for another account")
        if part.sku not in license.skus:
            return judged(
                "token_sku_not_covered", 403, f"license {jti} does not cover SKU {part.sku}"
            )
        if license.regions is not None and launch.region not in license.regions:
            where = f"region {launch.region}" if launch.region else "a launch without a region"
            return judged("token_region_not_covered", 403, f"license {jti} does not cover {where}")

    deciding = controlled[0] if controlled else first_judged or (items[0] if items else None)
    if license is not None:
        needed = sum(i.count * i.per_instance for i in controlled)
        return judged("licensed", None, f"licensed by {license.jti}", reserve=needed)
    if first_judged is None and not unresolved:
        return judged("sku_not_controlled", None, "no controlled accelerator")
    return judged("account_not_restricted", None, "account is not in a restricted jurisdiction")


def store_unavailable(decision: Decision) -> Decision:
    """Row 18: the ledger cannot be reached; fail closed."""
    return verdict(decision, "store_unavailable", 503, "the license ledger cannot be reached")


def within_token(result: ReserveResult, max_accelerators: int) -> ReserveResult:
    """``result`` held to the presenting token's own ``max_accelerators`` as well as the
    ledger's. The ledger keeps the quantity of the first token it saw for a jti; a token
    re-issued under that jti with a smaller one is held to it (found by QA: a token for 4
    launched 12 against a first token's 64). A reservation past it reads as EXHAUSTED, as if
    not made (the caller gives it back)."""
    if result.outcome is not ReserveOutcome.RESERVED:
        return result
    if result.used + result.reserved <= max_accelerators:
        return result
    return replace(
        result,
        outcome=ReserveOutcome.EXHAUSTED,
        max_accelerators=min(result.max_accelerators, max_accelerators),
        reserved=result.reserved - result.requested,
    )


def after_reservation(
    decision: Decision, result: ReserveResult, *, replay_sent_on: bool = True
) -> Decision:
    """Rows 19-21 from the ledger's answer to the reservation of a licensed launch.

    With an idempotency key the ledger may also answer that the key belongs to another
    request or to a first attempt still in flight (409 ``idempotency_conflict``), or that
    this is a retry of a launch already counted: it stays ``licensed``, reserving 0, when
    the upstream deduplicates on the key (``replay_sent_on``); else it is 409 as well, for
    sent on it would launch again, uncounted.
    """
    jti = decision.license.jti if decision.license else "?"
    outcome = result.outcome
    if outcome is ReserveOutcome.REVOKED:
        return verdict(decision, "license_revoked", 403, f"license {jti} has been revoked")
    if outcome is ReserveOutcome.OTHER_ACCOUNT:
        # Row 15 as the ledger sees it. The other account is not named: the answer goes to
        # the caller, and the decision record keeps the token's license fields.
        detail = (
            f"license {jti} is on record for another account; a license id (jti) names one"
            " license, so this token cannot draw on it"
        )
        return verdict(decision, "token_account_mismatch", 403, detail)
    if outcome is ReserveOutcome.EXHAUSTED:
        detail = (
            f"license {jti} has {result.remaining} of {result.max_accelerators} accelerators left; "
            f"this launch needs {result.requested}"
        )
        return verdict(decision, "license_exhausted", 403, detail)
    if outcome is ReserveOutcome.CONFLICT:
        detail = (
            f"the idempotency key was used by decision {result.replay_of} for a different"
            " request; use a new key for a new launch"
        )
        return verdict(decision, "idempotency_conflict", 409, detail)
    if outcome is ReserveOutcome.IN_PROGRESS:
        detail = (
            f"the first attempt with this idempotency key (decision {result.replay_of}) is still"
            " in progress; retry once it has completed"
        )
        return verdict(decision, "idempotency_conflict", 409, detail)
    if outcome is ReserveOutcome.REPLAYED and not replay_sent_on:
        detail = (
            f"decision {result.replay_of} was counted under this idempotency key; the upstream"
            " is not known to deduplicate on it, so a retry is not sent again (it would launch"
            " again, uncounted)"
        )
        return verdict(decision, "idempotency_conflict", 409, detail)
    if outcome is ReserveOutcome.REPLAYED:
        detail = f"{decision.detail}; a retry of decision {result.replay_of}, counted once"
        return replace(decision, detail=detail, reserve=0)
    return decision


def with_ledger_state(decision: Decision, state: LicenseState | None) -> Decision:
    """Rows 19-21 judged from the ledger's view of the license, reserving nothing (``decide``)."""
    license = decision.license
    if license is None:
        return decision
    # The ledger keeps the first token's quantity for a jti; a token re-issued under it with a
    # smaller one is held to that too, as the gateway holds it (``within_token``; found by
    # review: `decide` said licensed where the gateway said license_exhausted).
    maximum = license.max_accelerators
    if state and state.max_accelerators is not None:
        maximum = min(maximum, state.max_accelerators)
    used, reserved = (state.used, state.reserved) if state else (0, 0)
    if state and state.revoked:
        outcome = ReserveOutcome.REVOKED
    elif state and state.account is not None and state.account != license.sub:
        outcome = ReserveOutcome.OTHER_ACCOUNT
    elif used + reserved + decision.reserve > maximum:
        outcome = ReserveOutcome.EXHAUSTED
    else:
        outcome = ReserveOutcome.RESERVED
    return after_reservation(
        decision, ReserveResult(outcome, maximum, used, reserved, decision.reserve)
    )
