"""Harvest API v2 payloads, parsed at the edge into small frozen values.

Each model keeps the subset of a Harvest object that syncd uses, under Harvest's own
field names, and ignores the rest (Harvest adds fields over time). Money and hours are
:class:`~decimal.Decimal`: the connector parses response bodies with
``json.loads(..., parse_float=Decimal)``, so a value such as ``0.1`` never passes
through a binary float. Ids are Harvest's integers.

The field lists follow the object tables of the Harvest API v2 reference:

* time entry: https://help.getharvest.com/api-v2/timesheets-api/timesheets/time-entries/#the-time-entry-object
* project: https://help.getharvest.com/api-v2/projects-api/projects/projects/#the-project-object
* task assignment: https://help.getharvest.com/api-v2/projects-api/projects/task-assignments/#the-task-assignment-object
* user assignment: https://help.getharvest.com/api-v2/projects-api/projects/user-assignments/#the-user-assignment-object
* client: https://help.getharvest.com/api-v2/clients-api/clients/clients/#the-client-object
* user: https://help.getharvest.com/api-v2/users-api/users/users/#the-user-object
* task: https://help.getharvest.com/api-v2/tasks-api/tasks/tasks/#the-task-object
* pagination: https://help.getharvest.com/api-v2/introduction/overview/pagination/
"""

from __future__ import annotations

from datetime import date
from decimal import Decimal

from pydantic import AwareDatetime, BaseModel, ConfigDict

from syncd.core.interfaces import TimeEntry


class Payload(BaseModel):
    """Base of every Harvest payload: frozen, unknown fields ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore")


class Ref(Payload):
    """The ``{"id", "name"}`` object Harvest nests for a related record."""

    id: int
    name: str | None = None


class ClientRef(Ref):
    """A project's client: id, name and currency (ISO 4217 code)."""

    currency: str | None = None


class InvoiceRef(Payload):
    """The invoice a time entry was billed on: its id and number."""

    id: int
    number: str | None = None


class PageLinks(Payload):
    """The ``links`` of a paginated response; ``next`` is ``None`` on the last page."""

    first: str | None = None
    next: str | None = None
    previous: str | None = None
    last: str | None = None


class Page(Payload):
    """The pagination fields every Harvest list response carries beside its records."""

    per_page: int | None = None
    total_pages: int | None = None
    total_entries: int | None = None
    next_page: int | None = None
    previous_page: int | None = None
    page: int | None = None
    links: PageLinks | None = None


class HarvestTimeEntry(Payload):
    """A time entry as Harvest sends it.

    Attributes:
        id: Harvest's id.
        spent_date: the day worked.
        user / client / project / task: the related records' ids and names.
        hours: decimal hours tracked.
        notes: the entry's notes.
        billable: whether the hours are billable.
        billable_rate: the rate Harvest applies to the entry (``None`` when not billable).
        is_billed: whether Harvest marks it invoiced.
        invoice: the Harvest invoice it was billed on, if any.
        is_running: whether its timer is running (its hours still grow).
        updated_at: last change at Harvest.
    """

    id: int
    spent_date: date
    user: Ref
    client: Ref | None = None
    project: Ref
    task: Ref | None = None
    hours: Decimal
    notes: str | None = None
    billable: bool = True
    billable_rate: Decimal | None = None
    is_billed: bool = False
    invoice: InvoiceRef | None = None
    is_running: bool = False
    updated_at: AwareDatetime

    def to_time_entry(self) -> TimeEntry:
        """The canonical :class:`~syncd.core.interfaces.TimeEntry` for this entry."""
        return TimeEntry(
            id=str(self.id),
            project_id=str(self.project.id),
            client_id=str(self.client.id) if self.client is not None else None,
            task=self.task.name if self.task is not None else None,
            person=self.user.name,
            spent_date=self.spent_date,
            hours=self.hours,
            billable=self.billable,
            billable_rate=self.billable_rate,
            invoiced=self.is_billed,
            updated_at=self.updated_at,
        )


