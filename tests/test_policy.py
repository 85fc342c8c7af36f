"""The decision table (CONTRACT section 3) as a pure function, row by row."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from conftest import CPU_SKU, H100_SKU, RESTRICTED, UNRESTRICTED, Keys, write_config
from launchgate.config import Config, load_config
from launchgate.dialects import Item, Launch
from launchgate.errors import TokenError
from launchgate.ledger import LicenseState, ReserveOutcome, ReserveResult
from launchgate.policy import (
    after_reservation,
    decide,
    malformed,
    store_unavailable,
    with_ledger_state,
    within_token,
)
from launchgate.tokens import License

A100_SKU = "p4d.24xlarge"  # 8x A100 40GB


@pytest.fixture
def config(tmp_path: Path, keys: Keys) -> Config:
    return load_config(write_config(tmp_path, "http://127.0.0.1:9", keys))


def lic(**changes: object) -> License:
    fields: dict[str, object] = {
        "jti": "lic-1",
        "sub": RESTRICTED,
        "iss": "compliance.example-cloud",
        "aud": ("launchgate",),
        "iat": 0.0,
        "exp": 2e9,
        "nbf": None,
        "skus": (H100_SKU,),
        "max_accelerators": 64,
        "regions": None,
        "license_ref": None,
        "kid": "k-ed",
        "alg": "EdDSA",
    }
    fields.update(changes)
    return License(**fields)  # type: ignore[arg-type]  # test factory over the dataclass fields


def verifier(result: License | TokenError) -> Callable[[str], License]:
    def verify(token: str) -> License:
        if isinstance(result, TokenError):
            raise result
        return result

    return verify


def never(token: str) -> License:
    raise AssertionError("the token must not be verified for this launch")


def one(sku: str = H100_SKU, count: int = 1, region: str | None = "us-east-1") -> Launch:
    return Launch((Item(sku, count),), region)


@pytest.mark.parametrize(
    ("launch", "account", "token", "verify", "outcome", "reason", "status"),
    [
        (one(), None, None, never, "deny", "missing_account", 400),
        (one(), "", "t", never, "deny", "missing_account", 400),
        (one(CPU_SKU), RESTRICTED, None, never, "allow", "sku_not_controlled", None),
        (one(CPU_SKU), "acct-nobody", None, never, "allow", "sku_not_controlled", None),
        (one(), UNRESTRICTED, None, never, "allow", "account_not_restricted", None),
        (one("x9.unknown"), UNRESTRICTED, None, never, "allow", "account_not_restricted", None),
        (one(), "acct-nobody", None, never, "deny", "unknown_account", 403),
        (one("x9.unknown"), RESTRICTED, "t", never, "deny", "unknown_sku", 403),
        (
            Launch((), None, "launch template without a type"),
            RESTRICTED,
            "t",
            never,
            "deny",
            "unresolvable_launch",
            403,
        ),
        (
            Launch((), None, "opaque route"),
            "acct-nobody",
            None,
            never,
            "deny",
            "unknown_account",
            403,
        ),
        (
            Launch((), None, "opaque route"),
            UNRESTRICTED,
            None,
            never,
            "allow",
            "account_not_restricted",
            None,
        ),
        (one(), RESTRICTED, None, never, "deny", "license_required", 403),
        (
            one(),
            RESTRICTED,
            "t",
            verifier(TokenError("token_invalid", "x")),
            "deny",
            "token_invalid",
            403,
        ),
        (
            one(),
            RESTRICTED,
            "t",
            verifier(TokenError("token_unknown_key", "x")),
            "deny",
            "token_unknown_key",
            403,
        ),
        (
            one(),
            RESTRICTED,
            "t",
            verifier(TokenError("token_expired", "x")),
            "deny",
            "token_expired",
            403,
        ),
        (
            one(),
            RESTRICTED,
            "t",
            verifier(TokenError("token_not_yet_valid", "x")),
            "deny",
            "token_not_yet_valid",
            403,
        ),
        (
            one(),
            RESTRICTED,
            "t",
            verifier(TokenError("token_wrong_issuer", "x")),
            "deny",
            "token_wrong_issuer",
            403,
        ),
        (
            one(),
            RESTRICTED,
            "t",
            verifier(TokenError("token_wrong_audience", "x")),
            "deny",
            "token_wrong_audience",
            403,
        ),
        (
            one(),
            RESTRICTED,
            "t",
            verifier(lic(sub="acct-2002")),
            "deny",
            "token_account_mismatch",
            403,
        ),
        (one(A100_SKU), RESTRICTED, "t", verifier(lic()), "deny", "token_sku_not_covered", 403),
        (
            one(region="eu-west-1"),
            RESTRICTED,
            "t",
            verifier(lic(regions=("us-east-1",))),
            "deny",
            "token_region_not_covered",
            403,
        ),
        (
            one(region=None),
            RESTRICTED,
            "t",
            verifier(lic(regions=("us-east-1",))),
            "deny",
            "token_region_not_covered",
            403,
        ),
        (one(), RESTRICTED, "t", verifier(lic(regions=("us-east-1",))), "allow", "licensed", None),
        (one(), RESTRICTED, "t", verifier(lic()), "allow", "licensed", None),
    ],
)
def test_decision_table(
    config: Config,
    launch: Launch,
    account: str | None,
    token: str | None,
    verify: Callable[[str], License],
    outcome: str,
    reason: str,
    status: int | None,
) -> None:
    """Each row of the table gives its outcome, reason and status; earlier rows win."""
    decision = decide(launch, account, token, config, verify)
    assert (decision.outcome, decision.reason, decision.status) == (outcome, reason, status)
    assert decision.detail


@pytest.mark.parametrize(
    ("account", "restricted"), [(RESTRICTED, True), (UNRESTRICTED, False), ("acct-nobody", None)]
)
def test_a_launch_of_nothing_controlled_still_says_whether_the_account_is_restricted(
    config: Config, account: str, restricted: bool | None
) -> None:
    """Row 3 allows before the account matters, but its record tells a compliance officer
    whether the account is restricted (null only for an account the registry lacks)."""
    decision = decide(one(CPU_SKU), account, None, config, never)
    assert (decision.reason, decision.restricted) == ("sku_not_controlled", restricted)


def test_malformed_is_row_one() -> None:
    """Row 1 is a 400 whatever else the request says."""
    decision = malformed("bad JSON", RESTRICTED)
    assert (decision.outcome, decision.reason, decision.status) == (
        "deny",
        "malformed_request",
        400,
    )


def test_licensed_reserves_count_times_accelerators(config: Config) -> None:
    """A licensed launch reserves count x accelerators_per_instance over controlled items."""
    launch = Launch((Item(H100_SKU, 3), Item(CPU_SKU, 5), Item(A100_SKU, 0)), "us-east-1")
    decision = decide(launch, RESTRICTED, "t", config, verifier(lic(skus=(H100_SKU, A100_SKU))))
    assert (decision.reason, decision.reserve) == ("licensed", 24)
    assert decision.deciding is not None and decision.deciding.sku == H100_SKU
    assert [i.accelerators for i in decision.items] == [24, 0, 0]


def test_first_denying_item_decides(config: Config) -> None:
    """Every controlled item needs the token; the first uncovered one is the deciding item."""
    launch = Launch((Item(H100_SKU, 1), Item(A100_SKU, 0)), None)
    decision = decide(launch, RESTRICTED, "t", config, verifier(lic()))
    assert decision.reason == "token_sku_not_covered"
    assert decision.deciding is not None and decision.deciding.sku == A100_SKU


def test_unknown_sku_among_items_denies(config: Config) -> None:
    """An item outside the catalog denies a restricted launch even beside known ones."""
    launch = Launch((Item(CPU_SKU, 1), Item("x9.unknown", 1)), None)
    decision = decide(launch, RESTRICTED, None, config, never)
    assert decision.reason == "unknown_sku"


@pytest.mark.parametrize(
    ("items", "account", "token", "reason", "deciding"),
    [
        # The first item denies (row 7) before the second does (row 6).
        ((H100_SKU, "x9.unknown"), RESTRICTED, None, "license_required", H100_SKU),
        ((A100_SKU, "x9.unknown"), RESTRICTED, "t", "token_sku_not_covered", A100_SKU),
        ((CPU_SKU, "x9.unknown"), RESTRICTED, None, "unknown_sku", "x9.unknown"),
        # An item row 3 allows is passed over: the one that denies is the deciding item.
        ((CPU_SKU, "x9.unknown"), "acct-nobody", None, "unknown_account", "x9.unknown"),
        ((CPU_SKU, H100_SKU), "acct-nobody", None, "unknown_account", H100_SKU),
        ((CPU_SKU, "x9.unknown"), UNRESTRICTED, None, "account_not_restricted", "x9.unknown"),
        ((CPU_SKU, H100_SKU), UNRESTRICTED, None, "account_not_restricted", H100_SKU),
    ],
)
def test_each_item_is_judged_in_turn_and_the_first_that_denies_decides(
    config: Config,
    items: tuple[str, ...],
    account: str,
    token: str | None,
    reason: str,
    deciding: str,
) -> None:
    """CONTRACT section 9: every item is judged; the first item that denies decides, and is the
    record's deciding item. Found by QA: the rows were applied across all items at once, so
    CreateFleet overrides (p5.48xlarge, an unknown type) from a restricted account without a
    token were unknown_sku, and an unknown account's record named an item allowed on its own."""
    launch = Launch(tuple(Item(sku, 1) for sku in items), "us-east-1")
    decision = decide(launch, account, token, config, verifier(lic()))
    assert decision.reason == reason
    assert decision.deciding is not None and decision.deciding.sku == deciding


