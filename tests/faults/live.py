"""Real ``syncd run`` replicas against the emulators on loopback sockets, behind a balancer.

The emulators are served by uvicorn in the test's event loop on free ports; each
replica is a subprocess with its own config (its own port, the same database) and a
log file. Vendors deliver webhooks to one public URL, ``http://syncd-lb.test``, every
replica's ``public_url`` (signatures cover it), and :class:`Balancer` hands each
delivery to the next live replica, as a load balancer in front of them would.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from connectors.hubspot.emulator import HubSpotEmulator
from connectors.xero.emulator import XeroEmulator
from syncd.plumbing.serving import free_port, serve
from syncd.store.db import EffectRow, EventRow, Store
from tests.faults.checker import Report, check, emulator_secrets, log_texts, record
from tests.harness import write_config
from tests.servers import healthy, start_daemon, until

PUBLIC_URL = "http://syncd-lb.test"
DAEMON = 'poll_interval_s = 3600\nworkers = 2\nlog_level = "debug"\n'


class Balancer(httpx.AsyncBaseTransport):
    """Round-robin over the replicas' addresses; a replica that refuses the connection is skipped."""

    def __init__(self, upstreams: list[str]) -> None:
        self.upstreams = [httpx.URL(url) for url in upstreams]
        self._next = itertools.cycle(range(len(upstreams)))
        self._inner = httpx.AsyncHTTPTransport()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        for _ in self.upstreams:
            upstream = self.upstreams[next(self._next)]
            request.url = request.url.copy_with(scheme=upstream.scheme, host=upstream.host, port=upstream.port)
            try:
                return await self._inner.handle_async_request(request)
            except httpx.ConnectError:
                continue
        return httpx.Response(502, request=request)

    async def aclose(self) -> None:
        await self._inner.aclose()


@dataclass
class Replica:
    """One ``syncd run`` process: its config, address and log; started and stopped by the test."""

    name: str
    config: Path
    url: str
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self, env: Mapping[str, str] | None = None) -> None:
        """Start it (again), with ``env`` added to the environment (``SYNCD_FAILPOINTS`` ...)."""
        assert not self.alive, f"{self.name} is already running"
        self.proc = start_daemon(self.config, self.log, env)

    @property
    def alive(self) -> bool:
        """Whether the process runs (or is frozen)."""
        return self.proc is not None and self.proc.poll() is None

    async def ready(self, client: httpx.AsyncClient) -> None:
        """Wait until it answers ``/readyz``."""
        assert self.proc is not None
        await healthy(client, self.url, self.proc, self.log)

    async def ready_or_gone(self, client: httpx.AsyncClient, timeout_s: float = 60) -> bool:
        """Wait until it answers ``/readyz`` (``True``) or exits (``False``: a failpoint may fire during start-up)."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None:
            with contextlib.suppress(httpx.TransportError):
                if (await client.get(f"{self.url}/readyz")).status_code == 200:
                    return True
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.name} neither became ready nor exited")
            await asyncio.sleep(0.1)
        return False

    def signal(self, sig: signal.Signals) -> None:
        """Send ``sig`` to the process."""
        assert self.proc is not None
        os.kill(self.proc.pid, sig)

    async def exited(self, timeout_s: float = 30) -> int:
        """Wait for the process to end; its return code."""
        assert self.proc is not None
        proc = self.proc
        await until(f"{self.name} to exit", lambda: proc.poll() is not None, timeout_s)
        return int(proc.returncode)

    async def stop(self) -> int:
        """SIGTERM, and wait for a drained exit; its return code."""
        if not self.alive:
            return int(self.proc.returncode) if self.proc is not None else 0
        self.signal(signal.SIGCONT)  # a frozen process cannot drain
        self.signal(signal.SIGTERM)
        return await self.exited()

    def kill(self) -> None:
        """SIGKILL it (no drain) and reap it."""
        if self.alive:
            assert self.proc is not None
            self.proc.kill()
            self.proc.wait()


@dataclass
class Live:
    """A running scenario: emulators, replicas, the balancer, and a client for the test."""

    folder: Path
    database_url: str
    hub: HubSpotEmulator
    xero: XeroEmulator
    replicas: list[Replica]
    client: httpx.AsyncClient
    balanced: httpx.AsyncClient
    logs: list[Path] = field(default_factory=list)

    async def start(self, *indexes: int, env: Mapping[str, str] | None = None) -> None:
        """Start the replicas at ``indexes`` (all by default) and wait until each is ready."""
        chosen = [self.replicas[i] for i in indexes] if indexes else self.replicas
        for replica in chosen:
            replica.start(env)
        await asyncio.gather(*(replica.ready(self.client) for replica in chosen))

    async def verify(
        self, scenario: str, seed: int | None = None, *, expect_won: list[str] | tuple[str, ...] = ()
    ) -> Report:
        """The checker over the store, the emulators and every replica's log; fails listing every problem."""
        report = await check(
            self.database_url,
            self.hub,
            self.xero,
            expect_won=expect_won,
            secrets=emulator_secrets(self.hub, self.xero),
            texts=log_texts(*(replica.log for replica in self.replicas)),
        )
        record(report, scenario, seed)
        report.assert_ok()
        return report

    async def settled(self, deals: list[str] | tuple[str, ...], timeout_s: float = 90) -> None:
        """Wait until every deal shows an invoice number and no event or effect is pending."""
        store = Store.open(self.database_url)
        deadline = time.monotonic() + timeout_s
        try:
            while True:
                await self.hub.webhooks.retry_failed()  # as vendors deliver again what was not accepted
                await self.xero.webhooks.retry_failed()
                shown = all(self.hub.deal(deal)["properties"].get("syncd_invoice_number") for deal in deals)
                left = await store.count(EventRow, EventRow.status == "pending") + await store.count(
                    EffectRow, EffectRow.status == "pending"
                )
                if shown and left == 0:
                    return
                if time.monotonic() > deadline:
                    raise AssertionError(f"not settled: {left} pending, deals shown: {shown}\n{self.tails()}")
                await asyncio.sleep(0.2)
        finally:
            await store.close()

    def tails(self, chars: int = 2000) -> str:
        """The end of every replica's log (for a failure message)."""
        return "\n".join(f"--- {r.name}\n{r.log.read_text(errors='replace')[-chars:]}" for r in self.replicas)


