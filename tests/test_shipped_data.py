"""The shipped data in config/ (catalog, country groups, demo accounts) is complete and consistent.

These tests read the TOML files directly with tomllib and carry their own tiny copy of the
3A090 rule, so a bug in launchgate's loaders or classifier cannot hide a bug in the data.
"""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

CONFIG = Path(__file__).parents[1] / "config"
# CI checks out ../shared beside the repository; without it the reference cross-checks skip.
REFERENCE = Path(__file__).parents[2] / "shared" / "reference" / "accelerators.toml"

ECCNS = {"3A090.a", "3A090.b", "not-controlled"}
ACCELERATOR_KEYS = {"tpp", "die_area_mm2", "datacenter", "eccn"}
SKU_KEYS = {"accelerator", "accelerators_per_instance"}

# The shipped policy (CONTRACT section 2).
RESTRICTED_GROUPS = ("D:5",)
RESTRICTED_COUNTRIES = frozenset({"MO"})

# GCE accelerator-type names and the physical part each stands for.
GCE_ACCELERATOR_TYPES = {
    "nvidia-tesla-t4": "T4-16GB",
    "nvidia-tesla-a100": "A100-SXM4-40GB",
    "nvidia-a100-80gb": "A100-SXM4-80GB",
    "nvidia-h100-80gb": "H100-SXM5-80GB",
    "nvidia-h100-mega-80gb": "H100-SXM5-80GB",
    "nvidia-h200-141gb": "H200-SXM-141GB",
    "nvidia-b200": "B200-HGX-180GB",
    "nvidia-l4": "L4-24GB",
}


def _load(path: Path) -> dict[str, Any]:
    with path.open("rb") as f:
        return tomllib.load(f)


CATALOG = _load(CONFIG / "catalog.toml")
ACCELERATORS: dict[str, dict[str, Any]] = CATALOG["accelerators"]
SKUS: dict[str, dict[str, Any]] = CATALOG["skus"]
COUNTRY_GROUPS = _load(CONFIG / "country_groups.toml")
ACCOUNTS: dict[str, dict[str, str]] = _load(CONFIG / "accounts.toml")["accounts"]
REF: dict[str, Any] = _load(REFERENCE) if REFERENCE.is_file() else {}

_NO_REFERENCE = pytest.mark.skip(reason=f"research reference not present at {REFERENCE}")


def _reference_params(table: str) -> list[Any]:
    """One pytest param per entry of a reference table, or one skipped param if it is absent."""
    if not REF:
        return [pytest.param(None, marks=_NO_REFERENCE, id="no-reference")]
    return [pytest.param(name, id=name) for name in REF[table]]


def rule_class(tpp: float, die_area_mm2: float, *, datacenter: bool = True) -> str:
    """ECCN 3A090 (Oct-2023 parameters, CONTRACT section 2), written out independently."""
    if not datacenter and tpp < 4800:
        return "not-controlled"
    pd = tpp / die_area_mm2
    if tpp >= 4800 or (tpp >= 1600 and pd >= 5.92):
        return "3A090.a"
    if (2400 <= tpp < 4800 and 1.6 <= pd < 5.92) or (tpp >= 1600 and 3.2 <= pd < 5.92):
        return "3A090.b"
    return "not-controlled"


def class_of(name: str) -> str:
    """The class the catalog gives an accelerator: its explicit eccn, else the rules."""
    acc = ACCELERATORS[name]
    if "eccn" in acc:
        return str(acc["eccn"])
    return rule_class(acc["tpp"], acc["die_area_mm2"], datacenter=acc.get("datacenter", True))


def sku_class(sku: str) -> str:
    """The class of the accelerator a SKU carries; not-controlled when it carries none."""
    accelerator = SKUS[sku].get("accelerator")
    return "not-controlled" if accelerator is None else class_of(accelerator)


