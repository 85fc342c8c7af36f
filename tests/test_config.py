"""Configuration is validated once; every error names the file and the key at fault."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from conftest import GENERIC_ROUTE, SHIPPED, Keys, write_config
from launchgate.config import load_config
from launchgate.errors import ConfigError
from launchgate.gateway import Gateway
from launchgate.paths import (
    AUTHORITY,
    LENIENT,
    PARAMETERS,
    SCRIPT,
    UnsafePath,
    has_dot_segments,
    normalize_path,
    normalize_path_slowly,
    second_readings,
)


def test_shipped_config_loads() -> None:
    """config/launchgate.toml and every file it names are valid as shipped."""
    config = load_config(SHIPPED / "launchgate.toml")
    assert config.mode == "enforce"
    assert config.catalog.skus["p5.48xlarge"].accelerators_per_instance == 8
    assert config.reservation_ttl_s == 300
    assert config.store_pool_size == 10
    assert config.upstream_deduplicates_idempotency_key is False  # the safe default
    assert config.upstream_idempotency_key_window_s is None  # (no retry is sent on)


@pytest.mark.parametrize(
    ("sections", "message"),
    [
        ({"server": {"mode": "audit"}}, r"\[server\]\.mode"),
        ({"server": {"listen": "8080"}}, r"\[server\]\.listen"),
        ({"server": {"max_body_bytes": 0}}, r"\[server\]\.max_body_bytes"),
        ({"server": {"colour": "blue"}}, r"\[server\]: unknown key 'colour'"),
        ({"upstream": {"url": "ftp://x"}}, r"\[upstream\]\.url"),
        ({"upstream": {"timeout_s": -1}}, r"\[upstream\]\.timeout_s"),
        (
            {"upstream": {"deduplicates_idempotency_key": "yes"}},
            r"\[upstream\]\.deduplicates_idempotency_key: must be true or false",
        ),
        (
            {"upstream": {"idempotency_key_window_s": 0}},
            r"\[upstream\]\.idempotency_key_window_s: must be a number > 0",
        ),
        ({"tokens": {"issuers": "one"}}, r"\[tokens\]\.issuers"),
        # seconds of clock skew, not hours (found in review: 1e12 revived expired tokens)
        ({"tokens": {"leeway_s": 301}}, r"\[tokens\]\.leeway_s: must be a number from 0 to 300"),
        ({"tokens": {"leeway_s": -0.5}}, r"\[tokens\]\.leeway_s: must be a number from 0 to 300"),
        ({"tokens": {"leeway_s": True}}, r"\[tokens\]\.leeway_s: must be a number from 0 to 300"),
        (
            {"upstream": {"idempotency_key_window_s": 1e308}},
            r"\[upstream\]\.idempotency_key_window_s: must be at most 604800 seconds",
        ),
        # A referenced file that is missing: the main file's key, then the file.
        (
            {"tokens": {"jwks": "/nonexistent/jwks.json"}},
            r"launchgate\.toml: \[tokens\]\.jwks: /nonexistent/jwks\.json",
        ),
        (
            {"accounts": {"file": "/nonexistent/accounts.toml"}},
            r"\[accounts\]\.file: /nonexistent/accounts\.toml: file not found",
        ),
        (
            {"policy": {"country_groups_file": "/nonexistent/groups.toml"}},
            r"\[policy\]\.country_groups_file: /nonexistent/groups\.toml: file not found",
        ),
        (
            {"policy": {"restricted_country_groups": ["D:9"]}},
            r"restricted_country_groups: no country group 'D:9'",
        ),
        ({"policy": {"controlled_eccns": ["3A090.z"]}}, r"controlled_eccns"),
        (
            {"catalog": {"file": "/nonexistent/catalog.toml"}},
            r"\[catalog\]\.file: /nonexistent/catalog\.toml: file not found",
        ),
        ({"store": {"url": "mysql://x"}}, r"mysql"),
        # Every token would be token_wrong_issuer (found by QA: check said ok).
        ({"tokens": {"issuers": []}}, r"\[tokens\]\.issuers: must name at least one issuer"),
        ({"store": {"pool_size": 0}}, r"\[store\]\.pool_size: must be an integer >= 1"),
        ({"store": {"pool_size": True}}, r"\[store\]\.pool_size: must be an integer >= 1"),
        ({"store": {"pool_size": 2.5}}, r"\[store\]\.pool_size: must be an integer >= 1"),
        ({"store": {"pool_size": 1001}}, r"\[store\]\.pool_size: must be at most 1000"),
        # Headers the gateway reads must be header names HTTP leaves free, and two of them.
        (
            {"identity": {"account_header": "X Account:Id"}},
            r"\[identity\]\.account_header: 'X Account:Id' is not an HTTP header name",
        ),
        (
            {"identity": {"account_header": "Connection"}},
            r"\[identity\]\.account_header: 'Connection' already means something in HTTP",
        ),
        ({"tokens": {"header": "Host"}}, r"\[tokens\]\.header: 'Host' already means"),
        (  # hop-by-hop: judged, then never forwarded
            {"identity": {"account_header": "Proxy-Authorization"}},
            r"'Proxy-Authorization' already means",
        ),
        (
            {"identity": {"account_header": "X-Account-Id"}, "tokens": {"header": "x_account_id"}},
            r"\[tokens\]\.header: 'x_account_id' is the account header too",
        ),
        ({"surprise": {"a": 1}}, r"unknown table 'surprise'"),
        # The admin listener is never on the proxy port, however its host is spelled (QA).
        *(
            (
                {"server": {"listen": "127.0.0.1:18080", "admin_listen": admin}},
                r"\[server\]\.admin_listen: must not be on the proxy's port 18080",
            )
            for admin in ("127.0.0.1:18080", "localhost:18080", "0.0.0.0:18080", "[::1]:18080")
        ),
    ],
)
def test_bad_main_file(tmp_path: Path, keys: Keys, sections: dict[str, Any], message: str) -> None:
    """A bad value in the main file is a ConfigError naming file, table and key."""
    path = write_config(tmp_path, "http://127.0.0.1:9", keys, **sections)
    with pytest.raises(ConfigError, match=message):
        Gateway(load_config(path))  # the store URL is checked when the gateway opens its ledger


@pytest.mark.parametrize(
    ("routes", "message"),
    [
        ([], r"\[\[routes\]\]"),
        ([GENERIC_ROUTE | {"dialect": "soap"}], r"routes\[0\]\.dialect: unknown dialect 'soap'"),
        ([GENERIC_ROUTE | {"sku": "instance_type"}], r"routes\[0\]\.sku"),
        ([GENERIC_ROUTE | {"sku": "/a~2b"}], r"routes\[0\]\.sku"),
        (
            [{k: v for k, v in GENERIC_ROUTE.items() if k != "sku"}],
            r"routes\[0\]: missing key 'sku'",
        ),
        ([GENERIC_ROUTE | {"path": "/v1//x"}], r"routes\[0\]\.path"),
        (
            [{k: v for k, v in GENERIC_ROUTE.items() if k != "path"}],
            r"routes\[0\]: missing key 'path'",
        ),
        ([GENERIC_ROUTE | {"extra": 1}], r"routes\[0\]: unknown key 'extra'"),
        (  # a route's region, not a pointer (CONTRACT section 9), and a default_region too
            [GENERIC_ROUTE | {"region": "eu-central-1", "default_region": "eu-west-1"}],
            r"routes\[0\]: 'region' names the route's region \('eu-central-1'\), and so does",
        ),
        (
            [GENERIC_ROUTE, GENERIC_ROUTE | {"sku": "/type"}],
            r"routes\[1\] claims the same requests as routes\[0\]",
        ),
        # aws-ec2 claims every method on its mount, PURGE too (found in review: passed).
        (
            [
                {"dialect": "aws-ec2", "path": "/ec2"},
                {"dialect": "opaque", "path": "/ec2", "methods": ["PURGE"]},
            ],
            r"routes\[1\] claims the same requests as routes\[0\]",
        ),
        (  # mounts that differ only in letter case, which the dialect ignores (found in review)
            [{"dialect": "gcp-compute"}, {"dialect": "gcp-compute", "path": "/Compute/v1"}],
            r"routes\[1\] claims the same requests as routes\[0\]",
        ),
        (
            [
                {"dialect": "aws-ec2", "path": "/ec2"},
                {"dialect": "opaque", "path": "/EC2", "methods": ["GET"], "ignore_case": True},
            ],
            r"routes\[1\] claims the same requests as routes\[0\]",
        ),
        (  # one API of known shapes mounted twice on one path
            [{"dialect": "azure-arm"}, {"dialect": "azure-arm", "region": "westeurope"}],
            r"routes\[1\] claims the same requests as routes\[0\]",
        ),
    ],
)
def test_bad_routes(tmp_path: Path, keys: Keys, routes: list[dict[str, Any]], message: str) -> None:
    """Routes are validated: dialect, pointers, paths, keys, and no two claiming one request."""
    path = write_config(tmp_path, "http://127.0.0.1:9", keys, routes)
    with pytest.raises(ConfigError, match=message):
        load_config(path)


@pytest.mark.parametrize(
    ("file", "text", "message"),
    [
        (
            "catalog.toml",
            "[accelerators.X]\ndie_area_mm2 = 1\n",
            r"accelerators\.'X': missing key 'tpp'",
        ),
        ("catalog.toml", "[accelerators.X]\ntpp = 1\n", r"accelerators\.'X': needs 'die_area_mm2'"),
        (
            "catalog.toml",
            '[accelerators.X]\ntpp = 5000\neccn = "3A090.q"\n',
            r"accelerators\.'X'\.eccn",
        ),
        (
            "catalog.toml",
            '[skus.s]\naccelerator = "nope"\naccelerators_per_instance = 1\n',
            r"skus\.'s'\.accelerator: no accelerator 'nope'",
        ),
        (
            "catalog.toml",
            '[accelerators.X]\ntpp = 1\ndie_area_mm2 = 1\n[skus.s]\naccelerator = "X"\n',
            r"skus\.'s'\.accelerators_per_instance",
        ),
        (
            "accounts.toml",
            '[accounts.a]\nbilling_country = "DE"\nheadquarters_country = "DE"\n',
            r"accounts\.'a': missing key 'ultimate_parent_country'",
        ),
        (
            "accounts.toml",
            '[accounts.a]\nbilling_country = "Germany"\nheadquarters_country = "DE"\nultimate_parent_country = "DE"\n',
            r"accounts\.'a'\.billing_country",
        ),
        ("country_groups.toml", '[groups]\n"D:5" = "CN"\n', r"groups\.'D:5'"),
        ("accounts.toml", "not toml [", r"not valid TOML"),
        # A misspelt table is not ignored (with every account or group in it).
        (
            "accounts.toml",
            '[acounts.a]\nbilling_country = "CN"\nheadquarters_country = "CN"\n',
            r"accounts\.toml: unknown table 'acounts'",
        ),
        ("country_groups.toml", '[groupz]\n"D:5" = ["CN"]\n', r"unknown table 'groupz'"),
    ],
)
def test_bad_referenced_file(
    tmp_path: Path, keys: Keys, file: str, text: str, message: str
) -> None:
    """An error in a referenced file names that file and its key."""
    target = tmp_path / file
    target.write_text(text)
    key = {"catalog.toml": "catalog", "accounts.toml": "accounts", "country_groups.toml": "policy"}[
        file
    ]
    field = "country_groups_file" if key == "policy" else "file"
    path = write_config(tmp_path, "http://127.0.0.1:9", keys, None, **{key: {field: str(target)}})
    with pytest.raises(ConfigError, match=message) as caught:
        load_config(path)
    assert str(target) in str(caught.value)


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path, keys: Keys) -> None:
    """Paths in the main file are relative to its folder, not to the working directory."""
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "catalog.toml").write_text((SHIPPED / "catalog.toml").read_text())
    path = write_config(
        tmp_path,
        "http://127.0.0.1:9",
        keys,
        catalog={"file": "cat/catalog.toml"},
        audit={"path": "logs/d.jsonl"},
    )
    config = load_config(path)
    assert config.audit_path == tmp_path / "logs" / "d.jsonl"
    assert "p5.48xlarge" in config.catalog.skus


@pytest.mark.parametrize(
    ("raw", "normalized"),
    [
        ("/v1/instances", "/v1/instances"),
        ("//v1///instances//", "/v1/instances"),
        ("/v1/./a/../instances", "/v1/instances"),
        ("/v1/%69%6E%73tances", "/v1/instances"),
        ("/a%7e%2a", "/a~%2A"),
        ("/", "/"),
        ("/a/..", "/"),
    ],
)
def test_normalize_path(raw: str, normalized: str) -> None:
    """Paths are brought to one form before matching."""
    assert normalize_path(raw) == normalized


@pytest.mark.parametrize(
    ("raw", "dotted"),
    [
        ("/a/./b", True),
        ("/a/%2e%2E/b", True),
        ("/a/.%2E", True),
        ("/.", True),
        ("/v2.1/servers", False),
        ("/a.b/c.", False),
        ("/a/.../b", False),
        ("/x/%2ex", False),
    ],
)
def test_has_dot_segments(raw: str, dotted: bool) -> None:
    """Whether normalization removes a "." or ".." segment, however its dots are escaped."""
    assert has_dot_segments(raw) is dotted


@pytest.mark.parametrize("raw", ["/x/..;/y", "/x/.;a/y", "/x/%2e%2e;a/y", "/x/;a/y", "/x/;"])
def test_a_parameter_on_an_empty_or_dot_segment_cannot_be_normalized(raw: str) -> None:
    """A name to the gateway, a dot or empty segment to a server that cuts parameters first."""
    with pytest.raises(UnsafePath, match="parameter on an empty or dot segment"):
        normalize_path(raw)
    assert normalize_path("/x/a;b/y") == "/x/a;b/y"  # a parameter on a name stays


@pytest.mark.parametrize(
    "raw",
    [
        "/..",
        "/a/../..",
        "/%2e%2e/x",
        "/a%2Fb",
        "/a%5cb",
        "/a%00",
        "/a%zz",
        "/a%4",
        "a/b",
        "/a b",
        "/a\\b",
    ],
)
def test_unsafe_paths(raw: str) -> None:
    """What could be read two ways by an upstream is refused."""
    with pytest.raises(UnsafePath):
        normalize_path(raw)


@given(st.text(alphabet="/.%2fFe5cA0az~ -\\", max_size=24))
def test_normalize_path_shortcut_agrees(raw: str) -> None:
    """The shortcut for already-normal paths never changes what normalization gives."""
    try:
        expected = normalize_path_slowly(raw)
    except UnsafePath:
        with pytest.raises(UnsafePath):
            normalize_path(raw)
        return
    assert normalize_path(raw) == expected


@pytest.mark.parametrize(
    ("raw", "readings"),
    [
        ("/v1/instances", []),  # the common path: none
        ("/v1/instances;x", [("/v1/instances", PARAMETERS)]),
        ("/V1/Instances", [("/v1/instances", LENIENT)]),
        ("/v1/instances.json", [("/v1/instances", LENIENT)]),
        ("/v1/instances.", [("/v1/instances", LENIENT)]),
        ("/v1/instances%3b", [("/v1/instances", LENIENT)]),
        ("/v1/instances%3bx/y.json", [("/v1/instances/y", LENIENT)]),
        ("/v1/instances.-", [("/v1/instances", LENIENT)]),  # Rails: any format but "./?"
        ("/v1/instances.a.b", [("/v1/instances", LENIENT)]),  # Spring's suffix match: ".*"
        ("/v1/instance%2573", [("/v1/instances", LENIENT)]),  # decoded twice, by two layers
        ("/v1/.json", []),  # no name before the dot: no suffix
        ("/v1/x/%252e%252e/instances", [("/v1/instances", LENIENT)]),  # then normalized
        ("/v1%252F%252Finstances%252F", [("/v1/instances", LENIENT)]),
        ("/v1.0/instances", []),  # a dot in another segment
        ("//evil/v1/instances", [("/v1/instances", AUTHORITY)]),
        ("///evil/v1/instances", [("/v1/instances", AUTHORITY)]),
        (
            "//a@b:1/V1/x;y",
            [
                ("/V1/x;y", AUTHORITY),
                ("/a@b:1/V1/x", PARAMETERS),
                ("/a@b:1/v1/x", LENIENT),
                ("/V1/x", AUTHORITY),
                ("/v1/x", AUTHORITY),
            ],
        ),
        ("//evil", [("/", AUTHORITY)]),
        ("//v1/instances", [("/instances", AUTHORITY)]),
        ("//a/..", []),  # no safe reading after the host: none
        # a front controller routes what follows the script's name (found in review)
        ("/index.php/v1/instances", [("/v1/instances", SCRIPT)]),
        (
            "/a/App.Php5/v1/x",
            [("/a/app.php5/v1/x", LENIENT), ("/a/v1/x", SCRIPT), ("/v1/x", SCRIPT)],
        ),
        ("/x.php.bak/v1/instances", []),
        ("/index.php", [("/index", LENIENT), ("/", SCRIPT)]),
        ("/api/index.php/v1/x", [("/api/v1/x", SCRIPT), ("/v1/x", SCRIPT)]),
        ("/index.php;x/v1/x", [("/index.php/v1/x", PARAMETERS), ("/v1/x", SCRIPT)]),  # (review)
    ],
)
def test_second_readings_of_a_path(raw: str, readings: list[tuple[str, str]]) -> None:
    """How common upstream servers read a path otherwise (found by QA: "//evil/v1/instances" and
    "/V1/Instances" went unjudged to upstreams that route them to the launch path)."""
    assert second_readings(raw, normalize_path(raw)) == readings


def _shipped_copy(tmp_path: Path) -> Path:
    """The shipped configuration, every file of it, copied into ``tmp_path``."""
    folder = tmp_path / "config"
    shutil.copytree(SHIPPED, folder, ignore=shutil.ignore_patterns("data", "*.pem"))
    return folder / "launchgate.toml"


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "+nan"])
@pytest.mark.parametrize(
    ("file", "line", "key"),
    [
        ("launchgate.toml", "leeway_s", "tokens.leeway_s"),
        ("launchgate.toml", "timeout_s", "upstream.timeout_s"),
        ("launchgate.toml", "connect_timeout_s", "upstream.connect_timeout_s"),
        ("launchgate.toml", "reservation_ttl_s", "store.reservation_ttl_s"),
        ("catalog.toml", "tpp", "accelerators.A100-SXM4-40GB.tpp"),
        ("catalog.toml", "die_area_mm2", "accelerators.A100-SXM4-40GB.die_area_mm2"),
    ],
)
def test_nan_and_inf_are_refused_naming_file_and_key(
    tmp_path: Path, file: str, line: str, key: str, value: str
) -> None:
    """No setting takes nan or inf. A NaN compares false with everything: a leeway of nan let
    expired tokens through, a TPP of nan made an H100 uncontrolled, a timeout of nan failed
    every request after it had gone upstream."""
    main = _shipped_copy(tmp_path)
    target = main.parent / file
    text = target.read_text()
    if file == "catalog.toml":  # the A100's own line
        head, _, rest = text.partition('[accelerators."A100-SXM4-40GB"]')
        rest = re.sub(rf"(?m)^{line} = .*$", f"{line} = {value}", rest, count=1)
        text = head + '[accelerators."A100-SXM4-40GB"]' + rest
    else:
        text, found = re.subn(rf"(?m)^#? *{line} = .*$", f"{line} = {value}", text, count=1)
        assert found, f"{line} is not in the shipped {file}"
    target.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(main)
    assert f"{target}: {key}: must be a finite number" in str(caught.value)


@pytest.mark.parametrize("file", ["launchgate.toml", "catalog.toml", "accounts.toml"])
def test_a_file_that_is_not_utf8_is_a_config_error_quoting_no_content(
    tmp_path: Path, file: str
) -> None:
    """TOML is UTF-8: other bytes are a ConfigError naming the file (not a traceback), and
    the message quotes the offending byte, not the file."""
    main = _shipped_copy(tmp_path)
    target = main.parent / file
    target.write_bytes(target.read_bytes() + b'\nsecret = "hunter2\xff"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(main)
    message = str(caught.value)
    assert f"{target}: not valid TOML: not UTF-8 (byte 0xff" in message
    assert "hunter2" not in message
