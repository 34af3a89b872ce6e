"""The Harvest connector against its emulator, through ``httpx.ASGITransport``.

There is no official Harvest Python SDK to run against the emulator (Harvest publishes
none; https://help.getharvest.com/api-v2/ lists community libraries only), so the
emulator's fidelity rests on the API reference pages cited in
``connectors/harvest/emulator.py`` and on the OpenAPI checks in
``test_harvest_spec.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from connectors.emulation import Fault
from connectors.harvest.connector import SPEC, HarvestConnector, HarvestSettings, PollCursor
from connectors.harvest.emulator import HarvestEmulator
from syncd.core.errors import AuthError, FatalError, NotFound, RecordError
from syncd.core.interfaces import TimeTracker
from syncd.plumbing.http import VendorHttp
from syncd.plumbing.registry import ConnectorContext

BASE_URL = "https://api.harvestapp.com/v2"
START = datetime(2025, 3, 3, 9, 0, tzinfo=UTC)
USER_AGENT = "syncd tests (ops@example.com)"


class Clock:
    """A settable clock shared by the emulator, the connector and the fake sleep."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now

    def advance(self, **delta: float) -> None:
        self.now += timedelta(**delta)


class MemoryTokens:
    """An in-memory TokenStore (Harvest's personal access tokens never need one)."""

    def __init__(self) -> None:
        self.tokens: Mapping[str, Any] | None = None
        self.lock = asyncio.Lock()

    async def load(self) -> Mapping[str, Any] | None:
        return self.tokens

    async def save(self, tokens: Mapping[str, Any]) -> None:
        self.tokens = dict(tokens)

    def locked(self) -> asyncio.Lock:
        return self.lock


@dataclass
class Harness:
    """A connector wired to an emulator, with what it slept and sent."""

    connector: HarvestConnector
    sleeps: list[float] = field(default_factory=list)
    sent: list[httpx.Request] = field(default_factory=list)


@dataclass(frozen=True)
class Account:
    """Ids of a small seeded Harvest account."""

    client: int
    user: int
    design: int
    build: int
    project: int


@pytest.fixture
def clock() -> Clock:
    return Clock(START)


@pytest.fixture
def emulator(clock: Clock) -> HarvestEmulator:
    return HarvestEmulator(clock=clock)


@contextlib.asynccontextmanager
async def connected(
    emulator: HarvestEmulator, clock: Clock, *, transport: httpx.AsyncBaseTransport | None = None, **settings: Any
) -> AsyncIterator[Harness]:
    """A Harvest connector built by ``SPEC.factory`` against ``emulator`` (or a one-off ``transport``)."""
    harness = Harness(connector=None)  # type: ignore[arg-type]

    async def sleep(seconds: float) -> None:
        harness.sleeps.append(seconds)
        clock.advance(seconds=seconds)

    async def record(request: httpx.Request) -> None:
        harness.sent.append(request)

    transport = transport or httpx.ASGITransport(app=emulator.app)
    async with httpx.AsyncClient(transport=transport, event_hooks={"request": [record]}) as client:
        ctx = ConnectorContext(
            connection="harvest",
            client=client,
            tokens=MemoryTokens(),
            clock=clock,
            make_http=functools.partial(VendorHttp, client, connection="harvest", sleep=sleep),
        )
        values = {
            "connector": "harvest",
            "base_url": BASE_URL,
            "token": emulator.token,
            "account_id": emulator.account_id,
            "user_agent": USER_AGENT,
            **settings,
        }
        harness.connector = SPEC.factory(HarvestSettings.model_validate(values), ctx)
        yield harness


def seed(emulator: HarvestEmulator) -> Account:
    """One client, one developer, two tasks and a project billed at the project rate."""
    client = emulator.add_client("Acme Ltd", currency="EUR")
    user = emulator.add_user("Dana", "Smith", default_hourly_rate=Decimal("95.00"))
    design = emulator.add_task("Design", default_hourly_rate=Decimal("120.00"))
    build = emulator.add_task("Build", billable_by_default=False)
    project = emulator.add_project(
        client, "Website", budget=Decimal("40.5"), hourly_rate=Decimal("112.35"), bill_by="Project"
    )
    emulator.assign_task(project, design)
    emulator.assign_task(project, build, billable=False)
    emulator.assign_user(project, user)
    return Account(client=client, user=user, design=design, build=build, project=project)


