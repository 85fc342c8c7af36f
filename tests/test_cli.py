"""The ``launchgate`` command line end to end (CONTRACT section 1).

Behaviour that shows in the process itself (exit status, what is on stdout and stderr,
no traceback) runs the real console entry, ``python -m launchgate``; the rest calls
``launchgate.cli.main`` in-process, which runs the same code faster.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import http.client
import json
import logging
import os
import re
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information
import jwt
import pytest
import structlog
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from conftest import (
    CPU_SKU,
    H100_SKU,
    ISSUER,
    RECORD_FIELDS,
    RESTRICTED,
    SHIPPED,
    UNRESTRICTED,
    Keys,
    MakeToken,
    StartGateway,
    write_config,
)
from launchgate.audit import AuditLog
from launchgate.cli import main
from launchgate.config import load_config
from launchgate.gateway import make_verifier
from launchgate.ledger import Ledger, LicenseState, ReserveOutcome, ReserveResult, open_ledger
from launchgate.sqliteledger import SqliteLedger
from launchgate.tokens import load_private_key
from test_ledger import postgres_schema

T = TypeVar("T")
NOWHERE = "http://127.0.0.1:9"  # an upstream no CLI command ever calls
COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
# CONTRACT section 5's required fields without the chain fields (seq, prev_hash, hash).
CHAIN_FIELDS = {"seq", "prev_hash", "hash"}  # `decide` chains nothing: null


# --- running the command line ------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str


def run_cli(*argv: str | Path, cwd: Path | None = None, stdin: str | None = None) -> Result:
    """The real console entry in a child process."""
    done = subprocess.run(
        [sys.executable, "-m", "launchgate", *map(str, argv)],
        capture_output=True,
        text=True,
        cwd=cwd,
        input=stdin,
        timeout=60,
    )
    return Result(done.returncode, done.stdout, done.stderr)


async def run_cli_async(*argv: str | Path) -> Result:
    """``run_cli`` without blocking the event loop a gateway under test runs on."""
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "launchgate", *map(str, argv)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return Result(process.returncode, out.decode(), err.decode())


def run_main(capsys: pytest.CaptureFixture[str], *argv: str | Path) -> Result:
    """``launchgate.cli.main`` in this process."""
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return Result(code, captured.out, captured.err)


def assert_user_error(result: Result, *names: str) -> None:
    """Exit 2, nothing on stdout, one line on stderr that names each of ``names``."""
    assert result.code == 2, result
    assert "Traceback" not in result.err, result.err
    lines = result.err.splitlines()
    assert len(lines) == 1, result.err
    for name in names:
        assert name in lines[0], (name, lines[0])
    assert result.out == ""


def issue_argv(key: Path, **flags: str | None) -> list[str]:
    """``token issue`` with valid flags for the restricted demo account; a keyword
    (``max_accelerators="0"``) replaces a flag's value, None leaves the flag out."""
    values: dict[str, str | None] = {
        "--key": str(key),
        "--kid": "k-ed",
        "--issuer": ISSUER,
        "--account": RESTRICTED,
        "--sku": H100_SKU,
        "--max-accelerators": "64",
        "--expires-in": "1h",
    }
    values |= {f"--{name.replace('_', '-')}": value for name, value in flags.items()}
    argv = ["token", "issue"]
    for flag, value in values.items():
        if value is not None:
            argv += [flag, value]
    return argv


def in_ledger(config_path: Path, op: Callable[[Ledger], Awaitable[T]]) -> T:
    """Run ``op`` on the configured ledger, as another process would."""
    config = load_config(config_path)

    async def run() -> T:
        ledger = open_ledger(config.store_url, config.base_dir)
        await ledger.open()
        try:
            return await op(ledger)
        finally:
            await ledger.close()

    return asyncio.run(run())


async def _reserve(
    ledger: Ledger, jti: str, amount: int, decision_id: str, settle: str | None
) -> None:
    now = time.time()
    await ledger.reserve(
        jti=jti,
        account=RESTRICTED,
        max_accelerators=64,
        expires=now + 3600,
        amount=amount,
        decision_id=decision_id,
        now=now,
    )
    if settle == "commit":
        await ledger.commit(decision_id, now)
    elif settle == "unknown":
        await ledger.settle_unknown(decision_id, now, "upstream outcome unknown")


def reserve(
    config_path: Path, jti: str, amount: int, decision_id: str, settle: str | None = "commit"
) -> None:
    """Reserve ``amount`` of license ``jti`` (max 64) and settle it: commit, unknown or None."""
    in_ledger(config_path, lambda ledger: _reserve(ledger, jti, amount, decision_id, settle))


def license_state(config_path: Path, jti: str) -> LicenseState | None:
    return in_ledger(config_path, lambda ledger: ledger.license(jti))


def jti_of(token: str) -> str:
    jti: str = jwt.decode(token, options={"verify_signature": False})["jti"]
    return jti


@pytest.fixture
def config_path(tmp_path: Path, keys: Keys) -> Path:
    """A complete configuration in tmp_path (ledger and decision log there too)."""
    return write_config(tmp_path, NOWHERE, keys)


# --- help ----------------------------------------------------------------------------------

# Every command path, with the flags CONTRACT section 1 gives it.
COMMANDS: list[tuple[str, list[str]]] = [
    ("", ["serve", "check", "keys", "token", "licenses", "decide", "classify", "audit"]),
    ("serve", ["--config"]),
    ("check", ["--config"]),
    ("keys", ["generate"]),
    ("keys generate", ["--kid", "--out-dir", "--alg"]),
    ("token", ["issue", "inspect", "revoke"]),
    (
        "token issue",
        [
            "--key",
            "--kid",
            "--issuer",
            "--account",
            "--sku",
            "--max-accelerators",
            "--expires-in",
            "--audience",
            "--region",
            "--license-ref",
            "--not-before",
        ],
    ),
    ("token inspect", ["--config", "TOKEN"]),
    ("token revoke", ["--config", "JTI", "--reason"]),
    ("licenses", ["list", "release"]),
    ("licenses list", ["--config", "--json"]),
    ("licenses release", ["--config", "--decision"]),
    ("decide", ["--config", "--account", "--sku", "--count", "--region", "--token"]),
    ("classify", ["--tpp", "--die-area", "--not-datacenter"]),
    ("audit", ["verify"]),
    ("audit verify", ["FILE"]),
    ("stub-backend", ["--listen"]),
]


@pytest.mark.parametrize(
    ("command", "flags"), COMMANDS, ids=[c or "launchgate" for c, _ in COMMANDS]
)
def test_every_command_prints_help(
    capsys: pytest.CaptureFixture[str], command: str, flags: list[str]
) -> None:
    """Every command and sub-command prints --help, naming its CONTRACT flags, exit 0."""
    result = run_main(capsys, *command.split(), "--help")
    assert result.code == 0
    assert result.out.startswith(f"usage: launchgate {command}".rstrip())
    for flag in flags:
        assert flag in result.out, flag
    assert result.err == ""


@pytest.mark.parametrize("argv", [["--help"], ["token", "issue", "--help"], ["stub-backend", "-h"]])
def test_help_from_the_console_entry(argv: list[str]) -> None:
    """`python -m launchgate ... --help` prints usage on stdout and exits 0."""
    result = run_cli(*argv)
    assert result.code == 0
    assert result.out.startswith("usage: launchgate")
    assert result.err == ""


# --- user errors ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Ctx:
    tmp: Path
    config: Path
    keys: Keys

    @property
    def pem(self) -> Path:
        return self.keys.folder / "k-ed.pem"

    def bad_config(self, **sections: dict[str, Any]) -> Path:
        """A configuration in its own folder with ``sections`` merged in."""
        folder = self.tmp / "bad"
        folder.mkdir(exist_ok=True)
        return write_config(folder, NOWHERE, self.keys, None, **sections)

    def text_file(self, name: str, text: str) -> Path:
        path = self.tmp / name
        path.write_text(text)
        return path


Case = Callable[[Ctx], tuple[Sequence[str | Path], Sequence[str | Path]]]


def _missing_config(c: Ctx) -> tuple[list[str | Path], list[str | Path]]:
    return ["check", "--config", c.tmp / "nope.toml"], [c.tmp / "nope.toml"]


def _not_toml(c: Ctx) -> tuple[list[str | Path], list[str | Path]]:
    path = c.text_file("broken.toml", "[server\nlisten = 1\n")
    return ["check", "--config", path], [path]


def _config_case(key: str, **sections: dict[str, Any]) -> Case:
    """`check` on a main file with ``sections`` merged in names the file and ``key``."""

    def case(c: Ctx) -> tuple[list[str | Path], list[str | Path]]:
        path = c.bad_config(**sections)
        return ["check", "--config", path], [path, key]

    return case


def _key_case(make: Callable[[Ctx], Path]) -> Case:
    """`token issue --key PEM` with a PEM that is not usable names the PEM."""

    def case(c: Ctx) -> tuple[list[str | Path], list[str | Path]]:
        key = make(c)
        return [*issue_argv(key)], [key]

    return case