def test_the_token_is_verified_once_for_all_items(config: Config) -> None:
    """However many controlled items a launch has, its token is verified once."""
    calls: list[str] = []

    def verify(token: str) -> License:
        calls.append(token)
        return lic(skus=(H100_SKU, A100_SKU))

    launch = Launch((Item(H100_SKU, 1), Item(A100_SKU, 2), Item(H100_SKU, 0)), None)
    decision = decide(launch, RESTRICTED, "t", config, verify)
    assert (decision.reason, decision.reserve, calls) == ("licensed", 24, ["t"])


def test_what_cannot_be_resolved_is_judged_where_row_6_stands(config: Config) -> None:
    """A launch the gateway cannot resolve in part is unresolvable_launch right after row 6 for
    its first item that rows 3-5 let through: an unknown SKU is unknown_sku (found in review:
    it had become unresolvable), a controlled item unresolvable_launch before any token row."""
    why = "a launch template by reference"
    unknown = Launch((Item("x9.unknown", 1), Item(H100_SKU, 1)), None, unresolvable=why)
    assert decide(unknown, RESTRICTED, None, config, never).reason == "unknown_sku"
    launch = Launch((Item(CPU_SKU, 1), Item(H100_SKU, 1)), None, unresolvable=why)
    decision = decide(launch, RESTRICTED, None, config, never)
    assert (decision.reason, decision.deciding and decision.deciding.sku) == (
        "unresolvable_launch",
        H100_SKU,
    )
    uncontrolled = Launch((Item(CPU_SKU, 1),), None, unresolvable=why)
    assert decide(uncontrolled, RESTRICTED, None, config, never).reason == "unresolvable_launch"
    assert decide(launch, UNRESTRICTED, None, config, never).reason == "account_not_restricted"
    assert decide(launch, "acct-nobody", None, config, never).reason == "unknown_account"


