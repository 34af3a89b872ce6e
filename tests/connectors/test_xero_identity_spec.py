"""The Xero emulator's identity and webhook payloads, checked against Xero's published descriptions.

``GET /connections`` answers are validated against the ``Connection`` schema of
``specs/xero/xero-identity.yaml``, and webhook deliveries against the ``WebhookEvent``
schema of ``specs/xero/xero-webhooks.yaml`` (XeroAPI/Xero-OpenAPI, see
``specs/README.md``). Bodies are checked with the OpenAPI schema validators of
``openapi-schema-validator`` (OpenAPI 3.0 and 3.1) without format checking: Xero's own
examples write date-times without a UTC offset (``"2019-12-07T18:46:19.5165400"`` in
``xero-identity.yaml``), which RFC 3339 ``date-time`` refuses.

One disagreement is left alone: the intent-to-receive deliveries carry
``firstEventSequence``/``lastEventSequence`` 0 (as the emulator sends them, quoting
https://developer.xero.com/documentation/webhooks/configuring-your-server), while the
schema asks for at least 1; those bodies are not validated here.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from openapi_schema_validator import OAS30Validator, OAS31Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from connectors.xero.emulator import XeroEmulator

REPO = Path(__file__).resolve().parents[2]
SPECS = REPO / "specs" / "xero"


def schema_validator(file: str, schema: str, validator: Any) -> Any:
    """A validator for ``#/components/schemas/<schema>`` of ``specs/xero/<file>``; fails loudly if the file is missing."""
    path = SPECS / file
    if not path.exists():
        pytest.fail(f"{path} is missing; it is tracked in the repository (specs/README.md)")
    spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    registry = Registry().with_resource(file, Resource.from_contents(spec, default_specification=DRAFT202012))
    return validator({"$ref": f"{file}#/components/schemas/{schema}"}, registry=registry)


def errors(validator: Any, instance: Any) -> list[str]:
    return [f"{'/'.join(map(str, error.absolute_path))}: {error.message}" for error in validator.iter_errors(instance)]


async def test_get_connections_matches_the_identity_schema() -> None:
    """The emulator's `GET /connections` is an array of Connection objects with every field Xero documents."""
    emulator = XeroEmulator(rate_limits=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=emulator.app), base_url="http://xero.test") as http:
        token = await http.post(
            "/connect/token",
            data={"grant_type": "client_credentials"},
            auth=(emulator.client_id, emulator.client_secret),
        )
        assert token.status_code == 200, token.text
        answer = await http.get("/connections", headers={"Authorization": f"Bearer {token.json()['access_token']}"})
    assert answer.status_code == 200, answer.text
    connections = answer.json()
    check = schema_validator("xero-identity.yaml", "Connection", OAS30Validator)
    assert isinstance(connections, list)
    assert connections
    for connection in connections:
        assert errors(check, connection) == []
        assert set(connection) == _properties("xero-identity.yaml", "Connection")
    assert errors(check, {"id": 7, "tenantType": ["ORGANISATION"]}) != []  # the check can fail


async def test_webhook_deliveries_match_the_webhooks_schema() -> None:
    """An invoice event delivered by the emulator is a valid WebhookEvent; a body missing its sequence is not."""
    emulator = XeroEmulator(rate_limits=False)
    subscriber = httpx.AsyncClient(transport=httpx.MockTransport(lambda _request: httpx.Response(200)))
    emulator.subscribe("http://syncd.test/webhooks/xero", subscriber)
    async with subscriber:
        delivery = await emulator.send_event("INVOICE", "UPDATE", str(uuid.uuid4()))
    assert delivery is not None
    body = json.loads(delivery.body)
    check = schema_validator("xero-webhooks.yaml", "WebhookEvent", OAS31Validator)
    assert errors(check, body) == []
    assert body["events"][0]["eventCategory"] == "INVOICE"
    broken = {key: value for key, value in body.items() if key != "lastEventSequence"}
    broken["events"] = [{**body["events"][0], "eventType": "DELETE"}]
    assert len(errors(check, broken)) == 2


def _properties(file: str, schema: str) -> set[str]:
    spec = yaml.safe_load((SPECS / file).read_text(encoding="utf-8"))
    return set(spec["components"]["schemas"][schema]["properties"])