def replica_config(folder: Path, name: str, base: str, *, port: int, hub_url: str, xero_url: str) -> Path:
    """``base`` (a config from :func:`tests.harness.write_config`) for a replica listening on ``port``."""
    text = base.replace("http://hubspot.test", hub_url).replace("http://xero.test", xero_url)
    text = text.replace('listen = "127.0.0.1:8080"', f'listen = "127.0.0.1:{port}"')
    text = text.replace('public_url = "http://syncd.test"', f'public_url = "{PUBLIC_URL}"')
    path = folder / f"{name}.toml"
    path.write_text(text, encoding="utf-8")
    return path


@contextlib.asynccontextmanager
async def live(
    folder: Path,
    database_url: str,
    *,
    replicas: int = 1,
    daemon_extra: str = "",
    hub: HubSpotEmulator | None = None,
    xero: XeroEmulator | None = None,
    extra: str = "",
) -> AsyncIterator[Live]:
    """Serve the emulators, write each replica's config (nothing started yet), and clean up after.

    Every replica still running at the end is stopped with SIGTERM (SIGKILL if that fails).
    """
    hub = hub or HubSpotEmulator(rate_limits=False)
    xero = xero or XeroEmulator(rate_limits=False)
    hub_port, xero_port = free_port(), free_port()
    base = write_config(folder, database_url, hub, xero, daemon_extra=DAEMON + daemon_extra, extra=extra)
    text = base.read_text(encoding="utf-8")
    members = []
    for index in range(replicas):
        port = free_port()
        name = f"replica{index}"
        config = replica_config(
            folder,
            name,
            text,
            port=port,
            hub_url=f"http://127.0.0.1:{hub_port}",
            xero_url=f"http://127.0.0.1:{xero_port}",
        )
        members.append(Replica(name=name, config=config, url=f"http://127.0.0.1:{port}", log=folder / f"{name}.log"))
    balancer = Balancer([member.url for member in members])
    async with (
        serve(hub.app, hub_port),
        serve(xero.app, xero_port),
        httpx.AsyncClient(timeout=10) as client,
        httpx.AsyncClient(transport=balancer, timeout=10) as balanced,
    ):
        hub.subscribe(f"{PUBLIC_URL}/webhooks/hubspot", balanced)
        xero.subscribe(f"{PUBLIC_URL}/webhooks/xero", balanced)
        scenario = Live(
            folder=folder,
            database_url=database_url,
            hub=hub,
            xero=xero,
            replicas=members,
            client=client,
            balanced=balanced,
        )
        try:
            yield scenario
        finally:
            for member in members:
                if member.alive:
                    try:
                        await member.stop()
                    except AssertionError:
                        member.kill()
