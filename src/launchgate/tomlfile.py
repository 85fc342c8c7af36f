"""Reading TOML files and checking their shape, with errors that name the file and key."""

from __future__ import annotations

import math
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from launchgate.errors import ConfigError


def read_toml(path: Path) -> dict[str, Any]:
    """Parse ``path``; ConfigError names the file when it is missing or not valid TOML, and
    the key when it holds ``nan`` or ``inf``: no setting takes one, and a NaN compares false
    with everything, so a limit or a TPP of NaN would pass every check it is meant to fail."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e
    except UnicodeDecodeError as e:  # TOML is UTF-8; the message quotes one byte, not the file
        byte = e.object[e.start]
        raise ConfigError(
            f"{path}: not valid TOML: not UTF-8 (byte 0x{byte:02x} at offset {e.start})"
        ) from None
    where = _non_finite(data)
    if where is not None:
        raise ConfigError(f"{path}: {where}: must be a finite number, not nan or inf")
    return data


def _non_finite(value: object, key: str = "") -> str | None:
    """The dotted key of the first ``nan`` or ``inf`` in ``value``; None when there is none."""
    if isinstance(value, float):
        return None if math.isfinite(value) else key
    if isinstance(value, dict):
        items: Iterable[tuple[str, object]] = (
            (f"{key}.{name}" if key else name, item) for name, item in value.items()
        )
    elif isinstance(value, list):
        items = ((f"{key}[{i}]", item) for i, item in enumerate(value))
    else:
        return None
    found = (_non_finite(item, name) for name, item in items)
    return next((key for key in found if key is not None), None)


def only_tables(data: Mapping[str, Any], allowed: set[str], source: str) -> None:
    """ConfigError naming ``source`` and the first top-level key not in ``allowed``: a
    misspelt table would otherwise be ignored, and what it holds with it."""
    unknown = set(data) - allowed
    if unknown:
        raise ConfigError(f"{source}: unknown table {sorted(unknown)[0]!r}")


def require_table(data: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    """``data[key]`` as a table (empty when absent); ConfigError if it is something else."""
    return as_table(data.get(key, {}), f"{where}: {key!r}")


def as_table(value: object, where: str) -> dict[str, Any]:
    """``value`` as a table; ConfigError naming ``where`` if it is something else."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table")
    return value