def test_ledger_rows(config: Config) -> None:
    """Rows 18-21: store down is 503; revoked and exhausted are 403; reserved stays licensed."""
    licensed = decide(one(count=2), RESTRICTED, "t", config, verifier(lic()))
    assert store_unavailable(licensed).status == 503
    revoked = after_reservation(licensed, ReserveResult(ReserveOutcome.REVOKED, 64, 0, 0, 16))
    assert (revoked.reason, revoked.status) == ("license_revoked", 403)
    exhausted = after_reservation(licensed, ReserveResult(ReserveOutcome.EXHAUSTED, 64, 56, 0, 16))
    assert (exhausted.reason, exhausted.status) == ("license_exhausted", 403)
    assert exhausted.detail == "license lic-1 has 8 of 64 accelerators left; this launch needs 16"
    assert after_reservation(
        licensed, ReserveResult(ReserveOutcome.RESERVED, 64, 0, 16, 16)
    ).allowed
    other = after_reservation(licensed, ReserveResult(ReserveOutcome.OTHER_ACCOUNT, 64, 8, 0, 16))
    assert (other.reason, other.status) == ("token_account_mismatch", 403)
    assert other.detail.startswith("license lic-1 is on record for another account")


def test_offline_ledger_view(config: Config) -> None:
    """`decide` judges rows 19-20 from the ledger's state without reserving."""
    licensed = decide(one(count=2), RESTRICTED, "t", config, verifier(lic()))

    def state(used: int, revoked: bool = False, account: str | None = RESTRICTED) -> LicenseState:
        return LicenseState("lic-1", account, 64, used, 0, revoked, None, None, 2e9, 0.0)

    assert with_ledger_state(licensed, None).reason == "licensed"
    assert with_ledger_state(licensed, state(48)).reason == "licensed"
    assert with_ledger_state(licensed, state(49)).reason == "license_exhausted"
    assert with_ledger_state(licensed, state(0, revoked=True)).reason == "license_revoked"
    assert with_ledger_state(licensed, state(0, account="acct-2002")).reason == (
        "token_account_mismatch"
    )
    assert with_ledger_state(licensed, state(0, account=None)).reason == "licensed"  # revoke-made
    # A token re-issued under the jti with a smaller quantity is held to its own, as the
    # gateway holds it (found in review: `decide` said licensed where the gateway said no).
    small = decide(one(count=2), RESTRICTED, "t", config, verifier(lic(max_accelerators=20)))
    assert with_ledger_state(small, state(0)).reason == "licensed"
    exhausted = with_ledger_state(small, state(8))
    assert (exhausted.reason, exhausted.detail) == (
        "license_exhausted",
        "license lic-1 has 12 of 20 accelerators left; this launch needs 16",
    )