def log(emulator: HarvestEmulator, account: Account, day: int, hours: str, **extra: Any) -> int:
    """Log ``hours`` of design on 2025-03-``day``."""
    return emulator.log_time(
        project_id=account.project,
        task_id=extra.pop("task_id", account.design),
        user_id=account.user,
        spent_date=date(2025, 3, day),
        hours=Decimal(hours),
        **extra,
    )


async def test_spec_registers_a_time_tracker(emulator: HarvestEmulator, clock: Clock) -> None:
    """The spec builds a TimeTracker that declares no mark-invoiced capability."""
    assert SPEC.name == "harvest"
    assert SPEC.roles == frozenset({TimeTracker})
    assert SPEC.secret_fields == ("token",)
    async with connected(emulator, clock) as harness:
        assert isinstance(harness.connector, TimeTracker)
        assert harness.connector.capabilities == frozenset()


async def test_every_request_carries_harvest_headers(emulator: HarvestEmulator, clock: Clock) -> None:
    """Each request sends the bearer token, the account id and the configured User-Agent."""
    seed(emulator)
    async with connected(emulator, clock) as harness:
        assert [user.name async for user in harness.connector.users()]
        assert await harness.connector.check() == []
    assert len(harness.sent) == 2
    for request in harness.sent:
        assert request.headers["Authorization"] == f"Bearer {emulator.token}"
        assert request.headers["Harvest-Account-Id"] == emulator.account_id
        assert request.headers["User-Agent"] == USER_AGENT
    assert "Authorization" not in harness.connector.http.headers


async def test_time_entries_follow_every_page(emulator: HarvestEmulator, clock: Clock) -> None:
    """Entries spread over several pages all arrive, once each, newest spent_date first."""
    account = seed(emulator)
    ids = [log(emulator, account, day, "1.5") for day in range(1, 6)]
    async with connected(emulator, clock, per_page=2) as harness:
        entries = [entry async for entry in harness.connector.time_entries(None)]
    assert [entry.id for entry in entries] == [str(i) for i in reversed(ids)]
    assert emulator.calls["GET /time_entries"] == 3
    assert [r.url.params.get("page") for r in harness.sent] == [None, "2", "3"]


async def test_cursor_paged_lists_follow_next_links(emulator: HarvestEmulator, clock: Clock) -> None:
    """Clients and users, which Harvest pages by cursor, arrive whole by following links.next."""
    names = [f"Client {n}" for n in range(5)]
    for name in names:
        emulator.add_client(name)
    async with connected(emulator, clock, per_page=2) as harness:
        clients = [client.name async for client in harness.connector.clients()]
    assert clients == list(reversed(names))
    cursors = [request.url.params.get("cursor") for request in harness.sent]
    assert cursors[0] is None
    assert all(cursors[1:])
    assert len(cursors) == 3


async def test_next_links_never_send_the_token_to_another_host(clock: Clock) -> None:
    """A links.next naming another host is followed on the configured base URL only."""
    hosts: list[str] = []
    wire_entry = {
        "id": 7,
        "spent_date": "2025-03-03",
        "user": {"id": 1, "name": "Dana Smith"},
        "client": {"id": 2, "name": "Acme"},
        "project": {"id": 3, "name": "Website"},
        "task": {"id": 4, "name": "Design"},
        "hours": 1.25,
        "updated_at": "2025-03-03T09:00:00Z",
    }

    def answer(request: httpx.Request) -> httpx.Response:
        hosts.append(request.url.host)
        if request.url.params.get("page") == "2":
            return httpx.Response(200, json={"time_entries": [], "next_page": None, "links": {"next": None}})
        links = {"next": "https://evil.example/v2/time_entries?page=2&per_page=2000"}
        return httpx.Response(200, json={"time_entries": [wire_entry], "next_page": 2, "links": links})

    emulator = HarvestEmulator(clock=clock)
    async with connected(emulator, clock, transport=httpx.MockTransport(answer)) as harness:
        entries = [entry async for entry in harness.connector.time_entries(None)]
    assert [entry.hours for entry in entries] == [Decimal("1.25")]
    assert hosts == ["api.harvestapp.com", "api.harvestapp.com"]


