"""`launchgate serve` as a real process: signals, reload, restart, structured logs."""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog

from conftest import H100_SKU, RESTRICTED, SHIPPED, UNRESTRICTED, Keys, MakeToken, write_config
from launchgate import workers
from launchgate.audit import verify_file
from launchgate.config import RestartOnly, load_config

LAUNCHGATE = [sys.executable, "-m", "launchgate"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class FakeWorker:
    """What ``workers.supervise`` asks of a worker (``workers.Worker``), with no process."""

    pid = 1

    def __init__(self, returncode: int | None = None, *, serves: bool = False) -> None:
        self.returncode = returncode
        self.serves = serves

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, signum: int) -> None:
        if signum == signal.SIGTERM:
            self.returncode = -signum

    def served(self) -> bool:
        return self.serves


def _on_a_fake_clock(
    monkeypatch: pytest.MonkeyPatch,
    spawn: Callable[..., FakeWorker],
    sleep: Callable[[float], None],
    clock: list[float],
    handlers: dict[int, Any],
) -> None:
    """``workers.supervise`` with ``spawn`` for its workers, ``sleep`` and ``clock[0]`` for its
    time, and its signal handlers put in ``handlers``."""
    monkeypatch.setattr(workers, "_spawn", spawn)
    monkeypatch.setattr("launchgate.workers.time.sleep", sleep)
    monkeypatch.setattr("launchgate.workers.time.monotonic", lambda: clock[0])
    monkeypatch.setattr("launchgate.workers.signal.signal", handlers.__setitem__)


