"""The Harvest time-tracking connector (API v2): time entries, projects, rates.

Harvest plays the :class:`~syncd.core.interfaces.TimeTracker` role. It reads time entries
(incrementally, with ``updated_since``), and the project set-up the billing engine needs
to price hours: projects with their budgets and billing method, task and user
assignments with their rates, clients, users and tasks.

Wire facts this module relies on, each from Harvest's API v2 reference:

* Every request carries ``Authorization: Bearer <token>``, ``Harvest-Account-Id`` and a
  ``User-Agent`` naming the application and a contact (a request without one is
  answered 400): https://help.getharvest.com/api-v2/introduction/overview/general/ and
  https://help.getharvest.com/api-v2/authentication-api/authentication/authentication/
* The API root is ``https://api.harvestapp.com/v2`` (the curl examples on the pages above).
* Rate limit: 100 requests per 15 seconds for the general API; a throttled request is
  answered 429 with ``Retry-After`` in seconds (the "Rate limiting" section of
  https://help.getharvest.com/api-v2/introduction/overview/general/).
* Lists are paginated: ``per_page`` is 1-2000 (default and maximum 2000), the response
  has ``page``, ``total_pages``, ``total_entries``, ``next_page``, ``previous_page`` and
  ``links`` (``first``/``next``/``previous``/``last``), and clients should follow
  ``links.next`` rather than build page URLs:
  https://help.getharvest.com/api-v2/introduction/overview/pagination/

Harvest cannot mark time entries invoiced from outside its own invoices: "Update a time
entry" accepts ``project_id``, ``task_id``, ``spent_date``, ``started_time``,
``ended_time``, ``hours``, ``notes`` and ``external_reference`` only, not ``is_billed``
(https://help.getharvest.com/api-v2/timesheets-api/timesheets/time-entries/#update-a-time-entry);
marking hours invoiced is a web-app action on the detailed time report
(https://support.getharvest.com/hc/en-us/articles/360053881392-Can-I-write-off-time-or-manually-mark-it-as-invoiced).
So this connector declares no :attr:`~syncd.core.interfaces.Capability.MARK_INVOICED`.

Harvest has no webhooks; changes are found by polling (:meth:`HarvestConnector.poll_changes`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Generator, Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any, TypeVar

import httpx
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator

from connectors.harvest.models import (
    HarvestClient,
    HarvestProject,
    HarvestTask,
    HarvestTaskAssignment,
    HarvestTimeEntry,
    HarvestUser,
    HarvestUserAssignment,
    Page,
    Payload,
)
from syncd.core.errors import AuthError, FatalError, NotFound, RecordError, SyncdError
from syncd.core.interfaces import Capability, ChangeHint, ChangePage, TimeEntry, TimeTracker
from syncd.plumbing.http import VendorHttp, within
from syncd.plumbing.registry import ConnectionSettings, ConnectorContext, ConnectorSpec

P = TypeVar("P", bound=Payload)

# https://help.getharvest.com/api-v2/introduction/overview/pagination/ : "Can range
# between 1 and 2000. (Default: 2000)"; a larger value is answered 422.
MAX_PER_PAGE = 2000

# https://help.getharvest.com/api-v2/introduction/overview/general/ (Rate limiting):
# 100 requests per 15 seconds for every endpoint but the reports API.
RATE_LIMIT_PERIOD_S = 15
API_VERSION_PATH = "/v2"


class HarvestSettings(ConnectionSettings):
    """``[connections.NAME]`` for a Harvest account.

    Attributes:
        base_url: the API root (vendor, emulator or proxy): the host
            (``https://api.harvestapp.com``) or the full API URL (``…/v2``); kept as
            the full API URL.
        token: a personal access token from Harvest ID's Developers section.
        account_id: the Harvest account the token acts on (``Harvest-Account-Id``).
        user_agent: ``App name (contact)``: Harvest requires the application's name
            and a link or email address in every ``User-Agent``.
        rate_limit_per_15s: requests per 15 s (Harvest's published 100); ``None``
            switches client-side limiting off (for emulator benchmarks).
        per_page: records per list page, 1-2000.
        poll_overlap_s: seconds each poll re-reads before its cursor, so an entry
            saved at Harvest while the previous poll was paging is still seen.
    """

    base_url: str = "https://api.harvestapp.com/v2"
    token: SecretStr
    account_id: str
    user_agent: str
    rate_limit_per_15s: int | None = Field(default=100, ge=1)
    per_page: int = Field(default=MAX_PER_PAGE, ge=1, le=MAX_PER_PAGE)
    poll_overlap_s: int = Field(default=300, ge=0)

    @field_validator("base_url")
    @classmethod
    def _api_root(cls, value: str) -> str:
        # Harvest API v2 lives under /v2 (https://help.getharvest.com/api-v2/, every
        # path there starts https://api.harvestapp.com/v2/…).
        root = value.rstrip("/")
        return root if root.endswith(API_VERSION_PATH) else root + API_VERSION_PATH

    @field_validator("account_id")
    @classmethod
    def _account_id(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("account_id is empty: copy the account id shown beside your token in Harvest ID")
        return value.strip()

    @field_validator("user_agent")
    @classmethod
    def _user_agent(cls, value: str) -> str:
        # https://help.getharvest.com/api-v2/introduction/overview/general/ : "each
        # request [must] include a User-Agent header with both: the name of your
        # application; a link to your application or email address".
        text = value.strip()
        if not text:
            raise ValueError('user_agent is empty: Harvest requires "App name (email or URL)"')
        if "@" not in text and "http" not in text:
            raise ValueError(f'user_agent {text!r} has no contact: Harvest requires "App name (email or URL)"')
        return text


class BearerToken(httpx.Auth):
    """Adds ``Authorization: Bearer <token>`` at send time, so the token is kept as a
    :class:`~pydantic.SecretStr` and never sits in a plain headers mapping."""

    def __init__(self, token: SecretStr) -> None:
        self._token = token

    def auth_flow(self, request: httpx.Request) -> Generator[httpx.Request, httpx.Response, None]:
        """Set the header and send the request once."""
        request.headers["Authorization"] = f"Bearer {self._token.get_secret_value()}"
        yield request


class PollCursor(BaseModel):
    """The state :meth:`HarvestConnector.poll_changes` hands back as its opaque cursor.

    Attributes:
        since: the newest ``updated_at`` seen so far (Harvest's clock).
        seen: ``"<id>:<updated_at>"`` of the versions already hinted whose
            ``updated_at`` falls within the overlap window before ``since``.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    since: AwareDatetime
    seen: tuple[str, ...] = ()


def wire_datetime(value: datetime) -> str:
    """``value`` in Harvest's datetime format (``2017-12-31T14:59:22Z``), in UTC.

    Sub-seconds are dropped (Harvest stamps whole seconds), which widens an
    ``updated_since`` window rather than narrowing it.
    """
    if value.tzinfo is None:
        raise ValueError(f"naive datetime {value!r}: pass a timezone-aware datetime")
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def version_key(entry: TimeEntry) -> str:
    """The key of one version of an entry: its id and its ``updated_at``."""
    return f"{entry.id}:{wire_datetime(entry.updated_at)}"


class HarvestConnector:
    """One Harvest account, as a :class:`~syncd.core.interfaces.TimeTracker`.

    Args:
        http: the connection's :class:`~syncd.plumbing.http.VendorHttp` (base URL, headers,
            auth and rate limit already bound).
        connection: the configured connection name.
        clock: current aware UTC time.
        account_id: the Harvest account id, for messages.
        per_page: records per list page.
        poll_overlap_s: how far before its cursor a poll re-reads.

    Errors: as for :class:`~syncd.core.interfaces.TimeTracker`; a record Harvest sends that
    does not parse raises :class:`~syncd.core.errors.RecordError` naming the record and field.
    """

    capabilities: frozenset[Capability] = frozenset()

    def __init__(
        self,
        *,
        http: VendorHttp,
        connection: str,
        clock: Callable[[], datetime],
        account_id: str,
        per_page: int = MAX_PER_PAGE,
        poll_overlap_s: int = 300,
    ) -> None:
        self.http = http
        self.connection = connection
        self.clock = clock
        self.account_id = account_id
        self.per_page = per_page
        self.poll_overlap = timedelta(seconds=poll_overlap_s)

    # -- time entries ------------------------------------------------------------------

    async def time_entries(self, updated_since: datetime | None) -> AsyncIterator[TimeEntry]:
        """Time entries changed since ``updated_since`` (all when ``None``).

        ``GET /time_entries`` with ``updated_since`` ("Only return time entries that have
        been updated since the given date and time"), every page:
        https://help.getharvest.com/api-v2/timesheets-api/timesheets/time-entries/#list-all-time-entries
        Harvest sorts them by ``spent_date``, not by ``updated_at``.
        """
        params = {} if updated_since is None else {"updated_since": wire_datetime(updated_since)}
        async for entry in self._records("/time_entries", "time_entries", HarvestTimeEntry, params):
            yield entry.to_time_entry()

    async def time_entry(self, entry_id: str) -> TimeEntry:
        """Re-read one time entry (``GET /time_entries/{id}``).

        https://help.getharvest.com/api-v2/timesheets-api/timesheets/time-entries/#retrieve-a-time-entry

        Raises:
            NotFound: Harvest has no entry ``entry_id`` (deleted).
        """
        path = f"/time_entries/{self._harvest_id(entry_id, 'time entry')}"
        body = await self._get_json(path, {})
        return self._parse(HarvestTimeEntry, body, path).to_time_entry()

    async def poll_changes(self, cursor: str | None, *, since: datetime | None = None) -> ChangePage:
        """Time entries changed since ``cursor``; ``None`` starts from now, hinting nothing.

        Each poll reads every page of ``updated_since = cursor.since - poll_overlap_s``
        and hints each entry version (id and ``updated_at``) not hinted before, so a
        change Harvest saved while the previous poll was paging is not lost. The hint's
        ``event_id`` is ``poll:{id}:{updated_at}``; ``more`` is always false. Starting
        from now reads the overlap window once and records it as already seen.
        """
        if cursor is None and since is not None:
            return await self._poll(PollCursor(since=min(self.clock(), since)))
        if cursor is None:
            start = await self._poll(PollCursor(since=self.clock()))
            return ChangePage(hints=(), cursor=start.cursor)
        return await self._poll(self._load_cursor(cursor))

    async def _poll(self, state: PollCursor) -> ChangePage:
        entries = [entry async for entry in self.time_entries(state.since - self.poll_overlap)]
        seen = set(state.seen)
        fresh = [entry for entry in entries if version_key(entry) not in seen]
        since = max([state.since, *(entry.updated_at for entry in entries)])
        window = since - self.poll_overlap
        keep = sorted(version_key(entry) for entry in entries if entry.updated_at >= window)
        return ChangePage(
            hints=tuple(self._hint(entry) for entry in fresh),
            cursor=PollCursor(since=since, seen=tuple(keep)).model_dump_json(),
        )

    def _hint(self, entry: TimeEntry) -> ChangeHint:
        return ChangeHint(
            connection=self.connection,
            object_type="time_entry",
            object_id=entry.id,
            event_id=f"poll:{version_key(entry)}",
            occurred_at=entry.updated_at,
            kind="time_entry.updated",
        )

    def _load_cursor(self, cursor: str) -> PollCursor:
        try:
            return PollCursor.model_validate_json(cursor)
        except ValidationError as exc:
            raise FatalError(
                f"{self.connection}: poll cursor is not one this connector wrote ({exc.error_count()} errors); "
                "reset the connection's cursor to poll from now",
            ) from exc

    # -- project set-up ----------------------------------------------------------------

    def projects(self, *, is_active: bool | None = None) -> AsyncIterator[HarvestProject]:
        """Projects with their client, billing method, rate and budget.

        https://help.getharvest.com/api-v2/projects-api/projects/projects/#list-all-projects
        """
        params = {} if is_active is None else {"is_active": is_active}
        return self._records("/projects", "projects", HarvestProject, params)

    def task_assignments(self, project_id: str) -> AsyncIterator[HarvestTaskAssignment]:
        """A project's tasks, billable or not, with their rates.

        https://help.getharvest.com/api-v2/projects-api/projects/task-assignments/#list-all-task-assignments-for-a-specific-project
        """
        path = f"/projects/{self._harvest_id(project_id, 'project')}/task_assignments"
        return self._records(path, "task_assignments", HarvestTaskAssignment, {})

    def user_assignments(self, project_id: str) -> AsyncIterator[HarvestUserAssignment]:
        """A project's people with their rates there.

        https://help.getharvest.com/api-v2/projects-api/projects/user-assignments/#list-all-user-assignments-for-a-specific-project
        """
        path = f"/projects/{self._harvest_id(project_id, 'project')}/user_assignments"
        return self._records(path, "user_assignments", HarvestUserAssignment, {})

    def clients(self) -> AsyncIterator[HarvestClient]:
        """Every client with its currency.

        https://help.getharvest.com/api-v2/clients-api/clients/clients/#list-all-clients
        """
        return self._records("/clients", "clients", HarvestClient, {})

    def users(self) -> AsyncIterator[HarvestUser]:
        """Every user with their default rates.

        https://help.getharvest.com/api-v2/users-api/users/users/#list-all-users
        """
        return self._records("/users", "users", HarvestUser, {})

    def tasks(self) -> AsyncIterator[HarvestTask]:
        """Every task with its default rate.

        https://help.getharvest.com/api-v2/tasks-api/tasks/tasks/#list-all-tasks
        """
        return self._records("/tasks", "tasks", HarvestTask, {})

    # -- check -------------------------------------------------------------------------

    async def check(self) -> list[str]:
        """Problems with the token, the account id or the user's access, from one call.

        ``GET /users/me`` (the authentication page's own example call:
        https://help.getharvest.com/api-v2/authentication-api/authentication/authentication/).
        A user who is not an administrator sees only some entries and rates: since the
        2022 permissions, managers see time "for their assigned people and for projects
        they manage" and rates only with a special permission
        (https://support.getharvest.com/hc/en-us/articles/4670090487309-New-permissions-What-changed-with-the-API-).
        """
        try:
            body = await self._get_json("/users/me", {})
            me = self._parse(HarvestUser, body, "/users/me")
        except AuthError:
            return [
                f"{self.connection}: Harvest rejected the token for account {self.account_id}: check `token` "
                "(a personal access token from Harvest ID > Developers) and `account_id`"
            ]
        except SyncdError as exc:
            return [f"{self.connection}: GET /users/me failed: {exc}"]
        if "administrator" in me.access_roles:
            return []
        roles = ", ".join(me.access_roles) or "none"
        return [
            f"{self.connection}: the token's user {me.name} (id {me.id}) has access roles [{roles}], "
            "not administrator: Harvest will hide other people's time entries and billable rates"
        ]

    # -- plumbing ----------------------------------------------------------------------

    async def _records(self, path: str, key: str, model: type[P], params: Mapping[str, Any]) -> AsyncIterator[P]:
        """Every record under ``key`` on every page of ``GET path``."""
        async for body in self._pages(path, params):
            items = body.get(key)
            if not isinstance(items, list):
                raise FatalError(f"{self.connection}: GET {path} answered without a {key!r} list")
            for index, item in enumerate(items):
                yield self._parse(model, item, f"{path} {key}[{index}]")

    async def _pages(self, path: str, params: Mapping[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """Each page of a list, following ``links.next`` (else ``next_page``)."""
        query: dict[str, Any] | None = {**params, "per_page": self.per_page}
        while query is not None:
            body = await self._get_json(path, query)
            yield body
            following = self._next_query(body, query)
            query = following if following != query else None

    @staticmethod
    def _next_query(body: Mapping[str, Any], query: Mapping[str, Any]) -> dict[str, Any] | None:
        """The query of the next page, or ``None`` on the last page.

        Harvest asks clients to use ``links.next`` (it may be a cursor URL). Only its
        query is taken and sent to the same path on the configured ``base_url``, so a
        proxy or emulator base URL keeps working and the token never goes to a host
        named in a response body.
        """
        page = Page.model_validate(body)
        if page.links is not None and page.links.next:
            return dict(httpx.URL(page.links.next).params.multi_items())
        if page.next_page is not None:
            return {**query, "page": page.next_page}
        return None

    async def _get_json(self, path: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """``GET path`` parsed with Decimal for every JSON number that has a fraction."""
        response = await self.http.request("GET", path, params=params)
        try:
            body = json.loads(response.content, parse_float=Decimal)
        except ValueError as exc:
            raise FatalError(f"{self.connection}: GET {path} answered a body that is not JSON") from exc
        if not isinstance(body, dict):
            raise FatalError(f"{self.connection}: GET {path} answered JSON that is not an object")
        return body

    def _harvest_id(self, value: str, kind: str) -> str:
        """``value`` if it can be a Harvest id (an integer), so it is safe in a path."""
        if not value.isdigit():
            raise NotFound(f"{self.connection}: {value!r} is not a Harvest {kind} id (Harvest ids are integers)")
        return value

    def _parse(self, model: type[P], item: Any, place: str) -> P:
        try:
            return model.model_validate(item)
        except ValidationError as exc:
            record_id = item.get("id") if isinstance(item, dict) else None
            fields = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in exc.errors())
            raise RecordError(
                f"Harvest {model.__name__} id {record_id} does not parse: {fields}",
                place=f"{self.connection}: GET {place}",
            ) from exc


def build(settings: HarvestSettings, ctx: ConnectorContext) -> HarvestConnector:
    """The :class:`HarvestConnector` for one configured connection."""
    limits = within(settings.rate_limit_per_15s, RATE_LIMIT_PERIOD_S)
    http = ctx.make_http(
        base_url=settings.base_url,
        auth=BearerToken(settings.token),
        headers={
            "Harvest-Account-Id": settings.account_id,
            "User-Agent": settings.user_agent,
            "Accept": "application/json",
        },
        limits=limits,
    )
    return HarvestConnector(
        http=http,
        connection=ctx.connection,
        clock=ctx.clock,
        account_id=settings.account_id,
        per_page=settings.per_page,
        poll_overlap_s=settings.poll_overlap_s,
    )


SPEC = ConnectorSpec(
    name="harvest",
    roles=frozenset({TimeTracker}),
    settings_model=HarvestSettings,
    factory=build,
    verifier=None,
    secret_fields=("token",),
)