def restricted(account: dict[str, str], *, use_aliases: bool = True) -> bool:
    """CONTRACT section 2: any of the three countries in a restricted group or country."""
    aliases: dict[str, str] = COUNTRY_GROUPS.get("aliases", {}) if use_aliases else {}
    blocked = set(RESTRICTED_COUNTRIES)
    for group in RESTRICTED_GROUPS:
        blocked.update(COUNTRY_GROUPS["groups"][group])
    countries = (
        account["billing_country"],
        account["headquarters_country"],
        account["ultimate_parent_country"],
    )
    return any(aliases.get(c, c) in blocked for c in countries)


# --- catalog: shape -------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ACCELERATORS))
def test_accelerator_has_only_contract_keys_with_valid_values(name: str) -> None:
    """Every accelerator uses only the CONTRACT keys, with tpp > 0 and a valid optional eccn."""
    acc = ACCELERATORS[name]
    assert set(acc) <= ACCELERATOR_KEYS
    assert isinstance(acc["tpp"], int | float)
    assert not isinstance(acc["tpp"], bool)
    assert acc["tpp"] > 0
    if "die_area_mm2" in acc:
        assert isinstance(acc["die_area_mm2"], int | float)
        assert acc["die_area_mm2"] > 0
    if "datacenter" in acc:
        assert isinstance(acc["datacenter"], bool)
    if "eccn" in acc:
        assert acc["eccn"] in ECCNS


@pytest.mark.parametrize("name", sorted(ACCELERATORS))
def test_accelerator_is_classifiable(name: str) -> None:
    """Every accelerator has a die area for the rules or an explicit eccn."""
    acc = ACCELERATORS[name]
    assert "die_area_mm2" in acc or "eccn" in acc
    assert class_of(name) in ECCNS


@pytest.mark.parametrize("name", sorted(n for n, a in ACCELERATORS.items() if "eccn" in a))
def test_explicit_eccn_does_not_contradict_tpp_floor(name: str) -> None:
    """An explicit eccn never undercuts a.1: a datacenter part with TPP >= 4800 is 3A090.a."""
    acc = ACCELERATORS[name]
    if acc["tpp"] >= 4800 and acc.get("datacenter", True):
        assert acc["eccn"] == "3A090.a"


@pytest.mark.parametrize("name", sorted(SKUS))
def test_sku_has_only_contract_keys_and_a_known_accelerator(name: str) -> None:
    """Every SKU names an accelerator in the catalog with a count >= 1, or has no accelerator."""
    sku = SKUS[name]
    assert set(sku) <= SKU_KEYS
    if "accelerator" in sku:
        assert sku["accelerator"] in ACCELERATORS
        count = sku["accelerators_per_instance"]
        assert isinstance(count, int)
        assert not isinstance(count, bool)
        assert count >= 1
    else:
        assert "accelerators_per_instance" not in sku


def _entry_blocks(text: str) -> dict[str, str]:
    """Map each '[accelerators."X"]' / '[skus."X"]' header to the raw text of its block."""
    header = re.compile(r'^\[(accelerators|skus)\."([^"]+)"\][^\n]*$', re.MULTILINE)
    matches = list(header.finditer(text))
    blocks: dict[str, str] = {}
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        blocks[f"{m.group(1)}.{m.group(2)}"] = text[m.start() : end]
    return blocks


def test_every_catalog_entry_cites_a_source() -> None:
    """Every accelerator and SKU block in catalog.toml carries a '# Source:' comment."""
    blocks = _entry_blocks((CONFIG / "catalog.toml").read_text(encoding="utf-8"))
    assert len(blocks) == len(ACCELERATORS) + len(SKUS)
    missing = [name for name, block in blocks.items() if "# Source:" not in block]
    assert missing == []


def test_each_cloud_has_cpu_only_skus() -> None:
    """AWS, GCP and Azure each have ordinary SKUs without an accelerator (never controlled)."""
    for sku in ("m7i.large", "c7i.xlarge", "n2-standard-8", "e2-standard-4", "Standard_D4s_v5"):
        assert "accelerator" not in SKUS[sku]
        assert sku_class(sku) == "not-controlled"