@dataclass
class Process:
    proc: asyncio.subprocess.Process
    lines: list[str] = field(default_factory=list)
    reader: asyncio.Task[None] | None = None

    async def _pump(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.lines:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return out

    async def wait_for_line(self, needle: str, within_s: float = 10) -> str:
        deadline = asyncio.get_running_loop().time() + within_s
        while asyncio.get_running_loop().time() < deadline:
            for line in self.lines:
                if needle in line:
                    return line
            await asyncio.sleep(0.05)
        raise AssertionError(f"{needle!r} not seen in output: {self.lines[-20:]}")

    async def stop(self, sig: int = signal.SIGTERM, within_s: float = 15) -> int:
        if self.proc.returncode is None:
            self.proc.send_signal(sig)
        code = await asyncio.wait_for(self.proc.wait(), within_s)
        if self.reader is not None:
            await self.reader
        return code


async def spawn(*args: str, tmp: Path | None = None) -> Process:
    """``launchgate *args``; with ``tmp``, its temporary files go there (a supervisor killed
    with SIGKILL cannot remove its metrics folder: it stays with the test's own files)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if tmp is not None:
        env["TMPDIR"] = str(tmp)
    proc = await asyncio.create_subprocess_exec(
        *LAUNCHGATE,
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    process = Process(proc)
    process.reader = asyncio.create_task(process._pump())
    return process


@dataclass
class Deployment:
    stub_url: str
    url: str
    admin_url: str
    config_path: Path
    gateway: Process
    session: aiohttp.ClientSession

    async def launch(
        self, account: str, token: str | None = None, sku: str = H100_SKU
    ) -> tuple[int, dict[str, Any]]:
        headers = {"X-Account-Id": account}
        if token:
            headers["License-Token"] = token
        async with self.session.post(
            f"{self.url}/v1/instances",
            json={"instance_type": sku, "region": "us-east-1"},
            headers=headers,
        ) as r:
            return r.status, await r.json(content_type=None)


async def start_serve(config_path: Path, admin_url: str) -> Process:
    gateway = await spawn("serve", "--config", str(config_path))
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            try:
                async with session.get(f"{admin_url}/healthz") as r:
                    if r.status == 200:
                        return gateway
            except aiohttp.ClientConnectionError:
                pass
            if gateway.proc.returncode is not None:
                break
            await asyncio.sleep(0.05)
    raise AssertionError(f"gateway did not start: {gateway.lines[-20:]}")


@pytest.fixture
async def deployment(tmp_path: Path, keys: Keys) -> AsyncIterator[Deployment]:
    """The stub backend and `launchgate serve`, each in its own process, on free ports."""
    stub = await spawn("stub-backend", "--listen", "127.0.0.1:0")
    line = await stub.wait_for_line("listening on")
    stub_url = line.rsplit(" ", 1)[-1]
    listen, admin = free_port(), free_port()
    accounts = tmp_path / "accounts.toml"
    accounts.write_text((SHIPPED / "accounts.toml").read_text())
    config_path = write_config(
        tmp_path,
        stub_url,
        keys,
        server={"listen": f"127.0.0.1:{listen}", "admin_listen": f"127.0.0.1:{admin}"},
        accounts={"file": str(accounts)},
    )
    admin_url = f"http://127.0.0.1:{admin}"
    gateway = await start_serve(config_path, admin_url)
    async with aiohttp.ClientSession() as session:
        d = Deployment(
            stub_url, f"http://127.0.0.1:{listen}", admin_url, config_path, gateway, session
        )
        yield d
    await d.gateway.stop()  # the test may have restarted the gateway
    await stub.stop()


async def test_serve_enforces_and_logs_json(deployment: Deployment, make_token: MakeToken) -> None:
    """The real process: 201 unrestricted, 403 license_required, 201 licensed; JSON decision events."""
    d = deployment
    assert (await d.launch(UNRESTRICTED))[0] == 201
    status, body = await d.launch(RESTRICTED)
    assert (status, body["reason"]) == (403, "license_required")
    assert (await d.launch(RESTRICTED, make_token()))[0] == 201
    await d.gateway.wait_for_line('"reason":"licensed"')
    decisions = [e for e in d.gateway.events() if e.get("event") == "launch.decision"]
    assert [e["reason"] for e in decisions] == [
        "account_not_restricted",
        "license_required",
        "licensed",
    ]
    assert all({"seq", "hash", "prev_hash", "decision_id"} <= set(e) for e in decisions)
    assert await d.gateway.stop() == 0
    assert any(e.get("event") == "gateway.stopped" for e in d.gateway.events())


@pytest.mark.parametrize(
    "line",
    [b"License-Token: %s\x01", b"License-Token: \x01%s", b"License-Token: %s " + b"a" * 9000],
    ids=["control-after", "control-before", "line-too-long"],
)
async def test_a_malformed_request_head_never_echoes_or_logs_the_token(
    deployment: Deployment, make_token: MakeToken, line: bytes
) -> None:
    """aiohttp refuses a header line with a control character (or one over its limit) and, left
    alone, quotes the line in its text/plain answer and its log: the token with it. The
    gateway answers problem+json quoting nothing and logs only the kind of error."""
    d = deployment
    token = make_token().encode()
    host, port = d.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /v1/instances HTTP/1.1\r\nHost: gw\r\nX-Account-Id: acct-2001\r\n"
        + line.replace(b"%s", token)
        + b"\r\nContent-Length: 2\r\n\r\n{}"
    )
    answer = await reader.read()
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.split()[1] == b"400"
    assert b"Content-Type: application/problem+json" in head
    assert json.loads(body)["reason"] == "malformed_request"
    await d.gateway.wait_for_line("http.bad_request")
    await d.gateway.stop()
    signature = token.rsplit(b".", 1)[1].decode()
    for text in (answer.decode(errors="replace"), *d.gateway.lines):
        assert signature[:16] not in text and token[:40].decode() not in text


async def test_sigterm_finishes_in_flight_launch(
    deployment: Deployment, make_token: MakeToken
) -> None:
    """SIGTERM stops accepting but lets an in-flight launch finish and settle before exit."""
    d = deployment
    async with d.session.post(f"{d.stub_url}/_stub/fail", json={"delay_s": 1.0, "times": 1}) as r:
        assert r.status == 200
    in_flight = asyncio.create_task(d.launch(RESTRICTED, make_token(jti="lic-inflight")))
    await d.gateway.wait_for_line('"reason":"licensed"')
    d.gateway.proc.send_signal(signal.SIGTERM)
    status, _ = await in_flight
    assert status == 201
    assert await d.gateway.stop() == 0
    records = [
        json.loads(x)
        for x in Path(d.config_path.parent / "decisions.jsonl").read_text().splitlines()
    ]
    completed = [r for r in records if r["event"] == "launch.completed"]
    assert [(c["upstream_status"], c["settlement"]) for c in completed] == [(201, "used")]


async def test_sighup_reloads_and_keeps_good_config_on_error(deployment: Deployment) -> None:
    """SIGHUP re-reads the accounts file; a broken reload keeps the running configuration."""
    d = deployment
    accounts = d.config_path.parent / "accounts.toml"
    accounts.write_text(
        accounts.read_text() + '\n[accounts."acct-9001"]\nbilling_country = "US"\n'
        'headquarters_country = "US"\nultimate_parent_country = "US"\n'
    )
    d.gateway.proc.send_signal(signal.SIGHUP)
    await d.gateway.wait_for_line("config.reloaded")
    assert (await d.launch("acct-9001"))[0] == 201
    accounts.write_text(
        accounts.read_text().replace(
            'ultimate_parent_country = "US"\n', 'ultimate_parent_country = "CN"\n'
        )
    )
    d.gateway.proc.send_signal(signal.SIGHUP)
    for _ in range(300):
        if sum("config.reloaded" in line for line in d.gateway.lines) >= 2:
            break
        await asyncio.sleep(0.05)
    status, body = await d.launch("acct-9001")
    assert (status, body["reason"]) == (403, "license_required")
    accounts.write_text("this is [not toml")
    d.gateway.proc.send_signal(signal.SIGHUP)
    line = await d.gateway.wait_for_line("config.reload_failed")
    assert "accounts.toml" in line
    status, body = await d.launch("acct-9001")
    assert (status, body["reason"]) == (403, "license_required")


async def test_restart_continues_the_chain(deployment: Deployment) -> None:
    """A restarted gateway continues the decision log's chain; `audit verify` passes."""
    d = deployment
    await d.launch(UNRESTRICTED)
    await d.launch(RESTRICTED)
    assert await d.gateway.stop() == 0
    d.gateway = await start_serve(d.config_path, d.admin_url)
    await d.launch(RESTRICTED)
    log = d.config_path.parent / "decisions.jsonl"
    result = verify_file(log)
    assert result.ok, result.detail
    records = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["seq"] for r in records] == list(range(1, len(records) + 1))
    assert records[-1]["event"] == "launch.decision" and records[-1]["seq"] >= 4