def test_case_folding_items_use_the_catalog_spelling(config: Config) -> None:
    """An ARM size in other letter case is the catalog's SKU, recorded and licensed as such."""
    launch = Launch((Item("standard_nd96isr_h100_v5", 1, fold_case=True),), "eastus")
    license = lic(skus=("Standard_ND96isr_H100_v5",), regions=None)
    decision = decide(launch, RESTRICTED, "t", config, verifier(license))
    assert (decision.reason, decision.reserve) == ("licensed", 8)
    assert decision.items[0].sku == "Standard_ND96isr_H100_v5"
    strict = decide(
        Launch((Item("standard_nd96isr_h100_v5", 1),), None), RESTRICTED, "t", config, never
    )
    assert strict.reason == "unknown_sku"  # other APIs' SKU names are case-sensitive
    # ARM matches a size with a dotless i (U+0131) as .NET's OrdinalIgnoreCase does: the same
    odd = Launch((Item("STANDARD_ND96\u0131SR_H100_V5", 1, fold_case=True),), "eastus")
    assert decide(odd, RESTRICTED, "t", config, verifier(license)).reason == "licensed"


@pytest.mark.parametrize(
    ("outcome", "reason", "status", "reserve"),
    [
        (ReserveOutcome.CONFLICT, "idempotency_conflict", 409, 16),
        (ReserveOutcome.IN_PROGRESS, "idempotency_conflict", 409, 16),
        (ReserveOutcome.REPLAYED, "licensed", None, 0),
    ],
)
def test_idempotency_answers(
    config: Config, outcome: ReserveOutcome, reason: str, status: int | None, reserve: int
) -> None:
    """A reused key is 409 idempotency_conflict; a retry of a counted launch stays licensed, reserving 0."""
    licensed = decide(one(count=2), RESTRICTED, "t", config, verifier(lic()))
    result = ReserveResult(outcome, 64, 16, 0, 16, replay_of="01FIRST")
    decided = after_reservation(licensed, result)
    assert (decided.reason, decided.status, decided.reserve) == (reason, status, reserve)
    assert "01FIRST" in decided.detail


def test_a_retry_to_an_upstream_that_would_launch_again_is_refused(config: Config) -> None:
    """A retry of a counted launch that the upstream would not deduplicate is 409, not sent."""
    licensed = decide(one(count=2), RESTRICTED, "t", config, verifier(lic()))
    result = ReserveResult(ReserveOutcome.REPLAYED, 64, 16, 0, 16, replay_of="01FIRST")
    decided = after_reservation(licensed, result, replay_sent_on=False)
    assert (decided.outcome, decided.reason, decided.status) == (
        "deny",
        "idempotency_conflict",
        409,
    )
    assert "01FIRST" in decided.detail and "not sent again" in decided.detail


def test_within_token_holds_a_reservation_to_the_tokens_own_quantity() -> None:
    """Only a reservation made past the token's own max turns into EXHAUSTED, reckoned without
    itself (it is given back); anything else is left as the ledger said."""
    made = ReserveResult(ReserveOutcome.RESERVED, 64, used=8, reserved=8, requested=8)
    assert within_token(made, 64) is made and within_token(made, 16) is made
    held = within_token(made, 12)
    assert (held.outcome, held.max_accelerators, held.used, held.reserved) == (
        ReserveOutcome.EXHAUSTED,
        12,
        8,
        0,
    )
    assert held.remaining == 4
    refused = ReserveResult(ReserveOutcome.EXHAUSTED, 4, used=4, reserved=0, requested=8)
    assert within_token(refused, 64) is refused
