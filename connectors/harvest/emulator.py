"""A stateful local Harvest API v2, for tests, the demo and benchmarks.

It speaks Harvest's wire format under ``/v2``: the same paths, field names, pagination
fields and links, auth headers, 401/429 answers and date formats, for the part of the
API syncd uses. Seed it with :meth:`HarvestEmulator.add_client` and friends, then point
a connector (or any HTTP client) at it through ``httpx.ASGITransport``.

Sources, per behaviour:

* Paths, parameters and objects: the API v2 reference pages cited beside each handler,
  and the community OpenAPI file generated from them
  (``specs/harvest/harvest-openapi.yaml``, jolicode/harvest-openapi-generator).
* Auth: ``Authorization: Bearer`` plus ``Harvest-Account-Id``, or the ``access_token``
  and ``account_id`` query parameters
  (https://help.getharvest.com/api-v2/authentication-api/authentication/authentication/).
  A wrong token *or a missing account id* is answered 401 with
  ``{"error": "invalid_token", "error_description": ...}``: that body is quoted in
  https://github.com/googleworkspace/apps-script-oauth2/issues/90, where the cause was a
  missing ``Harvest-Account-Id``.
* ``User-Agent`` is required; without one Harvest answers 400
  (https://help.getharvest.com/api-v2/introduction/overview/general/). The body of that
  400 is not documented; this emulator answers ``{"code": 400, "message": ...}``, the
  ``Error`` schema of the OpenAPI file.
* Rate limit: 100 requests per 15 seconds, then 429 with ``Retry-After`` in seconds
  (the "Rate limiting" section of the overview page above). The 429 body is not
  documented; this emulator sends the ``Error`` schema shape. Harvest does not say
  whether its window is fixed or sliding; this one is fixed
  (:class:`~connectors.emulation.WindowLimiter`).
* Pagination: ``per_page`` 1-2000 (default 2000, larger is 422), ``page``,
  ``total_pages``, ``total_entries``, ``next_page``, ``previous_page`` and ``links``
  with ``first``/``next``/``previous``/``last``
  (https://help.getharvest.com/api-v2/introduction/overview/pagination/). Harvest
  answers some lists with cursor links; this emulator always uses page links, which the
  same page allows ("Depending on how a response is paginated").
* Dates ``2017-12-31``, datetimes ``2017-12-31T14:59:22Z`` (overview page, "Data types").
* Order: time entries newest ``spent_date`` first ("sorted by spent_date date",
  list-all-time-entries); other lists newest first by creation, as the reference says
  for them (e.g. https://help.getharvest.com/api-v2/clients-api/clients/clients/#list-all-clients).
* ``updated_since`` is taken as inclusive (``updated_at >= updated_since``); Harvest
  does not say which.
* Unknown ids are answered 404 and invalid input 422, both with the ``Error`` schema
  shape ``{"code", "message"}``; Harvest's own bodies for these are not documented.
  ("422 Unprocessable Entity: There was a problem with your request parameters. Check
  the response body for details", the "HTTP Status Codes" of the overview page above.)
* Given a ``contract`` (:class:`~connectors.emulation.OpenApiContract` over
  ``specs/harvest/harvest-openapi.yaml``, as ``tests/connectors/test_strict.py`` builds
  it), every request that passed the User-Agent and auth checks is validated against the
  description too: a parameter of the wrong type or enum, an unknown path or a body
  missing a required field is answered 422 with every problem in ``message`` and kept
  in :attr:`HarvestEmulator.contract` ``.breaches``.
"""

from __future__ import annotations

import base64
import json
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, fields
from datetime import UTC, date, datetime
from decimal import Decimal
from typing import Any

from starlette.applications import Starlette
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, Route
from starlette.types import ASGIApp

from connectors.emulation import Contract, ContractGate, FaultMiddleware, FaultPlan, WindowLimiter

MAX_PER_PAGE = 2000
RATE_WINDOW_S = 15.0
INVALID_TOKEN = {
    "error": "invalid_token",
    "error_description": "The access token provided is expired, revoked, malformed or invalid for other reasons.",
}

Handler = Callable[[Request], Awaitable[Response]]


def wire_time(value: datetime) -> str:
    """A datetime in Harvest's format, UTC to the second: ``2017-12-31T14:59:22Z``."""
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def encode_json(value: Any) -> str:
    """JSON text with every :class:`~decimal.Decimal` written as a JSON number, exactly.

    ``json.dumps`` cannot write a Decimal as a number, and going through ``float``
    would turn ``0.1`` into ``0.1000000000000000055…`` on the reader's side.
    """
    if isinstance(value, Decimal):
        text = format(value, "f")
        return text if "." in text else f"{text}.0"
    if isinstance(value, Mapping):
        return "{" + ",".join(f"{json.dumps(str(k))}:{encode_json(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(encode_json(item) for item in value) + "]"
    return json.dumps(value, ensure_ascii=False)


class HarvestJSON(Response):
    """A JSON response whose Decimals stay exact."""

    media_type = "application/json; charset=utf-8"

    def render(self, content: Any) -> bytes:
        """Encode ``content`` with :func:`encode_json`."""
        return encode_json(content).encode("utf-8")