async def test_workers_share_port_store_log_and_metrics(
    tmp_path: Path, keys: Keys, make_token: MakeToken
) -> None:
    """`serve --workers 2`: two processes on one port, one ledger and one chain; metrics summed."""
    stub = await spawn("stub-backend", "--listen", "127.0.0.1:0")
    stub_url = (await stub.wait_for_line("listening on")).rsplit(" ", 1)[-1]
    listen, admin = free_port(), free_port()
    config_path = write_config(
        tmp_path,
        stub_url,
        keys,
        server={"listen": f"127.0.0.1:{listen}", "admin_listen": f"127.0.0.1:{admin}"},
    )
    gateway = await spawn("serve", "--config", str(config_path), "--workers", "2")
    try:
        for index in (0, 1):
            await gateway.wait_for_line(f'"worker": {index}')
        token = make_token(jti="lic-workers", max_accelerators=80)
        url = f"http://127.0.0.1:{listen}/v1/instances"
        body = {"instance_type": H100_SKU, "region": "us-east-1"}
        headers = {"X-Account-Id": RESTRICTED, "License-Token": token}

        async def launch() -> int:
            # A new connection each time, so SO_REUSEPORT spreads them over the workers.
            async with (
                aiohttp.ClientSession() as session,
                session.post(url, json=body, headers=headers) as r,
            ):
                return r.status

        statuses = await asyncio.gather(*(launch() for _ in range(30)))
        assert sorted(statuses).count(201) == 10  # 80 accelerators = ten 8-GPU launches
        assert statuses.count(403) == 20
        async with (
            aiohttp.ClientSession() as session,
            session.get(f"http://127.0.0.1:{admin}/metrics") as r,
        ):
            metrics = await r.text()
        assert 'launchgate_decisions_total{outcome="allow",reason="licensed"} 10.0' in metrics
        assert (
            'launchgate_decisions_total{outcome="deny",reason="license_exhausted"} 20.0' in metrics
        )
        gateway.proc.send_signal(signal.SIGHUP)
        for _ in range(300):  # each worker re-reads every file; slow on a busy machine
            if sum("config.reloaded" in line for line in gateway.lines) >= 2:
                break
            await asyncio.sleep(0.05)
        reloaded = sum("config.reloaded" in line for line in gateway.lines)
        assert reloaded == 2, gateway.lines[-30:]  # what each process said, if one did not
    finally:
        assert await gateway.stop() == 0
        await stub.stop()
    result = verify_file(tmp_path / "decisions.jsonl")
    assert result.ok and result.records == 30 + 10, result.detail  # decisions + completions


def test_tune_gc_freezes_start_up_objects_and_collects_less_often() -> None:
    import gc

    from launchgate.server import GC_THRESHOLDS, tune_gc

    before = gc.get_threshold()
    try:
        tune_gc()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