class HarvestProject(Payload):
    """A project and how it bills.

    Attributes:
        id / name / code: identity.
        client: the client billed, with its currency.
        is_active: ``False`` once archived.
        is_billable: whether the project is billable at all.
        is_fixed_fee: fixed-fee projects bill ``fee``, not hours.
        bill_by: ``Project``, ``Tasks``, ``People`` or ``none``: where the hourly rate comes from.
        hourly_rate: the rate when ``bill_by`` is ``Project``.
        budget: the budget in hours when budgeting by time.
        budget_by: ``project``, ``project_cost``, ``task``, ``task_fees``, ``person`` or ``none``.
        budget_is_monthly: the budget resets every month.
        cost_budget: the budget in money when budgeting by money.
        fee: the amount to invoice on a fixed-fee project.
        starts_on / ends_on: the project's dates.
        updated_at: last change at Harvest.
    """

    id: int
    name: str
    code: str | None = None
    client: ClientRef | None = None
    is_active: bool = True
    is_billable: bool = True
    is_fixed_fee: bool = False
    bill_by: str | None = None
    hourly_rate: Decimal | None = None
    budget: Decimal | None = None
    budget_by: str | None = None
    budget_is_monthly: bool = False
    cost_budget: Decimal | None = None
    fee: Decimal | None = None
    starts_on: date | None = None
    ends_on: date | None = None
    updated_at: AwareDatetime | None = None


class HarvestTaskAssignment(Payload):
    """A task on a project: billable or not, its rate when the project bills by task.

    Attributes:
        id: the assignment's id.
        project / task: what is assigned to what.
        is_active: ``False`` once archived.
        billable: time tracked to this task on this project is billable.
        hourly_rate: the rate when the project's ``bill_by`` is ``Tasks``.
        budget: the budget when the project's ``budget_by`` is ``task`` or ``task_fees``.
        updated_at: last change (archiving a task milestone dates its completion):
            https://help.getharvest.com/api-v2/projects-api/projects/task-assignments/#the-task-assignment-object
    """

    id: int
    project: Ref
    task: Ref
    is_active: bool = True
    billable: bool = False
    hourly_rate: Decimal | None = None
    budget: Decimal | None = None
    updated_at: AwareDatetime | None = None


class HarvestUserAssignment(Payload):
    """A person on a project and the rate they bill there when it bills by person.

    Attributes:
        id: the assignment's id.
        project / user: who is assigned where.
        is_active: ``False`` once archived.
        is_project_manager: the person manages the project.
        use_default_rates: ``True`` means the person's own default rate applies.
        hourly_rate: the custom rate used when ``use_default_rates`` is ``False``.
        budget: the budget when the project's ``budget_by`` is ``person``.
    """

    id: int
    project: Ref
    user: Ref
    is_active: bool = True
    is_project_manager: bool = False
    use_default_rates: bool = True
    hourly_rate: Decimal | None = None
    budget: Decimal | None = None


class HarvestClient(Payload):
    """A customer company at Harvest and the currency it is billed in."""

    id: int
    name: str
    is_active: bool = True
    currency: str | None = None
    address: str | None = None
    updated_at: AwareDatetime | None = None


class HarvestUser(Payload):
    """A person at Harvest, their default rates and their access roles.

    Attributes:
        access_roles: ``administrator``, ``manager`` or ``member`` (plus manager
            sub-roles); decides which entries and rates the API shows this user.
    """

    id: int
    first_name: str
    last_name: str
    email: str | None = None
    is_active: bool = True
    is_contractor: bool = False
    default_hourly_rate: Decimal | None = None
    cost_rate: Decimal | None = None
    access_roles: tuple[str, ...] = ()
    timezone: str | None = None

    @property
    def name(self) -> str:
        """First and last name, as Harvest shows the person on time entries."""
        return f"{self.first_name} {self.last_name}".strip()


class HarvestTask(Payload):
    """A kind of work, with the default rate it brings to new projects."""

    id: int
    name: str
    billable_by_default: bool = True
    default_hourly_rate: Decimal | None = None
    is_default: bool = False
    is_active: bool = True
