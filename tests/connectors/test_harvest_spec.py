"""Harvest wire fidelity, checked against the Harvest API v2 OpenAPI description.

Every request the connector sends, and every emulator answer, during a realistic
scenario is validated with openapi-core against
``specs/harvest/harvest-openapi.yaml``. That file is community-made
(jolicode/harvest-openapi-generator scrapes https://help.getharvest.com/api-v2/):
Harvest publishes no OpenAPI description and no official Python SDK, so the reference
pages are the second check, and where the file and the pages disagree the fixture
patches the file in memory, citing the page. The file fails the strict spec check, so
it is loaded with ``Config(spec_validator_cls=None)`` (``specs/README.md``).
"""

from __future__ import annotations

import asyncio
import copy
import functools
from collections.abc import Iterator
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
import yaml
from openapi_core import OpenAPI
from openapi_core.configurations import Config
from openapi_core.datatypes import RequestParameters
from openapi_core.exceptions import OpenAPIError
from werkzeug.datastructures import Headers, ImmutableMultiDict

from connectors.emulation import Fault
from connectors.harvest.connector import SPEC, HarvestConnector, HarvestSettings
from connectors.harvest.emulator import HarvestEmulator
from syncd.core.errors import AuthError
from syncd.plumbing.http import VendorHttp
from syncd.plumbing.registry import ConnectorContext

REPO = Path(__file__).resolve().parents[2]
SPEC_FILE = REPO / "specs" / "harvest" / "harvest-openapi.yaml"
BASE_URL = "https://api.harvestapp.com/v2"
START = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)

Exchange = tuple[httpx.Request, httpx.Response]


def patch_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """The Harvest description, made checkable.

    Where the file and the reference pages differ but the file still accepts what the
    pages describe, it is left alone:

    * A 401 is answered ``{"error": "invalid_token", "error_description": ...}``
      (https://github.com/googleworkspace/apps-script-oauth2/issues/90), not the file's
      ``Error`` ``{"code", "message"}``; ``Error`` requires neither field, so it passes.
    * ``TimeEntry.user_assignment``/``task_assignment`` are ``anyOf`` with ``type:
      'null'`` (no OpenAPI 3.0 type); the object branch matches what Harvest sends.
    * The older time-entries page says ``user_assignment``, ``task_assignment`` and
      ``invoice`` are "not returned in the list response"; the current object table and
      the file's list example include them, as the emulator does.
    """
    spec = copy.deepcopy(spec)
    # The file writes response codes unquoted (``200:``), which YAML reads as ints;
    # OpenAPI keys responses by the string "200", and with int keys every answer would
    # be checked against ``default`` (the Error schema) only.
    for operations in spec["paths"].values():
        for operation in operations.values():
            if isinstance(operation, dict) and "responses" in operation:
                operation["responses"] = {str(code): answer for code, answer in operation["responses"].items()}
    return spec


@pytest.fixture(scope="session")
def openapi() -> OpenAPI:
    if not SPEC_FILE.exists():
        pytest.fail(
            f"the Harvest OpenAPI file is not at {SPEC_FILE}; it is tracked in the repository (specs/README.md)"
        )
    with SPEC_FILE.open("rb") as handle:
        raw = yaml.load(handle, Loader=yaml.CSafeLoader)
    return OpenAPI.from_dict(patch_spec(raw), config=Config(spec_validator_cls=None))


class OpenAPIRequest:
    """An ``httpx.Request`` as openapi-core's Request protocol."""

    def __init__(self, request: httpx.Request) -> None:
        self.request = request
        self.parameters = RequestParameters(
            query=ImmutableMultiDict(parse_qs(request.url.query.decode())),
            header=Headers(dict(request.headers)),
            cookie=ImmutableMultiDict(),
        )

    @property
    def host_url(self) -> str:
        return f"{self.request.url.scheme}://{self.request.url.netloc.decode()}"

    @property
    def path(self) -> str:
        return self.request.url.path

    @property
    def method(self) -> str:
        return self.request.method.lower()

    @property
    def body(self) -> bytes | None:
        return self.request.content or None

    @property
    def content_type(self) -> str:
        return str(self.request.headers.get("content-type", ""))


class OpenAPIResponse:
    """An ``httpx.Response`` as openapi-core's Response protocol."""

    def __init__(self, response: httpx.Response) -> None:
        self.response = response

    @property
    def status_code(self) -> int:
        return self.response.status_code

    @property
    def content_type(self) -> str:
        return str(self.response.headers.get("content-type", ""))

    @property
    def headers(self) -> Headers:
        return Headers(dict(self.response.headers))

    @property
    def data(self) -> bytes:
        return self.response.content


