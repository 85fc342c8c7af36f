"""Reading TOML files and checking their shape, with errors that name the file and key."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from launchgate.errors import ConfigError


def read_toml(path: Path) -> dict[str, Any]:
    """Parse ``path``; ConfigError names the file when it is missing or not valid TOML."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e.strerror}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from e


def require_table(data: Mapping[str, Any], key: str, where: str) -> dict[str, Any]:
    """``data[key]`` as a table (empty when absent); ConfigError if it is something else."""
    return as_table(data.get(key, {}), f"{where}: {key!r}")


def as_table(value: object, where: str) -> dict[str, Any]:
    """``value`` as a table; ConfigError naming ``where`` if it is something else."""
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table")
    return value
