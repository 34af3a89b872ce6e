"""``syncd emulate``: a seeded HubSpot portal, Xero organisation and Harvest account on 127.0.0.1.

It lets a newcomer run syncd for real without any vendor account (README, "Quick start
without accounts"). The three emulators (``connectors/*/emulator.py``) serve their
vendors' HTTP APIs on real sockets, each on its own port; the command prints (and with
``--write-config`` writes) a complete syncd config pointing every connection at them,
then serves until Ctrl-C or SIGTERM.

What is seeded, as an admin and a team would have left it:

* HubSpot: three companies with billing contacts and three open deals, one per shipped
  mapping (``mappings/``): a fixed-fee deal with line items, a monthly retainer, and an
  hourly deal linked to the Harvest project; every property the mappings read is
  defined (HubSpot: Settings > Properties). The app's webhook target is the syncd
  address in the config, subscribed to ``deal.propertyChange`` for ``dealstage``,
  ``amount``, ``closedate`` and every other deal property the mappings read
  (docs/credentials.md, "Webhook subscriptions"), so a deal changed over HubSpot's API
  (``PATCH /crm/v3/objects/deals/{id}``) reaches syncd as a signed v3 webhook.
* Xero: two contacts, one with the legal name of a HubSpot company (syncd adopts it).
* Harvest: a client, a task, a person, the project, and a few time entries logged over
  Harvest's own API (``POST /v2/time_entries``), as anyone can log more.

The database named in the config belongs to the emulated portal: it is made afresh with
each run (the emulators start empty), and an existing file is replaced only when the
config beside it was written by this command too.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from cryptography.fernet import Fernet

from connectors.harvest.emulator import HarvestEmulator
from connectors.hubspot.emulator import HubSpotEmulator
from connectors.xero.emulator import XeroEmulator
from syncd.core.errors import ConfigError
from syncd.core.mapping import load_mapping

MAPPINGS = Path(__file__).resolve().parents[2] / "mappings"
HOST = "127.0.0.1"
MARK = "# Written by `syncd emulate`"
HARVEST_USER_AGENT = "syncd emulate (ops@example.com)"
# One [[pipelines]] per shipped mapping, with its time tracker (mappings/README.md).
PIPELINES: tuple[tuple[str, str | None], ...] = (
    ("hubspot-xero.toml", None),
    ("hubspot-xero-retainer.toml", None),
    ("hubspot-harvest-xero.toml", "harvest"),
)
# The deal properties with a webhook subscription besides those the mappings read
# (docs/credentials.md, "Webhook subscriptions").
ALWAYS_WATCHED = ("dealstage", "amount", "closedate")


@dataclass(frozen=True, kw_only=True)
class Ports:
    """The TCP ports on 127.0.0.1; ``0`` asks the system for a free one."""

    hubspot: int = 8101
    xero: int = 8102
    harvest: int = 8103
    syncd: int = 8080


@dataclass(frozen=True, kw_only=True)
class SeededDeal:
    """An open deal of the seeded portal."""

    id: str
    name: str
    what: str  # how it bills, in words


@dataclass(kw_only=True)
class Portal:
    """The three emulators and what was seeded in them."""

    hub: HubSpotEmulator
    xero: XeroEmulator
    harvest: HarvestEmulator
    deals: list[SeededDeal]
    harvest_project: int
    harvest_task: int
    harvest_person: int


@dataclass(frozen=True, kw_only=True)
class Urls:
    """Where each emulator, and syncd, can be reached."""

    hubspot: str
    xero: str
    harvest: str  # Harvest's API root, ``/v2`` included
    syncd: str


# ---------------------------------------------------------------------------- seeding


def build_portal(*, today: date) -> Portal:
    """The emulators, seeded in-process with what an admin would have set up (hours come later, over HTTP)."""
    hub, xero, harvest = HubSpotEmulator(), XeroEmulator(), HarvestEmulator()
    for file, _ in PIPELINES:
        for read in load_mapping(MAPPINGS / file).source_reads:
            hub.define_property(read.object_type, read.name)
    client = harvest.add_client("Initech Corporation")
    task = harvest.add_task("Development", default_hourly_rate=Decimal("150"))
    person = harvest.add_user("Sam", "Okafor", default_hourly_rate=Decimal("150"))
    project = harvest.add_project(client, "Initech support", bill_by="Tasks")
    harvest.assign_task(project, task)
    harvest.assign_user(project, person)
    harvest.assign_user(project, harvest.owner_id)
    xero.seed_contact("Northwind Traders LLC", email="ap@northwind.example")
    xero.seed_contact("Acme Supplies Pty Ltd", email="accounts@acme.example")
    deals = [_fixed_fee(hub), _retainer(hub, today), _hourly(hub, today, project)]
    return Portal(
        hub=hub,
        xero=xero,
        harvest=harvest,
        deals=deals,
        harvest_project=project,
        harvest_task=task,
        harvest_person=person,
    )


def _company(hub: HubSpotEmulator, properties: dict[str, str], contact: dict[str, str]) -> tuple[str, str]:
    company = hub.add_company(properties)
    return company, hub.add_contact(contact, company_id=company)


def _fixed_fee(hub: HubSpotEmulator) -> SeededDeal:
    company, contact = _company(
        hub,
        {
            "name": "Northwind",
            "legal_name": "Northwind Traders LLC",
            "default_po_number": "PO-4411",
            "payment_terms_days": "14",
            "address": "1 Harbour Way",
            "city": "Boston",
            "state": "MA",
            "zip": "02110",
            "country": "United States",
        },
        {"firstname": "Dana", "lastname": "Reyes", "email": "ap@northwind.example"},
    )
    name = "Northwind website rebuild"
    deal = hub.add_deal(
        {"dealname": name, "amount": "12500.00", "dealstage": "contractsent", "deal_currency_code": "USD"},
        company_id=company,
        contact_ids=[contact],
        line_items=[
            {"name": "Discovery workshop", "quantity": "1", "price": "2500.00", "hs_sku": "CONSULT"},
            {"name": "Build sprint", "quantity": "4", "price": "2500.00", "hs_sku": "DEV"},
        ],
    )
    return SeededDeal(id=deal, name=name, what="fixed fee, 2 line items, 12500.00 USD")


def _retainer(hub: HubSpotEmulator, today: date) -> SeededDeal:
    company, contact = _company(
        hub,
        {"name": "Globex", "legal_name": "Globex Corporation", "payment_terms_days": "30", "country": "United States"},
        {"firstname": "Hank", "lastname": "Scorpio", "email": "billing@globex.example"},
    )
    name = "Globex care plan"
    deal = hub.add_deal(
        {
            "dealname": name,
            "amount": "1000.00",
            "dealstage": "contractsent",
            "deal_currency_code": "USD",
            "billing_type": "retainer",
            "billing_cycle": "monthly",
            "service_start_date": today.replace(day=1).isoformat(),
        },
        company_id=company,
        contact_ids=[contact],
    )
    return SeededDeal(id=deal, name=name, what="retainer, 1000.00 USD a month in advance")


def _hourly(hub: HubSpotEmulator, today: date, project: int) -> SeededDeal:
    company, contact = _company(
        hub,
        {
            "name": "Initech",
            "legal_name": "Initech Corporation",
            "payment_terms_days": "30",
            "country": "United States",
        },
        {"firstname": "Bill", "lastname": "Lumbergh", "email": "ap@initech.example"},
    )
    name = "Initech support"
    deal = hub.add_deal(
        {
            "dealname": name,
            "dealstage": "contractsent",
            "deal_currency_code": "USD",
            "billing_type": "time_and_materials",
            "harvest_project_id": str(project),
            "service_start_date": today.replace(day=1).isoformat(),
            "hours_cap": "40",
            "cap_step_percent": "50",
        },
        company_id=company,
        contact_ids=[contact],
    )
    return SeededDeal(id=deal, name=name, what=f"hourly, Harvest project {project}, cap 40 h")


async def log_hours(client: httpx.AsyncClient, urls: Urls, portal: Portal, *, today: date) -> list[dict[str, Any]]:
    """A few days of hours on the Harvest project, logged over ``POST /v2/time_entries``.

    https://help.getharvest.com/api-v2/timesheets-api/timesheets/time-entries/#create-a-time-entry-via-duration
    """
    harvest = portal.harvest
    headers = {
        "Authorization": f"Bearer {harvest.token}",
        "Harvest-Account-Id": harvest.account_id,
        "User-Agent": HARVEST_USER_AGENT,
    }
    logged = []
    for days_ago, hours, notes in ((3, "3.5", "Ticket triage"), (2, "6", "Release 2.4"), (1, "2.5", "On call")):
        body = {
            "project_id": portal.harvest_project,
            "task_id": portal.harvest_task,
            "user_id": portal.harvest_person,
            "spent_date": (today - timedelta(days=days_ago)).isoformat(),
            "hours": float(Decimal(hours)),  # Harvest's schema says number; these are exact in binary
            "notes": notes,
        }
        response = await client.post(f"{urls.harvest}/time_entries", json=body, headers=headers)
        response.raise_for_status()
        logged.append(response.json())
    return logged


def watched_properties() -> list[str]:
    """The deal properties the emulated app subscribes to (docs/credentials.md, "Webhook subscriptions")."""
    names = dict.fromkeys(ALWAYS_WATCHED)
    for file, _ in PIPELINES:
        names.update(dict.fromkeys(read.name for read in load_mapping(MAPPINGS / file).source_reads))
    return list(names)


# ---------------------------------------------------------------------------- the config


def config_text(portal: Portal, urls: Urls, *, database: str, listen: str) -> str:
    """A complete syncd config for the emulated portal (every shipped mapping, one pipeline each)."""
    hub, xero, harvest = portal.hub, portal.xero, portal.harvest
    pipelines = "".join(
        '\n[[pipelines]]\ncrm = "hubspot"\ninvoicing = "xero"\n'
        + (f'time_tracking = "{tracker}"\n' if tracker else "")
        + f'mapping = "{MAPPINGS / file}"\n'
        for file, tracker in PIPELINES
    )
    return f"""{MARK} for its emulators on {HOST}; they start empty each run.
