#!/usr/bin/env python3
"""launchgate benchmark: every target driven by the same load generator in one run.

Starts the stub backend, the reference pass-through proxy (bench/refproxy.py) and
launchgate (SQLite ledger; PostgreSQL too when LAUNCHGATE_BENCH_POSTGRES_DSN or
LAUNCHGATE_TEST_POSTGRES_DSN is set), then drives each scenario with wrk (Debian's
package) when it is on PATH, else with the bundled async client, and prints requests/s,
p50 and p99 latency, the CPU time each request cost the proxy, the stub and PostgreSQL
(read from /proc: steadier than requests/s on a shared machine), and the ratios to the
reference pass-through.

    .venv/bin/python bench/run.py [--duration 5] [--rounds 3] [--connections 16]
                                  [--client wrk|python] [--workers N]

Run it on a quiet machine; it only talks to 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from statistics import median
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LAUNCH_BODY = json.dumps({"instance_type": "p5.48xlarge", "count": 1, "region": "us-east-1"})
THROUGH_PATH = "/_stub/bytes?n=256"


@dataclass(frozen=True)
class Scenario:
    name: str
    url: str
    method: str = "GET"
    body: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    proxy: str = ""  # which proxy serves it (a key of the run's pids), "" for none
    postgres: bool = False  # whether PostgreSQL works for it


@dataclass(frozen=True)
class Result:
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us: dict[str, float] | None = None  # CPU microseconds per request, by process


# --- CPU per request, from /proc (Linux) -------------------------------------------------

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _cpu_of(pid: int) -> float:
    """User plus system CPU seconds of one process (all its threads)."""
    return _seconds(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1])


def _seconds(after_name: str) -> float:
    """User plus system CPU seconds from a /proc stat line's fields after the command name."""
    fields = after_name.split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def cpu_snapshot(pids: dict[str, int]) -> dict[str, float] | None:
    """CPU seconds so far of each named process with its children (workers), and of all
    PostgreSQL server processes as "postgres"; None where /proc is not there."""
    if not Path("/proc/self/stat").exists():
        return None
    children: dict[int, list[int]] = {}
    postgres = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            name, rest = stat.split("(", 1)[1].rsplit(")", 1)
            ppid = int(rest.split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
            if name.startswith("postgres"):
                postgres += _seconds(rest)
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
    snapshot = {"postgres": postgres}
    for role, pid in pids.items():
        try:
            snapshot[role] = sum(_cpu_of(p) for p in [pid, *children.get(pid, [])])
        except OSError:
            continue
    return snapshot


def measured(
    load: Callable[[Scenario, float, int], Result],
    s: Scenario,
    duration: float,
    connections: int,
    pids: dict[str, int],
) -> Result:
    """``load`` with the CPU that each request cost the scenario's proxy, the stub and
    (for PostgreSQL scenarios) the database server."""
    before = cpu_snapshot(pids)
    result = load(s, duration, connections)
    after = cpu_snapshot(pids)
    if before is None or after is None or result.rps <= 0:
        return result
    requests = result.rps * max(1, round(duration))
    roles = [r for r in (s.proxy, "stub") if r] + (["postgres"] if s.postgres else [])
    cpu = {r: (after[r] - before[r]) / requests * 1e6 for r in roles if r in after}
    return replace(result, cpu_us=cpu)


def _cpu_text(cpu: dict[str, float] | None) -> str:
    if not cpu:
        return ""
    return "  cpu/req " + ", ".join(f"{role} {us:4.0f} us" for role, us in cpu.items())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_http(url: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1):  # noqa: S310 - loopback only
                return
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"{url} did not come up")


# --- cores: the proxy under test on its own, the stub and the load generator on the rest ----


@dataclass(frozen=True)
class Cores:
    """Which CPUs each side runs on; empty sets leave the scheduler free (no pinning)."""

    proxy: frozenset[int] = frozenset()
    load: frozenset[int] = frozenset()  # the stub backend and the load generator

    @classmethod
    def split(cls, pin: bool) -> Cores:
        """With ``pin`` and two CPUs or more: the proxies on the first, the rest for the stub
        and the load generator, so that neither takes CPU from the proxy being measured."""
        cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
        if not pin or len(cpus) < 2:
            return cls()
        return cls(frozenset(cpus[:1]), frozenset(cpus[1:]))

    def describe(self) -> str:
        if not self.proxy:
            return "cores: not pinned; the load generator, the stub and the proxies share them"
        return (
            f"cores: the proxy under test on CPU {_cpus(self.proxy)}; the stub and the load"
            f" generator on CPU {_cpus(self.load)}; PostgreSQL and `--workers` are not pinned"
        )


