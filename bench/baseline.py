"""The minimal baseline: a hand-written webhook receiver making syncd's vendor calls, nothing else.

It answers a signed HubSpot deal-won webhook at once and then, in a task, makes the
same sequence of calls per deal that syncd makes (counted from the emulators'
``calls`` counters for one syncd deal, see ``bench.e2e``): 6 HubSpot reads, 3 Xero
calls (contact by number, create contact, create invoice) and the write-back to the
deal. No store, no queue, no retries, no mapping engine: the floor syncd is compared
with. It runs in its own process, as syncd does, so its CPU time is measured the same way.

Usage: ``python -m bench.baseline --listen 127.0.0.1:PORT --hubspot URL --xero URL
--token T --secret S --xero-client-id ID --xero-client-secret SECRET``
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import hmac
import json
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import uvicorn

DEAL = "dealname,amount,dealstage,pipeline,closedate,createdate,hs_is_closed_won,hs_lastmodifieddate,deal_currency_code"
COMPANY = "name,legal_name,default_po_number,payment_terms_days,address,city,state,zip,country"
CONTACT = ["firstname", "lastname", "email"]
LINE = ["name", "quantity", "price", "hs_sku"]
PRIMARY_COMPANY_TYPE_ID = 5


class Baseline:
    """The receiver and the per-deal calls."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.client = httpx.AsyncClient(timeout=30.0, limits=httpx.Limits(max_connections=100))
        self.hub_headers = {"Authorization": f"Bearer {args.token}", "Accept": "application/json"}
        self.xero_headers: dict[str, str] = {}
        self.tasks: set[asyncio.Task[None]] = set()
        self.url = f"http://{args.listen}/webhooks/hubspot"

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        """The ASGI app: ``POST /webhooks/hubspot`` and ``GET /healthz``."""
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
            return
        body = b""
        more = True
        while more:
            message = await receive()
            body += message.get("body", b"")
            more = message.get("more_body", False)
        status = 200 if scope["path"] == "/healthz" else self._accept(scope, body)
        await send({"type": "http.response.start", "status": status, "headers": [(b"content-length", b"0")]})
        await send({"type": "http.response.body", "body": b""})

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.client.aclose()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _accept(self, scope: dict[str, Any], body: bytes) -> int:
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        timestamp = headers.get("x-hubspot-request-timestamp", "")
        source = b"POST" + self.url.encode() + body + timestamp.encode()
        expected = base64.b64encode(hmac.new(self.args.secret.encode(), source, hashlib.sha256).digest()).decode()
        if not hmac.compare_digest(expected, headers.get("x-hubspot-signature-v3", "")):
            return 401
        for event in json.loads(body):
            if event.get("propertyName") == "dealstage" and event.get("propertyValue") == "closedwon":
                task = asyncio.create_task(self._deal(str(event["objectId"])))
                self.tasks.add(task)
                task.add_done_callback(self.tasks.discard)
        return 200

    async def _deal(self, deal_id: str) -> None:
        try:
            await self._invoice(deal_id)
        except (httpx.HTTPError, KeyError, StopIteration, ValueError) as exc:
            print(f"baseline: deal {deal_id}: {type(exc).__name__}: {exc}", file=sys.stderr)

    async def _hub(self, method: str, path: str, **kwargs: Any) -> Any:
        response = await self.client.request(method, self.args.hubspot + path, headers=self.hub_headers, **kwargs)
        response.raise_for_status()
        return response.json()

    async def _xero(self, method: str, path: str, **kwargs: Any) -> Any:
        if not self.xero_headers:
            auth = (self.args.xero_client_id, self.args.xero_client_secret)
            token = await self.client.post(
                self.args.xero + "/connect/token", data={"grant_type": "client_credentials"}, auth=auth
            )
            token.raise_for_status()
            self.xero_headers = {
                "Authorization": f"Bearer {token.json()['access_token']}",
                "Accept": "application/json",
            }
        headers = {**self.xero_headers, **kwargs.pop("headers", {})}
        url = self.args.xero + "/api.xro/2.0" + path
        response = await self.client.request(method, url, headers=headers, **kwargs)
        response.raise_for_status()
        return response.json()

    async def _invoice(self, deal_id: str) -> None:
        deal = await self._hub(
            "GET",
            f"/crm/v3/objects/deals/{deal_id}",
            params={"properties": DEAL, "associations": "companies,contacts,line_items"},
        )
        links = {key.replace(" ", "_"): block["results"] for key, block in deal.get("associations", {}).items()}
        companies = await self._hub(
            "GET", f"/crm/v4/objects/deals/{deal_id}/associations/companies", params={"limit": 500}
        )
        primary = next(
            c
            for c in companies["results"]
            if any(t["typeId"] == PRIMARY_COMPANY_TYPE_ID for t in c["associationTypes"])
        )
        company = await self._hub(
            "GET", f"/crm/v3/objects/companies/{primary['toObjectId']}", params={"properties": COMPANY}
        )
        people = await self._hub("GET", f"/crm/v4/objects/deals/{deal_id}/associations/contacts", params={"limit": 500})
        contact_ids = [{"id": str(p["toObjectId"])} for p in people["results"]]
        contacts = await self._hub(
            "POST", "/crm/v3/objects/contacts/batch/read", json={"inputs": contact_ids, "properties": CONTACT}
        )
        line_ids = [{"id": str(item["id"])} for item in links.get("line_items", [])]
        items = await self._hub(
            "POST", "/crm/v3/objects/line_items/batch/read", json={"inputs": line_ids, "properties": LINE}
        )
        contact_id = await self._customer(company, contacts["results"][0]["properties"])
        await self._create(deal_id, deal["properties"], company["properties"], contact_id, items["results"])

    async def _customer(self, company: dict[str, Any], person: dict[str, Any]) -> str:
        number = f"hubspot:company:{company['id']}"
        name = company["properties"].get("legal_name") or company["properties"]["name"]
        found = await self._xero("GET", "/Contacts", params={"where": f'ContactNumber=="{number}"'})
        if found["Contacts"]:
            return str(found["Contacts"][0]["ContactID"])
        contact = {"Name": name, "ContactNumber": number, "EmailAddress": person.get("email")}
        created = await self._xero(
            "PUT", "/Contacts", json={"Contacts": [contact]}, headers={"Idempotency-Key": f"contact-{number}"}
        )
        return str(created["Contacts"][0]["ContactID"])

    async def _create(
        self, deal_id: str, deal: dict[str, Any], company: dict[str, Any], contact_id: str, items: list[dict[str, Any]]
    ) -> None:
        key = hashlib.sha256(f"hubspot:deal:{deal_id}:won".encode()).hexdigest()[:32]
        # syncd looks the invoice up only when retrying (a first attempt cannot have created it)
        today = datetime.now(UTC).date()
        terms = int(company.get("payment_terms_days") or 30)
        lines = [
            {
                "Description": item["properties"]["name"],
                "Quantity": item["properties"]["quantity"],
                "UnitAmount": item["properties"]["price"],
                "AccountCode": "200",
                "TaxType": "OUTPUT",
            }
            for item in items
        ]
        invoice = {
            "Type": "ACCREC",
            "Contact": {"ContactID": contact_id},
            "Date": today.isoformat(),
            "DueDate": (today + timedelta(days=terms)).isoformat(),
            "LineAmountTypes": "Exclusive",
            "CurrencyCode": deal.get("deal_currency_code") or "USD",
            "Status": "AUTHORISED",
            "Reference": f"{company.get('default_po_number', '')} · syncd:{key}",
            "LineItems": lines,
        }
        created = await self._xero(
            "PUT", "/Invoices", params={"unitdp": 4}, json={"Invoices": [invoice]}, headers={"Idempotency-Key": key}
        )
        stored = created["Invoices"][0]
        status = {
            "syncd_invoice_number": stored["InvoiceNumber"],
            "syncd_invoice_status": "authorised",
            "syncd_amount_due": str(stored["AmountDue"]),
            "syncd_invoice_currency": stored["CurrencyCode"],
        }
        await self._hub("PATCH", f"/crm/v3/objects/deals/{deal_id}", json={"properties": status})


def main() -> None:
    """Serve the baseline until SIGTERM."""
    parser = argparse.ArgumentParser(prog="python -m bench.baseline")
    for name in ("--listen", "--hubspot", "--xero", "--token", "--secret", "--xero-client-id", "--xero-client-secret"):
        parser.add_argument(name, required=True)
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    uvicorn.run(Baseline(args), host=host, port=int(port), log_config=None, access_log=False, lifespan="on")


if __name__ == "__main__":
    main()