# Every key is documented in config.example.toml.

[daemon]
database_url = "{database}"
listen = "{listen}"
timezone = "America/New_York"
poll_interval_s = 60
workers = 2
encryption_key = "{Fernet.generate_key().decode()}"

[connections.hubspot]
connector = "hubspot"
base_url = "{urls.hubspot}"
token = "{hub.token}"
webhook_secret = "{hub.client_secret}"

[connections.xero]
connector = "xero"
base_url = "{urls.xero}"
token_url = "{urls.xero}/connect/token"
client_id = "{xero.client_id}"
client_secret = "{xero.client_secret}"
tenant_id = "{xero.tenant_id}"
webhook_key = "{xero.webhook_key}"

[connections.harvest]
connector = "harvest"
base_url = "{urls.harvest}"
token = "{harvest.token}"
account_id = "{harvest.account_id}"
user_agent = "{HARVEST_USER_AGENT}"
{pipelines}"""


def claim_config(path: Path) -> str:
    """The ``database_url`` for a config written to ``path``, its database made ready to start afresh.

    Raises:
        ConfigError: ``path`` exists and was not written by ``syncd emulate``, the
            database file beside it exists while the config does not, or the folder
            is missing.
    """
    database = path.with_suffix(".db")
    if not path.parent.is_dir():
        raise ConfigError(f"the folder {path.parent} does not exist", place="--write-config")
    if path.exists():
        if not path.is_file() or not path.read_text(encoding="utf-8", errors="replace").startswith(MARK):
            raise ConfigError(
                f"{path} exists and was not written by syncd emulate; name a new file", place="--write-config"
            )
        for leftover in (database, Path(f"{database}-wal"), Path(f"{database}-shm")):
            leftover.unlink(missing_ok=True)
    elif database.exists():
        raise ConfigError(
            f"{database} exists; the emulated portal needs a new database: remove it or name another config",
            place="--write-config",
        )
    return f"sqlite:///./{database.name}"


# ---------------------------------------------------------------------------- serving


class _Server(uvicorn.Server):
    """uvicorn serving one emulator; the command, not each server, handles SIGINT and SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(port: int, option: str) -> socket.socket:
    """A socket bound to 127.0.0.1:``port`` (``0``: a free port), for uvicorn to listen on.

    Raises:
        ConfigError: the port is taken (naming the option that sets it).
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((HOST, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(f"{HOST}:{port} is in use; choose another port", place=option) from exc
        raise
    return sock


def free_port(port: int, option: str) -> int:
    """``port`` once it is found free right now, or a free port for ``0`` (for syncd, which binds it itself).

    Raises:
        ConfigError: the port is taken.
    """
    with contextlib.closing(bind(port, option)) as sock:
        return int(sock.getsockname()[1])


@contextlib.asynccontextmanager
async def serving(app: Any, sock: socket.socket) -> AsyncIterator[None]:
    """Serve ``app`` on ``sock`` until the block exits."""
    server = _Server(uvicorn.Config(app, log_config=None, access_log=False, lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield
    finally:
        server.should_exit = True
        await task
        sock.close()


@dataclass(frozen=True, kw_only=True)
class Options:
    """What the command was asked for.

    Attributes:
        ports: the ports to bind (``0``: free ones, printed).
        write_config: where to write the config (``None``: print it only).
        today: the day hours are logged before (injected in tests).
    """

    ports: Ports = Ports()
    write_config: Path | None = None
    today: date | None = None


async def emulate(options: Options, say: Callable[[str], None], stop: asyncio.Event) -> None:
    """Start, seed and serve the emulators until ``stop`` is set; ``say`` prints one line.

    Every port is checked before anything is written or removed: syncd's too, so that a
    ``syncd run`` left from an earlier run (on the database this run replaces) is noticed.

    Raises:
        ConfigError: a port is taken, or the config file may not be written.
    """
    ports = options.ports
    syncd_port = free_port(ports.syncd, "--syncd-port")
    with contextlib.ExitStack() as opened:
        sockets = {
            name: opened.enter_context(contextlib.closing(bind(port, f"--{name}-port")))
            for name, port in (("hubspot", ports.hubspot), ("xero", ports.xero), ("harvest", ports.harvest))
        }
        database = claim_config(options.write_config) if options.write_config else "sqlite:///./emulated.db"
        urls = Urls(
            hubspot=f"http://{HOST}:{sockets['hubspot'].getsockname()[1]}",
            xero=f"http://{HOST}:{sockets['xero'].getsockname()[1]}",
            harvest=f"http://{HOST}:{sockets['harvest'].getsockname()[1]}/v2",
            syncd=f"http://{HOST}:{syncd_port}",
        )
        today = options.today or datetime.now(UTC).date()
        portal = build_portal(today=today)
        text = config_text(portal, urls, database=database, listen=f"{HOST}:{syncd_port}")
        async with (
            httpx.AsyncClient(timeout=10) as client,
            serving(portal.hub.app, sockets["hubspot"]),
            serving(portal.xero.app, sockets["xero"]),
            serving(portal.harvest.app, sockets["harvest"]),
        ):
            portal.hub.subscribe(f"{urls.syncd}/webhooks/hubspot", client, properties=watched_properties())
            portal.xero.subscribe(f"{urls.syncd}/webhooks/xero", client)
            entries = await log_hours(client, urls, portal, today=today)
            if options.write_config is not None:
                options.write_config.write_text(text, encoding="utf-8")
            for line in summary(portal, urls, text=text, written=options.write_config, entries=entries):
                say(line)
            await stop.wait()
            say("stopping the emulators")


def summary(
    portal: Portal, urls: Urls, *, text: str, written: Path | None, entries: Sequence[dict[str, Any]]
) -> list[str]:
    """What the command prints: the config, where everything is, what was seeded, what to do next."""
    hub, harvest = portal.hub, portal.harvest
    config = str(written) if written is not None else "emulated.toml"
    hours = sum(Decimal(str(entry["hours"])) for entry in entries)
    first = portal.deals[0]
    lines = [*text.rstrip("\n").splitlines(), ""]
    if written is not None:
        lines.append(f"config written to {written}")
    else:
        lines.append("save the config above as emulated.toml (or use --write-config emulated.toml)")
    lines += [
        "",
        f"HubSpot  {urls.hubspot}  token {hub.token}",
        f"Xero     {urls.xero}  client {portal.xero.client_id}",
        f"Harvest  {urls.harvest}  token {harvest.token}",
        f"         account {harvest.account_id}",
        f"syncd    {urls.syncd}  (webhooks go there)",
        "",
        "open HubSpot deals (pipeline default):",
        *(f"  {deal.id}  {deal.name}: {deal.what}" for deal in portal.deals),
        "Xero contacts: " + ", ".join(contact["Name"] for contact in portal.xero.contacts()),
        f"Harvest project {portal.harvest_project}: {hours} h logged (POST /v2/time_entries)",
        "",
        "next, in another terminal:",
        f"  syncd run --config {config}",
        f"then win deal {first.id}:",
        f"  curl -X PATCH {urls.hubspot}/crm/v3/objects/deals/{first.id} \\",
        f'    -H "Authorization: Bearer {hub.token}" \\',
        '    -H "Content-Type: application/json" \\',
        """    -d '{"properties": {"dealstage": "closedwon"}}'""",
        "",
        "ready; Ctrl-C stops the emulators",
    ]
    return lines
