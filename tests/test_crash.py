"""A daemon killed mid-invoice recovers without a duplicate; SIGTERM stops it within the grace.

The daemon runs as a real subprocess (``python -m syncd run``) against the emulators
served by uvicorn on 127.0.0.1. The Xero emulator's commit hook SIGKILLs the daemon
right after the invoice is stored and before the answer leaves: syncd never learns
the invoice exists. After a restart the lease expires, the effect is claimed again, the
invoice is found by its key, and the deal is updated.

SIGTERM with a backlog and a slow Xero: the vendor call in flight finishes, the rest of
the claimed batch goes back to the queue uncounted, and the process exits 0 within
``[daemon].shutdown_grace_s`` (syncd/daemon.py).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from connectors.emulation import Fault
from connectors.hubspot.emulator import HubSpotEmulator
from connectors.xero.emulator import XeroEmulator
from syncd.plumbing.serving import free_port, serve
from syncd.store.db import EffectRow, Store
from tests.harness import seed_company, seed_deal, stack, write_config
from tests.servers import healthy, start_daemon, until

pytestmark = pytest.mark.slow


def _served_config(
    folder: Path,
    db_url: str,
    hub: HubSpotEmulator,
    xero: XeroEmulator,
    ports: dict[str, int],
    daemon_extra: str,
    encryption_key: str | None = None,
) -> Path:
    """A config whose connections and listen address are the emulators and syncd on 127.0.0.1 ``ports``."""
    config = write_config(folder, db_url, hub, xero, daemon_extra=daemon_extra, encryption_key=encryption_key)
    text = config.read_text()
    text = text.replace("http://hubspot.test", f"http://127.0.0.1:{ports['hub']}")
    text = text.replace("http://xero.test", f"http://127.0.0.1:{ports['xero']}")
    text = text.replace('listen = "127.0.0.1:8080"', f'listen = "127.0.0.1:{ports["syncd"]}"')
    text = text.replace('public_url = "http://syncd.test"', f'public_url = "http://127.0.0.1:{ports["syncd"]}"')
    config.write_text(text)
    return config


async def test_sigkill_after_the_vendor_committed_leaves_exactly_one_invoice(tmp_path: Path, db_url: str) -> None:
    """SIGKILL between Xero's commit and syncd's record: after restart, one invoice and the deal updated."""
    hub, xero = HubSpotEmulator(rate_limits=False), XeroEmulator(rate_limits=False)
    ports = {name: free_port() for name in ("hub", "xero", "syncd")}
    url = f"http://127.0.0.1:{ports['syncd']}"
    config = _served_config(tmp_path, db_url, hub, xero, ports, "poll_interval_s = 3600\nworkers = 2")
    log = tmp_path / "daemon.log"

    async with serve(hub.app, ports["hub"]), serve(xero.app, ports["xero"]), httpx.AsyncClient(timeout=10) as client:
        setup = [sys.executable, "-m", "syncd", "setup", "hubspot", "--config", str(config)]
        done = await asyncio.to_thread(subprocess.run, setup, capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        assert "syncd_invoice_number" in hub._properties["deals"]
        first = start_daemon(config, log)
        try:
            await healthy(client, url, first, log)
            hub.subscribe(f"{url}/webhooks/hubspot", client)
            xero.subscribe(f"{url}/webhooks/xero", client)

            def kill(*_args: Any) -> None:
                if first.poll() is None:
                    os.kill(first.pid, signal.SIGKILL)

            xero.on_commit = kill
            deal = seed_deal(hub)
            await hub.set_deal_properties(deal, {"dealstage": "closedwon"})
            await until("the daemon to be killed", lambda: first.poll() is not None)
        finally:
            if first.poll() is None:
                first.kill()
            first.wait()
        xero.on_commit = None
        assert first.returncode == -signal.SIGKILL
        assert len(xero.invoices()) == 1
        assert not hub.deal(deal)["properties"].get("syncd_invoice_number")

        second = start_daemon(config, log)
        try:
            await healthy(client, url, second, log)
            await until(
                "the deal to be updated", lambda: bool(hub.deal(deal)["properties"].get("syncd_invoice_number"))
            )
            assert len(xero.invoices()) == 1
            assert hub.deal(deal)["properties"]["syncd_invoice_number"] == xero.invoices()[0]["InvoiceNumber"]
            second.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(second.wait, 30) == 0
        finally:
            if second.poll() is None:
                second.kill()
                second.wait()


BACKLOG = 8  # invoices queued before syncd starts
SLOW_S = 4.0  # each invoice create at Xero takes this long
GRACE_S = 12  # [daemon].shutdown_grace_s here; the whole backlog would take BACKLOG * SLOW_S


async def test_sigterm_with_a_backlog_exits_within_the_grace_and_hands_the_rest_back(
    tmp_path: Path, db_url: str
) -> None:
    """SIGTERM mid-create: that invoice is finished, the rest of the batch is pending again uncounted, exit 0 in the grace."""
    hub, xero = HubSpotEmulator(rate_limits=False), XeroEmulator(rate_limits=False)
    (tmp_path / "prep").mkdir()
    async with stack(tmp_path / "prep", db_url, hub=hub, xero=xero) as s:
        company = seed_company(hub)
        for _ in range(BACKLOG):
            await hub.set_deal_properties(seed_deal(hub, company=company), {"dealstage": "closedwon"})
        while await s.daemon.engine.process_events(100):  # the invoices are queued, none created
            pass
        key = s.config.daemon.encryption_key
        assert key is not None
    ports = {name: free_port() for name in ("hub", "xero", "syncd")}
    url = f"http://127.0.0.1:{ports['syncd']}"
    # one row at a time (batch_max = 1): the batched variant is tests/test_batching.py
    extra = f"poll_interval_s = 3600\nworkers = 1\nshutdown_grace_s = {GRACE_S}\nbatch_max = 1"
    config = _served_config(tmp_path, db_url, hub, xero, ports, extra, key.get_secret_value())
    log = tmp_path / "daemon.log"
    creating = asyncio.Event()

    async def watched(scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "PUT" and scope["path"].endswith("/Invoices"):
            creating.set()
        await xero.app(scope, receive, send)

    xero.faults.add(Fault(kind="latency", latency_s=SLOW_S, method="PUT", path_contains="/Invoices", times=None))
    async with serve(hub.app, ports["hub"]), serve(watched, ports["xero"]), httpx.AsyncClient(timeout=10) as client:
        daemon = start_daemon(config, log)
        try:
            await healthy(client, url, daemon, log)
            hub.subscribe(f"{url}/webhooks/hubspot", client)
            await asyncio.wait_for(creating.wait(), timeout=60)
            daemon.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            code = await asyncio.to_thread(daemon.wait, 3 * BACKLOG * SLOW_S)
            exit_s = time.monotonic() - sent
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
        print(f"exited {exit_s:.1f} s after SIGTERM (grace {GRACE_S} s, backlog {BACKLOG} x {SLOW_S} s)")
        assert code == 0, log.read_text()[-3000:]
        assert exit_s < GRACE_S, f"{exit_s:.1f} s"
        assert len(xero.invoices()) == 1
        store = Store.open(db_url)
        try:
            rows = await store.select(EffectRow, EffectRow.kind == "create_invoice", order_by=EffectRow.id)
        finally:
            await store.close()
        assert [row.status for row in rows] == ["done"] + ["pending"] * (BACKLOG - 1)
        for row in rows[1:]:  # handed back: no lease, no attempt counted
            assert (row.attempts, row.first_attempt_at, row.lease_owner, row.lease_until) == (0, None, None, None)
        assert '"claims_released"' in log.read_text()

        xero.faults.clear()
        again = start_daemon(config, log)
        try:
            await healthy(client, url, again, log)
            await until("every invoice", lambda: len(xero.invoices()) == BACKLOG)
            again.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(again.wait, 3 * GRACE_S) == 0
        finally:
            if again.poll() is None:
                again.kill()
                again.wait()
        references = sorted(invoice["Reference"] for invoice in xero.invoices())
        assert len(set(references)) == BACKLOG


async def test_sigterm_during_a_call_longer_than_the_grace_exits_in_time_and_counts_the_attempt(
    tmp_path: Path, sqlite_url: str
) -> None:
    """A call still running when the grace is nearly spent is cut off: exit 0 in time, its row pending with the attempt counted."""
    hub, xero = HubSpotEmulator(rate_limits=False), XeroEmulator(rate_limits=False)
    (tmp_path / "prep").mkdir()
    async with stack(tmp_path / "prep", sqlite_url, hub=hub, xero=xero) as s:
        await hub.set_deal_properties(seed_deal(hub), {"dealstage": "closedwon"})
        await s.daemon.engine.process_events(10)
        key = s.config.daemon.encryption_key
        assert key is not None
    ports = {name: free_port() for name in ("hub", "xero", "syncd")}
    url = f"http://127.0.0.1:{ports['syncd']}"
    grace_s = 8
    extra = f"poll_interval_s = 3600\nworkers = 1\nshutdown_grace_s = {grace_s}"
    config = _served_config(tmp_path, sqlite_url, hub, xero, ports, extra, key.get_secret_value())
    log = tmp_path / "daemon.log"
    slow = xero.faults.add(Fault(kind="latency", latency_s=15.0, method="PUT", path_contains="/Invoices"))
    async with serve(hub.app, ports["hub"]), serve(xero.app, ports["xero"]), httpx.AsyncClient(timeout=10) as client:
        daemon = start_daemon(config, log)
        try:
            await healthy(client, url, daemon, log)
            hub.subscribe(f"{url}/webhooks/hubspot", client)
            await until("the create to be in flight", lambda: not slow.times)
            daemon.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            code = await asyncio.to_thread(daemon.wait, 60)
            exit_s = time.monotonic() - sent
        finally:
            if daemon.poll() is None:
                daemon.kill()
                daemon.wait()
        print(f"exited {exit_s:.1f} s after SIGTERM (grace {grace_s} s, the call in flight 15 s)")
        assert code == 0, log.read_text()[-3000:]
        assert exit_s < grace_s, f"{exit_s:.1f} s"
        store = Store.open(sqlite_url)
        try:
            (row,) = await store.select(EffectRow, EffectRow.kind == "create_invoice")
        finally:
            await store.close()
        assert (row.status, row.attempts, row.lease_owner, row.lease_until) == ("pending", 1, None, None)
        assert row.last_error == "interrupted at shutdown"
        assert '"workers_cancelled"' in log.read_text()