USER_ERRORS: list[Any] = [
    pytest.param(lambda c: (["frobnicate"], ["frobnicate"]), id="unknown-command"),
    pytest.param(lambda c: (["keys", "rotate"], ["rotate"]), id="unknown-sub-command"),
    pytest.param(lambda c: (["keys"], ["generate"]), id="missing-sub-command"),
    pytest.param(
        lambda c: (["classify", "--tpp", "1", "--die-area", "1", "--bogus"], ["--bogus"]),
        id="unknown-flag",
    ),
    pytest.param(lambda c: (issue_argv(c.pem, kid=None), ["--kid"]), id="issue-missing-kid"),
    # An unknown key id (CONTRACT section 1), in the JWK Set beside the key (found by QA: a
    # token was printed, and every gateway trusting that set refused it).
    pytest.param(
        lambda c: (issue_argv(c.pem, kid="k-nosuch"), ["--kid", "k-nosuch", "jwks.json"]),
        id="issue-unknown-kid",
    ),
    pytest.param(  # the set holds k-es, but for the P-256 key, not this Ed25519 one
        lambda c: (issue_argv(c.pem, kid="k-es"), ["--kid", "k-es", "jwks.json"]),
        id="issue-kid-of-another-key",
    ),
    pytest.param(lambda c: (issue_argv(c.pem, sku=None), ["--sku"]), id="issue-missing-sku"),
    pytest.param(lambda c: (["check"], ["--config"]), id="check-missing-config"),
    pytest.param(
        lambda c: (["decide", "--config", c.config], ["--account"]), id="decide-no-account"
    ),
    pytest.param(lambda c: (["audit", "verify"], ["FILE"]), id="audit-verify-no-file"),
    *(
        pytest.param(
            lambda c, v=value: (issue_argv(c.pem, expires_in=v), ["--expires-in"]),
            id=f"expires-in-{value}",
        )
        for value in ["90", "12w", "0d", "-1d", "1.5s", "d", "90 d"]
    ),
    *(
        pytest.param(
            lambda c, v=value: (issue_argv(c.pem, max_accelerators=v), ["--max-accelerators"]),
            id=f"max-accelerators-{value}",
        )
        for value in ["0", "-8", "eight"]
    ),
    pytest.param(
        lambda c: (issue_argv(c.pem, not_before="next tuesday"), ["--not-before"]),
        id="not-before-not-iso",
    ),
    pytest.param(lambda c: (issue_argv(c.pem, sku=""), ["--sku"]), id="empty-sku"),
    pytest.param(lambda c: (issue_argv(c.pem, account=""), ["--account"]), id="empty-account"),
    pytest.param(_missing_config, id="missing-config-file"),
    pytest.param(_not_toml, id="config-not-toml"),
    pytest.param(_config_case("bogus", server={"bogus": 1}), id="config-unknown-key"),
    pytest.param(_config_case("mode", server={"mode": "loud"}), id="config-bad-mode"),
    pytest.param(_config_case("leeway_s", tokens={"leeway_s": "30"}), id="config-bad-leeway"),
    pytest.param(_config_case("url", upstream={"url": "ftp://x"}), id="config-bad-upstream"),
    pytest.param(_config_case("listen", server={"listen": "nohost"}), id="config-bad-listen"),
    pytest.param(_config_case("issuers", tokens={"issuers": "one"}), id="config-bad-issuers"),
    pytest.param(_config_case("url", store={"url": "mysql://db"}), id="config-bad-store"),
    pytest.param(
        _config_case("D:9", policy={"restricted_country_groups": ["D:9"]}),
        id="config-unknown-country-group",
    ),
    pytest.param(_key_case(lambda c: c.tmp / "missing.pem"), id="missing-key-pem"),
    pytest.param(_key_case(lambda c: c.keys.folder / "jwks.json"), id="key-is-jwks"),
    pytest.param(_key_case(lambda c: c.text_file("fake.pem", "hello\n")), id="key-not-pem"),
    pytest.param(_key_case(lambda c: c.keys.folder), id="key-is-folder"),
    pytest.param(
        lambda c: (
            ["keys", "generate", "--kid", "k1", "--out-dir", c.tmp, "--alg", "RS256"],
            ["--alg"],
        ),
        id="keys-bad-alg",
    ),
    pytest.param(
        lambda c: (["keys", "generate", "--kid", "../k1", "--out-dir", c.tmp], ["../k1"]),
        id="keys-bad-kid",
    ),
    pytest.param(
        lambda c: (
            ["licenses", "release", "--config", c.config, "--decision", "01NOSUCHDECISION"],
            ["--decision", "01NOSUCHDECISION"],
        ),
        id="release-unknown-decision",
    ),
    pytest.param(
        lambda c: (["audit", "verify", c.tmp / "gone.jsonl"], [c.tmp / "gone.jsonl"]),
        id="audit-verify-missing-file",
    ),
    pytest.param(lambda c: (["audit", "verify", c.tmp], [c.tmp]), id="audit-verify-folder"),
    pytest.param(
        lambda c: (["token", "inspect", "--config", c.tmp / "nope.toml", "x.y.z"], ["nope.toml"]),
        id="inspect-missing-config",
    ),
    pytest.param(
        lambda c: (
            ["decide", "--config", c.config, "--account", "a", "--sku", "s", "--count", "0"],
            ["--count"],
        ),
        id="decide-count-0",
    ),
    pytest.param(  # over MAX_COUNT: the gateway answers malformed_request, decide must not allow
        lambda c: (
            ["decide", "--config", c.config, "--account", "a", "--sku", "s", "--count", "100001"],
            ["--count", "100000"],
        ),
        id="decide-count-over-the-gateway-limit",
    ),
    *(
        pytest.param(
            lambda c, f=flag, v=value: (
                ["classify", "--tpp", "1000", "--die-area", "100", f, v],
                [f],
            ),
            id=f"classify{flag}-{value}",
        )
        for flag, value in [("--tpp", "0"), ("--die-area", "-1"), ("--tpp", "nan"), ("--tpp", "x")]
    ),
    pytest.param(lambda c: (["stub-backend", "--listen", "nohost"], ["--listen"]), id="bad-listen"),
    # An unknown flag is named even when a required argument is missing too.
    pytest.param(lambda c: (["--bogus"], ["--bogus"]), id="unknown-top-level-flag"),
    pytest.param(lambda c: (["serve", "--conifg", c.config], ["--conifg"]), id="misspelt-flag"),
    pytest.param(lambda c: (["serve", "--bogus=1"], ["--bogus=1"]), id="unknown-flag-with-value"),
    # ... but what argparse takes (a "-" value, a negative number, an abbreviation) is not one.
    pytest.param(lambda c: (["token", "inspect", "-"], ["--config"]), id="dash-value-is-no-flag"),
    pytest.param(
        lambda c: (["classify", "--tpp", "-.5"], ["--die-area"]), id="negative-value-is-no-flag"
    ),
    pytest.param(
        lambda c: (["decide", "--conf", c.config, "--acc", "a"], ["--sku"]),
        id="abbreviations-are-no-unknown-flags",
    ),
    pytest.param(
        lambda c: (["stub-backend", "--listen", "127.0.0.1:70000"], ["--listen"]), id="bad-port"
    ),
    pytest.param(
        lambda c: (
            ["stub-backend", "--listen", "127.0.0.1:0", "--keep-last", "0"],
            ["--keep-last"],
        ),
        id="bad-keep-last",
    ),
]


@pytest.mark.parametrize("case", USER_ERRORS)
def test_user_errors_exit_2_with_one_line(tmp_path: Path, keys: Keys, case: Case) -> None:
    """A user error exits 2 with one stderr line naming the file, key or flag; no traceback."""
    ctx = Ctx(tmp_path, write_config(tmp_path, NOWHERE, keys), keys)
    argv, names = case(ctx)
    result = run_cli(*argv, cwd=tmp_path)
    assert_user_error(result, *map(str, names))


