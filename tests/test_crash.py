"""A daemon killed mid-invoice recovers without a duplicate; SIGTERM drains and exits 0.

The daemon runs as a real subprocess (``python -m syncd run``) against the emulators
served by uvicorn on 127.0.0.1. The Xero emulator's commit hook SIGKILLs the daemon
right after the invoice is stored and before the answer leaves: syncd never learns
the invoice exists. After a restart the lease expires, the effect is claimed again, the
invoice is found by its key, and the deal is updated.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from connectors.hubspot.emulator import HubSpotEmulator
from connectors.xero.emulator import XeroEmulator
from syncd.plumbing.serving import free_port, serve
from tests.harness import seed_deal, write_config
from tests.servers import healthy, start_daemon, until

pytestmark = pytest.mark.slow


async def test_sigkill_after_the_vendor_committed_leaves_exactly_one_invoice(tmp_path: Path, db_url: str) -> None:
    """SIGKILL between Xero's commit and syncd's record: after restart, one invoice and the deal updated."""
    hub, xero = HubSpotEmulator(rate_limits=False), XeroEmulator(rate_limits=False)
    ports = {name: free_port() for name in ("hub", "xero", "syncd")}
    url = f"http://127.0.0.1:{ports['syncd']}"
    config = write_config(tmp_path, db_url, hub, xero, daemon_extra="poll_interval_s = 3600\nworkers = 2")
    text = config.read_text()
    text = text.replace("http://hubspot.test", f"http://127.0.0.1:{ports['hub']}")
    text = text.replace("http://xero.test", f"http://127.0.0.1:{ports['xero']}")
    text = text.replace('listen = "127.0.0.1:8080"', f'listen = "127.0.0.1:{ports["syncd"]}"')
    text = text.replace('public_url = "http://syncd.test"', f'public_url = "{url}"')
    config.write_text(text)
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
