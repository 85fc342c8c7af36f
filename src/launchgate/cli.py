"""The ``launchgate`` command line (CONTRACT section 1): ``main(argv) -> int``.

A user error (bad flag, missing or invalid file, unknown key id) exits 2 with one line
on stderr naming what is at fault; success exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from launchgate.errors import ConfigError, StoreUnavailable, TokenError

if TYPE_CHECKING:
    from launchgate.ledger import Ledger


class UsageError(Exception):
    """A user error: printed as one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    _given: Sequence[str] = ()

    def parse_known_args(  # type: ignore[override]  # typeshed overloads on the namespace
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        # argparse names a missing argument before an unknown flag; the flag is what is wrong
        # when both are (``launchgate serve --conifg x``), so it is named first.
        unknown = self._unknown_flags()
        if message.startswith("the following arguments are required") and unknown:
            message = f"unrecognized arguments: {' '.join(unknown)}"
        command = self.prog.partition(" ")[2]  # main() prints the "launchgate: error:" prefix
        raise UsageError(f"{command}: {message}" if command else message)

    def _unknown_flags(self) -> list[str]:
        """The given arguments that look like flags this parser does not know: not a value
        (after an option that takes one, a lone ``-``, a negative number, text with a space),
        not after ``--``, and not an abbreviation argparse would accept."""
        unknown: list[str] = []
        takes_value = False
        for arg in self._given:
            if arg == "--":
                break
            if takes_value or arg == "-" or not arg.startswith("-") or " " in arg:
                takes_value = False
                continue
            if self._negative_number_matcher.match(arg):
                continue
            name, has_value, _ = arg.partition("=")
            known = [o for o in self._option_string_actions if o.startswith(name)]
            if not known:
                unknown.append(arg)
                continue
            action = self._option_string_actions[known[0]]
            takes_value = not has_value and action.nargs != 0
        return unknown


def _config(args: argparse.Namespace) -> Any:
    from launchgate.config import load_config

    return load_config(Path(args.config))


# Far beyond any useful count on one host (each worker is a process with its own event loop and
# store connections); found by QA: --workers 100000 started processes until the host choked.
MAX_WORKERS = 256


def cmd_serve(args: argparse.Namespace) -> int:
    # A reload asked for before the gateway (or the supervisor) handles SIGHUP would end the
    # process (found by QA: a supervisor died of one 0.2 s after it started); one asked for
    # after the files are read is remembered and made once the gateway runs (found by QA: a
    # worker started again kept a retired key).
    from launchgate.reloads import remember_until_served

    remember_until_served()
    from launchgate.logsetup import configure_logging
    from launchgate.server import run

    configure_logging()
    if not 1 <= args.workers <= MAX_WORKERS:
        raise UsageError(f"--workers: must be from 1 to {MAX_WORKERS}")
    config = _config(args)
    if args.workers > 1 and args.worker_index is None:
        from launchgate.workers import port_taken, supervise

        for where in (config.listen, config.admin_listen):
            try:
                taken = port_taken(where.host, where.port)
            except OSError as e:  # (socket.gaierror too: a host that does not resolve)
                raise UsageError(
                    f"{config.source}: cannot serve: {where}: {e.strerror or e}"
                ) from None
            if taken:
                raise UsageError(f"{config.source}: cannot serve: {where}: address already in use")
        return supervise(config, args.workers)
    if args.worker_index is not None:
        from launchgate.config import RestartOnly
        from launchgate.workers import RUNNING_ENV

        if RUNNING_ENV in os.environ:
            try:
                running = RestartOnly.from_json(os.environ[RUNNING_ENV])
            except (ValueError, TypeError):  # found by QA: an upgrade under a running supervisor
                raise UsageError(
                    f"{RUNNING_ENV}: not what this launchgate reads; the supervisor was started"
                    " by another version: restart it"
                ) from None
            config = running.applied_to(config)
    try:
        run(config, worker=args.worker_index, create_store=not args.respawned)
    except OSError as e:
        # Binding a listener is the usual failure here (address in use, no permission).
        raise UsageError(f"{config.source}: cannot serve: {e.strerror or e}") from None
    return 0


def cmd_store_migrate(args: argparse.Namespace) -> int:
    from launchgate.ledger import migrate_store

    config = _config(args)
    version = _run(lambda: migrate_store(config.store_url, config.base_dir))
    print(f"ok schema version {version}")
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    from launchgate.audit import check_log
    from launchgate.ledger import open_ledger

    config = _config(args)
    # load_config takes [store] url as text; building the ledger (without connecting)
    # rejects a url no store understands, as `serve` would at start.
    try:
        ledger = open_ledger(config.store_url, config.base_dir)
    except ConfigError as e:
        raise ConfigError(f"{config.source}: {e}") from None
    # A SQLite ledger already there must be one (found by QA: a file of random bytes passed,
    # and /readyz then said 503 "file is not a database"). A database server's state is not
    # checked: `check` validates files, offline.
    from launchgate.sqliteledger import SqliteLedger, check_ledger_file

    if isinstance(ledger, SqliteLedger) and (why := check_ledger_file(ledger.path)):
        raise ConfigError(f"{config.source}: [store].url: {why}")
    # And the decision log as `serve` would open it (a folder, a torn last line), unchanged.
    try:
        check_log(config.audit_path)
    except ConfigError as e:
        raise ConfigError(f"{config.source}: [audit].path: {e}") from None
    print("ok")
    return 0


def cmd_keys_generate(args: argparse.Namespace) -> int:
    from launchgate.tokens import generate_key

    pem = generate_key(args.kid, Path(args.out_dir), args.alg)
    print(
        f"wrote {pem} and added {args.kid} ({args.alg}) to {pem.parent / 'jwks.json'}",
        file=sys.stderr,
    )
    return 0


def _iso_time(text: str) -> int:
    from launchgate.tokens import MAX_TIMESTAMP

    try:
        # RFC 3339 allows a lower-case "z" as it allows a lower-case "t" (found by QA).
        moment = datetime.fromisoformat(text[:-1] + "Z" if text.endswith("z") else text)
    except ValueError:
        raise UsageError(f"--not-before: not an ISO 8601 time: {text!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    try:
        seconds = int(moment.timestamp())
    except (OverflowError, ValueError):
        seconds = -1
    if not 0 <= seconds <= MAX_TIMESTAMP:
        raise UsageError(f"--not-before: {text!r} is not between 1970 and 9999")
    return seconds


def cmd_token_issue(args: argparse.Namespace) -> int:
    from launchgate.tokens import (
        MAX_ACCELERATORS,
        MAX_TIMESTAMP,
        check_signing_kid,
        issue_token,
        load_private_key,
        parse_duration,
    )

    try:
        expires_in = parse_duration(args.expires_in)
    except ValueError as e:
        raise UsageError(f"--expires-in: {e}") from None
    # Ranges checked here, to name the flag at fault (found by QA: issue_token names none).
    if time.time() + expires_in > MAX_TIMESTAMP:
        raise UsageError(f"--expires-in: {args.expires_in!r} ends after the year 9999")
    if not 1 <= args.max_accelerators <= MAX_ACCELERATORS:
        raise UsageError(f"--max-accelerators: must be from 1 to {MAX_ACCELERATORS}")
    # Name the flag at fault; issue_token would only name the claim.
    texts = {"--kid": [args.kid], "--issuer": [args.issuer], "--account": [args.account]}
    texts |= {"--sku": args.sku, "--audience": [args.audience], "--region": args.region or []}
    for flag, values in texts.items():
        if not all(v.strip() for v in values):
            raise UsageError(f"{flag}: must not be empty")
    not_before = _iso_time(args.not_before) if args.not_before is not None else None
    private_key = load_private_key(Path(args.key))
    # The JWK Set `keys generate` keeps beside the key, when there is one, must know the kid.
    jwks = Path(args.key).parent / "jwks.json"
    if jwks.exists():
        check_signing_kid(private_key, args.kid, jwks)
    try:
        token = issue_token(
            private_key=private_key,
            kid=args.kid,
            issuer=args.issuer,
            account=args.account,
            skus=args.sku,
            max_accelerators=args.max_accelerators,
            expires_in_s=expires_in,
            audience=args.audience,
            regions=args.region,
            license_ref=args.license_ref,
            not_before=not_before,
        )
    except ValueError as e:
        raise UsageError(f"token issue: {e}") from None
    print(token)
    return 0


def _run(coro_factory: Callable[[], Any]) -> Any:
    return asyncio.run(coro_factory())


async def _missing_ledger(ledger: Ledger) -> str | None:
    """Where ``ledger`` (not opened) would be, when there is none there yet, else None: a SQLite
    file that does not exist, a PostgreSQL database or schema without its tables. Raises
    ``StoreUnavailable`` when a database cannot be asked."""
    from launchgate.sqliteledger import SqliteLedger

    if isinstance(ledger, SqliteLedger):
        return None if ledger.path.exists() else str(ledger.path)
    from launchgate.pgledger import PostgresLedger  # (open_ledger has loaded it)

    if isinstance(ledger, PostgresLedger) and not await ledger.exists():
        return ledger.name
    return None


@contextlib.asynccontextmanager
async def _staff_ledger(config: Any, *, making: bool = False) -> AsyncIterator[Ledger | None]:
    """The configured ledger, open, for a staff command; closed after. None where there is
    no ledger yet, unless ``making``.

    Staff commands that only read make none: an empty ledger at a mistyped or emptied path
    would answer for the real one (found by QA: `licenses list` printed an empty table,
    `decide` answered from a ledger it had just made, a mistyped schema was created). Either
    way it is said on stderr.
    """
    from launchgate.ledger import open_ledger

    ledger = open_ledger(config.store_url, config.base_dir)  # does not connect
    missing = await _missing_ledger(ledger)
    if missing is not None:
        made = "; making one" if making else ""
        print(
            f"note: there is no ledger at {missing}{made} (no gateway on this configuration has"
            " used it yet)",
            file=sys.stderr,
        )
        if not making:
            yield None
            return
    try:
        await ledger.open()
        yield ledger
    finally:
        await ledger.close()


def _read_token(text: str) -> str:
    return sys.stdin.read().strip() if text == "-" else text.strip()


def cmd_token_inspect(args: argparse.Namespace) -> int:
    from launchgate.gateway import make_verifier
    from launchgate.tokens import peek

    config = _config(args)
    token = _read_token(args.token)
    header, claims = peek(token)
    out: dict[str, Any] = {
        "header": header,
        "claims": claims,
        "verified": False,
        "reason": None,
        "detail": None,
    }
    try:
        make_verifier(config).verify(token, now=time.time())
        out |= {"verified": True, "detail": "signature and claims verify"}
    except TokenError as e:
        out |= {"reason": e.reason, "detail": e.detail}
    jti = claims.get("jti") if isinstance(claims, dict) else None

    async def ledger_view() -> dict[str, Any]:
        state = None
        if isinstance(jti, str):
            async with _staff_ledger(config) as ledger:
                state = None if ledger is None else await ledger.license(jti)
        max_acc = claims.get("max_accelerators") if isinstance(claims, dict) else None
        if state and state.max_accelerators is not None:
            # The lower of the ledger's and this token's own, as the gateway holds a launch.
            claimed = max_acc if type(max_acc) is int else None
            max_acc = min(state.max_accelerators, claimed or state.max_accelerators)
        used = state.used if state else 0
        reserved = state.reserved if state else 0
        remaining = max(0, max_acc - used - reserved) if isinstance(max_acc, int) else None
        return {
            "max_accelerators": max_acc,
            "used": used,
            "reserved": reserved,
            "remaining": remaining,
            "revoked": bool(state and state.revoked),
            "revoked_reason": state.revoked_reason if state else None,
        }

    try:
        out |= _run(ledger_view)
    except StoreUnavailable as e:
        # The same keys as when the store answers (found by QA: a script reading "reserved"
        # failed), each unknown, and why.
        unknown = ("max_accelerators", "used", "reserved", "remaining", "revoked", "revoked_reason")
        out |= dict.fromkeys(unknown) | {"store_error": str(e)}
    print(json.dumps(out, indent=2, sort_keys=True))
    return 0


def cmd_token_revoke(args: argparse.Namespace) -> int:
    from launchgate.tokens import license_id_ok

    if not license_id_ok(args.jti):
        raise UsageError(f"token revoke: not a license id: {args.jti!r}")
    config = _config(args)

    async def revoke() -> bool:
        # Made if missing: a license may be revoked before any gateway has seen it. Said, so a
        # mistyped path is noticed (found by QA: a revocation went to a ledger no gateway reads).
        async with _staff_ledger(config, making=True) as ledger:
            assert ledger is not None  # (making)
            return await ledger.revoke(args.jti, reason=args.reason, now=time.time())

    try:
        newly = _run(revoke)
    except StoreUnavailable as e:
        # Say what staff must do (found by QA: against a license row held by another session
        # the command failed and did not say the license might still be unrevoked).
        raise StoreUnavailable(
            f"{e}; {args.jti} may not be revoked: run this again (revoking twice is harmless)"
        ) from e
    print(f"revoked {args.jti}" if newly else f"{args.jti} was already revoked")
    return 0


def cmd_licenses_list(args: argparse.Namespace) -> int:

    config = _config(args)

    async def fetch() -> list[Any]:
        async with _staff_ledger(config) as ledger:
            return [] if ledger is None else await ledger.licenses()

    rows = [
        {
            "jti": s.jti,
            "account": s.account,
            "used": s.used,
            "reserved": s.reserved,
            "max": s.max_accelerators,
            "remaining": s.remaining,
            "revoked": s.revoked,
            "expires": _expiry(s.expires),
        }
        for s in _run(fetch)
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    columns = ["jti", "account", "used", "reserved", "max", "remaining", "revoked", "expires"]
    table = [columns] + [[_cell(r[c]) for c in columns] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(columns))]
    for line in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
    return 0


def _expiry(expires: float | None) -> str | float | None:
    """A license's expiry as a timestamp; the number itself where no date can say it (a
    ledger row from a token with an ``exp`` past 9999, before the gateway refused those)."""
    from launchgate.audit import utc_timestamp

    if expires is None:
        return None
    try:
        return utc_timestamp(expires)
    except (OverflowError, ValueError, OSError):
        return expires


def _cell(value: object) -> str:
    if value is None:
        return "-"
    return str(value).lower() if isinstance(value, bool) else str(value)


def cmd_licenses_release(args: argparse.Namespace) -> int:
    from launchgate.audit import AuditLog, utc_timestamp
    from launchgate.ledger import open_ledger

    config = _config(args)
    # Before anything is made (found by QA: a refused release left an empty decision log).
    missing = _run(lambda: _missing_ledger(open_ledger(config.store_url, config.base_dir)))
    if missing is not None:  # (one line for an error: it goes with it)
        raise UsageError(
            f"--decision: no reservation for decision {args.decision}"
            f" (there is no ledger at {missing})"
        )
    # Opened before the ledger is touched: a log that cannot take the record (unwritable,
    # torn last line) must stop the release, not leave a give-back without its record.
    audit = AuditLog.open(config.audit_path)

    ttl = config.reservation_ttl_s

    def record(entry: dict[str, Any], done: str) -> None:
        """Append ``entry``; a log that refuses it now (the ledger has changed already) is one
        line and exit 2, saying what was done (found in review: a traceback)."""
        try:
            audit.append_sync(entry)
        except (OSError, ValueError) as e:
            raise UsageError(
                f"{config.audit_path}: {done}, but its record was not written: {e}"
            ) from None

    async def give_back() -> Any:
        ledger = open_ledger(config.store_url, config.base_dir)
        try:
            await ledger.open()
            now = time.time()
            found = await ledger.reservation(args.decision)
            if found is None:
                raise LookupError(args.decision)
            # (Its time on the store's clock, which the reservation's is on: a staff host's clock
            # may differ from the database server's.)
            if found.state == "reserved" and found.created_at >= ledger.store_time(now) - ttl:
                raise ValueError(
                    f"reservation for decision {args.decision} is still open (made less than"
                    f" [store] reservation_ttl_s = {ttl:g} s ago): its launch may be under way"
                )
            # Then what any gateway's sweeper does, recorded as it records it: with no gateway
            # running since one died mid-launch, its reservation is still open past the TTL,
            # and would not be given back (found by QA: only a running gateway settled it).
            # (Not before the decision is known to be one to give back: a refused release
            # changes nothing, found in review.)
            if found.state == "reserved":
                for decision_id in await ledger.expire_reservations(now=now, ttl_s=ttl):
                    record(
                        {
                            "event": "reservation.settled",
                            "timestamp": utc_timestamp(time.time()),
                            "decision_id": decision_id,
                            "settlement": "used",
                            "note": f"outcome unknown after {ttl:g} s; counted as used",
                        },
                        f"settled the reservation of decision {decision_id} as used",
                    )
            # Not while a retry counted on it may be under way (answered within the upstream's
            # timeouts, and at the latest within the TTL the sweeper allows a launch).
            return await ledger.give_back(
                args.decision,
                now=time.time(),
                note=args.note,
                replays_within_s=max(ttl, config.connect_timeout_s + config.timeout_s),
            )
        finally:
            await ledger.close()

    try:
        try:
            reservation = _run(give_back)
        except LookupError:
            raise UsageError(f"--decision: no reservation for decision {args.decision}") from None
        except ValueError as e:
            raise UsageError(f"--decision: {e}") from None
        record(
            {
                "event": "license.released",
                "timestamp": utc_timestamp(time.time()),
                "decision_id": args.decision,
                "license": {"jti": reservation.jti},
                "accelerators": reservation.amount,
                "note": args.note,
            },
            f"released {reservation.amount} accelerators of {reservation.jti} in the ledger",
        )
    finally:
        audit.close()
    print(
        f"released {reservation.amount} accelerators of {reservation.jti}"
        f" (decision {args.decision})"
    )
    return 0


def cmd_decide(args: argparse.Namespace) -> int:
    from launchgate.dialects import Item, Launch
    from launchgate.gateway import make_verifier
    from launchgate.ids import new_ulid
    from launchgate.policy import decide, store_unavailable, with_ledger_state
    from launchgate.records import decision_record
    from launchgate.strict import MAX_COUNT

    config = _config(args)
    if not 1 <= args.count <= MAX_COUNT:  # the gateway answers more as malformed_request
        raise UsageError(f"--count: must be from 1 to {MAX_COUNT}")
    launch = Launch((Item(args.sku, args.count),), args.region)
    now = time.time()
    verifier = make_verifier(config)
    decision = decide(
        launch, args.account, args.token, config, lambda t: verifier.verify(t, now=now)
    )
    if decision.reason == "licensed" and decision.license is not None:
        jti = decision.license.jti

        async def state() -> Any:
            async with _staff_ledger(config) as ledger:
                return None if ledger is None else await ledger.license(jti)

        try:
            decision = with_ledger_state(decision, _run(state))
        except StoreUnavailable:
            decision = store_unavailable(decision)
    record = decision_record(
        decision,
        decision_id=new_ulid(),
        mode=config.mode,
        enforced=config.enforcing,
        method=None,
        path=None,
        now=now,
    )
    # The fields of a decision record (CONTRACT section 5); what does not apply offline, the
    # chain among them, is null, never missing.
    record |= {"seq": None, "prev_hash": None, "hash": None}
    print(json.dumps(record, indent=2))
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from launchgate.catalog import classify

    for flag, value in (("--tpp", args.tpp), ("--die-area", args.die_area)):
        # NaN compares false with everything, so it would slip through to not-controlled.
        if not math.isfinite(value) or value <= 0:
            raise UsageError(f"{flag}: must be a positive number, got {value:g}")
    print(classify(args.tpp, args.die_area, datacenter=not args.not_datacenter))
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    from launchgate.audit import verify_file

    path = Path(args.file)
    if not path.exists():
        raise UsageError(f"{path}: file not found")
    if not path.is_file():
        raise UsageError(f"{path}: not a regular file")
    result = verify_file(path)
    print(result.summary())
    for line in (result.reason(), result.note()):
        if line is not None:
            print(line, file=sys.stderr)
    return 0 if result.ok else 1


def cmd_stub_backend(args: argparse.Namespace) -> int:
    from launchgate.config import parse_host_port
    from launchgate.stub import run_stub

    where = parse_host_port(args.listen, "--listen")
    if args.keep_last is not None and args.keep_last < 1:
        raise UsageError("--keep-last: must be at least 1")
    try:
        asyncio.run(run_stub(where.host, where.port, keep_last=args.keep_last))
    except OSError as e:
        raise UsageError(f"--listen {args.listen}: cannot listen: {e.strerror or e}") from None
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="launchgate", description="Export-control enforcement gateway for instance launches."
    )
    # No dest: a missing sub-command is then named by its choices, not by an internal name.
    sub = parser.add_subparsers(required=True, parser_class=_Parser)

    def command(
        name: str, func: Callable[[argparse.Namespace], int], help: str, group: Any = sub
    ) -> Any:
        p = group.add_parser(name, help=help, description=help)
        p.set_defaults(func=func)
        return p

    def with_config(p: Any) -> Any:
        p.add_argument(
            "--config", required=True, metavar="FILE", help="the main TOML configuration file"
        )
        return p

    serve = with_config(
        command("serve", cmd_serve, "run the gateway until SIGTERM/SIGINT; SIGHUP reloads")
    )
    serve.add_argument(
        "--workers", type=int, default=1, metavar="N", help="N processes sharing the port"
    )
    serve.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)  # set by --workers
    serve.add_argument("--respawned", action="store_true", help=argparse.SUPPRESS)  # and this
    store = command("store", _group_help, "the license store").add_subparsers(
        required=True, parser_class=_Parser
    )
    with_config(
        command("migrate", cmd_store_migrate, "create or upgrade the store's schema", store)
    )
    with_config(command("check", cmd_check, "validate the whole configuration and print ok"))

    keys = command("keys", _group_help, "signing keys").add_subparsers(
        required=True, parser_class=_Parser
    )
    gen = command(
        "generate", cmd_keys_generate, "create a signing key pair and add it to DIR/jwks.json", keys
    )
    gen.add_argument("--kid", required=True)
    gen.add_argument("--out-dir", required=True, metavar="DIR")
    gen.add_argument("--alg", choices=["EdDSA", "ES256"], default="EdDSA")

    token = command("token", _group_help, "license tokens").add_subparsers(
        required=True, parser_class=_Parser
    )
    issue = command("issue", cmd_token_issue, "print one signed license token", token)
    issue.add_argument("--key", required=True, metavar="PEM")
    issue.add_argument("--kid", required=True)
    issue.add_argument("--issuer", required=True)
    issue.add_argument("--account", required=True)
    issue.add_argument("--sku", required=True, action="extend", nargs="+")
    issue.add_argument("--max-accelerators", required=True, type=int, metavar="N")
    issue.add_argument(
        "--expires-in", required=True, metavar="DURATION", help="e.g. 90d, 12h, 30m, 45s"
    )
    issue.add_argument("--audience", default="launchgate")
    issue.add_argument("--region", action="extend", nargs="+")
    issue.add_argument("--license-ref", metavar="REF")
    issue.add_argument("--not-before", metavar="ISO8601")
    inspect = with_config(
        command(
            "inspect",
            cmd_token_inspect,
            "show a token, whether it verifies, and its ledger use",
            token,
        )
    )
    inspect.add_argument("token", metavar="TOKEN", help="the token, or - to read it from stdin")
    revoke = with_config(
        command("revoke", cmd_token_revoke, "revoke a license in the configured store", token)
    )
    revoke.add_argument("jti", metavar="JTI")
    revoke.add_argument("--reason", metavar="TEXT")

    lic = command("licenses", _group_help, "the license ledger").add_subparsers(
        required=True, parser_class=_Parser
    )
    ls = with_config(command("list", cmd_licenses_list, "every license the ledger has seen", lic))
    ls.add_argument("--json", action="store_true")
    rel = with_config(
        command("release", cmd_licenses_release, "give back a reservation settled as used", lic)
    )
    rel.add_argument("--decision", required=True, metavar="DECISION_ID")
    rel.add_argument("--note", metavar="TEXT", help="what staff checked")

    dec = with_config(
        command("decide", cmd_decide, "evaluate one launch offline; reserves nothing")
    )
    dec.add_argument("--account", required=True)
    dec.add_argument("--sku", required=True)
    dec.add_argument("--count", type=int, default=1)
    dec.add_argument("--region")
    dec.add_argument("--token")

    cls = command("classify", cmd_classify, "the ECCN 3A090 class of an accelerator")
    cls.add_argument("--tpp", required=True, type=float)
    cls.add_argument("--die-area", required=True, type=float, metavar="MM2")
    cls.add_argument("--not-datacenter", action="store_true")

    audit = command("audit", _group_help, "the decision log").add_subparsers(
        required=True, parser_class=_Parser
    )
    ver = command("verify", cmd_audit_verify, "check the hash chain of a decision log", audit)
    ver.add_argument("file", metavar="FILE")

    stub = command("stub-backend", cmd_stub_backend, "a stand-in instance-launch API")
    stub.add_argument("--listen", required=True, metavar="HOST:PORT")
    stub.add_argument(
        "--keep-last",
        type=int,
        default=None,
        metavar="N",
        help="remember only the last N requests and instances (default: all)",
    )
    return parser


def _group_help(args: argparse.Namespace) -> int:  # pragma: no cover - subparsers are required
    return 2


def main(argv: Sequence[str] | None = None) -> int:
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:
            # argparse exits after --help; main() returns the status instead.
            return e.code if isinstance(e.code, int) else 0
        if args.func in (cmd_serve, cmd_stub_backend):  # servers: they log as they run
            result: int = args.func(args)
        else:
            from launchgate.logsetup import quiet_logs

            with quiet_logs():
                result = args.func(args)
        sys.stdout.flush()  # here, where a closed pipe is caught below, not at exit
        return result
    except (UsageError, ConfigError) as e:
        print(f"launchgate: error: {e}", file=sys.stderr)
        return 2
    except StoreUnavailable as e:
        print(f"launchgate: error: store unavailable: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`licenses list | head`): no traceback, and none at exit when
        # Python flushes stdout into the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