def test_stub_backend_on_a_taken_port_is_a_user_error() -> None:
    """stub-backend on a port that is already bound exits 2 naming --listen, no traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("stub-backend", "--listen", f"127.0.0.1:{port}")
    assert_user_error(result, "--listen", str(port))


# --- check ---------------------------------------------------------------------------------


def test_check_accepts_the_shipped_configuration(tmp_path: Path) -> None:
    """`check` on config/launchgate.toml prints exactly `ok` and exits 0 (from any folder)."""
    result = run_cli("check", "--config", SHIPPED / "launchgate.toml", cwd=tmp_path)
    assert (result.code, result.out, result.err) == (0, "ok\n", "")


def test_check_accepts_a_test_configuration(
    capsys: pytest.CaptureFixture[str], config_path: Path
) -> None:
    """`check` on a complete configuration prints ok."""
    assert run_main(capsys, "check", "--config", config_path) == Result(0, "ok\n", "")


BROKEN_FILES: list[Any] = [
    pytest.param(
        "catalog",
        "catalog.toml",
        '[accelerators."X1"]\ndie_area_mm2 = 800\n'
        '[skus."x1.large"]\naccelerator = "X1"\naccelerators_per_instance = 1\n',
        "tpp",
        id="catalog-accelerator-without-tpp",
    ),
    pytest.param(
        "catalog",
        "catalog.toml",
        '[skus."x1.large"]\naccelerator = "NOPE"\naccelerators_per_instance = 1\n',
        "NOPE",
        id="catalog-sku-unknown-accelerator",
    ),
    pytest.param(
        "accounts",
        "accounts.toml",
        '[accounts."acct-9"]\nbilling_country = "CHN"\nheadquarters_country = "CN"\n'
        'ultimate_parent_country = "CN"\n',
        "billing_country",
        id="accounts-bad-country-code",
    ),
    pytest.param(
        "accounts",
        "accounts.toml",
        '[accounts."acct-9"]\nbilling_country = "CN"\nheadquarters_country = "CN"\n',
        "ultimate_parent_country",
        id="accounts-missing-country",
    ),
    pytest.param("tokens", "jwks.json", '{"keys": [', "JSON", id="jwks-not-json"),
    pytest.param(
        "tokens",
        "jwks.json",
        '{"keys": [{"kid": "k1", "alg": "HS256", "kty": "oct", "k": "c2VjcmV0"}]}',
        "HS256",
        id="jwks-hmac-key",
    ),
    pytest.param(
        "policy",
        "groups.toml",
        '[groups]\n"D:5" = ["CN", "China"]\n',
        "China",
        id="country-groups-bad-code",
    ),
]


@pytest.mark.parametrize(("section", "name", "text", "key"), BROKEN_FILES)
def test_check_names_a_broken_referenced_file(
    tmp_path: Path, keys: Keys, section: str, name: str, text: str, key: str
) -> None:
    """`check` exits 2 naming the referenced file at fault and what in it is wrong."""
    broken = tmp_path / name
    broken.write_text(text)
    option = {
        "catalog": {"file": str(broken)},
        "accounts": {"file": str(broken)},
        "tokens": {"jwks": str(broken)},
        "policy": {"country_groups_file": str(broken)},
    }[section]
    path = write_config(tmp_path, NOWHERE, keys, None, **{section: option})
    assert_user_error(run_cli("check", "--config", path), str(broken), key)


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda log: log.mkdir(), "Is a directory"),
        (lambda log: log.write_text('{"seq": 1, "hash": "ab'), "last record is not intact"),
    ],
    ids=["a-folder", "a-torn-last-line"],
)
def test_check_refuses_a_decision_log_serve_would_refuse(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    keys: Keys,
    make: Callable[[Path], object],
    says: str,
) -> None:
    """`check` said ok where `serve` then refused the decision log; both name the key now."""
    log = tmp_path / "decisions.jsonl"
    make(log)
    path = write_config(tmp_path, NOWHERE, keys, None, audit={"path": str(log)})
    result = run_main(capsys, "check", "--config", path)
    assert result.code == 2
    assert f"{path}: [audit].path: {log}" in result.err and says in result.err


def _newer_ledger(path: Path) -> None:
    conn = sqlite3.connect(path)
    conn.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    conn.execute("INSERT INTO schema_version VALUES (999)")
    conn.commit()
    conn.close()


@pytest.mark.parametrize(
    ("make", "says"),
    [
        (lambda p: p.write_bytes(os.urandom(4096)), "is not a SQLite database"),
        (lambda p: p.write_bytes(b"SQLite format 3"), "is not a SQLite database"),
        (lambda p: p.mkdir(), "is not a file"),
        (_newer_ledger, "schema version 999"),
    ],
    ids=["random-bytes", "cut-header", "folder", "newer-schema"],
)
def test_check_refuses_a_ledger_file_serve_could_not_use(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    keys: Keys,
    make: Callable[[Path], object],
    says: str,
) -> None:
    """Found by QA: `check` said ok for a ledger file of random bytes, which /readyz then
    reported as "file is not a database". A ledger not there yet, or a real one, is fine."""
    ledger = tmp_path / "ledger.sqlite3"
    path = write_config(tmp_path, NOWHERE, keys, None, store={"url": f"sqlite:{ledger}"})
    assert run_main(capsys, "check", "--config", path).code == 0  # not there: serve makes it
    assert not ledger.exists()
    assert run_main(capsys, "token", "revoke", "--config", path, "lic-1").code == 0  # a real one
    files = sorted(tmp_path.glob("ledger.sqlite3*"))
    assert run_main(capsys, "check", "--config", path).code == 0
    assert sorted(tmp_path.glob("ledger.sqlite3*")) == files  # only read (found in review)
    for leftover in tmp_path.glob("ledger.sqlite3*"):
        leftover.unlink()
    make(ledger)
    result = run_main(capsys, "check", "--config", path)
    assert_user_error(result, f"{path}: [store].url: {ledger}")
    assert says in result.err


@pytest.mark.parametrize(
    ("what", "how", "says"),
    [
        ("audit", "a-file-on-the-way", "Not a directory"),
        ("audit", "a-folder-not-writable", "is not writable by this user"),
        ("store", "a-file-on-the-way", "is not a folder"),
        ("store", "a-folder-not-writable", "is not writable by this user"),
        ("store", "not-writable", "not writable by this user"),  # (a log: open() answers)
    ],
)
def test_check_refuses_a_log_or_ledger_this_user_could_not_create_or_write(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    keys: Keys,
    monkeypatch: pytest.MonkeyPatch,
    what: str,
    how: str,
    says: str,
) -> None:
    """Found by QA: `check` said ok for a decision log under a folder the gateway's user could
    not write (a container's mounted configuration without data/), and `serve` then failed.
    (The tests run as root, who may write anywhere: os.access plays the permissions.)"""
    folder = tmp_path / "mnt"
    target = folder / "data" / ("decisions.jsonl" if what == "audit" else "ledger.sqlite3")
    if how == "a-file-on-the-way":
        folder.write_text("not a folder")
    else:
        folder.mkdir()
        if how == "not-writable":  # a ledger there already, made by another user
            target.parent.mkdir()
            sqlite3.connect(target).close()
        denied = {folder, target}
        real_access = os.access
        monkeypatch.setattr(
            "launchgate.files.os.access", lambda p, m: real_access(p, m) and Path(p) not in denied
        )
    section = {"path": str(target)} if what == "audit" else {"url": f"sqlite:{target}"}
    path = write_config(tmp_path, NOWHERE, keys, None, **{what: section})
    result = run_main(capsys, "check", "--config", path)
    assert_user_error(result, f"{path}: {'[audit].path' if what == 'audit' else '[store].url'}: ")
    assert re.search(says, result.err), result.err


@pytest.mark.parametrize("what", ["audit", "store"])
def test_check_follows_links_as_serve_does(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    keys: Keys,
    monkeypatch: pytest.MonkeyPatch,
    what: str,
) -> None:
    """Found in review: a ledger that is a link into a writable folder, from a folder this user
    cannot write, was refused (SQLite writes beside the target, and `serve` ran); a folder that
    is a link leading nowhere passed (`serve` cannot make a folder where it stands)."""
    name = "decisions.jsonl" if what == "audit" else "ledger.sqlite3"
    volume, folder = tmp_path / "volume", tmp_path / "cfg-data"
    volume.mkdir()
    folder.mkdir()
    if what == "store":
        sqlite3.connect(volume / name).close()
    else:
        (volume / name).write_bytes(b"")
    (folder / name).symlink_to(volume / name)
    real_access = os.access
    monkeypatch.setattr(
        "launchgate.files.os.access", lambda p, m: real_access(p, m) and Path(p) != folder
    )

    def check(target: Path) -> Result:
        section = {"path": str(target)} if what == "audit" else {"url": f"sqlite:{target}"}
        path = write_config(tmp_path, NOWHERE, keys, None, **{what: section})
        return run_main(capsys, "check", "--config", path)

    assert check(folder / name) == Result(0, "ok\n", "")
    (tmp_path / "nowhere").symlink_to(tmp_path / "not-there")
    result = check(tmp_path / "nowhere" / name)
    assert_user_error(result, f"{tmp_path / 'nowhere'} is not a folder")
    (folder / "dangling").symlink_to(tmp_path / "not-there" / name)  # (found in review)
    result = check(folder / "dangling")
    assert_user_error(result, f"{folder / 'dangling'} leads to {tmp_path / 'not-there' / name}")


def test_check_creates_no_decision_log(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, keys: Keys
) -> None:
    """A log not there yet is fine (serve creates it), and `check` leaves it not there."""
    log = tmp_path / "logs" / "decisions.jsonl"
    path = write_config(tmp_path, NOWHERE, keys, None, audit={"path": str(log)})
    assert run_main(capsys, "check", "--config", path).code == 0
    assert not log.parent.exists()


def test_check_resolves_paths_against_the_config_folder(tmp_path: Path, keys: Keys) -> None:
    """Relative paths are taken from the main file's folder, not the working directory."""
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "keys").mkdir()
    (folder / "keys" / "jwks.json").write_text((keys.folder / "jwks.json").read_text())
    path = write_config(
        folder,
        NOWHERE,
        keys,
        tokens={"jwks": "keys/jwks.json"},
        catalog={"file": "catalog.toml"},
    )
    (folder / "catalog.toml").write_text((SHIPPED / "catalog.toml").read_text())
    assert run_cli("check", "--config", path, cwd=tmp_path).out == "ok\n"
    (folder / "catalog.toml").unlink()
    assert_user_error(run_cli("check", "--config", path, cwd=folder), str(folder / "catalog.toml"))


