"""A whole syncd stack in one event loop: the emulators and the daemon, over ASGI transports.

Vendor hosts are routed to the emulators with httpx mounts; the emulators deliver
webhooks to syncd's ASGI app through another ASGI transport. The daemon runs with no
worker tasks, so a test drives the engine with ``drain()`` and never sleeps; a vendor
call's wait before a retry (``Retry-After``, back-off) is recorded in ``Stack.sleeps``
and takes no wall time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import httpx
from cryptography.fernet import Fernet

from connectors.harvest.emulator import HarvestEmulator
from connectors.hubspot.emulator import HubSpotEmulator
from connectors.xero.emulator import XeroEmulator
from syncd.daemon import Daemon
from syncd.engine.runtime import utcnow
from syncd.plumbing.settings import Config, load_config

REPO = Path(__file__).resolve().parents[1]
MAPPING = REPO / "mappings" / "hubspot-xero.toml"
SYNCD_URL = "http://syncd.test"
HARVEST_URL = "http://harvest.test/v2"


@dataclass
class Stack:
    """The running pieces of one test."""

    hub: HubSpotEmulator
    xero: XeroEmulator
    daemon: Daemon
    web: httpx.AsyncClient
    config: Config
    harvest: HarvestEmulator | None = None
    sleeps: list[float] = field(default_factory=list)

    async def drain(self) -> None:
        """Process every due event and effect."""
        await self.daemon.engine.drain()


def write_config(
    folder: Path,
    db_url: str,
    hub: HubSpotEmulator,
    xero: XeroEmulator,
    *,
    daemon_extra: str = "",
    mapping: Path = MAPPING,
    harvest: HarvestEmulator | None = None,
    harvest_url: str = HARVEST_URL,
    extra: str = "",
    name: str = "config.toml",
    shared_rate_budget: bool | None = False,
    rate_limits: bool = False,
    encryption_key: str | None = None,
) -> Path:
    """A config pointing every connection at an emulator host.

    With ``harvest``, a ``harvest`` connection (at ``harvest_url``) is the pipeline's
    time tracker; ``extra`` is TOML appended at the end (``[pilot]`` ...).

    ``shared_rate_budget`` is off by default: on PostgreSQL the shared budget paces
    every vendor call on real time (a slot a second for Xero, ``syncd/plumbing/http.py``), which
    only its own tests need (``tests/test_budget.py``); ``None`` leaves syncd's default.
    A ``daemon_extra`` that sets the key itself wins.

    The connections' own rate limits are off unless ``rate_limits``, like those of the
    emulators the tests build (``rate_limits=False``): syncd's limiter waits on the event
    loop's real clock, not on a test's, and the limits have their own tests
    (``tests/test_http.py``, ``tests/connectors/``). For Xero 0 leaves only the
    concurrency limit and the app-wide 10,000 a minute (``connectors/xero/connector.py``).

    ``encryption_key`` is a new one unless given (two daemons on one database share one).
    """
    path = folder / name
    hub_limits = xero_limits = ""
    if not rate_limits:
        hub_limits, xero_limits = "rate_limit_per_10s = 0\nsearch_rate_per_s = 0\n", "rate_limit_per_min = 0\n"
    if shared_rate_budget is not None and "shared_rate_budget" not in daemon_extra:
        daemon_extra = f"shared_rate_budget = {str(shared_rate_budget).lower()}\n{daemon_extra}"
    tracker = ""
    if harvest is not None:
        tracker = f"""
[connections.harvest]
connector = "harvest"
base_url = "{harvest_url}"
token = "{harvest.token}"
account_id = "{harvest.account_id}"
user_agent = "syncd tests (ops@example.com)"
"""
    path.write_text(
        f"""
[daemon]
database_url = "{db_url}"
listen = "127.0.0.1:8080"
public_url = "{SYNCD_URL}"
timezone = "America/New_York"
lease_s = 5
encryption_key = "{encryption_key or Fernet.generate_key().decode()}"
{daemon_extra}

