#!/usr/bin/env python3
"""Set up and run launchgate with nothing but Python 3.11+.

    python3 dev.py demo   # venv, stub backend + gateway on config/, demo token, curl lines
    python3 dev.py test   # venv + install, ruff, mypy --strict and the whole pytest suite

The virtual environment lives in .venv and is reinstalled only when pyproject.toml changes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
CONFIG = ROOT / "config" / "launchgate.toml"
KEYS = ROOT / "config" / "keys"
DEMO_KID = "demo"


def setup() -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 - dev.py runs on whatever python3 is first
        sys.exit("launchgate needs Python 3.11 or newer")
    stamp = VENV / ".installed"
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.exists() and stamp.read_text() == wanted and PY.exists():
        return
    if not PY.exists():
        print("creating .venv", flush=True)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("installing launchgate and its test tools into .venv", flush=True)
    pip = [str(PY), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    subprocess.run([*pip, "--upgrade", "pip"], check=True)
    subprocess.run([*pip, "-e", f"{ROOT}[test]"], check=True)
    stamp.write_text(wanted)


def launchgate(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(BIN / "launchgate"), *args], check=True, text=True, **kwargs)  # type: ignore[call-overload]


def wait_for(url: str, children: list[subprocess.Popen[bytes]], timeout_s: float = 20.0) -> None:
    """Until ``url`` answers; SystemExit at once if a child exits meanwhile (its own error is
    above: found by QA, a port in use made the demo wait the whole 20 s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if any(child.poll() is not None for child in children):
            raise SystemExit("the demo could not start: see the error above")
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310 - loopback only
                return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"{url} did not come up within {timeout_s:g} s") from None
            time.sleep(0.2)


def taken(ports: tuple[int, ...]) -> list[int]:
    """Which of ``ports`` something on 127.0.0.1 serves already (found by QA: another server on
    the admin port answered /healthz, and the demo printed its banner for a gateway that had
    failed to start)."""
    busy = []
    for port in ports:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                busy.append(port)
    return busy


def _published(kid: str) -> bool:
    """Whether config/keys/jwks.json holds ``kid``."""
    try:
        keys = json.loads((KEYS / "jwks.json").read_text())["keys"]
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return any(isinstance(key, dict) and key.get("kid") == kid for key in keys)


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def demo() -> int:
    setup()
    busy = taken((8080, 9000, 9901))  # before anything is written
    if busy:
        ports = ", ".join(map(str, busy))
        print(f"the demo needs 127.0.0.1 ports 8080, 9000, 9901; in use: {ports}", file=sys.stderr)
        return 1
    pem = KEYS / f"{DEMO_KID}.pem"
    if pem.exists() and not _published(DEMO_KID):
        # A demo key left from an earlier run whose public half is gone from jwks.json (a
        # checkout restored the shipped, empty set): `token issue` would refuse its kid.
        pem.unlink()
    if not pem.exists():
        launchgate("keys", "generate", "--kid", DEMO_KID, "--out-dir", str(KEYS))
    token = launchgate(
        "token",
        "issue",
        "--key",
        str(KEYS / f"{DEMO_KID}.pem"),
        "--kid",
        DEMO_KID,
        "--issuer",
        "compliance.example-cloud",
        "--account",
        "acct-2001",
        "--sku",
        "p5.48xlarge",
        "--max-accelerators",
        "64",
        "--expires-in",
        "90d",
        "--license-ref",
        "DEMO-LICENSE-0001",
        capture_output=True,
    ).stdout.strip()
    launchgate("check", "--config", str(CONFIG))
    # A stop however it is asked (SIGTERM; SIGINT, also when started in the background, where
    # it is ignored) ends the stub and the gateway too: they would serve on, orphaned.
    signal.signal(signal.SIGTERM, _interrupted)
    signal.signal(signal.SIGINT, _interrupted)
    children = [
        subprocess.Popen([str(BIN / "launchgate"), "stub-backend", "--listen", "127.0.0.1:9000"]),
        subprocess.Popen([str(BIN / "launchgate"), "serve", "--config", str(CONFIG)]),
    ]
    try:
        wait_for("http://127.0.0.1:9901/healthz", children)
        url = "http://127.0.0.1:8080/v1/instances"

        def curl(account: str, body: dict[str, object], extra: str = "") -> str:
            return (
                f"curl -si {url} -H 'Content-Type: application/json' -H 'X-Account-Id: {account}'"
                f"{extra} -d {shlex.quote(json.dumps(body))}"
            )

        body = {"instance_type": "p5.48xlarge", "count": 1, "region": "us-east-1"}
        print(
            f"""
launchgate demo: gateway http://127.0.0.1:8080 -> stub backend http://127.0.0.1:9000
admin: http://127.0.0.1:9901/metrics   decision log: config/data/decisions.jsonl

Demo license token (acct-2001, p5.48xlarge, 64 accelerators, 90 days):
{token}

# 1. allowed: an unrestricted account (DE) launches 8x H100 -> 201
{curl("acct-1001", body)}

# 2. denied: a restricted account (CN) without a license -> 403 license_required
{curl("acct-2001", body)}

# 3. licensed: the same launch with the license token -> 201, 8 of 64 accelerators used
{curl("acct-2001", body, f" -H 'License-Token: {token}'")}

# then: {BIN}/launchgate licenses list --config config/launchgate.toml
#       {BIN}/launchgate audit verify config/data/decisions.jsonl
Ctrl-C stops both.
""",
            flush=True,
        )
        while all(c.poll() is None for c in children):
            time.sleep(0.5)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in children:
            child.wait(timeout=30)


def test(extra: list[str]) -> int:
    setup()
    steps = [
        [str(BIN / "ruff"), "check", "src", "tests", "bench", "dev.py"],
        [str(BIN / "ruff"), "format", "--check", "src", "tests", "bench", "dev.py"],
        [str(BIN / "mypy")],
        [str(PY), "-m", "pytest", *extra],
    ]
    for step in steps:
        print("+", " ".join(step), flush=True)
        code = subprocess.run(step, cwd=ROOT).returncode
        if code != 0:
            return code
    return 0


def main() -> int:
    command = sys.argv[1] if len(sys.argv) > 1 else ""
    if command == "demo":
        return demo()
    if command == "test":
        return test(sys.argv[2:])
    if command == "setup":
        setup()
        return 0
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main())