# --- catalog: spot checks ------------------------------------------------------------


@pytest.mark.parametrize(
    ("sku", "eccn", "per_instance"),
    [
        ("p5.48xlarge", "3A090.a", 8),
        ("p4d.24xlarge", "3A090.a", 8),
        ("a3-highgpu-8g", "3A090.a", 8),
        ("a2-highgpu-8g", "3A090.a", 8),
        ("Standard_ND96isr_H100_v5", "3A090.a", 8),
        ("Standard_ND96amsr_A100_v4", "3A090.a", 8),
        ("g6.xlarge", "3A090.a", 1),  # L4: 3A090.a only through the density prong a.2
        ("p3.16xlarge", "not-controlled", 8),  # V100
        ("g4dn.xlarge", "not-controlled", 1),  # T4
        ("Standard_NC4as_T4_v3", "not-controlled", 1),
        ("g5.xlarge", "not-controlled", 1),  # A10G
    ],
)
def test_known_skus_classify_as_expected(sku: str, eccn: str, per_instance: int) -> None:
    """Well-known GPU SKUs carry the expected class and accelerator count."""
    assert sku_class(sku) == eccn
    assert SKUS[sku]["accelerators_per_instance"] == per_instance


@pytest.mark.parametrize(
    ("name", "eccn"),
    [
        ("RTX-4090D-24GB", "not-controlled"),  # PD 7.74 alone says .a; the Note takes it out
        ("RTX-4090-24GB", "3A090.a"),  # consumer, but TPP >= 4800: the Note does not apply
        ("A30-24GB", "3A090.b"),
        ("L40-48GB", "3A090.b"),
        ("H20-96GB", "not-controlled"),
        ("A10-24GB", "not-controlled"),
    ],
)
def test_edge_case_accelerators(name: str, eccn: str) -> None:
    """Border cases of the 3A090 rule (datacenter Note, b.1, just-under floors) come out right."""
    assert class_of(name) == eccn


def test_consumer_4090d_is_freed_by_the_datacenter_note_not_an_override() -> None:
    """The RTX 4090 D is not-controlled because datacenter = false, and would be .a without it."""
    acc = ACCELERATORS["RTX-4090D-24GB"]
    assert acc["datacenter"] is False
    assert "eccn" not in acc
    assert rule_class(acc["tpp"], acc["die_area_mm2"], datacenter=True) == "3A090.a"


@pytest.mark.parametrize(("gce_type", "part"), sorted(GCE_ACCELERATOR_TYPES.items()))
def test_gce_accelerator_type_mirrors_its_physical_part(gce_type: str, part: str) -> None:
    """A GCE accelerator type is a one-accelerator SKU with its physical part's numbers."""
    assert ACCELERATORS[gce_type] == ACCELERATORS[part]
    assert SKUS[gce_type] == {"accelerator": gce_type, "accelerators_per_instance": 1}


# --- catalog against the research reference ----------------------------------------


@pytest.mark.parametrize("name", _reference_params("accelerators"))
def test_accelerator_class_matches_reference(name: str) -> None:
    """Each reference accelerator is in the catalog and gets the reference's class."""
    ref = REF["accelerators"][name]
    assert name in ACCELERATORS
    expected = ref.get("eccn", ref.get("eccn_conservative"))
    if expected is None:
        pytest.skip(f"reference gives no class for {name}")
    assert class_of(name) == expected


@pytest.mark.parametrize("name", _reference_params("skus"))
def test_sku_matches_reference(name: str) -> None:
    """Each reference SKU is in the catalog with the same accelerator and count."""
    ref = REF["skus"][name]
    assert SKUS[name] == {
        "accelerator": ref["accelerator"],
        "accelerators_per_instance": ref["accelerators_per_instance"],
    }


# --- country groups ------------------------------------------------------------------