# --- keys generate -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("alg_flag", "alg", "kty", "crv", "key_type"),
    [
        ([], "EdDSA", "OKP", "Ed25519", Ed25519PrivateKey),
        (["--alg", "EdDSA"], "EdDSA", "OKP", "Ed25519", Ed25519PrivateKey),
        (["--alg", "ES256"], "ES256", "EC", "P-256", ec.EllipticCurvePrivateKey),
    ],
    ids=["default", "EdDSA", "ES256"],
)
def test_keys_generate_writes_pem_and_jwks(
    tmp_path: Path, alg_flag: list[str], alg: str, kty: str, crv: str, key_type: type
) -> None:
    """DIR/KID.pem is PKCS#8 PEM mode 0600; DIR/jwks.json gets the public key, kid and alg."""
    out = tmp_path / "new" / "keys"
    result = run_cli("keys", "generate", "--kid", "2026-11", "--out-dir", out, *alg_flag)
    assert result.code == 0, result.err
    assert result.out == ""
    assert sorted(os.listdir(out)) == ["2026-11.pem", "jwks.json"]
    pem = out / "2026-11.pem"
    assert stat.S_IMODE(pem.stat().st_mode) == 0o600
    text = pem.read_text()
    assert text.startswith("-----BEGIN PRIVATE KEY-----\n")  # PKCS#8, not a legacy format
    assert text.rstrip().endswith("-----END PRIVATE KEY-----")
    private = serialization.load_pem_private_key(text.encode(), password=None)
    assert isinstance(private, key_type)
    [jwk] = json.loads((out / "jwks.json").read_text())["keys"]
    assert (jwk["kid"], jwk["alg"], jwk["kty"], jwk["crv"]) == ("2026-11", alg, kty, crv)
    assert "d" not in jwk  # public keys only
    public = private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    ring = (
        load_private_key(pem)
        .public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    assert public == ring


def test_keys_generate_keeps_other_keys(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A second key joins jwks.json; the first stays, byte for byte the same JWK."""
    assert run_main(capsys, "keys", "generate", "--kid", "a", "--out-dir", tmp_path).code == 0
    [first] = json.loads((tmp_path / "jwks.json").read_text())["keys"]
    args = ("keys", "generate", "--kid", "b", "--out-dir", tmp_path, "--alg", "ES256")
    assert run_main(capsys, *args).code == 0
    keys = json.loads((tmp_path / "jwks.json").read_text())["keys"]
    assert keys[0] == first
    assert [(k["kid"], k["alg"]) for k in keys] == [("a", "EdDSA"), ("b", "ES256")]
    assert {p.name for p in tmp_path.iterdir()} == {"a.pem", "b.pem", "jwks.json"}


@pytest.mark.parametrize("alg", ["EdDSA", "ES256"])
def test_keys_generate_refuses_an_existing_kid(tmp_path: Path, alg: str) -> None:
    """A kid already generated: exit 2 with one line naming it; PEM and JWK Set untouched."""
    assert run_cli("keys", "generate", "--kid", "k1", "--out-dir", tmp_path).code == 0
    pem, jwks = (tmp_path / "k1.pem").read_bytes(), (tmp_path / "jwks.json").read_bytes()
    result = run_cli("keys", "generate", "--kid", "k1", "--out-dir", tmp_path, "--alg", alg)
    assert_user_error(result, "k1")
    assert (tmp_path / "k1.pem").read_bytes() == pem
    assert (tmp_path / "jwks.json").read_bytes() == jwks
    assert {p.name for p in tmp_path.iterdir()} == {"k1.pem", "jwks.json"}


def test_keys_generate_refuses_an_existing_pem(tmp_path: Path) -> None:
    """DIR/KID.pem already there (its JWK gone): exit 2 naming the PEM, which is untouched."""
    assert run_cli("keys", "generate", "--kid", "k1", "--out-dir", tmp_path).code == 0
    pem = (tmp_path / "k1.pem").read_bytes()
    (tmp_path / "jwks.json").unlink()
    result = run_cli("keys", "generate", "--kid", "k1", "--out-dir", tmp_path)
    assert_user_error(result, str(tmp_path / "k1.pem"))
    assert (tmp_path / "k1.pem").read_bytes() == pem
    assert stat.S_IMODE((tmp_path / "k1.pem").stat().st_mode) == 0o600


def test_keys_generate_refuses_a_broken_jwks(tmp_path: Path) -> None:
    """A jwks.json that is not a JWK Set is never overwritten, and no PEM is left behind."""
    (tmp_path / "jwks.json").write_text("not json")
    assert_user_error(
        run_cli("keys", "generate", "--kid", "k1", "--out-dir", tmp_path),
        str(tmp_path / "jwks.json"),
    )
    assert (tmp_path / "jwks.json").read_text() == "not json"
    assert not (tmp_path / "k1.pem").exists()


# --- token issue ---------------------------------------------------------------------------


def issue(keys: Keys, *extra: str, kid: str = "k-ed") -> tuple[str, dict[str, Any]]:
    """Run `token issue` for real; return the token and its claims (signature unchecked)."""
    result = run_cli(*issue_argv(keys.folder / f"{kid}.pem", kid=kid), *extra)
    assert result.code == 0, result.err
    assert result.err == ""
    token = result.out.removesuffix("\n")
    assert result.out == token + "\n"  # exactly one line
    assert COMPACT_JWS.fullmatch(token), result.out
    return token, jwt.decode(token, options={"verify_signature": False})


def test_token_issue_prints_one_compact_jws_with_the_claims(keys: Keys) -> None:
    """stdout is one compact JWS; its claims are CONTRACT section 4's, aud defaults."""
    before = int(time.time())
    token, claims = issue(keys)
    after = int(time.time())
    assert jwt.get_unverified_header(token) == {"alg": "EdDSA", "kid": "k-ed", "typ": "JWT"}
    assert set(claims) == {"iss", "aud", "sub", "jti", "iat", "exp", "skus", "max_accelerators"}
    assert claims["iss"] == ISSUER
    assert claims["aud"] == "launchgate"
    assert claims["sub"] == RESTRICTED
    assert isinstance(claims["jti"], str) and claims["jti"]
    assert before <= claims["iat"] <= after
    assert claims["exp"] - claims["iat"] == 3600
    assert claims["skus"] == [H100_SKU]
    assert claims["max_accelerators"] == 64
    assert type(claims["max_accelerators"]) is int


def test_token_issue_optional_claims(keys: Keys) -> None:
    """Repeated --sku/--region, --license-ref, --audience and --not-before land in the claims."""
    _, claims = issue(
        keys,
        *("--sku", "p4d.24xlarge", "--region", "us-east-1", "--region", "eu-west-1"),
        *("--license-ref", "D1234567", "--audience", "gate-eu"),
        *("--not-before", "2027-01-01T00:00:00+01:00"),
    )
    assert claims["skus"] == [H100_SKU, "p4d.24xlarge"]
    assert claims["regions"] == ["us-east-1", "eu-west-1"]
    assert claims["license_ref"] == "D1234567"
    assert claims["aud"] == "gate-eu"
    assert claims["nbf"] == int(datetime(2026, 12, 31, 23, 0, tzinfo=UTC).timestamp())


def test_token_issue_with_no_jwks_beside_the_key(keys: Keys, tmp_path: Path) -> None:
    """A key kept apart from any JWK Set (its public half published elsewhere) signs under the
    kid given: nothing beside it says which kids exist."""
    alone = tmp_path / "alone"
    alone.mkdir()
    pem = alone / "k-ed.pem"
    pem.write_bytes((keys.folder / "k-ed.pem").read_bytes())
    result = run_cli(*issue_argv(pem, kid="k-elsewhere"))
    assert (result.code, result.err) == (0, "")
    assert jwt.get_unverified_header(result.out.strip())["kid"] == "k-elsewhere"


def test_token_issue_not_before_in_utc(keys: Keys) -> None:
    """--not-before with a Z suffix is that instant in UTC."""
    _, claims = issue(keys, "--not-before", "2027-03-04T05:06:07Z")
    assert claims["nbf"] == int(datetime(2027, 3, 4, 5, 6, 7, tzinfo=UTC).timestamp())


@pytest.mark.parametrize(
    ("duration", "seconds"),
    [("45s", 45), ("30m", 1800), ("12h", 43_200), ("90d", 7_776_000), ("1d", 86_400)],
)
def test_token_issue_expires_in(keys: Keys, duration: str, seconds: int) -> None:
    """--expires-in DURATION sets exp - iat to the duration in seconds."""
    _, claims = issue(keys, "--expires-in", duration)
    assert claims["exp"] - claims["iat"] == seconds


def test_token_issue_not_before_with_a_lower_case_z(keys: Keys) -> None:
    """RFC 3339 allows a lower-case "z" (found by QA: refused, while a lower-case "t" passed)."""
    _, claims = issue(keys, "--not-before", "2027-03-04t05:06:07z")
    assert claims["nbf"] == int(datetime(2027, 3, 4, 5, 6, 7, tzinfo=UTC).timestamp())


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("expires_in", "999999999d"),
        ("not_before", "1969-01-01T00:00:00Z"),
        ("not_before", "9999-12-31T23:59:59-01:00"),
        ("not_before", "0001-01-01T00:00:00+01:00"),
        ("max_accelerators", "99999999999999999999"),
        ("max_accelerators", "0"),
    ],
)
def test_token_issue_out_of_range_names_the_flag(keys: Keys, flag: str, value: str) -> None:
    """Found by QA: a time or a quantity out of range was a user error naming no flag."""
    argv = issue_argv(keys.folder / "k-ed.pem", **{flag: value})
    assert_user_error(run_cli(*argv), "--" + flag.replace("_", "-"))


def test_token_issue_takes_a_long_duration_in_seconds(keys: Keys) -> None:
    """Found by QA: "1000000000s" (about 32 years, less than "3650d" allows) was refused as no
    duration at all."""
    _, claims = issue(keys, "--expires-in", "1000000000s")
    assert claims["exp"] - claims["iat"] == 1_000_000_000


@pytest.mark.parametrize(("kid", "alg"), [("k-ed", "EdDSA"), ("k-es", "ES256")])
def test_issued_token_verifies_with_the_gateway(
    keys: Keys, config_path: Path, kid: str, alg: str
) -> None:
    """A token from `token issue` passes the gateway's verifier with its claims intact."""
    token, claims = issue(keys, "--region", "us-east-1", "--license-ref", "L-1", kid=kid)
    assert jwt.get_unverified_header(token)["alg"] == alg
    config = load_config(config_path)
    lic = make_verifier(config).verify(token, now=time.time())
    assert (lic.jti, lic.sub, lic.iss, lic.kid, lic.alg) == (
        claims["jti"],
        RESTRICTED,
        ISSUER,
        kid,
        alg,
    )
    assert lic.aud == ("launchgate",)
    assert (lic.skus, lic.max_accelerators) == ((H100_SKU,), 64)
    assert (lic.regions, lic.license_ref) == (("us-east-1",), "L-1")


def test_issued_tokens_have_distinct_jtis(keys: Keys) -> None:
    """Each issued license gets its own jti (the ledger's key)."""
    assert issue(keys)[1]["jti"] != issue(keys)[1]["jti"]


# --- token inspect / revoke, licenses list -------------------------------------------------


def inspect(capsys: pytest.CaptureFixture[str], config_path: Path, token: str) -> dict[str, Any]:
    result = run_main(capsys, "token", "inspect", "--config", config_path, token)
    assert result.code == 0, result.err
    data: dict[str, Any] = json.loads(result.out)
    return data


def test_inspect_a_fresh_token(
    capsys: pytest.CaptureFixture[str], config_path: Path, make_token: MakeToken
) -> None:
    """inspect: header, claims, verified true, and the full license left when unused."""
    token = make_token(jti="lic-fresh", max_accelerators=32)
    data = inspect(capsys, config_path, token)
    assert data["header"] == {"alg": "EdDSA", "kid": "k-ed", "typ": "JWT"}
    assert data["claims"]["jti"] == "lic-fresh"
    assert data["claims"]["sub"] == RESTRICTED
    assert data["verified"] is True
    assert data["reason"] is None
    assert (data["used"], data["remaining"], data["revoked"]) == (0, 32, False)
    assert token not in json.dumps(data)


