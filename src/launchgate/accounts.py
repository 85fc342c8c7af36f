"""The billing-layer account registry and the jurisdictions it places each account in."""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from launchgate.errors import ConfigError
from launchgate.tomlfile import as_table, only_tables, read_toml, require_table

COUNTRY_FIELDS = ("billing_country", "headquarters_country", "ultimate_parent_country")


def _country(value: object, where: str) -> str:
    if not isinstance(value, str) or len(value) != 2 or not value.isascii() or not value.isalpha():
        raise ConfigError(f"{where}: must be an ISO 3166-1 alpha-2 code, got {value!r}")
    return value.upper()


@dataclass(frozen=True, slots=True)
class Account:
    account_id: str
    name: str | None
    billing_country: str
    headquarters_country: str
    ultimate_parent_country: str

    @property
    def countries(self) -> tuple[str, str, str]:
        return (self.billing_country, self.headquarters_country, self.ultimate_parent_country)


@dataclass(frozen=True, slots=True)
class CountryGroups:
    groups: Mapping[str, frozenset[str]]
    aliases: Mapping[str, str]  # e.g. HK -> CN: the EAR treats Hong Kong as China

    def resolve(self, country: str) -> str:
        return self.aliases.get(country, country)


@dataclass(frozen=True, slots=True)
class Jurisdictions:
    """Which countries are restricted: the configured groups plus single countries."""

    restricted: frozenset[str]
    groups: CountryGroups

    def restricted_countries_of(self, account: Account) -> tuple[str, ...]:
        """The account's countries (after aliases) that are restricted; empty if none."""
        resolved = (self.groups.resolve(c) for c in account.countries)
        return tuple(dict.fromkeys(c for c in resolved if c in self.restricted))

    def is_restricted(self, account: Account) -> bool:
        return bool(self.restricted_countries_of(account))


def build_jurisdictions(
    groups: CountryGroups,
    restricted_groups: Collection[str],
    restricted_countries: Collection[str],
    where: str,
) -> Jurisdictions:
    """Combine restricted groups and countries; ConfigError on a group the file lacks."""
    restricted: set[str] = set()
    for name in restricted_groups:
        if name not in groups.groups:
            raise ConfigError(f"{where}.restricted_country_groups: no country group {name!r}")
        restricted |= groups.groups[name]
    restricted |= {
        groups.resolve(_country(c, f"{where}.restricted_countries")) for c in restricted_countries
    }
    return Jurisdictions(frozenset(restricted), groups)


def parse_country_groups(data: Mapping[str, Any], source: str) -> CountryGroups:
    only_tables(data, {"groups", "aliases"}, source)
    groups: dict[str, frozenset[str]] = {}
    for name, codes in require_table(data, "groups", source).items():
        where = f"{source}: groups.{name!r}"
        if not isinstance(codes, list):
            raise ConfigError(f"{where}: must be a list of country codes")
        groups[name] = frozenset(_country(c, where) for c in codes)
    aliases = {
        _country(code, f"{source}: aliases"): _country(target, f"{source}: aliases.{code!r}")
        for code, target in require_table(data, "aliases", source).items()
    }
    return CountryGroups(groups, aliases)


def parse_accounts(data: Mapping[str, Any], source: str) -> Mapping[str, Account]:
    only_tables(data, {"accounts"}, source)
    accounts: dict[str, Account] = {}
    for account_id, value in require_table(data, "accounts", source).items():
        where = f"{source}: accounts.{account_id!r}"
        table = as_table(value, where)
        unknown = set(table) - {"name", *COUNTRY_FIELDS}
        if unknown:
            raise ConfigError(f"{where}: unknown key {sorted(unknown)[0]!r}")
        missing = [f for f in COUNTRY_FIELDS if f not in table]
        if missing:
            raise ConfigError(f"{where}: missing key {missing[0]!r}")
        name = table.get("name")
        if name is not None and not isinstance(name, str):
            raise ConfigError(f"{where}.name: must be a string")
        countries = [_country(table[f], f"{where}.{f}") for f in COUNTRY_FIELDS]
        accounts[account_id] = Account(account_id, name, *countries)
    return accounts


def load_country_groups(path: Path) -> CountryGroups:
    return parse_country_groups(read_toml(path), str(path))


def load_accounts(path: Path) -> Mapping[str, Account]:
    return parse_accounts(read_toml(path), str(path))