class HarvestError(Exception):
    """An error answer: status, JSON body and headers."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        body: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = body if body is not None else {"code": status, "message": message}
        self.headers = dict(headers or {})

    def response(self) -> Response:
        """The error as an HTTP response."""
        return HarvestJSON(self.body, status_code=self.status, headers=self.headers)


@dataclass(kw_only=True)
class _Record:
    id: int
    created_at: datetime
    updated_at: datetime
    is_active: bool = True


@dataclass(kw_only=True)
class _Client(_Record):
    name: str
    currency: str


@dataclass(kw_only=True)
class _User(_Record):
    first_name: str
    last_name: str
    default_hourly_rate: Decimal | None
    access_roles: list[str]

    @property
    def name(self) -> str:
        return f"{self.first_name} {self.last_name}"


@dataclass(kw_only=True)
class _Task(_Record):
    name: str
    default_hourly_rate: Decimal | None
    billable_by_default: bool


@dataclass(kw_only=True)
class _Project(_Record):
    client_id: int
    name: str
    budget: Decimal | None
    budget_by: str
    hourly_rate: Decimal | None
    bill_by: str


@dataclass(kw_only=True)
class _TaskAssignment(_Record):
    project_id: int
    task_id: int
    hourly_rate: Decimal | None
    billable: bool


@dataclass(kw_only=True)
class _UserAssignment(_Record):
    project_id: int
    user_id: int
    hourly_rate: Decimal | None
    use_default_rates: bool


@dataclass(kw_only=True)
class _Entry(_Record):
    project_id: int
    task_id: int
    user_id: int
    spent_date: date
    hours: Decimal
    notes: str | None
    billable: bool
    billable_rate: Decimal | None = None
    is_billed: bool = False
    invoice: dict[str, Any] | None = None
    is_locked: bool = False
    locked_reason: str | None = None
    is_closed: bool = False
    is_running: bool = False
    timer_started_at: datetime | None = None
    started_time: str | None = None
    ended_time: str | None = None
    external_reference: dict[str, Any] | None = None


# https://help.getharvest.com/api-v2/projects-api/projects/projects/#create-a-project
BILL_BY = ("Project", "Tasks", "People", "none")
BUDGET_BY = ("project", "project_cost", "task", "task_fees", "person", "none")
ENTRY_FIELDS = frozenset(f.name for f in fields(_Entry)) - {"id", "created_at", "updated_at"}
# "Update a time entry" takes these and no others:
# https://help.getharvest.com/api-v2/timesheets-api/timesheets/time-entries/#update-a-time-entry
PATCHABLE = (
    "project_id",
    "task_id",
    "spent_date",
    "started_time",
    "ended_time",
    "hours",
    "notes",
    "external_reference",
)


class HarvestEmulator:
    """A stateful Harvest account behind Harvest's API v2 wire format.

    Args:
        token: the personal access token it accepts.
        account_id: the ``Harvest-Account-Id`` it accepts.
        rate_limits: enforce Harvest's request limit (on by default).
        rate_limit_per_15s: requests allowed per 15 s window.
        clock: current aware time, for ``created_at``/``updated_at`` and the rate
            window (defaults to the wall clock).
        contract: Harvest's published contract to check each request against
            (``None``: no check; see the module docstring).
        faults: the fault plan (``None``: a plan with nothing queued and no seed, i.e. off).

    Attributes:
        app: the ASGI app (mounted at ``/v2``), wrapped in :class:`FaultMiddleware`.
        faults: the :class:`FaultPlan` that middleware applies.
        calls: requests received per route, as ``"GET /time_entries"``.
        owner_id: the id of the administrator user the token belongs to.
        contract: the :class:`~connectors.emulation.ContractGate` (``breaches`` lists refused requests).
    """

    def __init__(
        self,
        *,
        token: str = "harvest-emulator-token",
        account_id: str = "123456",
        rate_limits: bool = True,
        rate_limit_per_15s: int = 100,
        clock: Callable[[], datetime] | None = None,
        contract: Contract | None = None,
        faults: FaultPlan | None = None,
    ) -> None:
        self.token = token
        self.contract = ContractGate(contract)
        self.account_id = account_id
        self.clock = clock or (lambda: datetime.now(UTC))
        self.limiter = WindowLimiter(rate_limit_per_15s if rate_limits else None, RATE_WINDOW_S, self._seconds)
        self.faults = faults or FaultPlan()
        self.calls: Counter[str] = Counter()
        self._next_id = 1000
        self.clients: dict[int, _Client] = {}
        self.users: dict[int, _User] = {}
        self.tasks: dict[int, _Task] = {}
        self.projects: dict[int, _Project] = {}
        self.task_assignments: dict[int, _TaskAssignment] = {}
        self.user_assignments: dict[int, _UserAssignment] = {}
        self.entries: dict[int, _Entry] = {}
        self.owner_id = self.add_user("Account", "Owner")
        self.users[self.owner_id].access_roles = ["administrator"]
        self.app: ASGIApp = FaultMiddleware(Starlette(routes=[Mount("/v2", routes=self._routes())]), self.faults)

    # -- seeding -----------------------------------------------------------------------

    def add_client(self, name: str, *, currency: str = "USD") -> int:
        """Create a client; returns its id."""
        record = _Client(**self._stamp(), name=name, currency=currency)
        self.clients[record.id] = record
        return record.id

    def add_user(self, first_name: str, last_name: str, *, default_hourly_rate: Decimal | None = None) -> int:
        """Create a user with the ``member`` access role; returns its id."""
        record = _User(
            **self._stamp(),
            first_name=first_name,
            last_name=last_name,
            default_hourly_rate=default_hourly_rate,
            access_roles=["member"],
        )
        self.users[record.id] = record
        return record.id

    def add_task(
        self, name: str, *, default_hourly_rate: Decimal | None = None, billable_by_default: bool = True
    ) -> int:
        """Create a task; returns its id."""
        record = _Task(
            **self._stamp(), name=name, default_hourly_rate=default_hourly_rate, billable_by_default=billable_by_default
        )
        self.tasks[record.id] = record
        return record.id

    def add_project(
        self,
        client_id: int,
        name: str,
        *,
        budget: Decimal | None = None,
        budget_by: str = "project",
        hourly_rate: Decimal | None = None,
        bill_by: str = "Project",
    ) -> int:
        """Create a project for ``client_id``; returns its id.

        ``bill_by`` is ``Project``, ``Tasks``, ``People`` or ``none``; ``budget_by`` is
        ``project``, ``project_cost``, ``task``, ``task_fees``, ``person`` or ``none``
        (https://help.getharvest.com/api-v2/projects-api/projects/projects/#create-a-project).
        """
        _known(self.clients, client_id, "client")
        if bill_by not in BILL_BY or budget_by not in BUDGET_BY:
            raise ValueError(f"bill_by must be one of {BILL_BY} and budget_by one of {BUDGET_BY}")
        record = _Project(
            **self._stamp(),
            client_id=client_id,
            name=name,
            budget=budget,
            budget_by=budget_by,
            hourly_rate=hourly_rate,
            bill_by=bill_by,
        )
        self.projects[record.id] = record
        return record.id

    def assign_task(
        self, project_id: int, task_id: int, *, hourly_rate: Decimal | None = None, billable: bool = True
    ) -> int:
        """Add a task to a project; the rate defaults to the task's default rate."""
        _known(self.projects, project_id, "project")
        task = _known(self.tasks, task_id, "task")
        rate = hourly_rate if hourly_rate is not None else task.default_hourly_rate
        record = _TaskAssignment(
            **self._stamp(), project_id=project_id, task_id=task_id, hourly_rate=rate, billable=billable
        )
        self.task_assignments[record.id] = record
        return record.id

    def assign_user(self, project_id: int, user_id: int, *, hourly_rate: Decimal | None = None) -> int:
        """Add a user to a project; without a rate the user's default rate applies."""
        _known(self.projects, project_id, "project")
        _known(self.users, user_id, "user")
        record = _UserAssignment(
            **self._stamp(),
            project_id=project_id,
            user_id=user_id,
            hourly_rate=hourly_rate,
            use_default_rates=hourly_rate is None,
        )
        self.user_assignments[record.id] = record
        return record.id

    def set_task_assignment_active(self, assignment_id: int, is_active: bool) -> None:
        """Archive (``False``) or restore a task on its project, as Harvest's web app would; bumps ``updated_at``.

        The wire field is the task assignment's ``is_active``
        (https://help.getharvest.com/api-v2/projects-api/projects/task-assignments/#update-a-task-assignment).
        """
        record = _known(self.task_assignments, assignment_id, "task assignment")
        record.is_active = is_active
        record.updated_at = self.clock()

    def set_project_active(self, project_id: int, is_active: bool) -> None:
        """Archive (``False``) or restore a project, as Harvest's web app would; bumps ``updated_at``.

        The wire field is the project's ``is_active``
        (https://help.getharvest.com/api-v2/projects-api/projects/projects/#update-a-project).
        """
        record = _known(self.projects, project_id, "project")
        record.is_active = is_active
        record.updated_at = self.clock()

    def log_time(
        self,
        *,
        project_id: int,
        task_id: int,
        user_id: int,
        spent_date: date,
        hours: Decimal,
        notes: str = "",
        billable: bool | None = None,
    ) -> int:
        """Log hours, as a person would in Harvest; returns the entry's id.

        The task and the user must be assigned to the project. ``billable`` defaults to
        the task assignment's (and the project's) billable flag; the billable rate
        follows the project's ``bill_by``.

        Raises:
            ValueError: an unknown id or a missing assignment.
        """
        try:
            return self._create_entry(
                project_id=project_id,
                task_id=task_id,
                user_id=user_id,
                spent_date=spent_date,
                hours=hours,
                notes=notes,
                billable=billable,
            ).id
        except HarvestError as exc:
            raise ValueError(str(exc)) from exc

    def update_time_entry(self, entry_id: int, **changes: Any) -> None:
        """Change an entry as Harvest's web app would (``is_billed`` included); bumps ``updated_at``.

        Raises:
            ValueError: an unknown entry or field.
        """
        entry = self.entries.get(entry_id)
        if entry is None:
            raise ValueError(f"no time entry {entry_id}")
        unknown = set(changes) - ENTRY_FIELDS
        if unknown:
            raise ValueError(f"unknown time entry fields {sorted(unknown)}; known: {sorted(ENTRY_FIELDS)}")
        try:
            self._apply(entry, changes)
        except HarvestError as exc:
            raise ValueError(str(exc)) from exc

    # -- state helpers -----------------------------------------------------------------

    def _seconds(self) -> float:
        return self.clock().timestamp()

    def _stamp(self) -> dict[str, Any]:
        self._next_id += 1
        now = self.clock()
        return {"id": self._next_id, "created_at": now, "updated_at": now}

    @staticmethod
    def _get(table: Mapping[int, Any], record_id: int, kind: str, status: int = 404) -> Any:
        """A record by id; 404 for one in the path, 422 (``status``) for one in a body."""
        record = table.get(record_id)
        if record is None:
            raise HarvestError(status, f"no {kind} {record_id}")
        return record

    def _task_assignment(self, project_id: int, task_id: int) -> _TaskAssignment:
        for assignment in self.task_assignments.values():
            if assignment.project_id == project_id and assignment.task_id == task_id:
                return assignment
        raise HarvestError(422, f"task {task_id} is not assigned to project {project_id}")

    def _user_assignment(self, project_id: int, user_id: int) -> _UserAssignment:
        for assignment in self.user_assignments.values():
            if assignment.project_id == project_id and assignment.user_id == user_id:
                return assignment
        raise HarvestError(422, f"user {user_id} is not assigned to project {project_id}")

    def _create_entry(self, *, hours: Decimal | None, billable: bool | None = None, **values: Any) -> _Entry:
        """A new entry; without ``hours`` its timer runs, as "create via duration" says."""
        project = self._get(self.projects, values["project_id"], "project", 422)
        self._get(self.users, values["user_id"], "user", 422)
        task_assignment = self._task_assignment(project.id, values["task_id"])
        self._user_assignment(project.id, values["user_id"])
        running = hours is None
        if billable is None:
            # The task assignment decides; a project billed by "none" bills nothing.
            billable = task_assignment.billable and project.bill_by != "none"
        entry = _Entry(
            **self._stamp(),
            **values,
            hours=Decimal(0) if hours is None else hours,
            billable=billable,
            is_running=running,
        )
        entry.timer_started_at = entry.created_at if running else None
        entry.billable_rate = self._billable_rate(entry)
        self.entries[entry.id] = entry
        return entry

    def _apply(self, entry: _Entry, changes: Mapping[str, Any]) -> None:
        """Apply changes, re-price the entry unless a rate was given, and stamp it."""
        if "project_id" in changes or "task_id" in changes or "user_id" in changes:
            project_id = changes.get("project_id", entry.project_id)
            self._get(self.projects, project_id, "project", 422)
            self._task_assignment(project_id, changes.get("task_id", entry.task_id))
            self._user_assignment(project_id, changes.get("user_id", entry.user_id))
        for name, value in changes.items():
            setattr(entry, name, value)
        if "billable_rate" not in changes:
            entry.billable_rate = self._billable_rate(entry)
        entry.updated_at = self.clock()

    def _billable_rate(self, entry: _Entry) -> Decimal | None:
        """The rate the project's ``bill_by`` gives this entry (``None`` when not billable).

        ``Project`` uses the project's rate, ``Tasks`` the task assignment's, ``People``
        the user assignment's custom rate or the user's default rate
        (https://help.getharvest.com/api-v2/projects-api/projects/user-assignments/#the-user-assignment-object).
        """
        if not entry.billable:
            return None
        project = self.projects[entry.project_id]
        if project.bill_by == "Project":
            return project.hourly_rate
        if project.bill_by == "Tasks":
            return self._task_assignment(project.id, entry.task_id).hourly_rate
        if project.bill_by == "People":
            assignment = self._user_assignment(project.id, entry.user_id)
            return self._person_rate(assignment)
        return None

    def _person_rate(self, assignment: _UserAssignment) -> Decimal | None:
        if assignment.use_default_rates:
            return self.users[assignment.user_id].default_hourly_rate
        return assignment.hourly_rate

    # -- routing and the gate every request passes ------------------------------------------------

    def _routes(self) -> list[Route]:
        table: list[tuple[str, str, Handler]] = [
            ("GET", "/time_entries", self._list_time_entries),
            ("POST", "/time_entries", self._create_time_entry),
            ("GET", "/time_entries/{entry_id:int}", self._get_time_entry),
            ("PATCH", "/time_entries/{entry_id:int}", self._patch_time_entry),
            ("GET", "/projects", self._list_projects),
            ("GET", "/projects/{project_id:int}", self._get_project),
            ("GET", "/projects/{project_id:int}/task_assignments", self._list_task_assignments),
            ("GET", "/projects/{project_id:int}/user_assignments", self._list_user_assignments),
            ("GET", "/clients", self._list_clients),
            ("GET", "/users/me", self._get_me),
            ("GET", "/users", self._list_users),
            ("GET", "/tasks", self._list_tasks),
            ("GET", "/company", self._get_company),
        ]
        return [self._route(method, path, handler) for method, path, handler in table]

    def _route(self, method: str, path: str, handler: Handler) -> Route:
        name = f"{method} {path.replace(':int', '')}"

        async def endpoint(request: Request) -> Response:
            self.calls[name] += 1
            try:
                self._admit(request)
                await self._keeps_contract(request)
                return await handler(request)
            except HarvestError as exc:
                return exc.response()

        return Route(path, endpoint, methods=[method])

    def _admit(self, request: Request) -> None:
        """User-Agent (400), token and account (401), then the rate limit (429)."""
        if not request.headers.get("user-agent", "").strip():
            raise HarvestError(400, "a User-Agent header with your app name and a contact is required")
        query = request.query_params
        token = request.headers.get("authorization", "").removeprefix("Bearer ") or query.get("access_token", "")
        account = request.headers.get("harvest-account-id") or query.get("account_id")
        if token != self.token or account != self.account_id:
            raise HarvestError(401, "invalid token", body=INVALID_TOKEN)
        wait_s = self.limiter.hit(self.account_id)
        if wait_s is not None:
            retry_after = str(max(1, math.ceil(wait_s)))
            raise HarvestError(429, "rate limit exceeded", headers={"Retry-After": retry_after})

    async def _keeps_contract(self, request: Request) -> None:
        """422 with every problem when the request breaks the contract (if one was given)."""
        problems = await self.contract.problems(request)
        if problems:
            raise HarvestError(422, "; ".join(problems))

    # -- time entries ------------------------------------------------------------------
    # https://help.getharvest.com/api-v2/timesheets-api/timesheets/time-entries/

    async def _list_time_entries(self, request: Request) -> Response:
        query = request.query_params
        since = _datetime_param(query, "updated_since")
        start, end = _date_param(query, "from"), _date_param(query, "to")
        wanted = {name: _int_param(query, name) for name in ("user_id", "client_id", "project_id", "task_id")}
        flags = {name: _bool_param(query, name) for name in ("is_billed", "is_running")}
        entries = [
            entry
            for entry in self.entries.values()
            if (since is None or entry.updated_at >= since)
            and (start is None or entry.spent_date >= start)
            and (end is None or entry.spent_date <= end)
            and all(value is None or self._entry_ids(entry)[name] == value for name, value in wanted.items())
            and all(value is None or getattr(entry, name) == value for name, value in flags.items())
        ]
        entries.sort(key=lambda entry: (entry.spent_date, entry.id), reverse=True)
        return HarvestJSON(_page(request, "time_entries", [self._render_entry(entry) for entry in entries]))

    async def _get_time_entry(self, request: Request) -> Response:
        entry = self._get(self.entries, request.path_params["entry_id"], "time entry")
        return HarvestJSON(self._render_entry(entry))

    async def _create_time_entry(self, request: Request) -> Response:
        """https://help.getharvest.com/api-v2/timesheets-api/timesheets/time-entries/#create-a-time-entry-via-duration"""
        body = await _json_body(request)
        missing = [name for name in ("project_id", "task_id", "spent_date") if body.get(name) is None]
        if missing:
            raise HarvestError(422, f"missing required parameters: {', '.join(missing)}")
        hours = body.get("hours")
        entry = self._create_entry(
            project_id=_as_int(body["project_id"], "project_id"),
            task_id=_as_int(body["task_id"], "task_id"),
            user_id=_as_int(body.get("user_id", self.owner_id), "user_id"),
            spent_date=_as_date(body["spent_date"], "spent_date"),
            hours=None if hours is None else _as_decimal(hours, "hours"),
            notes=body.get("notes"),
            started_time=body.get("started_time"),
            ended_time=body.get("ended_time"),
            external_reference=body.get("external_reference"),
        )
        return HarvestJSON(self._render_entry(entry), status_code=201)

    async def _patch_time_entry(self, request: Request) -> Response:
        """Only the documented parameters are applied; others are ignored."""
        entry = self._get(self.entries, request.path_params["entry_id"], "time entry")
        body = await _json_body(request)
        changes = {name: body[name] for name in PATCHABLE if name in body}
        converters: dict[str, Callable[[Any, str], Any]] = {
            "project_id": _as_int,
            "task_id": _as_int,
            "spent_date": _as_date,
            "hours": _as_decimal,
        }
        for name, convert in converters.items():
            if name in changes:
                changes[name] = convert(changes[name], name)
        self._apply(entry, changes)
        return HarvestJSON(self._render_entry(entry))

    def _entry_ids(self, entry: _Entry) -> dict[str, int]:
        client_id = self.projects[entry.project_id].client_id
        return {
            "user_id": entry.user_id,
            "client_id": client_id,
            "project_id": entry.project_id,
            "task_id": entry.task_id,
        }

    def _render_entry(self, entry: _Entry) -> dict[str, Any]:
        """https://help.getharvest.com/api-v2/timesheets-api/timesheets/time-entries/#the-time-entry-object"""
        project = self.projects[entry.project_id]
        client = self.clients[project.client_id]
        user = self.users[entry.user_id]
        return {
            "id": entry.id,
            "spent_date": entry.spent_date.isoformat(),
            "user": {"id": user.id, "name": user.name},
            "client": {"id": client.id, "name": client.name},
            "project": {"id": project.id, "name": project.name},
            "task": {"id": entry.task_id, "name": self.tasks[entry.task_id].name},
            "user_assignment": self._render_user_assignment(self._user_assignment(project.id, user.id)),
            "task_assignment": self._render_task_assignment(self._task_assignment(project.id, entry.task_id)),
            "hours": entry.hours,
            "hours_without_timer": entry.hours,
            "rounded_hours": entry.hours,
            "notes": entry.notes,
            "created_at": wire_time(entry.created_at),
            "updated_at": wire_time(entry.updated_at),
            "is_locked": entry.is_locked,
            "locked_reason": entry.locked_reason,
            "is_closed": entry.is_closed,
            "is_billed": entry.is_billed,
            "timer_started_at": None if entry.timer_started_at is None else wire_time(entry.timer_started_at),
            "started_time": entry.started_time,
            "ended_time": entry.ended_time,
            "is_running": entry.is_running,
            "invoice": entry.invoice,
            "external_reference": entry.external_reference,
            "billable": entry.billable,
            "budgeted": project.budget_by != "none",
            "billable_rate": entry.billable_rate,
            "cost_rate": None,
        }

    # -- projects and assignments ------------------------------------------------------
    # https://help.getharvest.com/api-v2/projects-api/projects/projects/

    async def _list_projects(self, request: Request) -> Response:
        client_id = _int_param(request.query_params, "client_id")
        projects = [p for p in _active(self.projects.values(), request) if client_id in (None, p.client_id)]
        return HarvestJSON(_cursor_page(request, "projects", [self._render_project(p) for p in projects]))

    async def _get_project(self, request: Request) -> Response:
        project = self._get(self.projects, request.path_params["project_id"], "project")
        return HarvestJSON(self._render_project(project))

    async def _list_task_assignments(self, request: Request) -> Response:
        """https://help.getharvest.com/api-v2/projects-api/projects/task-assignments/#list-all-task-assignments-for-a-specific-project"""
        project = self._get(self.projects, request.path_params["project_id"], "project")
        found = [a for a in _active(self.task_assignments.values(), request) if a.project_id == project.id]
        return HarvestJSON(_page(request, "task_assignments", [self._render_task_assignment(a) for a in found]))

    async def _list_user_assignments(self, request: Request) -> Response:
        """https://help.getharvest.com/api-v2/projects-api/projects/user-assignments/#list-all-user-assignments-for-a-specific-project"""
        project = self._get(self.projects, request.path_params["project_id"], "project")
        user_id = _int_param(request.query_params, "user_id")
        found = [
            a
            for a in _active(self.user_assignments.values(), request)
            if a.project_id == project.id and user_id in (None, a.user_id)
        ]
        return HarvestJSON(_page(request, "user_assignments", [self._render_user_assignment(a) for a in found]))

    def _render_project(self, project: _Project) -> dict[str, Any]:
        """https://help.getharvest.com/api-v2/projects-api/projects/projects/#the-project-object"""
        client = self.clients[project.client_id]
        return {
            "id": project.id,
            "client": {"id": client.id, "name": client.name, "currency": client.currency},
            "name": project.name,
            "code": None,
            "is_active": project.is_active,
            "is_billable": project.bill_by != "none",
            "is_fixed_fee": False,
            "bill_by": project.bill_by,
            "hourly_rate": project.hourly_rate,
            "budget": project.budget,
            "budget_by": project.budget_by,
            "budget_is_monthly": False,
            "notify_when_over_budget": False,
            "over_budget_notification_percentage": Decimal("80.0"),
            "over_budget_notification_date": None,
            "show_budget_to_all": False,
            "cost_budget": None,
            "cost_budget_include_expenses": False,
            "fee": None,
            "notes": "",
            "starts_on": None,
            "ends_on": None,
            **_stamps(project),
        }

    def _project_ref(self, project_id: int) -> dict[str, Any]:
        project = self.projects[project_id]
        return {"id": project.id, "name": project.name, "code": None}

    def _render_task_assignment(self, assignment: _TaskAssignment) -> dict[str, Any]:
        """https://help.getharvest.com/api-v2/projects-api/projects/task-assignments/#the-task-assignment-object"""
        task = self.tasks[assignment.task_id]
        return {
            "id": assignment.id,
            "project": self._project_ref(assignment.project_id),
            "task": {"id": task.id, "name": task.name},
            "is_active": assignment.is_active,
            "billable": assignment.billable,
            "hourly_rate": assignment.hourly_rate,
            "budget": None,
            **_stamps(assignment),
        }

    def _render_user_assignment(self, assignment: _UserAssignment) -> dict[str, Any]:
        """https://help.getharvest.com/api-v2/projects-api/projects/user-assignments/#the-user-assignment-object"""
        user = self.users[assignment.user_id]
        return {
            "id": assignment.id,
            "project": self._project_ref(assignment.project_id),
            "user": {"id": user.id, "name": user.name},
            "is_active": assignment.is_active,
            "is_project_manager": "administrator" in user.access_roles,
            "use_default_rates": assignment.use_default_rates,
            "hourly_rate": self._person_rate(assignment),
            "budget": None,
            **_stamps(assignment),
        }

    # -- clients, users, tasks, company ------------------------------------------------

    async def _list_clients(self, request: Request) -> Response:
        """https://help.getharvest.com/api-v2/clients-api/clients/clients/#list-all-clients"""
        clients = [
            {
                "id": c.id,
                "name": c.name,
                "is_active": c.is_active,
                "address": None,
                "statement_key": f"key{c.id}",
                "currency": c.currency,
                **_stamps(c),
            }
            for c in _active(self.clients.values(), request)
        ]
        return HarvestJSON(_cursor_page(request, "clients", clients))

    async def _list_users(self, request: Request) -> Response:
        """https://help.getharvest.com/api-v2/users-api/users/users/#list-all-users"""
        users = [self._render_user(user) for user in _active(self.users.values(), request)]
        return HarvestJSON(_cursor_page(request, "users", users))

    async def _get_me(self, request: Request) -> Response:
        """https://help.getharvest.com/api-v2/users-api/users/users/#retrieve-the-currently-authenticated-user"""
        return HarvestJSON(self._render_user(self.users[self.owner_id]))

    def _render_user(self, user: _User) -> dict[str, Any]:
        """https://help.getharvest.com/api-v2/users-api/users/users/#the-user-object"""
        return {
            "id": user.id,
            "first_name": user.first_name,
            "last_name": user.last_name,
            "email": f"{user.first_name}.{user.last_name}@example.com".lower().replace(" ", ""),
            "telephone": "",
            "timezone": "Eastern Time (US & Canada)",
            "has_access_to_all_future_projects": False,
            "is_contractor": False,
            "is_active": user.is_active,
            "weekly_capacity": 126000,
            "default_hourly_rate": user.default_hourly_rate,
            "cost_rate": None,
            "roles": [],
            "access_roles": user.access_roles,
            "avatar_url": "https://d3s3969qhosaug.cloudfront.net/v2/user.png",
            **_stamps(user),
        }

    async def _list_tasks(self, request: Request) -> Response:
        """https://help.getharvest.com/api-v2/tasks-api/tasks/tasks/#list-all-tasks"""
        tasks = [
            {
                "id": t.id,
                "name": t.name,
                "billable_by_default": t.billable_by_default,
                "default_hourly_rate": t.default_hourly_rate,
                "is_default": False,
                "is_active": t.is_active,
                **_stamps(t),
            }
            for t in _active(self.tasks.values(), request)
        ]
        return HarvestJSON(_cursor_page(request, "tasks", tasks))

    async def _get_company(self, request: Request) -> Response:
        """https://help.getharvest.com/api-v2/company-api/company/company/#the-company-object"""
        return HarvestJSON(
            {
                "base_uri": "https://emulator.harvestapp.com",
                "full_domain": "emulator.harvestapp.com",
                "name": "Harvest Emulator",
                "is_active": True,
                "week_start_day": "Monday",
                "wants_timestamp_timers": False,
                "time_format": "decimal",
                "date_format": "%Y-%m-%d",
                "plan_type": "simple-v4",
                "clock": "24h",
                "currency_code_display": "iso_code_none",
                "currency_symbol_display": "symbol_before",
                "decimal_symbol": ".",
                "thousands_separator": ",",
                "color_scheme": "orange",
                "weekly_capacity": 126000,
                "expense_feature": True,
                "invoice_feature": True,
                "estimate_feature": True,
                "approval_feature": False,
                "team_feature": False,
            }
        )


# -- request parsing and pagination ---------------------------------------------------------


def _known(table: Mapping[int, Any], record_id: int, kind: str) -> Any:
    """A record for the seeding API, which raises ValueError rather than answering 404."""
    if record_id not in table:
        raise ValueError(f"no {kind} {record_id}")
    return table[record_id]


def _stamps(record: _Record) -> dict[str, str]:
    return {"created_at": wire_time(record.created_at), "updated_at": wire_time(record.updated_at)}


def _active(records: Iterable[Any], request: Request) -> list[Any]:
    """Records matching ``is_active`` and ``updated_since``, newest first."""
    query = request.query_params
    is_active = _bool_param(query, "is_active")
    since = _datetime_param(query, "updated_since")
    kept = [
        r
        for r in records
        if (is_active is None or r.is_active == is_active) and (since is None or r.updated_at >= since)
    ]
    return sorted(kept, key=lambda r: r.id, reverse=True)


def _per_page(request: Request) -> int:
    per_page = _int_param(request.query_params, "per_page")
    per_page = MAX_PER_PAGE if per_page is None else per_page
    if not 1 <= per_page <= MAX_PER_PAGE:
        raise HarvestError(422, f"per_page must be between 1 and {MAX_PER_PAGE}")
    return per_page


def _link(request: Request, **params: Any) -> str:
    """This list's URL with its filters, and the given paging parameters instead of any."""
    url = request.url.remove_query_params(["page", "cursor", "ref"])
    return str(url.include_query_params(**params))


def _page(request: Request, key: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """One page of ``records`` by page number, with Harvest's pagination fields and links."""
    per_page = _per_page(request)
    page = _int_param(request.query_params, "page") or 1
    if page < 1:
        raise HarvestError(422, "page must be 1 or more")
    total_pages = math.ceil(len(records) / per_page)
    next_page = page + 1 if page < total_pages else None
    previous_page = page - 1 if page > 1 else None

    def link(number: int | None) -> str | None:
        return None if number is None else _link(request, page=number, per_page=per_page)

    return {
        key: records[(page - 1) * per_page : page * per_page],
        "per_page": per_page,
        "total_pages": total_pages,
        "total_entries": len(records),
        "next_page": next_page,
        "previous_page": previous_page,
        "page": page,
        "links": {
            "first": link(1),
            "next": link(next_page),
            "previous": link(previous_page),
            "last": link(total_pages or 1),
        },
    }


def _cursor_page(request: Request, key: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """One page of ``records`` (newest id first) for a list that pages by cursor.

    As https://help.getharvest.com/api-v2/introduction/overview/pagination/ shows:
    ``links.next`` carries ``cursor`` (base64 JSON ``{"after": {"id": ...}}``) and
    ``ref=next_cursor``; ``first``/``last`` are page links; ``page``, ``next_page`` and
    ``previous_page`` are null on every page but the first and the last. The deprecated
    ``page`` parameter still pages by number. The ``previous`` cursor (``{"before": ...}``) is this
    emulator's guess: the page shows none.
    """
    query = request.query_params
    if "page" in query and "cursor" not in query:
        return _page(request, key, records)
    per_page = _per_page(request)
    start = _cursor_start(query["cursor"], records, per_page) if "cursor" in query else 0
    chunk = records[start : start + per_page]
    total_pages = math.ceil(len(records) / per_page)
    more = start + per_page < len(records)
    number = start // per_page + 1
    numbered = start == 0 or not more
    return {
        key: chunk,
        "per_page": per_page,
        "total_pages": total_pages,
        "total_entries": len(records),
        "next_page": number + 1 if numbered and more else None,
        "previous_page": number - 1 if numbered and number > 1 else None,
        "page": number if numbered else None,
        "links": {
            "first": _link(request, page=1, per_page=per_page, ref="first"),
            "next": _cursor_link(request, "after", chunk[-1]["id"], per_page) if more and chunk else None,
            "previous": _cursor_link(request, "before", chunk[0]["id"], per_page) if start > 0 and chunk else None,
            "last": _link(request, page=total_pages or 1, per_page=per_page, ref="last"),
        },
    }


def _cursor_link(request: Request, direction: str, record_id: int, per_page: int) -> str:
    cursor = base64.urlsafe_b64encode(json.dumps({direction: {"id": record_id}}, separators=(",", ":")).encode())
    ref = "next_cursor" if direction == "after" else "previous_cursor"
    return _link(request, cursor=cursor.decode().rstrip("="), per_page=per_page, ref=ref)


def _cursor_start(cursor: str, records: list[dict[str, Any]], per_page: int) -> int:
    """Where a cursor's page starts in ``records`` (sorted by id, newest first)."""
    try:
        decoded = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        direction, anchor = next(iter(decoded.items()))
        record_id = int(anchor["id"])
    except (ValueError, TypeError, KeyError, AttributeError, StopIteration) as exc:
        raise HarvestError(422, "cursor is not valid") from exc
    if direction == "after":
        return next((i for i, r in enumerate(records) if r["id"] < record_id), len(records))
    if direction == "before":
        end = next((i for i, r in enumerate(records) if r["id"] <= record_id), len(records))
        return max(0, end - per_page)
    raise HarvestError(422, "cursor is not valid")


async def _json_body(request: Request) -> dict[str, Any]:
    try:
        body = json.loads(await request.body(), parse_float=Decimal)
    except ValueError as exc:
        raise HarvestError(422, "the request body is not JSON") from exc
    if not isinstance(body, dict):
        raise HarvestError(422, "the request body is not a JSON object")
    return body


def _int_param(query: QueryParams, name: str) -> int | None:
    value = query.get(name)
    return None if value is None else _as_int(value, name)


def _bool_param(query: QueryParams, name: str) -> bool | None:
    value = query.get(name)
    if value is None:
        return None
    if value not in ("true", "false"):
        raise HarvestError(422, f"{name} must be true or false")
    return value == "true"


def _date_param(query: QueryParams, name: str) -> date | None:
    value = query.get(name)
    return None if value is None else _as_date(value, name)


def _datetime_param(query: QueryParams, name: str) -> datetime | None:
    value = query.get(name)
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise HarvestError(422, f"{name} must be an ISO 8601 date and time") from exc
    return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)


def _as_int(value: Any, name: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError) as exc:
        raise HarvestError(422, f"{name} must be an integer") from exc


def _as_date(value: Any, name: str) -> date:
    try:
        return date.fromisoformat(str(value))
    except ValueError as exc:
        raise HarvestError(422, f"{name} must be a date (YYYY-MM-DD)") from exc


def _as_decimal(value: Any, name: str) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | Decimal | str):
        raise HarvestError(422, f"{name} must be a number")
    try:
        return Decimal(value)
    except ArithmeticError as exc:
        raise HarvestError(422, f"{name} must be a number") from exc