def test_country_groups_are_iso_alpha2_and_cover_contract_groups() -> None:
    """At least D:1, D:4, D:5, E:1, E:2 exist and every code is ISO 3166-1 alpha-2 uppercase."""
    groups: dict[str, list[str]] = COUNTRY_GROUPS["groups"]
    assert {"D:1", "D:4", "D:5", "E:1", "E:2"} <= set(groups)
    codes = [c for members in groups.values() for c in members]
    codes += list(COUNTRY_GROUPS["aliases"]) + list(COUNTRY_GROUPS["aliases"].values())
    assert all(re.fullmatch(r"[A-Z]{2}", c) for c in codes)
    assert all(len(set(m)) == len(m) for m in groups.values())


@pytest.mark.parametrize(
    ("code", "group", "member"),
    [
        ("CN", "D:5", True),
        ("RU", "D:5", True),
        ("MO", "D:5", False),  # the EAR says "Macau or D:5": Macau is not in D:5
        ("MO", "D:1", True),
        ("IR", "E:1", True),
        ("CU", "E:2", True),
        ("IL", "D:4", True),
        ("IL", "A:6", True),
        ("DE", "D:5", False),
        ("SG", "D:5", False),
    ],
)
def test_country_group_membership(code: str, group: str, member: bool) -> None:
    """Spot checks of EAR Supp. 1 to Part 740 membership."""
    assert (code in COUNTRY_GROUPS["groups"][group]) is member


def test_hong_kong_is_treated_as_china() -> None:
    """HK is aliased to CN, and only aliases are used for it (it is in no group itself)."""
    assert COUNTRY_GROUPS["aliases"]["HK"] == "CN"
    assert all("HK" not in members for members in COUNTRY_GROUPS["groups"].values())


def test_country_groups_match_reference() -> None:
    """The shipped groups are the reference's groups, code for code."""
    if not REF:
        pytest.skip(f"research reference not present at {REFERENCE}")
    assert COUNTRY_GROUPS["groups"] == REF["country_groups"]


# --- accounts ------------------------------------------------------------------------

EXPECTED_RESTRICTED = {
    "acct-1001": False,
    "acct-1002": False,
    "acct-2001": True,
    "acct-2002": True,
    "acct-2003": True,
    "acct-2004": True,
    "acct-3001": True,
}


def test_accounts_are_the_demo_set_with_iso_countries() -> None:
    """The demo accounts are exactly the documented set, each with a name and three ISO codes."""
    assert set(ACCOUNTS) == set(EXPECTED_RESTRICTED)
    for account in ACCOUNTS.values():
        assert set(account) == {
            "name",
            "billing_country",
            "headquarters_country",
            "ultimate_parent_country",
        }
        assert account["name"]
        for key in ("billing_country", "headquarters_country", "ultimate_parent_country"):
            assert re.fullmatch(r"[A-Z]{2}", account[key])


@pytest.mark.parametrize(("account_id", "expected"), sorted(EXPECTED_RESTRICTED.items()))
def test_account_restrictedness(account_id: str, expected: bool) -> None:
    """Each demo account is restricted or not as its comment in accounts.toml says."""
    assert restricted(ACCOUNTS[account_id]) is expected


def test_each_restriction_path_is_exercised() -> None:
    """The demo set shows each way in: parent only, alias only, restricted_countries, HQ."""
    parent_only = ACCOUNTS["acct-2002"]
    assert restricted({**parent_only, "ultimate_parent_country": "SG"}) is False
    assert restricted(ACCOUNTS["acct-2003"], use_aliases=False) is False
    assert "MO" not in COUNTRY_GROUPS["groups"]["D:5"]
    hq_only = ACCOUNTS["acct-3001"]
    assert restricted({**hq_only, "ultimate_parent_country": "DE"}) is True
    assert (
        restricted({**hq_only, "headquarters_country": "DE", "ultimate_parent_country": "DE"})
        is False
    )