def _cpus(cpus: frozenset[int]) -> str:
    return ",".join(str(c) for c in sorted(cpus))


def _pinned(cpus: frozenset[int]) -> Callable[[], None] | None:
    """A ``preexec_fn`` that runs the child (and every thread and process it starts) on
    ``cpus``; None for no pinning."""
    if not cpus:
        return None
    return lambda: os.sched_setaffinity(0, cpus)


CORES = Cores()  # set by main()


@contextmanager
def process(
    *args: str, ready: str, cpus: frozenset[int] = frozenset()
) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(
        args,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        preexec_fn=_pinned(cpus),
    )
    try:
        wait_http(ready)
        yield proc
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()


def launchgate(*args: str, **kwargs: object) -> str:
    out = subprocess.run(
        [str(BIN / "launchgate"), *args], check=True, capture_output=True, text=True
    )
    return out.stdout.strip()


def write_config(folder: Path, store_url: str, upstream: str) -> tuple[Path, str, str, str]:
    """A launchgate configuration over the shipped data; returns (path, url, admin, token)."""
    keys = folder / "keys"
    if not (keys / "bench.pem").exists():
        launchgate("keys", "generate", "--kid", "bench", "--out-dir", str(keys))
    token = launchgate(
        "token",
        "issue",
        "--key",
        str(keys / "bench.pem"),
        "--kid",
        "bench",
        "--issuer",
        "compliance.example-cloud",
        "--account",
        "acct-2001",
        "--sku",
        "p5.48xlarge",
        "--max-accelerators",
        "100000000",
        "--expires-in",
        "1d",
    )
    listen, admin = free_port(), free_port()
    shipped = ROOT / "config"
    path = folder / f"launchgate-{listen}.toml"
    path.write_text(f"""
[server]
listen = "127.0.0.1:{listen}"
admin_listen = "127.0.0.1:{admin}"
max_body_bytes = 1048576
[upstream]
url = "{upstream}"
[tokens]
jwks = "{keys / "jwks.json"}"
issuers = ["compliance.example-cloud"]
[store]
url = "{store_url}"
[audit]
path = "{folder / f"decisions-{listen}.jsonl"}"
[catalog]
file = "{shipped / "catalog.toml"}"
[accounts]
file = "{shipped / "accounts.toml"}"
[policy]
country_groups_file = "{shipped / "country_groups.toml"}"
restricted_country_groups = ["D:5"]
restricted_countries = ["MO"]
[[routes]]
method = "POST"
path = "/v1/instances"
dialect = "generic-json"
sku = "/instance_type"
count = "/count"
region = "/region"
""")
    return path, f"http://127.0.0.1:{listen}", f"http://127.0.0.1:{admin}", token


# --- load generators ----------------------------------------------------------------------

_WRK_LUA = """
wrk.method = {method}
wrk.body = {body}
{headers}
"""


def _lua(text: str | None) -> str:
    return "nil" if text is None else json.dumps(text)


def _ms(value: str, unit: str) -> float:
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]


def run_wrk(s: Scenario, duration: float, connections: int) -> Result:
    headers = "\n".join(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}" for k, v in s.headers)
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(_WRK_LUA.format(method=json.dumps(s.method), body=_lua(s.body), headers=headers))
        script = f.name
    try:
        out = subprocess.run(
            [
                "wrk",
                "-t1",
                f"-c{connections}",
                f"-d{max(1, round(duration))}s",  # wrk takes whole seconds
                "--latency",
                "-s",
                script,
                s.url,
            ],
            check=True,
            capture_output=True,
            text=True,
            preexec_fn=_pinned(CORES.load),
        ).stdout
    finally:
        os.unlink(script)
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = dict(re.findall(r"^\s+(50|99)%\s+([\d.]+(?:us|ms|s))", out, re.M))
    p50 = re.match(r"([\d.]+)(us|ms|s)", lat["50"])
    p99 = re.match(r"([\d.]+)(us|ms|s)", lat["99"])
    errors = 0
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        errors += int(non2xx.group(1))
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out
    )
    if socket_errors:
        errors += sum(int(x) for x in socket_errors.groups())
    return Result(rps, _ms(*p50.groups()), _ms(*p99.groups()), errors)  # type: ignore[union-attr]