[connections.hubspot]
connector = "hubspot"
base_url = "http://hubspot.test"
token = "{hub.token}"
webhook_secret = "{hub.client_secret}"
{hub_limits}
[connections.xero]
connector = "xero"
base_url = "http://xero.test"
token_url = "http://xero.test/connect/token"
client_id = "{xero.client_id}"
client_secret = "{xero.client_secret}"
tenant_id = "{xero.tenant_id}"
webhook_key = "{xero.webhook_key}"
{xero_limits}{tracker}
[[pipelines]]
crm = "hubspot"
invoicing = "xero"
mapping = "{mapping}"
{'time_tracking = "harvest"' if harvest is not None else ""}
{extra}
""",
        encoding="utf-8",
    )
    return path


@contextlib.asynccontextmanager
async def stack(
    folder: Path,
    db_url: str,
    *,
    daemon_extra: str = "",
    clock: Callable[[], datetime] | None = None,
    mapping: Path = MAPPING,
    hub: HubSpotEmulator | None = None,
    xero: XeroEmulator | None = None,
    harvest: HarvestEmulator | None = None,
    extra: str = "",
    shared_rate_budget: bool | None = False,
    rate_limits: bool = False,
    encryption_key: str | None = None,
) -> AsyncIterator[Stack]:
    """Start emulators and a daemon (no worker tasks, no poll ticks) for one test.

    Args:
        clock: the clock of the daemon and of the emulators created here (wall clock by default).
        mapping: the pipeline's mapping file.
        hub / xero: emulators to reuse (a second daemon on the same vendors); new ones by default.
        harvest: a Harvest emulator, mounted at ``http://harvest.test`` as the pipeline's time tracker.
        extra: TOML appended to the config (``[pilot]`` ...).
        shared_rate_budget / rate_limits: as for :func:`write_config` (off unless a test is about them).
        encryption_key: as for :func:`write_config` (a second daemon on the same database passes the first's).
    """
    hub = hub or HubSpotEmulator(rate_limits=False, clock=clock)
    xero = xero or XeroEmulator(rate_limits=False, clock=clock)
    path = write_config(
        folder,
        db_url,
        hub,
        xero,
        daemon_extra=daemon_extra,
        mapping=mapping,
        harvest=harvest,
        extra=extra,
        shared_rate_budget=shared_rate_budget,
        rate_limits=rate_limits,
        encryption_key=encryption_key,
    )
    config = load_config(path)
    mounts = {
        "http://hubspot.test": httpx.ASGITransport(app=hub.app),
        "http://xero.test": httpx.ASGITransport(app=xero.app),
    }
    if harvest is not None:
        mounts["http://harvest.test"] = httpx.ASGITransport(app=harvest.app)
    sleeps: list[float] = []

    async def sleep(seconds: float) -> None:
        """A retry's wait, recorded instead of spent (the clock is the test's to move)."""
        sleeps.append(seconds)
        await asyncio.sleep(0)

    daemon = Daemon(config, mounts=mounts, poll=False, workers=0, clock=clock or utcnow, sleep=sleep)
    async with (
        daemon.lifespan(),
        httpx.AsyncClient(transport=httpx.ASGITransport(app=daemon.app()), base_url=SYNCD_URL) as web,
    ):
        await daemon.runtime.connectors["hubspot"].ensure_properties()  # what `syncd setup hubspot` does
        hub.subscribe(f"{SYNCD_URL}/webhooks/hubspot", web)
        xero.subscribe(f"{SYNCD_URL}/webhooks/xero", web)
        yield Stack(hub=hub, xero=xero, daemon=daemon, web=web, config=config, harvest=harvest, sleeps=sleeps)


def seed_company(hub: HubSpotEmulator, *, po: str = "PO-4411", terms: str = "14") -> tuple[str, str]:
    """A company with a PO number and payment terms, and its billing contact: (company, contact)."""
    company = hub.add_company(
        {
            "name": "Northwind",
            "legal_name": "Northwind Traders LLC",
            "default_po_number": po,
            "payment_terms_days": terms,
        }
    )
    contact = hub.add_contact(
        {"firstname": "Dana", "lastname": "Reyes", "email": "ap@northwind.example"}, company_id=company
    )
    return company, contact


def seed_deal(
    hub: HubSpotEmulator, *, po: str = "PO-4411", terms: str = "14", company: tuple[str, str] | None = None
) -> str:
    """An open deal with two lines for ``company`` (a new one by default)."""
    company_id, contact = company or seed_company(hub, po=po, terms=terms)
    return hub.add_deal(
        {
            "dealname": "Website rebuild",
            "dealstage": "contractsent",
            "pipeline": "default",
            "deal_currency_code": "USD",
        },
        company_id=company_id,
        contact_ids=[contact],
        line_items=[
            {"name": "Discovery workshop", "quantity": "1", "price": "2500.00"},
            {"name": "Build sprint", "quantity": "4", "price": "2500.00"},
        ],
    )