async def test_malformed_entry_raises_record_error(clock: Clock) -> None:
    """An entry Harvest sends without its project raises RecordError naming the entry and field."""

    def answer(request: httpx.Request) -> httpx.Response:
        entry = {
            "id": 41,
            "spent_date": "2025-03-03",
            "user": {"id": 1},
            "hours": 1,
            "updated_at": "2025-03-03T09:00:00Z",
        }
        return httpx.Response(200, json={"time_entries": [entry], "links": {"next": None}})

    emulator = HarvestEmulator(clock=clock)
    async with connected(emulator, clock, transport=httpx.MockTransport(answer)) as harness:
        with pytest.raises(RecordError, match=r"id 41 does not parse: project: Field required"):
            [entry async for entry in harness.connector.time_entries(None)]


async def test_updated_since_returns_only_changed_entries(emulator: HarvestEmulator, clock: Clock) -> None:
    """Only entries updated at or after ``updated_since`` are read."""
    account = seed(emulator)
    first, second = log(emulator, account, 3, "2"), log(emulator, account, 4, "3")
    clock.advance(hours=2)
    emulator.update_time_entry(second, notes="rework")
    async with connected(emulator, clock) as harness:
        changed = [entry async for entry in harness.connector.time_entries(START + timedelta(hours=1))]
        everything = [entry async for entry in harness.connector.time_entries(None)]
    assert [entry.id for entry in changed] == [str(second)]
    assert {entry.id for entry in everything} == {str(first), str(second)}
    assert harness.sent[0].url.params["updated_since"] == "2025-03-03T10:00:00Z"


async def test_hours_and_rates_are_exact_decimals(emulator: HarvestEmulator, clock: Clock) -> None:
    """Hours of 0.1 and 0.2 sum to exactly 0.3, and no JSON number passes through a float."""
    account = seed(emulator)
    tenth, fifth = log(emulator, account, 3, "0.1"), log(emulator, account, 4, "0.2")
    # 17 significant digits: a float on the way would come back as 0.3.
    fine = log(emulator, account, 5, "0.30000000000000001")
    async with connected(emulator, clock) as harness:
        hours = {entry.id: entry.hours async for entry in harness.connector.time_entries(None)}
        rates = {entry.billable_rate async for entry in harness.connector.time_entries(None)}
    assert hours[str(tenth)] + hours[str(fifth)] == Decimal("0.3")
    assert hours[str(fine)] == Decimal("0.30000000000000001")
    assert all(type(value) is Decimal for value in hours.values())
    assert rates == {Decimal("112.35")}


async def test_time_entry_maps_to_the_canonical_model(emulator: HarvestEmulator, clock: Clock) -> None:
    """An entry carries its project, client, task, person, date, billing state and an aware update time."""
    account = seed(emulator)
    billable = log(emulator, account, 5, "2.25", notes="wireframes")
    internal = log(emulator, account, 6, "1", task_id=account.build)
    clock.advance(minutes=30)
    emulator.update_time_entry(billable, is_billed=True, invoice={"id": 77, "number": "1001"})
    async with connected(emulator, clock) as harness:
        entry = await harness.connector.time_entry(str(billable))
        other = await harness.connector.time_entry(str(internal))
    assert entry.project_id == str(account.project)
    assert entry.client_id == str(account.client)
    assert (entry.task, entry.person) == ("Design", "Dana Smith")
    assert entry.spent_date == date(2025, 3, 5)
    assert (entry.hours, entry.billable, entry.billable_rate, entry.invoiced) == (
        Decimal("2.25"),
        True,
        Decimal("112.35"),
        True,
    )
    assert entry.updated_at == START + timedelta(minutes=30)
    assert entry.updated_at.tzinfo is not None
    assert (other.task, other.billable, other.billable_rate, other.invoiced) == ("Build", False, None, False)


