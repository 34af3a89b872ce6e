"""``syncd demo``: one deal from closed-won to paid, against the vendor emulators.

Everything runs on 127.0.0.1 on free ports in this one process: the HubSpot and Xero
emulators, and syncd itself (uvicorn, workers, a temporary SQLite file). Webhooks
travel over real HTTP, signed as the vendors sign them.
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
from cryptography.fernet import Fernet
from rich.console import Console
from rich.table import Table

from connectors.hubspot.emulator import HubSpotEmulator
from connectors.xero.emulator import XeroEmulator
from syncd.daemon import Daemon
from syncd.plumbing.serving import free_port, serve
from syncd.plumbing.settings import load_config

MAPPING = Path(__file__).resolve().parents[2] / "mappings" / "hubspot-xero.toml"
console = Console()


async def wait_for(what: str, check: Callable[[], Awaitable[bool] | bool], timeout_s: float = 20.0) -> None:
    """Poll ``check`` until it is true (a demo waits on a real daemon; tests use drain())."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if await result if isinstance(result, Awaitable) else result:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"demo: timed out waiting for {what}")


def write_config(
    folder: Path, *, syncd_port: int, hubspot_url: str, xero_url: str, hub: HubSpotEmulator, xero: XeroEmulator
) -> Path:
    """The demo's config file, pointing every connection at an emulator."""
    path = folder / "config.toml"
    path.write_text(
        f"""
[daemon]
database_url = "sqlite:///{folder / "syncd.db"}"
listen = "127.0.0.1:{syncd_port}"
timezone = "America/New_York"
poll_interval_s = 3600
workers = 2
encryption_key = "{Fernet.generate_key().decode()}"

[connections.hubspot]
connector = "hubspot"
base_url = "{hubspot_url}"
token = "{hub.token}"
webhook_secret = "{hub.client_secret}"

[connections.xero]
connector = "xero"
base_url = "{xero_url}"
token_url = "{xero_url}/connect/token"
client_id = "{xero.client_id}"
client_secret = "{xero.client_secret}"
tenant_id = "{xero.tenant_id}"
webhook_key = "{xero.webhook_key}"

[[pipelines]]
crm = "hubspot"
invoicing = "xero"
mapping = "{MAPPING}"
""",
        encoding="utf-8",
    )
    return path


def seed(hub: HubSpotEmulator) -> str:
    """A company with a billing contact and PO number, and an open deal with two lines."""
    company = hub.add_company(
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
        }
    )
    contact = hub.add_contact(
        {"firstname": "Dana", "lastname": "Reyes", "email": "ap@northwind.example"}, company_id=company
    )
    return hub.add_deal(
        {
            "dealname": "Northwind website rebuild",
            "amount": "12500.00",
            "dealstage": "contractsent",
            "pipeline": "default",
            "deal_currency_code": "USD",
        },
        company_id=company,
        contact_ids=[contact],
        line_items=[
            {"name": "Discovery workshop", "quantity": "1", "price": "2500.00", "hs_sku": "CONSULT"},
            {"name": "Build sprint", "quantity": "4", "price": "2500.00", "hs_sku": "DEV"},
        ],
    )


async def run_demo(*, keep: bool = False) -> dict[str, Any]:
    """Run the whole story; returns the summary (``ok`` is true when every step held)."""
    folder = Path(tempfile.mkdtemp(prefix="syncd-demo-"))
    hub, xero = HubSpotEmulator(), XeroEmulator()
    ports = {name: free_port() for name in ("hubspot", "xero", "syncd")}
    urls = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    config = load_config(
        write_config(
            folder, syncd_port=ports["syncd"], hubspot_url=urls["hubspot"], xero_url=urls["xero"], hub=hub, xero=xero
        )
    )
    daemon = Daemon(config)
    async with (
        httpx.AsyncClient(timeout=10) as client,
        serve(hub.app, ports["hubspot"]),
        serve(xero.app, ports["xero"]),
        serve(daemon.app(), ports["syncd"]),
    ):
        await daemon.runtime.connectors["hubspot"].ensure_properties()  # `syncd setup hubspot`
        hub.subscribe(f"{urls['syncd']}/webhooks/hubspot", client)
        xero.subscribe(f"{urls['syncd']}/webhooks/xero", client)
        summary = await _story(hub, xero)
    if keep:
        summary["kept"] = str(folder)
    else:
        await asyncio.to_thread(shutil.rmtree, folder, True)
    _print(summary)
    if keep:
        _print_kept(folder)
    return summary


async def _story(hub: HubSpotEmulator, xero: XeroEmulator) -> dict[str, Any]:
    deal_id = seed(hub)
    console.print(f"[bold]1.[/bold] HubSpot deal {deal_id} moves to closed-won")
    won_at = time.monotonic()
    await hub.set_deal_properties(deal_id, {"dealstage": "closedwon"})
    await wait_for("the invoice at Xero", lambda: len(xero.invoices()) == 1)
    seconds = time.monotonic() - won_at
    await wait_for(
        "the invoice number on the deal", lambda: bool(hub.deal(deal_id)["properties"].get("syncd_invoice_number"))
    )
    invoice = xero.invoices()[0]
    console.print(
        f"[bold]2.[/bold] Xero invoice {invoice['InvoiceNumber']} created in {seconds:.2f} s; written back to the deal"
    )
    await hub.redeliver_last()
    await asyncio.sleep(0.5)  # give a (wrong) second invoice every chance to appear
    count_after_redelivery = len(xero.invoices())
    console.print(f"[bold]3.[/bold] HubSpot re-delivers the webhook: still {count_after_redelivery} invoice")
    await xero.pay_invoice(invoice["InvoiceID"], Decimal(str(invoice["AmountDue"])))
    await wait_for("'paid' on the deal", lambda: hub.deal(deal_id)["properties"].get("syncd_invoice_status") == "paid")
    console.print("[bold]4.[/bold] Payment recorded at Xero; the deal now says paid")
    props = hub.deal(deal_id)["properties"]
    return {
        "ok": count_after_redelivery == 1 and props.get("syncd_invoice_status") == "paid",
        "deal": deal_id,
        "invoice_number": invoice["InvoiceNumber"],
        "reference": invoice.get("Reference"),
        "total": str(invoice["Total"]),
        "currency": invoice["CurrencyCode"],
        "due_date": invoice.get("DueDateString"),
        "seconds_close_to_invoice": round(seconds, 3),
        "invoices_after_redelivery": count_after_redelivery,
        "deal_status": props.get("syncd_invoice_status"),
        "amount_due_on_deal": props.get("syncd_amount_due"),
    }


def _print_kept(folder: Path) -> None:
    """Where ``--keep`` left the demo's files, and a command to look at them."""
    config = folder / "config.toml"
    console.print(f"kept in {folder}:", markup=False, highlight=False, soft_wrap=True)
    console.print(f"  config:   {config}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"  database: {folder / 'syncd.db'}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"  look:     syncd status --config {config}", markup=False, highlight=False, soft_wrap=True)
    console.print(f"  remove:   rm -r {folder}", markup=False, highlight=False, soft_wrap=True)


def _print(summary: dict[str, Any]) -> None:
    table = Table("what", "value", title="syncd demo")
    for key, value in summary.items():
        table.add_row(key, str(value))
    console.print(table)