async def test_a_worker_started_again_does_not_create_the_ledger(
    tmp_path: Path, keys: Keys, make_token: MakeToken
) -> None:
    """`--workers` starts a worker that died again with `--respawned`: if the ledger file is
    gone (its siblings saw it removed), it must not make an empty one that would forget what
    every license has spent (found by review). It serves, fails licensed launches closed and
    says so on /readyz; other launches pass."""
    stub = await spawn("stub-backend", "--listen", "127.0.0.1:0")
    stub_url = (await stub.wait_for_line("listening on")).rsplit(" ", 1)[-1]
    listen, admin = free_port(), free_port()
    ledger = tmp_path / "data" / "ledger.sqlite3"
    config_path = write_config(
        tmp_path,
        stub_url,
        keys,
        server={"listen": f"127.0.0.1:{listen}", "admin_listen": f"127.0.0.1:{admin}"},
        store={"url": f"sqlite:{ledger}"},
    )
    gateway = await spawn("serve", "--config", str(config_path), "--respawned")
    try:
        await gateway.wait_for_line("gateway.started")
        body = {"instance_type": H100_SKU, "region": "us-east-1"}
        url = f"http://127.0.0.1:{listen}/v1/instances"
        async with aiohttp.ClientSession() as session:
            headers = {"X-Account-Id": RESTRICTED, "License-Token": make_token()}
            async with session.post(url, json=body, headers=headers) as r:
                assert (r.status, (await r.json())["reason"]) == (503, "store_unavailable")
            async with session.post(url, json=body, headers={"X-Account-Id": UNRESTRICTED}) as r:
                assert r.status == 201
            async with session.get(f"http://127.0.0.1:{admin}/readyz") as r:
                assert r.status == 503
                assert "does not create one" in (await r.json())["checks"]["store"]
        assert not ledger.exists()
    finally:
        await gateway.stop()
        await stub.stop()