async def test_unknown_time_entry_raises_not_found(emulator: HarvestEmulator, clock: Clock) -> None:
    """Re-reading a deleted or unknown entry raises NotFound."""
    async with connected(emulator, clock) as harness:
        with pytest.raises(NotFound):
            await harness.connector.time_entry("999999")
        with pytest.raises(NotFound):
            await harness.connector.time_entry("../company")
    assert [request.url.path for request in harness.sent] == ["/v2/time_entries/999999"]


async def test_poll_starts_from_now_and_resumes(emulator: HarvestEmulator, clock: Clock) -> None:
    """A poll from no cursor hints nothing old; later polls hint each new version once."""
    account = seed(emulator)
    log(emulator, account, 1, "1")
    clock.advance(hours=1)
    async with connected(emulator, clock) as harness:
        start = await harness.connector.poll_changes(None)
        assert start.hints == ()
        assert emulator.calls["GET /time_entries"] == 1
        clock.advance(minutes=10)
        new = log(emulator, account, 2, "4")
        first = await harness.connector.poll_changes(start.cursor)
        again = await harness.connector.poll_changes(first.cursor)
        clock.advance(minutes=10)
        emulator.update_time_entry(new, hours=Decimal("4.5"))
        changed = await harness.connector.poll_changes(again.cursor)
    [hint] = first.hints
    assert (hint.object_type, hint.object_id, hint.connection) == ("time_entry", str(new), "harvest")
    assert hint.event_id == f"poll:{new}:2025-03-03T10:10:00Z"
    assert hint.occurred_at == START + timedelta(hours=1, minutes=10)
    assert again.hints == ()
    assert [h.event_id for h in changed.hints] == [f"poll:{new}:2025-03-03T10:20:00Z"]
    assert not changed.more
    assert PollCursor.model_validate_json(changed.cursor).since == START + timedelta(hours=1, minutes=20)


async def test_poll_catches_an_entry_saved_behind_its_cursor(emulator: HarvestEmulator, clock: Clock) -> None:
    """An entry stamped just before the cursor (saved while the last poll paged) is still hinted."""
    account = seed(emulator)
    async with connected(emulator, clock, poll_overlap_s=120) as harness:
        start = await harness.connector.poll_changes(None)
        clock.advance(minutes=5)
        log(emulator, account, 2, "1")
        first = await harness.connector.poll_changes(start.cursor)
        clock.advance(seconds=-30)
        late = log(emulator, account, 3, "2")
        clock.advance(seconds=30)
        second = await harness.connector.poll_changes(first.cursor)
    assert len(first.hints) == 1
    assert [hint.object_id for hint in second.hints] == [str(late)]


async def test_foreign_cursor_is_refused(emulator: HarvestEmulator, clock: Clock) -> None:
    """A cursor this connector did not write raises FatalError instead of polling from an unknown place."""
    async with connected(emulator, clock) as harness:
        with pytest.raises(FatalError, match="poll cursor"):
            await harness.connector.poll_changes('{"offset": 12}')


async def test_wrong_token_raises_auth_error(emulator: HarvestEmulator, clock: Clock) -> None:
    """A token Harvest rejects raises AuthError, and check names the problem without the token."""
    async with connected(emulator, clock, token="not-the-token") as harness:
        with pytest.raises(AuthError):
            [entry async for entry in harness.connector.time_entries(None)]
        problems = await harness.connector.check()
    assert len(problems) == 1
    assert "rejected the token" in problems[0]
    assert "not-the-token" not in problems[0]
    assert harness.sleeps == []


async def test_wrong_account_id_raises_auth_error(emulator: HarvestEmulator, clock: Clock) -> None:
    """An account id the token does not belong to raises AuthError."""
    async with connected(emulator, clock, account_id="999") as harness:
        with pytest.raises(AuthError):
            [project async for project in harness.connector.projects()]


