"""Accelerators, instance SKUs and their ECCN 3A090 class (pure, validated once).

Classification follows ECCN 3A090 as amended in October 2023 (88 FR 73458; text in
15 CFR 774 Supp. 1, checked against eCFR 2026-07-23, see shared/reference/regulatory.md):

- 3A090.a: TPP >= 4800, or TPP >= 1600 and PD >= 5.92
- 3A090.b: TPP >= 2400 and 1.6 <= PD < 5.92, or TPP >= 1600 and 3.2 <= PD < 5.92
- the Note to 3A090: an item not designed or marketed for datacenters is outside
  .a/.b unless its TPP is >= 4800.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Final

from launchgate import strict
from launchgate.errors import ConfigError
from launchgate.tomlfile import as_table, only_tables, read_toml, require_table

ECCN_A: Final = "3A090.a"
ECCN_B: Final = "3A090.b"
NOT_CONTROLLED: Final = "not-controlled"
ECCN_CLASSES: Final = frozenset({ECCN_A, ECCN_B, NOT_CONTROLLED})


# Performance-density thresholds of ECCN 3A090 (CONTRACT section 2), exact.
_PD_A: Final = Fraction("5.92")
_PD_B_LOW: Final = Fraction("1.6")
_PD_B_HIGH: Final = Fraction("3.2")


def classify(tpp: float, die_area_mm2: float, *, datacenter: bool = True) -> str:
    """The 3A090 class the catalog rules give an accelerator (CONTRACT section 2)."""
    if not (0 < tpp < math.inf and 0 < die_area_mm2 < math.inf):
        raise ValueError("TPP and die area must be positive")
    if not datacenter and tpp < 4800:
        return NOT_CONTROLLED
    # Performance density compared exactly, on the numbers as written (their shortest decimal
    # form): in binary floating point 4114.4 / 695 is 5.919999999999999, and an accelerator
    # exactly on 5.92 came out 3A090.b (found by QA, at 3.2 and 1.6 too).
    t, d = Fraction(repr(tpp)), Fraction(repr(die_area_mm2))
    if tpp >= 4800 or (tpp >= 1600 and t >= _PD_A * d):
        return ECCN_A
    if (tpp >= 2400 and _PD_B_LOW * d <= t < _PD_A * d) or (
        tpp >= 1600 and _PD_B_HIGH * d <= t < _PD_A * d
    ):
        return ECCN_B
    return NOT_CONTROLLED


@dataclass(frozen=True, slots=True)
class Accelerator:
    name: str
    tpp: float
    die_area_mm2: float | None
    datacenter: bool
    eccn: str  # explicit override, else computed by classify()


@dataclass(frozen=True, slots=True)
class Sku:
    name: str
    accelerator: Accelerator | None
    accelerators_per_instance: int  # 0 when the SKU carries no accelerator


@dataclass(frozen=True, slots=True)
class Catalog:
    accelerators: Mapping[str, Accelerator]
    skus: Mapping[str, Sku]
    skus_folded: Mapping[str, Sku]  # by folded name (``fold_case``), for APIs that ignore case

    def sku(self, name: str, *, fold_case: bool = False) -> Sku | None:
        """The SKU called ``name``; with ``fold_case``, whatever the letter case."""
        found = self.skus.get(name)
        if found is None and fold_case:
            found = self.skus_folded.get(strict.fold_case(name))
        return found


def _number(value: object, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{where}: must be a positive number, got {value!r}")
    return float(value)


def _accelerator(name: str, table: Mapping[str, Any], where: str) -> Accelerator:
    unknown = set(table) - {"tpp", "die_area_mm2", "datacenter", "eccn"}
    if unknown:
        raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    if "tpp" not in table:
        raise ConfigError(f"{where}: missing key 'tpp'")
    tpp = _number(table["tpp"], f"{where}.tpp")
    area = table.get("die_area_mm2")
    die_area = None if area is None else _number(area, f"{where}.die_area_mm2")
    datacenter = table.get("datacenter", True)
    if not isinstance(datacenter, bool):
        raise ConfigError(f"{where}.datacenter: must be true or false")
    eccn = table.get("eccn")
    if eccn is None:
        if die_area is None:
            raise ConfigError(f"{where}: needs 'die_area_mm2' (or an explicit 'eccn')")
        eccn = classify(tpp, die_area, datacenter=datacenter)
    elif eccn not in ECCN_CLASSES:
        raise ConfigError(f"{where}.eccn: must be one of {sorted(ECCN_CLASSES)}, got {eccn!r}")
    return Accelerator(name, tpp, die_area, datacenter, eccn)


def parse_catalog(data: Mapping[str, Any], source: str) -> Catalog:
    """Turn the catalog TOML mapping into a Catalog; ConfigError names ``source`` and the key."""
    only_tables(data, {"accelerators", "skus"}, source)
    accelerators: dict[str, Accelerator] = {}
    for name, table in require_table(data, "accelerators", source).items():
        where = f"{source}: accelerators.{name!r}"
        accelerators[name] = _accelerator(name, as_table(table, where), where)
    skus: dict[str, Sku] = {}
    for name, table in require_table(data, "skus", source).items():
        where = f"{source}: skus.{name!r}"
        table = as_table(table, where)
        unknown = set(table) - {"accelerator", "accelerators_per_instance"}
        if unknown:
            raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
        acc_name = table.get("accelerator")
        if acc_name is None:
            skus[name] = Sku(name, None, 0)
            continue
        accelerator = accelerators.get(acc_name) if isinstance(acc_name, str) else None
        if accelerator is None:
            raise ConfigError(f"{where}.accelerator: no accelerator {acc_name!r} in the catalog")
        per = table.get("accelerators_per_instance")
        if isinstance(per, bool) or not isinstance(per, int) or per < 1:
            raise ConfigError(f"{where}.accelerators_per_instance: must be an integer >= 1")
        skus[name] = Sku(name, accelerator, per)
    folded: dict[str, Sku] = {}
    for name, sku in skus.items():
        other = folded.setdefault(strict.fold_case(name), sku)
        if other is not sku:
            raise ConfigError(
                f"{source}: skus.{name!r} and skus.{other.name!r} differ only in letter case"
            )
    return Catalog(accelerators, skus, folded)


def load_catalog(path: Path) -> Catalog:
    return parse_catalog(read_toml(path), str(path))