def test_workers_are_started_again_with_respawned(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a worker started again carries `--respawned`; the first start creates the ledger."""
    argvs: list[list[str]] = []

    def popen(argv: list[str], **kwargs: Any) -> FakeWorker:
        argvs.append(argv)
        return FakeWorker()

    monkeypatch.setattr("launchgate.workers.subprocess.Popen", popen)
    workers._spawn(Path("lg.toml"), 0, {})
    workers._spawn(Path("lg.toml"), 0, {}, respawn=True)
    assert "--respawned" not in argvs[0]
    assert argvs[1][-1] == "--respawned"


def test_restart_delays_double_while_a_worker_dies_before_it_serves_and_reset_once_it_served() -> (
    None
):
    """1, 2, 4, ... 60 s for a worker that keeps dying at start; 1 s after one that served."""
    backoff = workers.Backoff()
    delays = [backoff.after_death(served=False) for _ in range(9)]
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60, 60]
    assert backoff.after_death(served=True) == 1
    assert backoff.after_death(served=False) == 2
    # Found by QA: with the pause going by how long a worker had lived, workers killed every
    # few seconds waited longer each time, until all four waited at once.
    assert [backoff.after_death(served=True) for _ in range(9)] == [1] * 9


def test_a_worker_that_cannot_start_is_started_again_with_growing_pauses(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by QA: a worker that could not start (its configuration had become invalid on
    disk) was started again every 1.4 s for as long as the supervisor ran. Over 5 minutes it
    is now started again 9 times, not about 200; its healthy sibling is left alone, and a
    stop ends the supervisor without starting anything more."""
    config = load_config(write_config(tmp_path, "http://127.0.0.1:9", keys))
    clock = [0.0]
    spawned: list[tuple[float, int]] = []
    handlers: dict[int, Any] = {}
    hups: list[int] = []

    class Proc(FakeWorker):
        def __init__(self, index: int) -> None:
            super().__init__()
            self.pid, self.index = 1000 + len(spawned), index
            self.born = clock[0]

        def poll(self) -> int | None:
            if self.returncode is None and self.index == 1 and clock[0] - self.born >= 0.5:
                self.returncode = 2  # worker 1 fails at start, every time
            return self.returncode

        def send_signal(self, signum: int) -> None:
            if signum == signal.SIGTERM:
                self.returncode = -signum
            else:
                hups.append(self.index)

    def spawn(path: Path, index: int, env: dict[str, str], *, respawn: bool = False) -> Proc:
        spawned.append((clock[0], index))
        return Proc(index)

    def sleep(seconds: float) -> None:
        clock[0] += seconds
        if clock[0] >= 300 and signal.SIGTERM in handlers:
            handlers.pop(signal.SIGTERM)(signal.SIGTERM, None)

    _on_a_fake_clock(monkeypatch, spawn, sleep, clock, handlers)
    with structlog.testing.capture_logs() as logs:
        assert workers.supervise(config, 2) == 1  # a worker failed
    starts = [at for at, index in spawned if index == 1]
    assert [index for _, index in spawned].count(0) == 1
    assert len(starts) == 10  # the first start and 9 more
    pauses = [round(b - a) for a, b in itertools.pairwise(starts)]
    assert pauses == [2, 3, 5, 9, 17, 33, 61, 61, 61]  # each pause: the backoff, plus 0.5 s alive
    died = [e for e in logs if e["event"] == "worker.died"]
    assert [e["restart_in_s"] for e in died][:3] == [1, 2, 4]
    # Each time worker 1 starts again it reads the files as they are now, and so does its
    # sibling (one port, one policy; found by QA: an edit never reloaded split the workers).
    assert hups == [0] * 9


def test_workers_that_served_are_started_again_after_a_second_however_often_they_die(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by QA: four workers killed in turn every 2.5 s (each lived about 10 s) waited 1,
    2, 4, ... s to be started again, as workers that cannot start do, until at about 40 s all
    four waited at once and nothing served the port. A worker that had served is started again
    after 1 s however often it dies, and a stop that comes while one waits exits 0: it had
    served, and its death was logged."""
    config = load_config(write_config(tmp_path, "http://127.0.0.1:9", keys))
    clock = [0.0]
    handlers: dict[int, Any] = {}
    latest: dict[int, FakeWorker] = {}
    kills = [0]

    def spawn(path: Path, index: int, env: dict[str, str], *, respawn: bool = False) -> FakeWorker:
        latest[index] = FakeWorker(serves=True)
        return latest[index]

    def sleep(seconds: float) -> None:
        clock[0] += seconds
        if clock[0] >= 2.5 * (kills[0] + 1):
            victim = latest[kills[0] % 4]
            if victim.returncode is None:
                victim.returncode = -signal.SIGKILL
            kills[0] += 1
        assert any(w.returncode is None for w in latest.values()), f"all down at {clock[0]} s"
        if clock[0] >= 120.1 and signal.SIGTERM in handlers:  # just after a kill
            handlers.pop(signal.SIGTERM)(signal.SIGTERM, None)

    _on_a_fake_clock(monkeypatch, spawn, sleep, clock, handlers)
    with structlog.testing.capture_logs() as logs:
        assert workers.supervise(config, 4) == 0
    died = [e for e in logs if e["event"] == "worker.died"]
    assert len(died) == 48
    assert {e["restart_in_s"] for e in died} == {1}
    assert latest[3].returncode == -signal.SIGKILL  # killed at 120 s, waiting at the stop


def test_a_stop_while_workers_start_starts_no_more(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by QA: SIGTERM while many workers started left the ones started running (the
    handlers came after the last start). A stop now reaches every worker started, and ends
    the starting."""
    config = load_config(write_config(tmp_path, "http://127.0.0.1:9", keys))
    handlers: dict[int, Any] = {}
    procs: list[Any] = []

    def spawn(path: Path, index: int, env: dict[str, str], *, respawn: bool = False) -> FakeWorker:
        proc = FakeWorker()
        procs.append(proc)
        if index == 2:  # SIGTERM arrives while the third worker starts
            handlers[signal.SIGTERM](signal.SIGTERM, None)
        return proc

    monkeypatch.setattr(workers, "_spawn", spawn)
    monkeypatch.setattr("launchgate.workers.time.sleep", lambda s: None)
    monkeypatch.setattr("launchgate.workers.signal.signal", handlers.__setitem__)
    assert workers.supervise(config, 10) == 0
    assert len(procs) == 3
    assert all(p.returncode == -signal.SIGTERM for p in procs)


def _on_free_ports(tmp_path: Path, keys: Keys) -> tuple[Path, int, int]:
    """A configuration listening on two free ports; the path and the ports."""
    listen, admin = free_port(), free_port()
    server = {"listen": f"127.0.0.1:{listen}", "admin_listen": f"127.0.0.1:{admin}"}
    return write_config(tmp_path, "http://127.0.0.1:9", keys, server=server), listen, admin


async def test_workers_end_with_their_supervisor_and_their_port_is_not_shared(
    tmp_path: Path, keys: Keys
) -> None:
    """Found by QA: workers of a supervisor killed with SIGKILL served on, beyond its signals,
    and a second `serve --workers` joined them on the port (SO_REUSEPORT) with another policy.
    A second supervisor now refuses a port that is served (exit 2), and the kernel stops the
    workers of a supervisor that died."""
    config_path, listen, _ = _on_free_ports(tmp_path, keys)
    gateway = await spawn("serve", "--config", str(config_path), "--workers", "2", tmp=tmp_path)
    started: dict[str, Any] = {"pids": []}
    try:
        started = json.loads(await gateway.wait_for_line("workers.started"))
        for index in (0, 1):
            await gateway.wait_for_line(f'"worker": {index}', within_s=20)
        second = await spawn("serve", "--config", str(config_path), "--workers", "2")
        assert await asyncio.wait_for(second.proc.wait(), 30) == 2
        assert await second.stop() == 2
        [line] = second.lines
        assert line.endswith(
            f"{config_path}: cannot serve: 127.0.0.1:{listen}: address already in use"
        )
        gateway.proc.kill()
        await gateway.proc.wait()
        for _ in range(200):
            alive = [pid for pid in started["pids"] if os.path.exists(f"/proc/{pid}")]
            if not alive:
                break
            await asyncio.sleep(0.05)
        assert alive == []
    finally:
        for pid in started["pids"]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        await gateway.stop()


def _worker_pid(supervisor: int, index: int) -> int | None:
    """The process id of the supervisor's worker ``index``, if it runs."""
    children = Path(f"/proc/{supervisor}/task/{supervisor}/children").read_text().split()
    for child in children:
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{child}/cmdline").read_bytes().split(b"\0")
            if argv[argv.index(b"--worker-index") + 1] == str(index).encode():
                return int(child)
    return None


async def test_a_worker_that_served_is_started_again_at_once_and_metrics_folders_are_swept(
    tmp_path: Path, keys: Keys
) -> None:
    """A worker that served says so to its supervisor (a pipe), and is started again 1 s after
    each death however often it dies (found by QA: the pause doubled until every worker
    waited at once). A stop while it waits exits 0. Metrics folders of supervisors that are
    gone (killed with SIGKILL: their lock is free) are removed at start; a live one's, a young
    one's, one without a lock and its own stay, and no name stops it (found in review: a huge
    number raised)."""
    config_path, _, _ = _on_free_ports(tmp_path, keys)
    folders = {
        name: tmp_path / f"launchgate-metrics-{name}"
        for name in (
            *("abandoned", "live", "young", "unlocked", "fifo"),
            *("99999999999999999999-x", "²-x"),
        )
    }
    for name, folder in folders.items():
        folder.mkdir()
        (folder / "counter_1.db").write_bytes(b"0")
        if name in ("abandoned", "live", "young"):
            (folder / ".supervisor.lock").touch()
        if name == "fifo":  # (found in review: opening it would have waited for a writer)
            os.mkfifo(folder / ".supervisor.lock")
        if name != "young":
            os.utime(folder, (0, 0))
    # A supervisor that runs holds its lock, in whatever PID namespace it runs (found in review:
    # a process id from another namespace looked dead and a live folder was removed).
    with open(folders["live"] / ".supervisor.lock") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        gateway = await spawn("serve", "--config", str(config_path), "--workers", "2", tmp=tmp_path)
        try:
            await gateway.wait_for_line("workers.started")
        except BaseException:
            await gateway.stop(signal.SIGKILL)
            raise
    try:
        assert sorted(f.name for f in folders.values() if f.exists()) == sorted(
            f.name for n, f in folders.items() if n != "abandoned"
        )
        for deaths in range(1, 5):
            for _ in range(400):  # until worker 1 serves (again)
                started = [e for e in gateway.events() if e.get("event") == "gateway.started"]
                if sum(e["worker"] == 1 for e in started) == deaths:
                    break
                await asyncio.sleep(0.05)
            pid = _worker_pid(gateway.proc.pid, 1)
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            await gateway.wait_for_line(f'"pid": {pid}')
        died = [e for e in gateway.events() if e.get("event") == "worker.died"]
        assert [e["restart_in_s"] for e in died] == [1, 1, 1, 1]
        assert await gateway.stop() == 0  # worker 1 waits to be started again
        assert json.loads(gateway.lines[-1])["exit_codes"] == [0, -signal.SIGKILL]
        assert len(list(tmp_path.glob("launchgate-metrics-*"))) == len(folders) - 1  # its own gone
    finally:
        await gateway.stop(signal.SIGKILL)


def test_workers_are_bounded() -> None:
    """Found by QA: --workers 100000 started processes until the host choked."""
    result = subprocess.run(
        [*LAUNCHGATE, "serve", "--config", "nonexistent.toml", "--workers", "257"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.strip().endswith("error: --workers: must be from 1 to 256")


async def test_a_worker_keeps_the_restart_only_settings_its_supervisor_started_with(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found by QA: a worker started again after the file's [store] url changed counted in
    another ledger than its siblings (a license spent twice on one port). A worker takes the
    store, decision log and listeners from its supervisor, whatever the file says now."""
    listen, admin = free_port(), free_port()
    (tmp_path / "then").mkdir()
    (tmp_path / "now").mkdir()
    started_with = write_config(
        tmp_path / "then",
        "http://127.0.0.1:9",
        keys,
        server={"listen": f"127.0.0.1:{listen}", "admin_listen": f"127.0.0.1:{admin}"},
        store={"url": f"sqlite:{tmp_path / 'then' / 'ledger.sqlite3'}"},
    )
    now = write_config(
        tmp_path / "now",
        "http://127.0.0.1:9",
        keys,
        server={"listen": f"127.0.0.1:{free_port()}", "admin_listen": "127.0.0.1:0"},
        store={"url": f"sqlite:{tmp_path / 'now' / 'ledger.sqlite3'}"},
    )
    monkeypatch.setenv(workers.RUNNING_ENV, RestartOnly.of(load_config(started_with)).to_json())
    gateway = await spawn("serve", "--config", str(now), "--worker-index", "0")
    try:
        started = json.loads(await gateway.wait_for_line("gateway.started"))
    finally:
        await gateway.stop()
    assert started["listen"] == [f"127.0.0.1:{listen}"]
    assert started["store"] == f"sqlite:{tmp_path / 'then' / 'ledger.sqlite3'}"
    assert (tmp_path / "then" / "ledger.sqlite3").exists()
    assert not (tmp_path / "now" / "ledger.sqlite3").exists()


@pytest.mark.parametrize("running", ['["sqlite:x", "d.jsonl", ["h", 1], ["h", 2]]', "{}", "nope"])
def test_a_worker_of_a_supervisor_of_another_version_says_so(
    tmp_path: Path, keys: Keys, running: str
) -> None:
    """Found by QA: upgraded in place under a running supervisor, a worker started again met
    restart-only settings in an older shape and died with a traceback, every time. It now
    exits 2 with one line saying to restart the supervisor."""
    config = write_config(tmp_path, "http://127.0.0.1:9", keys)
    result = subprocess.run(
        [*LAUNCHGATE, "serve", "--config", str(config), "--worker-index", "0"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, workers.RUNNING_ENV: running},
    )
    assert result.returncode == 2
    assert result.stderr.strip().endswith("another version: restart it")
    assert "Traceback" not in result.stderr


async def test_workers_survive_a_reload_while_they_start_and_restart_on_a_port_just_used(
    tmp_path: Path, keys: Keys
) -> None:
    """Found in review: a worker ended on a SIGHUP that came before its gateway handled it
    (workers restarted together killed each other), and a supervisor started again right
    after a stop refused its own port, held by connections in TIME_WAIT. A worker now ignores
    SIGHUP until it handles it, and the port check lets TIME_WAIT be."""
    config_path, listen, admin = _on_free_ports(tmp_path, keys)
    gateway = await spawn("serve", "--config", str(config_path), "--workers", "2")
    try:
        started = json.loads(await gateway.wait_for_line("workers.started"))
        for pid in started["pids"]:  # at once: they are still starting
            os.kill(pid, signal.SIGHUP)
        for index in (0, 1):
            await gateway.wait_for_line(f'"worker": {index}', within_s=20)
        assert not [e for e in gateway.events() if e.get("event") == "worker.died"]
        async with aiohttp.ClientSession() as session:  # connections the server side closes
            for url in (f"http://127.0.0.1:{listen}/x", f"http://127.0.0.1:{admin}/healthz"):
                async with session.get(url, headers={"Connection": "close"}) as r:
                    await r.read()
    finally:
        assert await gateway.stop() == 0
    again = await spawn("serve", "--config", str(config_path), "--workers", "2")
    try:
        await again.wait_for_line("workers.started", within_s=20)
        assert again.proc.returncode is None
    finally:
        await again.stop()


def test_a_host_that_does_not_resolve_is_one_line_with_workers(tmp_path: Path, keys: Keys) -> None:
    """Found in review: the port check raised a traceback for a listen host that does not
    resolve; `serve` alone said so in one line."""
    config = write_config(
        tmp_path,
        "http://127.0.0.1:9",
        keys,
        server={"listen": "no-such-host.invalid:8080", "admin_listen": "127.0.0.1:0"},
    )
    result = subprocess.run(
        [*LAUNCHGATE, "serve", "--config", str(config), "--workers", "2"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert "cannot serve: no-such-host.invalid:8080" in line


def test_a_stop_while_a_worker_is_started_again_reaches_it(
    tmp_path: Path, keys: Keys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Found in review: a stop that came while a dead worker was started again reached only
    the dead process; the new one ran on and the supervisor waited for it forever."""
    config = load_config(write_config(tmp_path, "http://127.0.0.1:9", keys))
    handlers: dict[int, Any] = {}
    procs: list[Any] = []

    def spawn(path: Path, index: int, env: dict[str, str], *, respawn: bool = False) -> FakeWorker:
        proc = FakeWorker(1 if index == 1 and not respawn else None)  # worker 1 dies at once
        procs.append(proc)
        if respawn:  # SIGTERM arrives while worker 1 is started again
            handlers[signal.SIGTERM](signal.SIGTERM, None)
        return proc

    clock = [0.0]

    def sleep(seconds: float) -> None:
        clock[0] += seconds
        assert clock[0] < 60, "the supervisor did not stop"

    _on_a_fake_clock(monkeypatch, spawn, sleep, clock, handlers)
    workers.supervise(config, 2)
    assert len(procs) == 3 and procs[2].returncode == -signal.SIGTERM


async def test_a_reload_asked_for_while_serve_starts_does_not_end_it(
    tmp_path: Path, keys: Keys
) -> None:
    """Found by QA: a SIGHUP in the first half second ended `serve` (the supervisor too) with
    "Hangup". It is set aside (remembered) from the first thing `serve` does until the gateway
    handles it."""
    config_path = write_config(tmp_path, "http://127.0.0.1:9", keys)
    gateway = await spawn("serve", "--config", str(config_path))
    try:
        for _ in range(400):  # until serve has set SIGHUP aside (caught or ignored)
            if gateway.lines and "gateway.started" in gateway.lines[-1]:
                break
            if _handles_sighup(gateway.proc.pid):
                break
            await asyncio.sleep(0.005)
        else:
            raise AssertionError("serve never set SIGHUP aside while it started")
        assert not any("gateway.started" in line for line in gateway.lines), "too late to tell"
        gateway.proc.send_signal(signal.SIGHUP)
        await gateway.wait_for_line("gateway.started", within_s=20)
        assert gateway.proc.returncode is None
    finally:
        await gateway.stop()


def _handles_sighup(pid: int) -> bool:
    """Whether process ``pid`` catches or ignores SIGHUP (so one sent now cannot end it)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("SigCgt:", "SigIgn:")) and int(line.split()[1], 16) & 1:
            return True
    return False


async def _feed(fifo: Path, text: str) -> None:
    """Write ``text`` to ``fifo`` once a reader has opened it."""
    await asyncio.to_thread(fifo.write_text, text)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
async def test_a_reload_asked_for_while_serve_reads_its_files_is_made(
    tmp_path: Path, keys: Keys
) -> None:
    """A SIGHUP that reaches `launchgate serve` after it has begun to read its files and before
    the gateway handles SIGHUP is remembered and made once it does (found by QA: it was
    ignored, and a worker started again kept a retired key while its siblings reloaded). The
    accounts file is a FIFO here, so the read waits, signal sent, until the test writes it."""
    fifo = tmp_path / "accounts.toml"
    os.mkfifo(fifo)
    listen, admin = free_port(), free_port()
    config_path = write_config(
        tmp_path,
        "http://127.0.0.1:9",
        keys,
        server={"listen": f"127.0.0.1:{listen}", "admin_listen": f"127.0.0.1:{admin}"},
        accounts={"file": str(fifo)},
    )
    gateway = await spawn("serve", "--config", str(config_path))
    try:
        for _ in range(400):  # until it handles SIGHUP: then it reads (waits on) the FIFO
            if _handles_sighup(gateway.proc.pid):
                break
            await asyncio.sleep(0.025)
        gateway.proc.send_signal(signal.SIGHUP)
        accounts = (SHIPPED / "accounts.toml").read_text()
        await asyncio.wait_for(_feed(fifo, accounts), 10)  # the start's read
        await gateway.wait_for_line("gateway.started")
        await asyncio.wait_for(_feed(fifo, accounts), 10)  # the reload's read
        await gateway.wait_for_line("config.reloaded")
    finally:
        # A read still waiting for the FIFO (the test failed) ends with an empty file.
        with contextlib.suppress(OSError):
            fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            os.close(fd)
        await gateway.stop()