async def test_rate_limit_429_waits_retry_after(clock: Clock) -> None:
    """Past the emulator's limit a 429 comes back; the connector waits Retry-After and completes."""
    emulator = HarvestEmulator(clock=clock, rate_limit_per_15s=3)
    account = seed(emulator)
    for day in range(1, 6):
        log(emulator, account, day, "1")
    async with connected(emulator, clock, per_page=1, rate_limit_per_15s=None) as harness:
        entries = [entry async for entry in harness.connector.time_entries(None)]
    assert len(entries) == 5
    assert harness.sleeps == [15.0]
    assert emulator.calls["GET /time_entries"] == 6


async def test_injected_429_retry_after_is_honoured(emulator: HarvestEmulator, clock: Clock) -> None:
    """An injected 429 with Retry-After 7 is retried after exactly 7 seconds."""
    seed(emulator)
    emulator.faults.add(Fault(kind="status", status=429, retry_after_s=7, path_contains="/projects"))
    async with connected(emulator, clock) as harness:
        projects = [project async for project in harness.connector.projects()]
    assert [project.name for project in projects] == ["Website"]
    assert harness.sleeps == [7.0]


async def test_projects_and_assignments_carry_rates_and_budgets(emulator: HarvestEmulator, clock: Clock) -> None:
    """Projects, task and user assignments, clients, users and tasks read with Decimal rates."""
    account = seed(emulator)
    people = emulator.add_project(account.client, "Support", budget_by="person", bill_by="People")
    emulator.assign_user(people, account.user, hourly_rate=Decimal("150.50"))
    async with connected(emulator, clock) as harness:
        connector = harness.connector
        projects = {project.id: project async for project in connector.projects()}
        tasks = [assignment async for assignment in connector.task_assignments(str(account.project))]
        users = [assignment async for assignment in connector.user_assignments(str(account.project))]
        custom = [assignment async for assignment in connector.user_assignments(str(people))]
        clients = [client async for client in connector.clients()]
        persons = [user async for user in connector.users()]
        kinds = [task async for task in connector.tasks()]
    website = projects[account.project]
    assert (website.budget, website.budget_by, website.hourly_rate, website.bill_by) == (
        Decimal("40.5"),
        "project",
        Decimal("112.35"),
        "Project",
    )
    assert website.is_active
    assert website.client is not None
    assert (website.client.id, website.client.currency) == (account.client, "EUR")
    assert projects[people].bill_by == "People"
    assert {(a.task.name, a.billable, a.hourly_rate) for a in tasks} == {
        ("Design", True, Decimal("120.00")),
        ("Build", False, None),
    }
    assert [(a.user.id, a.use_default_rates, a.hourly_rate) for a in users] == [(account.user, True, Decimal("95.00"))]
    assert [(a.use_default_rates, a.hourly_rate) for a in custom] == [(False, Decimal("150.50"))]
    assert [(c.name, c.currency) for c in clients] == [("Acme Ltd", "EUR")]
    assert {u.name for u in persons} == {"Dana Smith", "Account Owner"}
    assert {(t.name, t.default_hourly_rate) for t in kinds} == {("Design", Decimal("120.00")), ("Build", None)}


async def test_billable_rate_follows_the_projects_bill_by(emulator: HarvestEmulator, clock: Clock) -> None:
    """The emulator prices an entry from the project, task or person rate as bill_by says."""
    account = seed(emulator)
    by_task = emulator.add_project(account.client, "By task", bill_by="Tasks")
    emulator.assign_task(by_task, account.design, hourly_rate=Decimal("130"))
    emulator.assign_user(by_task, account.user)
    by_person = emulator.add_project(account.client, "By person", bill_by="People")
    emulator.assign_task(by_person, account.design)
    emulator.assign_user(by_person, account.user)
    rates = {}
    for project in (by_task, by_person):
        entry_id = emulator.log_time(
            project_id=project,
            task_id=account.design,
            user_id=account.user,
            spent_date=date(2025, 3, 3),
            hours=Decimal(1),
        )
        rates[project] = entry_id
    async with connected(emulator, clock) as harness:
        priced = {entry.project_id: entry.billable_rate async for entry in harness.connector.time_entries(None)}
    assert priced == {str(by_task): Decimal("130"), str(by_person): Decimal("95.00")}


