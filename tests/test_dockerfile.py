"""The Dockerfile, without a Docker engine: its image's configuration, as the file builds it."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = (ROOT / "Dockerfile").read_text()


def _instructions() -> list[tuple[str, str]]:
    """The final stage's instructions (continuation lines joined), as (keyword, rest)."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE)
    lines = [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]
    stages = [i for i, line in enumerate(lines) if line.startswith("FROM ")]
    return [tuple(line.split(" ", 1)) for line in lines[stages[-1] :]]  # type: ignore[misc]


def _copied_config() -> str:
    [dest] = [
        rest.split()[1]
        for kw, rest in _instructions()
        if kw == "COPY" and rest.startswith("config/ ")
    ]
    return dest.rstrip("/")


def test_the_image_runs_serve_as_a_user_that_is_not_root_on_the_copied_configuration() -> None:
    steps = dict(_instructions())
    assert steps["USER"] not in ("root", "0")
    assert json.loads(steps["ENTRYPOINT"]) == ["launchgate"]
    command = json.loads(steps["CMD"])
    assert command[:2] == ["serve", "--config"]
    assert command[2] == f"{_copied_config()}/launchgate.toml"


def test_the_image_configuration_checks_out_and_trusts_no_key_of_the_checkout(
    tmp_path: Path,
) -> None:
    """Its configuration as the Dockerfile makes it (config/ copied, then each RUN that touches
    it, ownership aside) passes `launchgate check`; and whatever keys/jwks.json holds in the
    checkout (`dev.py demo` adds its demo key: found by QA), the image trusts none."""
    dest = _copied_config()
    here = tmp_path / dest.lstrip("/")
    shutil.copytree(ROOT / "config", here, ignore=shutil.ignore_patterns("data", "*.pem"))
    (here / "keys" / "jwks.json").write_text(json.dumps({"keys": [{"kid": "demo"}]}))
    for keyword, rest in _instructions():
        if keyword == "RUN" and dest in rest:
            script = " && ".join(
                part for part in rest.split(" && ") if not part.strip().startswith("chown")
            )
            subprocess.run(["sh", "-c", script.replace(dest, shlex.quote(str(here)))], check=True)
    assert json.loads((here / "keys" / "jwks.json").read_text()) == {"keys": []}
    assert (here / "data").is_dir()
    check = subprocess.run(
        [sys.executable, "-m", "launchgate", "check", "--config", str(here / "launchgate.toml")],
        capture_output=True,
        text=True,
    )
    assert (check.returncode, check.stdout) == (0, "ok\n"), check.stderr


def test_the_health_check_asks_the_admin_listener_of_the_shipped_configuration() -> None:
    shipped = tomllib.loads((ROOT / "config" / "launchgate.toml").read_text())
    port = shipped["server"]["admin_listen"].rsplit(":", 1)[1]
    [health] = [rest for kw, rest in _instructions() if kw == "HEALTHCHECK"]
    assert f"http://127.0.0.1:{port}/healthz" in health
