"""One running gateway: its configuration (swapped whole on reload) and its resources.

The proxy handler reads ``gateway.config`` and ``gateway.verifier`` once per request,
so a reload never mixes two configurations within one decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import structlog

from launchgate.config import Config, RestartOnly, load_config
from launchgate.errors import ConfigError, StoreUnavailable
from launchgate.ledger import Ledger, open_ledger
from launchgate.metrics import Metrics
from launchgate.records import Recorder
from launchgate.tokens import TokenVerifier
from launchgate.upstream import UpstreamClient

log = structlog.get_logger("launchgate")

_T = TypeVar("_T")


def _warn_if_ttl_short(config: Config) -> None:
    in_flight_s = config.connect_timeout_s + config.timeout_s
    if config.reservation_ttl_s <= in_flight_s:
        # The sweeper would settle as used a launch still waiting for its answer, and a failed
        # launch could then no longer give its units back (never an over-spend).
        log.warning(
            "config.reservation_ttl_short",
            reservation_ttl_s=config.reservation_ttl_s,
            upstream_s=in_flight_s,
        )


def make_verifier(config: Config) -> TokenVerifier:
    return TokenVerifier(
        config.keyring, issuers=config.issuers, audience=config.audience, leeway_s=config.leeway_s
    )


class Gateway:
    def __init__(self, config: Config, *, create_store: bool = True) -> None:
        self.config = config
        self.verifier = make_verifier(config)
        self.metrics = Metrics()
        self.ledger: Ledger = open_ledger(
            config.store_url,
            config.base_dir,
            create=create_store,
            pool_size=config.store_pool_size,
        )
        self._recorder: Recorder | None = None
        self._upstream: UpstreamClient | None = None
        self._sweeper: asyncio.Task[None] | None = None
        # Reloads one at a time, in the order asked: a slow load finishing after a later one
        # would otherwise put back older files (found by QA, reading the code).
        self._reloading = asyncio.Lock()
        self._background: set[asyncio.Future[Any]] = set()
        self.stopping = asyncio.Event()  # set when stop() begins: background retries end
        self.retrying = 0  # background retries of failed ledger writes under way
        self.running = False

    @property
    def recorder(self) -> Recorder:
        if self._recorder is None:
            raise RuntimeError("gateway not started")
        return self._recorder

    @property
    def upstream(self) -> UpstreamClient:
        if self._upstream is None:
            raise RuntimeError("gateway not started")
        return self._upstream

    async def start(self) -> None:
        """Open the decision log, the ledger and the upstream client.

        An unreachable ledger does not stop the start: restricted launches fail closed
        with ``store_unavailable`` until it is back, and /readyz says so.
        """
        try:
            self._recorder = Recorder(self.config.audit_path)
        except ConfigError as e:
            raise ConfigError(f"{self.config.source}: [audit].path: {e}") from e
        # The records of launches whose ledger writes committed together: one write.
        self.ledger.group_thens(self._recorder.audit.group)
        config = self.config
        _warn_if_ttl_short(config)
        try:
            await self.ledger.open()
        except StoreUnavailable as e:
            log.warning("store.unavailable", error=str(e))
        self._upstream = UpstreamClient()
        self._sweeper = asyncio.create_task(self._sweep_reservations())
        self.running = True

    def keep(self, work: Awaitable[_T]) -> asyncio.Future[_T]:
        """Run ``work`` to its end even if nobody awaits it (stop() waits for it)."""
        future = asyncio.ensure_future(work)
        self._background.add(future)
        future.add_done_callback(self._background.discard)
        return future

    async def stop(self) -> None:
        self.running = False
        self.stopping.set()
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        while self._background:  # e.g. giving back what a cancelled launch reserved
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._upstream is not None:
            await self._upstream.close()
        await self.ledger.close()
        if self._recorder is not None:
            await self._recorder.aclose()

    async def _sweep_reservations(self) -> None:
        """Settle, as used, reservations whose gateway died before the upstream answered.
        Each sweep runs to its end, records included, whenever the gateway stops: cancelled
        midway, it left reservations settled in the ledger with no record of it in the log."""
        while True:
            ttl = self.config.reservation_ttl_s  # as last reloaded
            try:
                await asyncio.shield(self.keep(self._sweep(ttl)))
            except Exception:  # a bug: the sweeper must outlive it, or nothing expires again
                log.exception("sweeper.failed")
            await asyncio.sleep(min(max(ttl / 4, 0.5), 30))

    async def _sweep(self, ttl: float) -> None:
        if self.retrying:
            # Settlements (and abandons) whose outcome this gateway knows are still to be made:
            # they go first, or a store away for longer than the TTL would have them counted
            # as used for want of an answer (found by QA). Another replica's sweeper may still.
            return
        try:
            expired = await self.ledger.expire_reservations(now=time.time(), ttl_s=ttl)
        except StoreUnavailable as e:
            log.warning("store.unavailable", error=str(e))
            return
        for decision_id in expired:
            try:
                await self.recorder.event(
                    "reservation.settled",
                    decision_id=decision_id,
                    settlement="used",
                    note=f"outcome unknown after {ttl:g} s; counted as used",
                )
            except (OSError, ValueError) as e:  # settled all the same: stdout keeps the trace
                log.error(
                    "audit.write_failed",
                    record="reservation.settled",
                    decision_id=decision_id,
                    error=str(e),
                )

    async def reload(self, path: Path) -> bool:
        """Re-read every configuration file; keep the running one if the new one is bad."""
        async with self._reloading:
            return await self._reload(path)

    async def _reload(self, path: Path) -> bool:
        try:
            config = await asyncio.to_thread(load_config, path)
        except ConfigError as e:
            self.metrics.count_reload("failed")
            log.error("config.reload_failed", error=str(e))
            return False
        except Exception as e:  # a bug in loading: still no reason to drop the running config
            self.metrics.count_reload("failed")
            log.error("config.reload_failed", error=f"{type(e).__name__} while loading {path}")
            return False
        running = RestartOnly.of(self.config)
        kept = running.changed_keys(RestartOnly.of(config))
        if kept:
            log.warning("config.reload_needs_restart", keys=kept)
            # The running configuration says what runs: these keep their values until a restart.
            config = running.applied_to(config)
        self.verifier = make_verifier(config)
        self.config = config
        self.metrics.count_reload("ok")
        _warn_if_ttl_short(config)  # (found by QA: only a start warned)
        log.info("config.reloaded", source=str(path), keys=list(config.keyring.kids))
        return True