async def test_check_flags_a_user_who_is_not_an_administrator(emulator: HarvestEmulator, clock: Clock) -> None:
    """check reports a token whose user cannot see every entry and rate."""
    emulator.users[emulator.owner_id].access_roles = ["manager"]
    async with connected(emulator, clock) as harness:
        problems = await harness.connector.check()
    assert len(problems) == 1
    assert "[manager], not administrator" in problems[0]


def test_settings_require_a_contact_in_the_user_agent() -> None:
    """A User-Agent without a contact, an empty one, or an out-of-range page size is refused."""
    base = {"connector": "harvest", "token": "pat-secret-1", "account_id": "1"}
    for user_agent in ("", "syncd"):
        with pytest.raises(ValidationError, match="user_agent"):
            HarvestSettings.model_validate({**base, "user_agent": user_agent})
    with pytest.raises(ValidationError, match="per_page"):
        HarvestSettings.model_validate({**base, "user_agent": USER_AGENT, "per_page": 2001})
    settings = HarvestSettings.model_validate({**base, "user_agent": "syncd (https://example.com/syncd)"})
    assert (settings.base_url, settings.rate_limit_per_15s, settings.per_page) == (BASE_URL, 100, 2000)
    assert "pat-secret-1" not in repr(settings)


async def test_emulator_wire_format_of_a_page(emulator: HarvestEmulator) -> None:
    """A list page has Harvest's pagination fields, absolute links that keep filters, and wire datetimes."""
    account = seed(emulator)
    for day in range(1, 4):
        log(emulator, account, day, "1")
    headers = {"Authorization": f"Bearer {emulator.token}", "Harvest-Account-Id": "123456", "User-Agent": USER_AGENT}
    transport = httpx.ASGITransport(app=emulator.app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL, headers=headers) as client:
        body = (await client.get("/time_entries", params={"per_page": 2, "page": 2, "is_billed": "false"})).json()
        too_big = await client.get("/time_entries", params={"per_page": 2001})
        no_agent = await client.get("/company", headers={"User-Agent": ""})
        no_account = await client.get("/company", headers={"Harvest-Account-Id": ""})
        by_query = await client.get(
            "/users/me", params={"access_token": emulator.token, "account_id": "123456"}, headers={"Authorization": ""}
        )
    assert {k: body[k] for k in ("per_page", "total_pages", "total_entries", "next_page", "previous_page", "page")} == {
        "per_page": 2,
        "total_pages": 2,
        "total_entries": 3,
        "next_page": None,
        "previous_page": 1,
        "page": 2,
    }
    assert body["links"]["next"] is None
    previous = httpx.URL(body["links"]["previous"])
    assert str(previous.copy_with(query=None)) == f"{BASE_URL}/time_entries"
    assert dict(previous.params) == {"page": "1", "per_page": "2", "is_billed": "false"}
    [entry] = body["time_entries"]
    assert (entry["spent_date"], entry["updated_at"], entry["hours"]) == ("2025-03-01", "2025-03-03T09:00:00Z", 1.0)
    assert too_big.status_code == 422
    assert no_agent.status_code == 400
    assert no_account.status_code == 401
    assert no_account.json()["error"] == "invalid_token"
    assert by_query.status_code == 200