def test_inspect_with_the_store_down_keeps_its_keys(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, keys: Keys, make_token: MakeToken
) -> None:
    """Found by QA: with the store unreachable, max_accelerators, reserved and revoked_reason
    went missing (a script reading "reserved" failed); they are null, and store_error says
    why."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = {"url": f"postgresql://nobody@127.0.0.1:{port}/none"}
    config_path = write_config(tmp_path, NOWHERE, keys, store=store)
    data = inspect(capsys, config_path, make_token(jti="lic-dark"))
    assert data["verified"] is True
    ledger_keys = ("max_accelerators", "used", "reserved", "remaining", "revoked", "revoked_reason")
    assert {key: data[key] for key in ledger_keys} == dict.fromkeys(ledger_keys)
    assert data["store_error"]


def test_inspect_shows_ledger_use(
    capsys: pytest.CaptureFixture[str], config_path: Path, make_token: MakeToken
) -> None:
    """inspect reports what the ledger holds for the license: used and remaining."""
    token = make_token(jti="lic-used")
    reserve(config_path, "lic-used", 24, "d-1")
    reserve(config_path, "lic-used", 8, "d-2", settle="unknown")
    data = inspect(capsys, config_path, token)
    assert (data["used"], data["remaining"], data["revoked"]) == (32, 32, False)


def test_inspect_holds_a_reissued_token_to_its_own_quantity(
    capsys: pytest.CaptureFixture[str], config_path: Path, make_token: MakeToken
) -> None:
    """A token re-issued under a jti with a smaller quantity is held to it by the gateway: so
    inspect's max and remaining, and decide (found in review: they showed the first token's)."""
    reserve(config_path, "lic-small", 24, "d-1")  # the ledger first saw lic-small for 64
    token = make_token(jti="lic-small", max_accelerators=32)
    data = inspect(capsys, config_path, token)
    assert (data["max_accelerators"], data["used"], data["remaining"]) == (32, 24, 8)
    record = decide(capsys, config_path, RESTRICTED, H100_SKU, "--count", "2", "--token", token)
    assert (record["outcome"], record["reason"]) == ("deny", "license_exhausted")


def test_inspect_reads_the_token_from_stdin(config_path: Path, make_token: MakeToken) -> None:
    """`token inspect --config FILE -` reads the token from stdin."""
    token = make_token(jti="lic-stdin")
    result = run_cli("token", "inspect", "--config", config_path, "-", stdin=token + "\n")
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert (data["claims"]["jti"], data["verified"]) == ("lic-stdin", True)


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda mk, k: mk(now=time.time() - 7200, expires_in_s=600), "token_expired"),
        (lambda mk, k: mk(kid="k-nobody"), "token_unknown_key"),
        (lambda mk, k: mk(issuer="someone.else"), "token_wrong_issuer"),
        (lambda mk, k: mk(audience="other-gate"), "token_wrong_audience"),
        (lambda mk, k: mk(not_before=int(time.time()) + 86_400), "token_not_yet_valid"),
        (lambda mk, k: mk(private_key=k.p256), "token_invalid"),  # ES256 under the EdDSA kid
        (lambda mk, k: mk()[:-4] + "AAAA", "token_invalid"),
    ],
    ids=["expired", "unknown-key", "wrong-issuer", "wrong-audience", "not-yet", "alg", "sig"],
)
def test_inspect_a_token_that_does_not_verify(
    capsys: pytest.CaptureFixture[str],
    config_path: Path,
    make_token: MakeToken,
    keys: Keys,
    make: Callable[[MakeToken, Keys], str],
    reason: str,
) -> None:
    """inspect still shows header and claims, with verified false and the reason code."""
    data = inspect(capsys, config_path, make(make_token, keys))
    assert data["verified"] is False
    assert data["reason"] == reason
    assert data["header"]["alg"] in ("EdDSA", "ES256")
    assert data["claims"]["sub"] == RESTRICTED


def test_inspect_garbage(capsys: pytest.CaptureFixture[str], config_path: Path) -> None:
    """A string that is no JWS: exit 0, header and claims null, token_invalid."""
    data = inspect(capsys, config_path, "not-a-token")
    assert (data["header"], data["claims"]) == (None, None)
    assert (data["verified"], data["reason"]) == (False, "token_invalid")


def test_inspect_against_the_shipped_empty_key_set(make_token: MakeToken, tmp_path: Path) -> None:
    """With the shipped configuration (an empty JWK Set) every token is token_unknown_key."""
    shipped = tmp_path / "config"
    shutil.copytree(SHIPPED, shipped)  # the command opens the ledger next to the config
    result = run_cli("token", "inspect", "--config", shipped / "launchgate.toml", make_token())
    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert (data["verified"], data["reason"]) == (False, "token_unknown_key")
    assert (data["used"], data["remaining"], data["revoked"]) == (0, 64, False)


def test_revoke_then_inspect_and_list(
    capsys: pytest.CaptureFixture[str], config_path: Path, make_token: MakeToken
) -> None:
    """token revoke marks the license; inspect and licenses list show it revoked."""
    token = make_token(jti="lic-bad")
    reserve(config_path, "lic-bad", 8, "d-1")
    result = run_main(
        capsys, "token", "revoke", "--config", config_path, "lic-bad", "--reason", "x"
    )
    assert result.code == 0, result.err
    assert "lic-bad" in result.out
    data = inspect(capsys, config_path, token)
    assert (data["revoked"], data["used"], data["verified"]) == (True, 8, True)
    state = license_state(config_path, "lic-bad")
    assert state is not None and state.revoked and state.revoked_reason == "x"
    again = run_main(capsys, "token", "revoke", "--config", config_path, "lic-bad")
    assert again.code == 0  # revoking twice is not an error
    [row] = json.loads(run_main(capsys, "licenses", "list", "--config", config_path, "--json").out)
    assert (row["jti"], row["revoked"]) == ("lic-bad", True)


def test_revoke_against_a_store_it_cannot_reach_says_to_run_it_again(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, keys: Keys
) -> None:
    """A revocation the store did not take says so and what to do: exit 2, one line naming the
    license and asking for the command again (found by QA: only the store's error)."""
    config = write_config(
        tmp_path, NOWHERE, keys, store={"url": "postgresql://postgres@127.0.0.1:1/test"}
    )
    result = run_main(capsys, "token", "revoke", "--config", config, "lic-42")
    assert result.code == 2 and result.out == ""
    assert "Traceback" not in result.err
    [line] = [x for x in result.err.splitlines() if x.startswith("launchgate: error:")]
    assert "store unavailable" in line and "lic-42 may not be revoked: run this again" in line


def test_a_locked_ledger_is_one_line_on_stderr_and_nothing_on_stdout(
    capsys: pytest.CaptureFixture[str], config_path: Path
) -> None:
    """Found by QA: with the SQLite ledger locked by another process, staff commands printed the
    ledger's own store.failing log line (on stdout, where it would break `licenses list
    --json`) before their one error line."""
    assert run_main(capsys, "token", "revoke", "--config", config_path, "lic-1").code == 0
    other = sqlite3.connect(config_path.parent / "ledger.sqlite3", isolation_level=None)
    try:
        other.execute("BEGIN EXCLUSIVE")
        for argv in (
            ("token", "revoke", "--config", config_path, "lic-2"),
            (
                "licenses",
                "release",
                "--config",
                config_path,
                "--decision",
                "01JAAAAAAAAAAAAAAAAAAAAAAA",
            ),
            ("licenses", "list", "--config", config_path, "--json"),
        ):
            result = run_cli(*argv)
            assert (result.code, result.out) == (2, ""), (argv, result)
            [line] = result.err.splitlines()
            assert line.startswith("launchgate: error: store unavailable:"), line
    finally:
        other.close()


def test_quiet_logs_silence_a_logger_only_while_they_last(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A logger that structlog cached while staff commands were quiet logs again afterwards
    (found in review: it stayed silent for the rest of the process)."""
    from launchgate.logsetup import configure_logging, quiet_logs

    before = structlog.get_config()
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        configure_logging()
        log = structlog.get_logger("launchgate.test")
        with quiet_logs():
            log.info("while.quiet")
        log.info("after.quiet")
        out = capsys.readouterr().out
        assert "while.quiet" not in out and "after.quiet" in out
    finally:
        structlog.configure(**before)
        root.handlers[:] = handlers
        root.setLevel(level)


def test_revoke_a_license_never_seen(
    capsys: pytest.CaptureFixture[str], config_path: Path, make_token: MakeToken
) -> None:
    """Revoking a jti the ledger has not seen yet makes its first decide a license_revoked."""
    assert run_main(capsys, "token", "revoke", "--config", config_path, "lic-future").code == 0
    token = make_token(jti="lic-future")
    record = decide(capsys, config_path, RESTRICTED, H100_SKU, "--token", token)
    assert (record["outcome"], record["reason"]) == ("deny", "license_revoked")


@pytest.mark.parametrize("jti", ["", "lic\t42"])
def test_revoke_refuses_what_cannot_be_a_license_id(
    capsys: pytest.CaptureFixture[str], config_path: Path, jti: str
) -> None:
    """An empty jti (or one with a control character) is no license: exit 2, nothing revoked."""
    result = run_main(capsys, "token", "revoke", "--config", config_path, jti)
    assert result.code == 2
    assert "not a license id" in result.err
    listed = run_main(capsys, "licenses", "list", "--config", config_path, "--json")
    assert json.loads(listed.out) == []


def test_staff_commands_that_only_read_make_no_ledger(
    capsys: pytest.CaptureFixture[str], config_path: Path, make_token: MakeToken
) -> None:
    """Found by QA: with the ledger missing (a mistyped path, a data folder emptied), `licenses
    list`, `decide` and `token inspect` made an empty one and answered from it, and `token
    revoke` wrote its revocation to it, all without a word. The reading commands now make
    nothing and say on stderr that there is no ledger; revoke still makes it (a license may be
    revoked before any gateway saw it) and says so too."""
    ledger = config_path.parent / "ledger.sqlite3"
    token = make_token(jti="lic-unseen")
    listed = run_main(capsys, "licenses", "list", "--config", config_path, "--json")
    assert (listed.code, json.loads(listed.out)) == (0, [])
    assert listed.err == (
        f"note: there is no ledger at {ledger} (no gateway on this configuration has used it yet)\n"
    )
    decided = run_main(
        capsys,
        *("decide", "--config", config_path, "--account", RESTRICTED, "--sku", H100_SKU),
        *("--token", token),
    )
    assert (decided.code, json.loads(decided.out)["reason"]) == (0, "licensed")
    inspected = run_main(capsys, "token", "inspect", "--config", config_path, token)
    assert json.loads(inspected.out)["used"] == 0
    assert "there is no ledger" in decided.err and "there is no ledger" in inspected.err
    assert not ledger.exists()
    released = run_main(capsys, "licenses", "release", "--config", config_path, "--decision", "d")
    assert released.code == 2 and "there is no ledger" in released.err
    audit = load_config(config_path).audit_path
    assert not audit.exists()  # found by QA: a refused release left an empty decision log
    revoked = run_main(capsys, "token", "revoke", "--config", config_path, "lic-unseen")
    assert (revoked.code, revoked.out) == (0, "revoked lic-unseen\n")
    assert "there is no ledger" in revoked.err and "making one" in revoked.err
    assert ledger.exists()
    listed = run_main(capsys, "licenses", "list", "--config", config_path, "--json")
    assert [r["jti"] for r in json.loads(listed.out)] == ["lic-unseen"]
    assert listed.err == ""


async def test_staff_commands_that_only_read_make_no_postgresql_ledger(
    tmp_path: Path, keys: Keys
) -> None:
    """The same on PostgreSQL (found by QA: a mistyped ?schema= was created by a revoke and
    listed as an empty ledger): the reading commands create no schema, revoke does; both say
    there was no ledger."""
    async with postgres_schema() as url:
        config = write_config(tmp_path, NOWHERE, keys, store={"url": url})
        schema = url.rpartition("schema=")[2]

        async def schema_exists() -> bool:
            conn = await asyncpg.connect(url.partition("?")[0], timeout=5)
            try:
                found = await conn.fetchval("SELECT 1 FROM pg_namespace WHERE nspname = $1", schema)
            finally:
                await conn.close()
            return bool(found == 1)

        listed = await asyncio.to_thread(run_cli, "licenses", "list", "--config", config, "--json")
        assert (listed.code, json.loads(listed.out)) == (0, [])
        assert f"schema={schema}" in listed.err and "there is no ledger" in listed.err
        assert not await schema_exists()
        revoked = await asyncio.to_thread(
            run_cli, "token", "revoke", "--config", config, "lic-unseen"
        )
        assert (revoked.code, "there is no ledger" in revoked.err) == (0, True)
        assert await schema_exists()
        listed = await asyncio.to_thread(run_cli, "licenses", "list", "--config", config, "--json")
        assert ([r["jti"] for r in json.loads(listed.out)], listed.err) == (["lic-unseen"], "")


def test_licenses_list(
    capsys: pytest.CaptureFixture[str], config_path: Path, make_token: MakeToken
) -> None:
    """licenses list (table and --json): jti, account, used, max, remaining, revoked, expires."""
    assert (
        json.loads(run_main(capsys, "licenses", "list", "--config", config_path, "--json").out)
        == []
    )
    reserve(config_path, "lic-a", 16, "d-1")
    reserve(config_path, "lic-b", 64, "d-2")
    run_main(capsys, "token", "revoke", "--config", config_path, "lic-b")
    result = run_main(capsys, "licenses", "list", "--config", config_path, "--json")
    assert result.code == 0
    rows = json.loads(result.out)
    assert [r["jti"] for r in rows] == ["lic-a", "lic-b"]
    for row in rows:
        assert {"jti", "account", "used", "max", "remaining", "revoked", "expires"} <= set(row)
        assert row["account"] == RESTRICTED
        assert row["max"] == 64
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", row["expires"])
    assert [(r["used"], r["remaining"], r["revoked"]) for r in rows] == [
        (16, 48, False),
        (64, 0, True),
    ]

    table = run_main(capsys, "licenses", "list", "--config", config_path)
    assert table.code == 0
    header, *lines = table.out.splitlines()
    for column in ("jti", "account", "used", "max", "remaining", "revoked", "expires"):
        assert column in header.split()
    assert len(lines) == 2
    assert lines[0].split()[:3] == ["lic-a", RESTRICTED, "16"]
    assert "lic-b" in lines[1]


def test_licenses_list_shows_an_expiry_no_date_can_say(
    capsys: pytest.CaptureFixture[str], config_path: Path
) -> None:
    """A ledger row from a token whose exp is past year 9999 (accepted before the gateway
    refused them) is listed with the number, not a traceback."""
    reserve(config_path, "lic-far", 8, "d-far")
    config = load_config(config_path)
    store = open_ledger(config.store_url, config.base_dir)
    assert isinstance(store, SqliteLedger)
    with contextlib.closing(sqlite3.connect(store.path)) as conn, conn:
        conn.execute("UPDATE licenses SET expires = 2.6e11 WHERE jti = 'lic-far'")
    [row] = json.loads(run_main(capsys, "licenses", "list", "--config", config_path, "--json").out)
    assert row["expires"] == 2.6e11
    table = run_main(capsys, "licenses", "list", "--config", config_path)
    assert table.code == 0 and "260000000000.0" in table.out


# --- licenses release ----------------------------------------------------------------------


def test_release_gives_back_an_unknown_outcome(
    capsys: pytest.CaptureFixture[str], config_path: Path
) -> None:
    """release: a settled_unknown reservation leaves `used`, a license.released record follows."""
    config = load_config(config_path)
    log = AuditLog.open(config.audit_path)
    log.append_sync({"event": "launch.decision", "decision_id": "d-lost"})
    log.close()
    reserve(config_path, "lic-r", 16, "d-done")
    reserve(config_path, "lic-r", 8, "d-lost", settle="unknown")
    assert (state := license_state(config_path, "lic-r")) and state.used == 24

    result = run_cli(
        *("licenses", "release", "--config", config_path, "--decision", "d-lost"),
        *("--note", "checked: nothing launched"),
    )
    assert result.code == 0, result.err
    assert "lic-r" in result.out and "8" in result.out

    state = license_state(config_path, "lic-r")
    assert state is not None and (state.used, state.remaining) == (16, 48)
    reservation = in_ledger(config_path, lambda ledger: ledger.reservation("d-lost"))
    assert reservation is not None and reservation.state == "released"
    records = [json.loads(line) for line in config.audit_path.read_text().splitlines()]
    released = records[-1]
    assert released["event"] == "license.released"
    assert released["decision_id"] == "d-lost"
    assert released["license"]["jti"] == "lic-r"
    assert released["seq"] == 2 and released["prev_hash"] == records[0]["hash"]
    verified = run_main(capsys, "audit", "verify", config.audit_path)
    assert verified == Result(0, "ok 2 records\n", "")


def test_release_settles_an_expired_reservation_no_gateway_swept(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, keys: Keys
) -> None:
    """A gateway died mid-launch and none has run since: its reservation is still open past
    the TTL. release first settles what any gateway's sweeper would (each with its
    reservation.settled record), then gives this one back (found by QA: it was refused as
    still reserved until a gateway ran again)."""
    path = write_config(tmp_path, NOWHERE, keys, store={"reservation_ttl_s": 0.2})
    reserve(path, "lic-r", 8, "d-lost", settle=None)
    reserve(path, "lic-r", 16, "d-other", settle=None)
    time.sleep(0.3)
    result = run_cli("licenses", "release", "--config", path, "--decision", "d-lost")
    assert result.code == 0, result.err
    state = license_state(path, "lic-r")
    assert state is not None and (state.used, state.reserved) == (16, 0)  # d-other: used
    records = [json.loads(line) for line in load_config(path).audit_path.read_text().splitlines()]
    swept = sorted(r["decision_id"] for r in records if r["event"] == "reservation.settled")
    assert swept == ["d-lost", "d-other"]
    assert records[-1]["event"] == "license.released"
    assert run_main(capsys, "audit", "verify", load_config(path).audit_path).code == 0


def test_a_refused_release_sweeps_nothing(tmp_path: Path, keys: Keys) -> None:
    """A release refused (no such decision, or one still within the TTL) leaves the ledger and
    the log as they were, expired reservations of others included (found in review: they were
    swept and recorded first)."""
    path = write_config(tmp_path, NOWHERE, keys, store={"reservation_ttl_s": 60})

    def reserved_ago(decision_id: str, age_s: float) -> Callable[[Ledger], Awaitable[Any]]:
        now = time.time() - age_s
        return lambda ledger: ledger.reserve(
            jti="lic-r",
            account=RESTRICTED,
            max_accelerators=64,
            expires=now + 3600,
            amount=8,
            decision_id=decision_id,
            now=now,
        )

    in_ledger(path, reserved_ago("d-expired", 120))
    in_ledger(path, reserved_ago("d-fresh", 0))
    audit = load_config(path).audit_path
    for decision in ("typo", "d-fresh"):
        result = run_cli("licenses", "release", "--config", path, "--decision", decision)
        assert_user_error(result, "--decision", decision)
    assert "still open" in result.err
    state = license_state(path, "lic-r")
    assert state is not None and (state.used, state.reserved) == (0, 16)
    assert not audit.exists() or audit.read_bytes() == b""


def test_a_release_whose_record_cannot_be_written_says_what_it_did(
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    keys: Keys,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The ledger has changed when a record is refused (a file-size limit): one line, exit 2,
    saying what was done (found in review: a traceback)."""
    path = write_config(tmp_path, NOWHERE, keys, store={"reservation_ttl_s": 0.2})
    reserve(path, "lic-r", 8, "d-lost", settle=None)
    time.sleep(0.3)

    def refused(self: AuditLog, record: Any) -> Any:
        raise OSError(27, "File too large")

    monkeypatch.setattr(AuditLog, "append_sync", refused)
    result = run_main(capsys, "licenses", "release", "--config", path, "--decision", "d-lost")
    assert result.code == 2 and "Traceback" not in result.err
    [line] = result.err.splitlines()
    assert "settled the reservation of decision d-lost as used" in line
    assert "record was not written" in line and "File too large" in line


@pytest.mark.parametrize("settle", ["commit", None, "unknown-released"])
def test_release_refuses_what_is_not_settled_unknown(config_path: Path, settle: str | None) -> None:
    """release of a used, still-reserved or already released reservation: exit 2, one line."""
    reserve(config_path, "lic-r", 8, "d-1", settle="unknown" if settle else None)
    if settle == "commit":
        reserve(config_path, "lic-r", 8, "d-2")
    if settle == "unknown-released":
        release = ("licenses", "release", "--config", config_path, "--decision", "d-1")
        assert run_cli(*release).code == 0
    decision = "d-2" if settle == "commit" else "d-1"
    before = license_state(config_path, "lic-r")
    audit = load_config(config_path).audit_path
    log_before = audit.read_bytes() if audit.exists() else b""
    result = run_cli("licenses", "release", "--config", config_path, "--decision", decision)
    assert_user_error(result, "--decision", decision)
    assert license_state(config_path, "lic-r") == before
    assert (audit.read_bytes() if audit.exists() else b"") == log_before


def test_release_refuses_while_a_retry_counted_on_it_may_be_under_way(config_path: Path) -> None:
    """Found by QA: released while a retry counted on the reservation was in flight, its units
    went to another launch at once and the retry launched too (2 of 1). A retry counted on it
    within max(reservation_ttl_s, connect + read timeout) ago refuses the release."""

    async def keyed(ledger: Ledger, decision_id: str) -> ReserveResult:
        return await ledger.reserve(
            jti="lic-k",
            account=RESTRICTED,
            max_accelerators=8,
            expires=time.time() + 3600,
            amount=8,
            decision_id=decision_id,
            now=time.time(),
            idempotency_key="ct-1",
            fingerprint="fp",
        )

    async def first_then_retry(ledger: Ledger) -> ReserveResult:
        await keyed(ledger, "d-1")
        await ledger.settle_unknown("d-1", time.time(), "timeout")
        return await keyed(ledger, "d-2")

    retry = in_ledger(config_path, first_then_retry)
    assert retry.outcome is ReserveOutcome.REPLAYED
    result = run_cli("licenses", "release", "--config", config_path, "--decision", "d-1")
    assert_user_error(result, "d-1", "may still be under way")
    state = license_state(config_path, "lic-k")
    assert state is not None and state.used == 8


def test_release_with_a_torn_decision_log_changes_nothing(config_path: Path) -> None:
    """When the decision log cannot take the record, release exits 2 and gives nothing back."""
    audit = load_config(config_path).audit_path
    log = AuditLog.open(audit)
    log.append_sync({"event": "launch.decision", "decision_id": "d-1"})
    log.close()
    with audit.open("ab") as f:
        f.write(b'{"event": "half a rec')
    reserve(config_path, "lic-r", 8, "d-1", settle="unknown")
    result = run_cli("licenses", "release", "--config", config_path, "--decision", "d-1")
    assert_user_error(result, str(audit))
    reservation = in_ledger(config_path, lambda ledger: ledger.reservation("d-1"))
    assert reservation is not None and reservation.state == "settled_unknown"


# --- decide --------------------------------------------------------------------------------


def decide(
    capsys: pytest.CaptureFixture[str], config_path: Path, account: str, sku: str, *extra: str
) -> dict[str, Any]:
    argv: list[str | Path] = ["decide", "--config", config_path, "--account", account]
    result = run_main(capsys, *argv, "--sku", sku, *extra)
    assert result.code == 0, result.err
    record: dict[str, Any] = json.loads(result.out)
    assert set(record) >= RECORD_FIELDS, RECORD_FIELDS - set(record)
    assert all(record[field] is None for field in CHAIN_FIELDS)
    assert record["event"] == "launch.decision"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", record["timestamp"])
    assert (record["enforced"], record["mode"]) == (True, "enforce")
    return record


def test_decide_unrestricted(capsys: pytest.CaptureFixture[str], config_path: Path) -> None:
    """An unrestricted account: allow account_not_restricted, with the SKU's facts."""
    record = decide(capsys, config_path, UNRESTRICTED, H100_SKU, "--count", "2")
    assert (record["outcome"], record["reason"]) == ("allow", "account_not_restricted")
    assert (record["account"], record["restricted"], record["license"]) == (
        UNRESTRICTED,
        False,
        None,
    )
    assert (record["sku"], record["count"], record["accelerators"]) == (H100_SKU, 2, 16)
    assert (record["accelerator"], record["eccn"], record["controlled"]) == (
        "H100-SXM5-80GB",
        "3A090.a",
        True,
    )


@pytest.mark.parametrize(
    ("account", "sku", "reason", "outcome"),
    [
        (RESTRICTED, CPU_SKU, "sku_not_controlled", "allow"),
        (RESTRICTED, H100_SKU, "license_required", "deny"),
        ("acct-nobody", H100_SKU, "unknown_account", "deny"),
        (RESTRICTED, "no.such.sku", "unknown_sku", "deny"),
    ],
)
def test_decide_without_token(
    capsys: pytest.CaptureFixture[str],
    config_path: Path,
    account: str,
    sku: str,
    reason: str,
    outcome: str,
) -> None:
    """decide without --token: the decision table's answer, as JSON, exit 0."""
    record = decide(capsys, config_path, account, sku, "--region", "us-east-1")
    assert (record["outcome"], record["reason"]) == (outcome, reason)
    assert (record["account"], record["sku"], record["region"]) == (account, sku, "us-east-1")
    assert record["license"] is None


def test_decide_licensed_reserves_nothing(
    capsys: pytest.CaptureFixture[str], config_path: Path, make_token: MakeToken
) -> None:
    """A valid token: allow licensed with the license named; the ledger stays untouched."""
    token = make_token(jti="lic-ok", regions=["us-east-1"])
    record = decide(
        capsys, config_path, RESTRICTED, H100_SKU, "--token", token, "--region", "us-east-1"
    )
    assert (record["outcome"], record["reason"]) == ("allow", "licensed")
    assert record["license"] == {"jti": "lic-ok", "kid": "k-ed", "iss": ISSUER}
    assert record["restricted"] is True
    assert token not in json.dumps(record)
    assert license_state(config_path, "lic-ok") is None

    reserve(config_path, "lic-ok", 8, "d-1")
    before = in_ledger(config_path, lambda ledger: ledger.licenses())
    for _ in range(3):
        again = decide(
            capsys,
            config_path,
            RESTRICTED,
            H100_SKU,
            "--token",
            token,
            "--region",
            "us-east-1",
            "--count",
            "2",
        )
        assert again["reason"] == "licensed"
    assert in_ledger(config_path, lambda ledger: ledger.licenses()) == before


def test_decide_exhausted_and_revoked(
    capsys: pytest.CaptureFixture[str], config_path: Path, make_token: MakeToken
) -> None:
    """decide reads the ledger: a spent license is license_exhausted, a revoked one revoked."""
    token = make_token(jti="lic-spent", max_accelerators=64)
    reserve(config_path, "lic-spent", 56, "d-1")
    assert decide(capsys, config_path, RESTRICTED, H100_SKU, "--token", token)["reason"] == (
        "licensed"
    )
    record = decide(capsys, config_path, RESTRICTED, H100_SKU, "--token", token, "--count", "2")
    assert (record["outcome"], record["reason"]) == ("deny", "license_exhausted")
    assert record["license"]["jti"] == "lic-spent"
    state = license_state(config_path, "lic-spent")
    assert state is not None and (state.used, state.reserved) == (56, 0)

    run_main(capsys, "token", "revoke", "--config", config_path, "lic-spent")
    record = decide(capsys, config_path, RESTRICTED, H100_SKU, "--token", token)
    assert (record["outcome"], record["reason"]) == ("deny", "license_revoked")


@pytest.mark.parametrize(
    ("overrides", "reason"),
    [
        ({"account": "acct-2002"}, "token_account_mismatch"),
        ({"skus": ["p4d.24xlarge"]}, "token_sku_not_covered"),
        ({"regions": ["eu-west-1"]}, "token_region_not_covered"),
        ({"kid": "k-nobody"}, "token_unknown_key"),
    ],
)
def test_decide_token_denials(
    capsys: pytest.CaptureFixture[str],
    config_path: Path,
    make_token: MakeToken,
    overrides: dict[str, Any],
    reason: str,
) -> None:
    """decide applies the token rows of the decision table."""
    token = make_token(**overrides)
    record = decide(capsys, config_path, RESTRICTED, H100_SKU, "--token", token)
    assert (record["outcome"], record["reason"]) == ("deny", reason)


def test_decide_exits_0_on_a_denial(config_path: Path) -> None:
    """`python -m launchgate decide` exits 0 for a deny and prints only the JSON record."""
    argv = ("decide", "--config", config_path, "--account", RESTRICTED, "--sku", H100_SKU)
    result = run_cli(*argv)
    assert (result.code, result.err) == (0, "")
    assert json.loads(result.out)["reason"] == "license_required"


# --- classify ------------------------------------------------------------------------------

CLASSES: list[Any] = [
    # TPP >= 4800 -> .a, whatever the density
    (4800, 10_000, False, "3A090.a"),
    (4799, 10_000, False, "not-controlled"),
    (4799, 1000, False, "3A090.b"),
    # TPP >= 1600 and PD >= 5.92 -> .a (1600 / 270.27027027027026 == 5.92 exactly in floats)
    (1600, 270.27027027027026, False, "3A090.a"),
    (1599, 270.27027027027026, False, "not-controlled"),
    (1600, 270.3, False, "3A090.b"),  # PD just below 5.92, still >= 3.2
    (2960, 500, False, "3A090.a"),  # PD exactly 5.92
    (2960, 500.01, False, "3A090.b"),
    # exactly on a threshold as written, where a float division falls just below it (found by
    # QA: 4114.4 / 695 is 5.919999999999999 in floats)
    (4114.4, 695, False, "3A090.a"),
    (2057.2, 347.5, False, "3A090.a"),
    (1612.8, 504, False, "3A090.b"),  # PD 3.2
    (2400.64, 1500.4, False, "3A090.b"),  # PD 1.6
    (4114.3, 695, False, "3A090.b"),
    (2400.63, 1500.4, False, "not-controlled"),
    # TPP >= 2400 and 1.6 <= PD < 5.92 -> .b
    (2400, 1500, False, "3A090.b"),
    (2399, 1500, False, "not-controlled"),
    (2400, 1500.1, False, "not-controlled"),
    # TPP >= 1600 and 3.2 <= PD < 5.92 -> .b
    (1600, 500, False, "3A090.b"),
    (1599, 500, False, "not-controlled"),
    (1600, 500.1, False, "not-controlled"),
    # real parts
    (15_832, 814, False, "3A090.a"),  # H100 SXM
    (4707, 608.5, False, "3A090.a"),  # RTX 4090D-like, were it a datacenter part
    (4707, 608.5, True, "not-controlled"),  # ... not designed for datacenters: the Note
    (5285, 608.5, True, "3A090.a"),  # RTX 4090: a consumer part with TPP >= 4800
    (4800, 608.5, True, "3A090.a"),
    (4799, 608.5, True, "not-controlled"),
    (2400, 1500, True, "not-controlled"),
]


@pytest.mark.parametrize(("tpp", "die_area", "not_datacenter", "eccn"), CLASSES)
def test_classify(
    capsys: pytest.CaptureFixture[str],
    tpp: float,
    die_area: float,
    not_datacenter: bool,
    eccn: str,
) -> None:
    """classify prints the 3A090 class at and just below every threshold."""
    flags = ["--not-datacenter"] if not_datacenter else []
    result = run_main(capsys, "classify", "--tpp", repr(tpp), "--die-area", repr(die_area), *flags)
    assert result == Result(0, eccn + "\n", "")


def test_classify_from_the_console_entry() -> None:
    """`python -m launchgate classify` prints just the class on stdout."""
    result = run_cli("classify", "--tpp", "15832", "--die-area", "814")
    assert result == Result(0, "3A090.a\n", "")


# --- audit verify --------------------------------------------------------------------------


def write_log(path: Path, n: int) -> list[bytes]:
    """``n`` records through AuditLog; returns the file's lines."""
    log = AuditLog.open(path)
    for i in range(n):
        log.append_sync({"event": "launch.decision", "decision_id": f"d-{i}", "count": i})
    log.close()
    return path.read_bytes().splitlines(keepends=True)


def test_audit_verify_ok(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A log written by AuditLog verifies: `ok N records`, exit 0; an empty one is ok 0."""
    path = tmp_path / "decisions.jsonl"
    path.touch()
    assert run_main(capsys, "audit", "verify", path) == Result(0, "ok 0 records\n", "")
    write_log(path, 5)
    assert run_cli("audit", "verify", path) == Result(0, "ok 5 records\n", "")


def _changed(byte: int) -> int:
    """Another byte that is still plausible JSON text there."""
    if chr(byte).isdigit():
        return ord("0") if byte != ord("0") else ord("1")
    return ord("x") if byte != ord("x") else ord("y")


@pytest.mark.parametrize("line", [0, 2, 4])
@pytest.mark.parametrize("where", ["first", "middle", "hash", "last", "newline"])
def test_audit_verify_finds_one_changed_byte(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, line: int, where: str
) -> None:
    """One byte changed anywhere in record N: verify prints seq N and exits 1."""
    path = tmp_path / "decisions.jsonl"
    lines = write_log(path, 5)
    start = sum(len(x) for x in lines[:line])
    record = lines[line]
    offset = {
        "first": 0,
        "middle": len(record) // 2,
        "hash": record.index(b'"hash":"') + 12,
        "last": len(record) - 2,
        "newline": len(record) - 1,
    }[where]
    data = bytearray(path.read_bytes())
    data[start + offset] = _changed(data[start + offset])
    path.write_bytes(bytes(data))
    result = run_main(capsys, "audit", "verify", path)
    assert result.code == 1, result
    assert result.out == f"{line + 1}\n", result.out
    assert not result.out.startswith("ok")


def test_audit_verify_failure_from_the_console_entry(tmp_path: Path) -> None:
    """The process exits 1 on a broken chain and names the bad seq on stdout."""
    path = tmp_path / "decisions.jsonl"
    write_log(path, 3)
    path.write_bytes(path.read_bytes().replace(b'"d-1"', b'"d-7"'))
    result = run_cli("audit", "verify", path)
    assert result.code == 1
    assert "Traceback" not in result.err
    # Only the bad seq on stdout (found by QA: the reason after it named other numbers); the
    # reason on stderr.
    assert result.out == "2\n"
    assert result.err.startswith("bad record seq 2: line 2: hash does not match")


def test_audit_verify_names_only_the_bad_seq_on_stdout_for_a_missing_record(
    tmp_path: Path,
) -> None:
    path = tmp_path / "decisions.jsonl"
    lines = write_log(path, 4)
    path.write_bytes(b"".join(lines[:1] + lines[2:]))
    result = run_cli("audit", "verify", path)
    assert (result.code, result.out) == (1, "3\n")  # the first bad record's
    assert "line 2: found the record of seq 3 where seq 2 belongs" in result.err


# --- stub-backend --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_stub_backend_serves_and_stops_on_sigterm() -> None:
    """stub-backend answers POST /v1/instances with 201 and exits 0 on SIGTERM."""
    port = _free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "launchgate", "stub-backend", "--listen", f"127.0.0.1:{port}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        ready = process.stdout.readline()  # printed once it listens
        assert str(port) in ready, ready
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        body = {"instance_type": H100_SKU, "count": 2, "region": "us-east-1"}
        connection.request(
            "POST", "/v1/instances", json.dumps(body), {"Content-Type": "application/json"}
        )
        response = connection.getresponse()
        answer = json.loads(response.read())
        connection.close()
        assert response.status == 201
        assert [i["instance_type"] for i in answer["instances"]] == [H100_SKU, H100_SKU]
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=10) == 0
        assert process.stderr is not None
        assert "Traceback" not in process.stderr.read()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        for stream in (process.stdout, process.stderr):
            if stream is not None:
                stream.close()


# --- with a running gateway ----------------------------------------------------------------


async def test_cli_issued_token_through_the_gateway(
    start_gateway: StartGateway, keys: Keys
) -> None:
    """A token from `token issue` is licensed by the gateway; inspect, list and audit agree."""
    gw = await start_gateway()
    issued = await run_cli_async(*issue_argv(keys.folder / "k-es.pem", kid="k-es"))
    assert issued.code == 0, issued.err
    token = issued.out.strip()
    status, _, headers = await gw.launch(token=token, count=2)
    assert status == 201
    assert gw.decisions()[-1]["reason"] == "licensed"

    inspected = await run_cli_async("token", "inspect", "--config", gw.config_path, token)
    data = json.loads(inspected.out)
    assert (data["verified"], data["used"], data["remaining"], data["revoked"]) == (
        True,
        16,
        48,
        False,
    )
    listed = await run_cli_async("licenses", "list", "--config", gw.config_path, "--json")
    [row] = json.loads(listed.out)
    assert (row["jti"], row["account"], row["used"], row["max"]) == (
        jti_of(token),
        RESTRICTED,
        16,
        64,
    )
    verified = await run_cli_async("audit", "verify", gw.config.audit_path)
    assert verified == Result(0, f"ok {len(gw.records())} records\n", "")
    assert headers["Launchgate-Decision-Id"] == gw.decisions()[-1]["decision_id"]


async def test_release_after_a_gateway_timeout(
    start_gateway: StartGateway, make_token: MakeToken
) -> None:
    """A launch that timed out upstream (settled as used) is given back by licenses release."""
    gw = await start_gateway(upstream={"timeout_s": 0.3})
    token = make_token(jti="lic-timeout")
    await gw.stub_fail(delay_s=2, times=1)
    status, body, _ = await gw.launch(token=token)
    assert (status, body["reason"]) == (504, "upstream_timeout")
    state = await gw.license("lic-timeout")
    assert (state.used, state.reserved) == (8, 0)

    released = await run_cli_async(
        "licenses", "release", "--config", gw.config_path, "--decision", body["decision_id"]
    )
    assert released.code == 0, released.err
    state = await gw.license("lic-timeout")
    assert (state.used, state.reserved) == (0, 0)
    last = gw.records()[-1]
    assert (last["event"], last["decision_id"]) == ("license.released", body["decision_id"])
    verified = await run_cli_async("audit", "verify", gw.config.audit_path)
    assert verified == Result(0, f"ok {len(gw.records())} records\n", "")
    assert (await gw.launch(token=token))[0] == 201  # the give-back is usable at once


def test_generated_key_issues_tokens_the_gateway_accepts(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, keys: Keys
) -> None:
    """keys generate -> token issue -> decide: the whole staff workflow, in-process."""
    folder = tmp_path / "staff"
    assert run_main(capsys, "keys", "generate", "--kid", "2026-11", "--out-dir", folder).code == 0
    config = write_config(tmp_path, NOWHERE, keys, tokens={"jwks": str(folder / "jwks.json")})
    issued = run_main(capsys, *issue_argv(folder / "2026-11.pem", kid="2026-11"))
    assert issued.code == 0
    token = issued.out.strip()
    record = decide(capsys, config, RESTRICTED, H100_SKU, "--token", token)
    assert (record["reason"], record["license"]["kid"]) == ("licensed", "2026-11")
    # The old key set no longer trusts it.
    assert (
        decide(
            capsys, write_config(tmp_path, NOWHERE, keys), RESTRICTED, H100_SKU, "--token", token
        )["reason"]
        == "token_unknown_key"
    )


def test_a_reader_that_goes_away_gets_no_traceback(config_path: Path) -> None:
    """`launchgate licenses list | head -1` printed a BrokenPipeError traceback (section 1:
    never a Python traceback; found by black-box QA)."""
    for i in range(300):  # more than a pipe holds
        reserve(config_path, f"lic-{i:03d}", 8, f"d-{i}")
    child = subprocess.Popen(
        [sys.executable, "-m", "launchgate", "licenses", "list", "--config", str(config_path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert child.stdout is not None and child.stderr is not None
    # The pipe at its smallest (a page), before the child has started writing: it was 64 KiB,
    # which holds all 300 lines, and the child could finish before `head` left (a flaky pass
    # with exit 0).
    fcntl.fcntl(child.stdout.fileno(), fcntl.F_SETPIPE_SZ, 4096)
    child.stdout.readline()
    child.stdout.close()  # as `head -1` does
    err = child.stderr.read().decode()
    child.stderr.close()
    assert child.wait(timeout=60) != 0
    assert "Traceback" not in err and "BrokenPipeError" not in err


def test_the_demo_says_at_once_which_of_its_ports_are_in_use_and_changes_nothing() -> None:
    """Found by QA: with a port in use the demo waited 20 s, or, when another server answered
    on the admin port, printed its banner for a gateway that had failed to start."""
    root = Path(__file__).resolve().parent.parent
    keys = root / "config" / "keys"
    before = sorted((p.name, p.read_bytes()) for p in keys.iterdir())
    with socket.socket() as held:
        with contextlib.suppress(OSError):  # else something else holds it: said all the same
            held.bind(("127.0.0.1", 9901))
        held.listen()
        started = time.monotonic()
        result = subprocess.run(
            [sys.executable, str(root / "dev.py"), "demo"],
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 1, result
    assert "in use: " in result.stderr and "9901" in result.stderr.splitlines()[-1]
    assert time.monotonic() - started < 60
    assert sorted((p.name, p.read_bytes()) for p in keys.iterdir()) == before