class Recorder(httpx.AsyncBaseTransport):
    """Passes requests to the emulator and keeps each request with its full answer."""

    def __init__(self, inner: httpx.AsyncBaseTransport) -> None:
        self.inner = inner
        self.exchanges: list[Exchange] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await request.aread()
        answer = await self.inner.handle_async_request(request)
        content = await answer.aread()
        kept = httpx.Response(answer.status_code, headers=answer.headers, content=content, request=request)
        self.exchanges.append((request, kept))
        return httpx.Response(answer.status_code, headers=answer.headers, content=content)


def build(
    client: httpx.AsyncClient, emulator: HarvestEmulator, clock: list[datetime], **settings: Any
) -> HarvestConnector:
    """The connector through ``SPEC.factory`` with a fixed clock and a sleep that moves it."""

    async def sleep(seconds: float) -> None:
        clock[0] += timedelta(seconds=seconds)

    ctx = ConnectorContext(
        connection="harvest",
        client=client,
        tokens=None,  # type: ignore[arg-type]  # personal access tokens need no store
        clock=lambda: clock[0],
        make_http=functools.partial(VendorHttp, client, connection="harvest", sleep=sleep),
    )
    values = {
        "connector": "harvest",
        "base_url": BASE_URL,
        "token": emulator.token,
        "account_id": emulator.account_id,
        "user_agent": "syncd spec tests (ops@example.com)",
        **settings,
    }
    connector = SPEC.factory(HarvestSettings.model_validate(values), ctx)
    assert isinstance(connector, HarvestConnector)
    return connector


def seed(emulator: HarvestEmulator) -> dict[str, int]:
    """An agency account: two clients, people, tasks, and projects billed three ways."""
    acme = emulator.add_client("Acme Ltd", currency="EUR")
    globex = emulator.add_client("Globex")
    dana = emulator.add_user("Dana", "Smith", default_hourly_rate=Decimal("95.00"))
    lee = emulator.add_user("Lee", "Wong")
    design = emulator.add_task("Design", default_hourly_rate=Decimal("120.00"))
    meetings = emulator.add_task("Meetings", billable_by_default=False)
    site = emulator.add_project(acme, "Website", budget=Decimal("40.5"), hourly_rate=Decimal("112.35"))
    audit = emulator.add_project(globex, "Audit", budget_by="task_fees", bill_by="Tasks")
    retainer = emulator.add_project(globex, "Retainer", budget_by="none", bill_by="People")
    for project in (site, audit, retainer):
        emulator.assign_task(project, design)
        emulator.assign_task(project, meetings, billable=False)
        emulator.assign_user(project, dana)
    emulator.assign_user(retainer, lee, hourly_rate=Decimal("150.50"))
    for day, (project, task, user, hours) in enumerate(
        [
            (site, design, dana, "0.1"),
            (site, design, dana, "0.2"),
            (audit, design, dana, "3.75"),
            (audit, meetings, dana, "1"),
            (retainer, design, lee, "2.5"),
        ],
        start=1,
    ):
        emulator.log_time(
            project_id=project, task_id=task, user_id=user, spent_date=date(2025, 3, day), hours=Decimal(hours)
        )
    return {"site": site, "design": design, "dana": dana}


async def run_scenario() -> list[Exchange]:
    """A day of syncd against Harvest, plus a person logging and editing time."""
    clock = [START]
    emulator = HarvestEmulator(clock=lambda: clock[0], rate_limit_per_15s=40)
    ids = seed(emulator)
    recorder = Recorder(httpx.ASGITransport(app=emulator.app))
    async with httpx.AsyncClient(transport=recorder) as client:
        # syncd's own limiter waits on the real clock; the 429s here come from the emulator's, on the test's.
        connector = build(client, emulator, clock, per_page=2, rate_limit_per_15s=None)
        assert await connector.check() == []
        entries = [entry async for entry in connector.time_entries(None)]
        cursor = (await connector.poll_changes(None)).cursor
        for project in [project async for project in connector.projects(is_active=True)]:
            [a async for a in connector.task_assignments(str(project.id))]
            [a async for a in connector.user_assignments(str(project.id))]
        [c async for c in connector.clients()]
        [u async for u in connector.users()]
        [t async for t in connector.tasks()]
        await connector.time_entry(entries[0].id)
        clock[0] += timedelta(minutes=10)
        await person_edits_time(client, emulator, ids)
        emulator.faults.add(Fault(kind="status", status=429, retry_after_s=3, path_contains="/time_entries"))
        page = await connector.poll_changes(cursor)
        assert len(page.hints) == 1  # the entry the person created, then edited
        [e async for e in connector.time_entries(START + timedelta(minutes=5))]
        while emulator.limiter.remaining(emulator.account_id):
            await connector.check()
        assert await connector.check() == []  # answered 429 first, then retried
        impostor = build(client, emulator, clock, token="revoked-token")
        with pytest.raises(AuthError):
            await impostor.time_entry(entries[0].id)
    return recorder.exchanges