async def test_emulator_cursor_pages_number_only_first_and_last(emulator: HarvestEmulator) -> None:
    """A cursor-paged list numbers its first and last pages only, and its links keep filters."""
    for n in range(5):
        emulator.add_task(f"Task {n}")
    headers = {"Authorization": f"Bearer {emulator.token}", "Harvest-Account-Id": "123456", "User-Agent": USER_AGENT}
    transport = httpx.ASGITransport(app=emulator.app)
    pages = []
    async with httpx.AsyncClient(transport=transport, headers=headers) as client:
        url: str | None = f"{BASE_URL}/tasks?per_page=2&is_active=true"
        while url is not None:
            pages.append((await client.get(url)).json())
            url = pages[-1]["links"]["next"]
    numbering = [(p["page"], p["next_page"], p["previous_page"], len(p["tasks"])) for p in pages]
    assert numbering == [(1, 2, None, 2), (None, None, None, 2), (3, None, 2, 1)]
    assert [p["total_entries"] for p in pages] == [5, 5, 5]
    assert all(httpx.URL(p["links"]["first"]).params["is_active"] == "true" for p in pages)
    assert httpx.URL(pages[0]["links"]["next"]).params["ref"] == "next_cursor"


def test_emulator_seeding_refuses_what_harvest_would(emulator: HarvestEmulator) -> None:
    """Seeding refuses an unknown billing method, an unknown client and time on an unassigned task."""
    account = seed(emulator)
    with pytest.raises(ValueError, match="bill_by"):
        emulator.add_project(account.client, "Odd", bill_by="Hours")
    with pytest.raises(ValueError, match="no client"):
        emulator.add_project(1, "Orphan")
    other = emulator.add_task("Travel")
    with pytest.raises(ValueError, match="not assigned"):
        log(emulator, account, 3, "1", task_id=other)
    with pytest.raises(ValueError, match="unknown time entry fields"):
        emulator.update_time_entry(log(emulator, account, 3, "1"), colour="red")


async def test_emulator_creates_and_updates_entries_over_http(emulator: HarvestEmulator, clock: Clock) -> None:
    """POST creates a priced entry (201); PATCH applies documented fields and ignores is_billed."""
    account = seed(emulator)
    headers = {"Authorization": f"Bearer {emulator.token}", "Harvest-Account-Id": "123456", "User-Agent": USER_AGENT}
    transport = httpx.ASGITransport(app=emulator.app)
    async with httpx.AsyncClient(transport=transport, base_url=BASE_URL, headers=headers) as client:
        created = await client.post(
            "/time_entries",
            json={
                "project_id": account.project,
                "task_id": account.design,
                "user_id": account.user,
                "spent_date": "2025-03-03",
                "hours": 1.25,
            },
        )
        entry_id = created.json()["id"]
        clock.advance(minutes=1)
        patched = await client.patch(f"/time_entries/{entry_id}", json={"hours": 2, "is_billed": True})
        unassigned = await client.post(
            "/time_entries", json={"project_id": account.project, "task_id": 1, "spent_date": "2025-03-03"}
        )
    assert created.status_code == 201
    assert created.json()["billable_rate"] == 112.35
    assert patched.status_code == 200
    assert (patched.json()["hours"], patched.json()["is_billed"]) == (2.0, False)
    assert patched.json()["updated_at"] == "2025-03-03T09:01:00Z"
    assert unassigned.status_code == 422


@pytest.mark.parametrize(
    "given",
    [
        "https://api.harvestapp.com",
        "https://api.harvestapp.com/",
        "https://api.harvestapp.com/v2",
        "https://api.harvestapp.com/v2/",
    ],
)
async def test_base_url_is_the_host_or_the_full_api_url(emulator: HarvestEmulator, clock: Clock, given: str) -> None:
    """base_url takes Harvest's host or its /v2 API URL; requests go to /v2/... either way."""
    account = seed(emulator)
    log(emulator, account, 3, "2.5")
    assert (
        HarvestSettings.model_validate(
            {"connector": "harvest", "base_url": given, "token": "t", "account_id": "1", "user_agent": USER_AGENT}
        ).base_url
        == BASE_URL
    )
    async with connected(emulator, clock, base_url=given) as harness:
        entries = [entry async for entry in harness.connector.time_entries(None)]
        assert len(entries) == 1
        assert {request.url.path.split("/")[1] for request in harness.sent} == {"v2"}
