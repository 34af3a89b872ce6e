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
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from connectors.hubspot.emulator import HubSpotEmulator
from connectors.xero.emulator import XeroEmulator
from syncd.plumbing.serving import free_port, serve
from tests.harness import seed_deal, write_config

pytestmark = pytest.mark.slow


async def _until(what: str, check: Callable[[], bool], timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.1)


def _start(config: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "syncd", "run", "--config", str(config)], stdout=out, stderr=out, env=env
        )


async def _healthy(client: httpx.AsyncClient, url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"daemon exited with {proc.returncode}: {log.read_text()[-3000:]}")
        try:
            if (await client.get(f"{url}/readyz")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.1)
    raise AssertionError("daemon did not become ready")


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
        first = _start(config, log)
        try:
            await _healthy(client, url, first, log)
            hub.subscribe(f"{url}/webhooks/hubspot", client)
            xero.subscribe(f"{url}/webhooks/xero", client)

            def kill(*_args: Any) -> None:
                if first.poll() is None:
                    os.kill(first.pid, signal.SIGKILL)

            xero.on_commit = kill
            deal = seed_deal(hub)
            await hub.set_deal_properties(deal, {"dealstage": "closedwon"})
            await _until("the daemon to be killed", lambda: first.poll() is not None)
        finally:
            if first.poll() is None:
                first.kill()
            first.wait()
        xero.on_commit = None
        assert first.returncode == -signal.SIGKILL
        assert len(xero.invoices()) == 1
        assert not hub.deal(deal)["properties"].get("syncd_invoice_number")

        second = _start(config, log)
        try:
            await _healthy(client, url, second, log)
            await _until(
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