async def person_edits_time(client: httpx.AsyncClient, emulator: HarvestEmulator, ids: dict[str, int]) -> None:
    """POST and PATCH /time_entries as Harvest's own clients send them, and read /company."""
    headers = {
        "Authorization": f"Bearer {emulator.token}",
        "Harvest-Account-Id": emulator.account_id,
        "User-Agent": "Timer app (timer@example.com)",
    }
    created = await client.post(
        f"{BASE_URL}/time_entries",
        headers=headers,
        json={
            "project_id": ids["site"],
            "task_id": ids["design"],
            "spent_date": "2025-03-07",
            "hours": 1.5,
            "user_id": ids["dana"],
            "notes": "Kick-off",
        },
    )
    assert created.status_code == 201
    patched = await client.patch(
        f"{BASE_URL}/time_entries/{created.json()['id']}", headers=headers, json={"hours": 1.75}
    )
    assert patched.status_code == 200
    (await client.get(f"{BASE_URL}/company", headers=headers)).raise_for_status()


@pytest.fixture(scope="module")
def exchanges() -> list[Exchange]:
    return asyncio.run(run_scenario())


def test_scenario_covers_the_api_syncd_uses(exchanges: list[Exchange]) -> None:
    """The scenario exercises every endpoint syncd and the emulator serve, and 401 and 429 answers."""
    seen = {(request.method, _template(request.url.path)) for request, _ in exchanges}
    assert seen == {
        ("GET", "/v2/users/me"),
        ("GET", "/v2/time_entries"),
        ("GET", "/v2/time_entries/{id}"),
        ("POST", "/v2/time_entries"),
        ("PATCH", "/v2/time_entries/{id}"),
        ("GET", "/v2/projects"),
        ("GET", "/v2/projects/{id}/task_assignments"),
        ("GET", "/v2/projects/{id}/user_assignments"),
        ("GET", "/v2/clients"),
        ("GET", "/v2/users"),
        ("GET", "/v2/tasks"),
        ("GET", "/v2/company"),
    }
    statuses = {response.status_code for _, response in exchanges}
    assert {200, 201, 401, 429} <= statuses
    assert any(request.url.params.get("page") == "2" for request, _ in exchanges)


def test_every_request_matches_the_spec(openapi: OpenAPI, exchanges: list[Exchange]) -> None:
    """Every request sent in the scenario is valid for Harvest's API description."""
    failures = [
        f"{request.method} {request.url}: {exc}" for request, exc in _errors(openapi, exchanges, responses=False)
    ]
    assert failures == []


def test_every_response_matches_the_spec(openapi: OpenAPI, exchanges: list[Exchange]) -> None:
    """Every emulator answer in the scenario is valid for Harvest's API description."""
    failures = [
        f"{request.method} {request.url} -> {exc}" for request, exc in _errors(openapi, exchanges, responses=True)
    ]
    assert failures == []


def test_the_spec_check_rejects_a_wrong_answer(openapi: OpenAPI, exchanges: list[Exchange]) -> None:
    """A time entry whose hours are text, or a list without its pagination fields, fails validation."""
    request, response = next(
        (req, res) for req, res in exchanges if req.url.path == "/v2/time_entries" and res.status_code == 200
    )
    body = response.json()
    body["time_entries"][0]["hours"] = "two"
    wrong_hours = httpx.Response(200, json=body, request=request)
    del body["total_pages"]
    no_pages = httpx.Response(200, json=body, request=request)
    for broken in (wrong_hours, no_pages):
        with pytest.raises(OpenAPIError):
            openapi.validate_response(OpenAPIRequest(request), OpenAPIResponse(broken))


def test_the_spec_check_rejects_a_wrong_request(openapi: OpenAPI, exchanges: list[Exchange]) -> None:
    """A request without the account header, or with a filter of the wrong type, fails validation."""
    request = next(req for req, _ in exchanges if req.url.path == "/v2/time_entries" and req.method == "GET")
    no_account = httpx.Request("GET", request.url, headers={"Authorization": request.headers["Authorization"]})
    bad_filter = httpx.Request(
        "GET", request.url.copy_merge_params({"is_billed": "sometimes"}), headers=request.headers
    )
    for broken in (no_account, bad_filter):
        with pytest.raises(OpenAPIError):
            openapi.validate_request(OpenAPIRequest(broken))


def _errors(
    openapi: OpenAPI, exchanges: list[Exchange], *, responses: bool
) -> Iterator[tuple[httpx.Request, Exception]]:
    for request, response in exchanges:
        try:
            if responses:
                openapi.validate_response(OpenAPIRequest(request), OpenAPIResponse(response))
            else:
                openapi.validate_request(OpenAPIRequest(request))
        except OpenAPIError as exc:
            yield request, exc


def _template(path: str) -> str:
    return "/".join("{id}" if part.isdigit() else part for part in path.split("/"))
