"""The runtime wires every connection alike: the sleep it is given paces each vendor call's retries."""

from __future__ import annotations

from pathlib import Path

from connectors.emulation import Fault
from tests.harness import stack


async def test_a_retry_after_is_waited_through_the_sleep_the_daemon_was_given(tmp_path: Path, sqlite_url: str) -> None:
    """Xero's Retry-After goes to the injected sleep (the test stack's records it), not to the event loop."""
    async with stack(tmp_path, sqlite_url) as s:
        s.xero.faults.add(Fault(kind="status", status=503, retry_after_s=30, times=2, path_contains="/Organisation"))
        response = await s.daemon.runtime.connectors["xero"].http.request("GET", "/Organisation")
        assert response.status_code == 200
        assert s.sleeps == [30.0, 30.0]


async def test_every_connection_retries_through_the_same_sleep(tmp_path: Path, sqlite_url: str) -> None:
    """HubSpot's 429 with Retry-After is waited through the same sleep as Xero's."""
    async with stack(tmp_path, sqlite_url) as s:
        s.hub.faults.add(
            Fault(kind="status", status=429, retry_after_s=10, times=1, path_contains="/crm/v3/properties")
        )
        await s.daemon.runtime.connectors["hubspot"].http.request("GET", "/crm/v3/properties/deals")
        assert s.sleeps == [10.0]