async def _python_load(s: Scenario, duration: float, connections: int) -> Result:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    deadline = time.perf_counter() + duration
    connector = aiohttp.TCPConnector(limit=connections)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                started = time.perf_counter()
                async with session.request(
                    s.method, s.url, data=s.body, headers=list(s.headers)
                ) as r:
                    await r.read()
                    if r.status >= 300:
                        errors += 1
                latencies.append(time.perf_counter() - started)

        begun = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(connections)))
        elapsed = time.perf_counter() - begun
    latencies.sort()
    return Result(
        len(latencies) / elapsed,
        latencies[len(latencies) // 2] * 1000,
        latencies[int(len(latencies) * 0.99)] * 1000,
        errors,
    )


def run_python(s: Scenario, duration: float, connections: int) -> Result:
    return asyncio.run(_python_load(s, duration, connections))


# --- the run ------------------------------------------------------------------------------


def build_scenarios(
    stub: str,
    ref: str,
    lg_sqlite: str,
    lg_pg: str | None,
    token: str,
    lg_workers: tuple[str, int] | None = None,
) -> list[Scenario]:
    json_type = ("Content-Type", "application/json")
    licensed = (json_type, ("X-Account-Id", "acct-2001"), ("License-Token", token))
    post: dict[str, Any] = {"method": "POST", "body": LAUNCH_BODY}
    ref_post = {**post, "headers": (json_type,), "proxy": "reference"}
    scenarios = [
        Scenario("upstream direct: GET", f"{stub}{THROUGH_PATH}"),
        Scenario("reference pass-through: GET", f"{ref}{THROUGH_PATH}", proxy="reference"),
        Scenario("launchgate pass-through: GET", f"{lg_sqlite}{THROUGH_PATH}", proxy="sqlite"),
        Scenario("upstream direct: launch", f"{stub}/v1/instances", **post, headers=(json_type,)),
        Scenario("reference pass-through: launch", f"{ref}/v1/instances", **ref_post),
        Scenario(
            "launchgate unrestricted launch",
            f"{lg_sqlite}/v1/instances",
            **post,
            headers=(json_type, ("X-Account-Id", "acct-1001")),
            proxy="sqlite",
        ),
        Scenario(
            "launchgate licensed launch (SQLite)",
            f"{lg_sqlite}/v1/instances",
            **post,
            headers=licensed,
            proxy="sqlite",
        ),
    ]
    if lg_pg:
        name = "launchgate licensed launch (PostgreSQL)"
        scenarios.append(
            Scenario(
                name,
                f"{lg_pg}/v1/instances",
                **post,
                headers=licensed,
                proxy="postgresql",
                postgres=True,
            )
        )
    if lg_workers:
        url, workers = lg_workers
        name = f"launchgate licensed launch (SQLite, {workers} workers)"
        scenarios.append(
            Scenario(name, f"{url}/v1/instances", **post, headers=licensed, proxy="workers")
        )
    return scenarios


# Measured again with one connection: a round trip's own latency, without queueing.
LATENCY_SCENARIOS = (
    "reference pass-through: GET",
    "launchgate pass-through: GET",
    "reference pass-through: launch",
    "launchgate unrestricted launch",
    "launchgate licensed launch (SQLite)",
    "launchgate licensed launch (PostgreSQL)",
)


def _base_of(name: str) -> str:
    return (
        "reference pass-through: GET" if name.endswith("GET") else "reference pass-through: launch"
    )


def report_latency(rounds: list[dict[str, Result]]) -> None:
    """The decision overhead: p50 of a lone request through launchgate minus the same
    request's through the reference pass-through (each the median over the rounds)."""
    print(
        "\ndecision overhead, one connection (p50 minus the reference pass-through's p50,"
        " medians over the rounds):"
    )
    for name in rounds[0]:
        p50 = median(r[name].p50_ms for r in rounds)
        p99 = median(r[name].p99_ms for r in rounds)
        overhead = median(r[name].p50_ms - r[_base_of(name)].p50_ms for r in rounds)
        goal = "  (target <= 1.0 ms)" if "licensed" in name else ""
        extra = "" if name.startswith("reference") else f"  overhead {overhead:+6.2f} ms{goal}"
        print(f"  {name:46s} p50 {p50:6.2f} ms  p99 {p99:6.2f} ms{extra}")


def report(rounds: list[dict[str, Result]]) -> None:
    """Medians over the rounds; each ratio is taken within a round (the reference and
    launchgate measured minutes apart, not an hour), then the median of those."""
    print(f"\nmedians over {len(rounds)} round(s):")
    for name in rounds[0]:
        rps = median(r[name].rps for r in rounds)
        p50 = median(r[name].p50_ms for r in rounds)
        p99 = median(r[name].p99_ms for r in rounds)
        errors = sum(r[name].errors for r in rounds)
        cpus = [c for r in rounds if (c := r[name].cpu_us)]
        cpu = {role: median(c[role] for c in cpus) for role in cpus[0]} if cpus else None
        print(
            f"  {name:46s} {rps:9.0f} req/s  p50 {p50:7.2f} ms  p99 {p99:7.2f} ms"
            f"  errors {errors}{_cpu_text(cpu)}"
        )
    print("\nratios to the reference pass-through (requests/s), and p50 overhead under load:")
    targets = {
        "launchgate pass-through: GET": 1.0,
        "launchgate unrestricted launch": None,
        "launchgate licensed launch (SQLite)": 0.7,
        "launchgate licensed launch (PostgreSQL)": 0.5,
    }
    targets |= {n: None for n in rounds[0] if "workers)" in n}
    for name, target in targets.items():
        if name not in rounds[0]:
            continue
        ratios = [r[name].rps / r[_base_of(name)].rps for r in rounds]
        overhead = median(r[name].p50_ms - r[_base_of(name)].p50_ms for r in rounds)
        spread = f" ({min(ratios):.2f}-{max(ratios):.2f})" if len(ratios) > 1 else ""
        goal = f"  (target >= {target:.1f}x)" if target else ""
        cpu_ratio = _cpu_ratio(rounds, name)
        print(
            f"  {name:46s} {median(ratios):5.2f}x{spread}  p50 {overhead:+6.2f} ms{goal}{cpu_ratio}"
        )
    print("\nlatencies are under load (every connection busy), not single round trips;")
    print(CORES.describe() + ".")
    print(
        "cpu: the reference's proxy CPU per request over launchgate's. While each proxy is\n"
        "bound by one core (one event loop, one GIL), the requests/s ratio follows it."
    )


def _cpu_ratio(rounds: list[dict[str, Result]], name: str) -> str:
    """``  cpu 0.47x``: the reference proxy's CPU per request over launchgate's, per round."""
    ratios = []
    for r in rounds:
        ours, theirs = r[name].cpu_us, r[_base_of(name)].cpu_us
        proxy = next((role for role in ours or {} if role not in ("stub", "postgres")), None)
        if ours and theirs and proxy and ours[proxy] > 0 and "reference" in theirs:
            ratios.append(theirs["reference"] / ours[proxy])
    return f"  cpu {median(ratios):4.2f}x" if ratios else ""


@contextmanager
def _own_schema(dsn: str) -> Iterator[str]:
    """A store url on a new schema of ``dsn``'s database (the ledger creates it), dropped after."""
    import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information

    schema = f"lg_bench_{os.getpid()}"
    try:
        yield f"{dsn}{'&' if '?' in dsn else '?'}schema={schema}"
    finally:

        async def drop() -> None:
            conn = await asyncpg.connect(dsn, timeout=5)
            try:
                await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            finally:
                await conn.close()

        asyncio.run(drop())


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per scenario")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--client", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument(
        "--workers", type=int, default=1, help="also measure `serve --workers N` (SQLite) when > 1"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=3,
        help="run every scenario this many times, interleaved, and report medians",
    )
    parser.add_argument(
        "--latency-duration",
        type=float,
        default=3.0,
        help="seconds per scenario of the one-connection latency pass (0 skips it)",
    )
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="let the scheduler place every process (default: the proxy under test on one CPU,"
        " the stub and the load generator on the others)",
    )
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    global CORES
    CORES = Cores.split(pin=not args.no_pin)
    if CORES.load:  # the bundled client runs in this process
        os.sched_setaffinity(0, CORES.load)
    client = args.client if args.client != "auto" else ("wrk" if shutil.which("wrk") else "python")
    load = run_wrk if client == "wrk" else run_python
    pg_dsn = os.environ.get("LAUNCHGATE_BENCH_POSTGRES_DSN") or os.environ.get(
        "LAUNCHGATE_TEST_POSTGRES_DSN"
    )
    rounds: list[dict[str, Result]] = []
    singles: list[dict[str, Result]] = []
    with tempfile.TemporaryDirectory(prefix="launchgate-bench-") as tmp, ExitStack() as stack:
        folder = Path(tmp)
        stub_port, ref_port = free_port(), free_port()
        stub, ref = f"http://127.0.0.1:{stub_port}", f"http://127.0.0.1:{ref_port}"
        sqlite_store = f"sqlite:{folder / 'ledger.sqlite3'}"
        sqlite_cfg, lg_sqlite, admin_sqlite, token = write_config(folder, sqlite_store, stub)
        targets = [("sqlite", sqlite_cfg, admin_sqlite, 1)]
        lg_pg = None
        if pg_dsn:
            # A schema of its own, dropped at the end: the run leaves no rows in the database,
            # and no earlier run's rows (or dead row versions) slow it.
            store = stack.enter_context(_own_schema(pg_dsn))
            pg_cfg, lg_pg, admin_pg, _ = write_config(folder, store, stub)
            targets.append(("postgresql", pg_cfg, admin_pg, 1))
        lg_workers = None
        if args.workers > 1:
            store = f"sqlite:{folder / 'ledger-workers.sqlite3'}"
            workers_cfg, url, admin, _ = write_config(folder, store, stub)
            targets.append(("workers", workers_cfg, admin, args.workers))
            lg_workers = (url, args.workers)
        stub_cmd = [
            str(BIN / "launchgate"),
            "stub-backend",
            "--listen",
            f"127.0.0.1:{stub_port}",
            "--keep-last",  # a bounded heap: no collector pauses growing through the run
            "10000",
        ]
        stub_proc = process(*stub_cmd, ready=f"{stub}/v1/instances", cpus=CORES.load)
        pids = {"stub": stack.enter_context(stub_proc).pid}
        refproxy = str(Path(__file__).with_name("refproxy.py"))
        ref_cmd = [
            sys.executable,
            refproxy,
            "--listen",
            f"127.0.0.1:{ref_port}",
            "--upstream",
            stub,
        ]
        ref_proc = process(*ref_cmd, ready=f"{ref}{THROUGH_PATH}", cpus=CORES.proxy)
        pids["reference"] = stack.enter_context(ref_proc).pid
        pids |= stack.enter_context(_gateways(targets))
        print(f"load generator: {client}, {args.connections} connections, {args.duration:g} s each")
        print(CORES.describe())
        for n in range(1, args.rounds + 1):
            print(f"round {n} of {args.rounds}:")
            results: dict[str, Result] = {}
            for s in build_scenarios(stub, ref, lg_sqlite, lg_pg, token, lg_workers):
                load(s, 1.0, args.connections)  # warm-up: connections, caches, the license row
                r = measured(load, s, args.duration, args.connections, pids)
                results[s.name] = r
                print(
                    f"  {s.name:46s} {r.rps:9.0f} req/s  p50 {r.p50_ms:7.2f} ms"
                    f"  p99 {r.p99_ms:7.2f} ms  errors {r.errors}{_cpu_text(r.cpu_us)}",
                    flush=True,
                )
            rounds.append(results)
            if args.latency_duration > 0:
                print(f"  one connection, {args.latency_duration:g} s each:")
                single: dict[str, Result] = {}
                for s in build_scenarios(stub, ref, lg_sqlite, lg_pg, token):
                    if s.name in LATENCY_SCENARIOS:
                        single[s.name] = r = load(s, args.latency_duration, 1)
                        print(f"    {s.name:44s} p50 {r.p50_ms:6.2f} ms", flush=True)
                singles.append(single)
    report(rounds)
    if singles:
        report_latency(singles)
    return 0


@contextmanager
def _gateways(targets: list[tuple[str, Path, str, int]]) -> Iterator[dict[str, int]]:
    """Start each (name, config, admin URL, workers) gateway; yields their pids by name."""
    procs = []
    pids = {}
    try:
        for name, config, admin, workers in targets:
            proc = subprocess.Popen(
                [
                    str(BIN / "launchgate"),
                    "serve",
                    "--config",
                    str(config),
                    "--workers",
                    str(workers),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                # N workers get every core: pinned to one, they would only share it.
                preexec_fn=_pinned(CORES.proxy if workers == 1 else frozenset()),
            )
            procs.append(proc)
            pids[name] = proc.pid
            wait_http(f"{admin}/healthz")
        yield pids
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()


if __name__ == "__main__":
    sys.exit(main())
