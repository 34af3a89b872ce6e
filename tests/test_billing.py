"""Tests of the pure billing rules: keys, triggers and drafts."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from syncd.core.billing import (
    CodeRule,
    DraftOptions,
    LedgerRules,
    RateCard,
    accepted_event,
    billing_event,
    cap_events,
    cap_step_hours,
    deal_won_event,
    deposit_event,
    draft_for_event,
    due_events,
    event_key,
    hours_draft,
    issue_date_for,
    milestone_events,
    rate_for,
    with_ledger_codes,
)
from syncd.core.errors import MappingError, ValidationFailed
from syncd.core.interfaces import (
    LINE_KINDS,
    OVER_CAP_SUFFIX,
    AmountChange,
    BillingEvent,
    BillingEventKind,
    Client,
    DraftKind,
    Engagement,
    EngagementType,
    InvoiceDraft,
    InvoiceLine,
    Milestone,
    TimeEntry,
    TrackingOption,
)
from syncd.core.money import round_money

BILLING_START = datetime(2024, 1, 1, tzinfo=UTC)


def make_client(**changes: object) -> Client:
    """A client billed in USD with 14-day terms."""
    values: dict[str, object] = {
        "key": "hubspot:company:1",
        "legal_name": "Acme Ltd",
        "currency": "USD",
        "payment_terms_days": 14,
        "po_number": "PO-CLIENT",
        "timezone": "America/New_York",
    }
    values.update(changes)
    return Client.model_validate(values)


def make_fixed(**changes: object) -> Engagement:
    """A won fixed-fee engagement with two lines."""
    values: dict[str, object] = {
        "key": "hubspot:deal:8812",
        "client_key": "hubspot:company:1",
        "type": EngagementType.ONE_TIME,
        "name": "Website",
        "currency": "USD",
        "won_at": datetime(2024, 3, 5, 15, 0, tzinfo=UTC),
        "lines": (
            InvoiceLine(description="Design", quantity=Decimal(1), unit_price=Decimal("1500.00")),
            InvoiceLine(description="Build", quantity=Decimal("2.5"), unit_price=Decimal("1000.005")),
        ),
    }
    values.update(changes)
    return Engagement.model_validate(values)


def test_event_key_is_32_lowercase_hex_and_deterministic() -> None:
    """An event key is 32 lowercase hex characters and the same for the same parts."""
    key = event_key("hubspot:deal:1", BillingEventKind.DEAL_WON, "won")
    assert len(key) == 32
    assert key == key.lower()
    int(key, 16)
    assert key == event_key("hubspot:deal:1", BillingEventKind.DEAL_WON, "won")


def test_event_key_separates_parts_unambiguously() -> None:
    """Keys differ when the same characters are split differently between the parts."""
    first = event_key("a:b", BillingEventKind.PERIOD_DUE, "c")
    second = event_key("a", BillingEventKind.PERIOD_DUE, "b:c")
    assert first != second


@settings(max_examples=60, deadline=None)
@given(
    engagement=st.text(min_size=1, max_size=20),
    kind=st.sampled_from(list(BillingEventKind)),
    first=st.text(max_size=20),
    second=st.text(max_size=20),
)
def test_event_keys_differ_for_different_occurrences(
    engagement: str, kind: BillingEventKind, first: str, second: str
) -> None:
    """Two different occurrences of one kind get different keys; equal ones the same key."""
    same = event_key(engagement, kind, first) == event_key(engagement, kind, second)
    assert same == (first == second)


def test_event_keys_differ_by_kind() -> None:
    """The same occurrence of two kinds gets two keys."""
    keys = {event_key("e", kind, "1") for kind in BillingEventKind}
    assert len(keys) == len(BillingEventKind)


def test_deal_won_event_for_a_won_fixed_fee_deal() -> None:
    """A won one-time engagement yields one deal_won event, occurrence "won", at won_at."""
    engagement = make_fixed()
    event = deal_won_event(engagement, billing_start=BILLING_START)
    assert event is not None
    assert event.kind is BillingEventKind.DEAL_WON
    assert event.occurrence == "won"
    assert event.occurred_at == engagement.won_at
    assert event.key == event_key(engagement.key, BillingEventKind.DEAL_WON, "won")


def test_deal_won_event_is_the_same_after_a_rewin() -> None:
    """Reopening and winning a deal again yields the same key: no second invoice."""
    first = deal_won_event(make_fixed(), billing_start=BILLING_START)
    rewon = deal_won_event(make_fixed(won_at=datetime(2024, 6, 1, tzinfo=UTC)), billing_start=BILLING_START)
    assert first is not None
    assert rewon is not None
    assert first.key == rewon.key


@pytest.mark.parametrize(
    "changes",
    [
        {"won_at": None},
        {"type": EngagementType.RETAINER},
        {"type": EngagementType.HOURLY},
        {"bill_on": "accepted"},
        {"won_at": datetime(2023, 12, 31, 23, 59, tzinfo=UTC)},
    ],
)
def test_deal_won_event_is_none(changes: dict[str, object]) -> None:
    """No deal_won event while open, for other types, on acceptance billing, or before billing_start."""
    assert deal_won_event(make_fixed(**changes), billing_start=BILLING_START) is None


@settings(max_examples=60, deadline=None)
@given(offset_s=st.integers(min_value=-(10**7), max_value=10**7))
def test_deal_won_event_respects_billing_start(offset_s: int) -> None:
    """A deal won at or after billing_start is invoiced; one won before it is not."""
    won_at = BILLING_START + timedelta(seconds=offset_s)
    event = deal_won_event(make_fixed(won_at=won_at), billing_start=BILLING_START)
    assert (event is not None) == (offset_s >= 0)


def test_draft_for_deal_won_bills_the_lines() -> None:
    """A deal_won draft bills the engagement's lines with the client's terms and PO."""
    engagement = make_fixed(po_number="PO-DEAL")
    client = make_client()
    event = deal_won_event(engagement, billing_start=BILLING_START)
    assert event is not None
    draft = draft_for_event(event, engagement, client, issue_date=date(2024, 3, 5), status="draft", send=True)
    assert draft.key == event.key
    assert draft.kind is DraftKind.INVOICE
    assert draft.lines == engagement.lines
    assert draft.due_date == date(2024, 3, 19)
    assert draft.reference == "PO-DEAL"
    assert draft.currency == "USD"
    assert draft.status == "draft"
    assert draft.send is True
    assert draft.subtotal() == Decimal("4000.01")


def test_draft_reference_defaults_to_the_clients_po_number() -> None:
    """Without an engagement PO number the reference is the client's."""
    engagement = make_fixed()
    event = deal_won_event(engagement, billing_start=BILLING_START)
    assert event is not None
    draft = draft_for_event(event, engagement, make_client(), issue_date=date(2024, 3, 5))
    assert draft.reference == "PO-CLIENT"
    assert draft.line_amount_types == "Exclusive"


@pytest.mark.parametrize(
    ("engagement", "client", "field"),
    [
        (make_fixed(lines=()), make_client(), "lines"),
        (
            make_fixed(lines=(InvoiceLine(description="x", quantity=Decimal(-1), unit_price=Decimal(5)),)),
            make_client(),
            "lines[0].quantity",
        ),
        (
            make_fixed(lines=(InvoiceLine(description=" ", quantity=Decimal(1), unit_price=Decimal(5)),)),
            make_client(),
            "lines[0].description",
        ),
        (
            make_fixed(
                lines=(
                    InvoiceLine(description="x", quantity=Decimal(1), unit_price=Decimal(5)),
                    InvoiceLine(description="discount", quantity=Decimal(1), unit_price=Decimal(-6)),
                )
            ),
            make_client(),
            "lines",
        ),
        (make_fixed(currency="EUR"), make_client(), "currency"),
        (make_fixed(), make_client(key="hubspot:company:2"), "client_key"),
        (make_fixed(), make_client(payment_terms_days=-1), "payment_terms_days"),
    ],
)
def test_draft_for_event_rejects_an_invalid_draft(engagement: Engagement, client: Client, field: str) -> None:
    """A draft that cannot be valid raises ValidationFailed naming the field."""
    event = deal_won_event(make_fixed(), billing_start=BILLING_START)
    assert event is not None
    with pytest.raises(ValidationFailed) as caught:
        draft_for_event(event, engagement, client, issue_date=date(2024, 3, 5))
    assert caught.value.place is not None
    assert caught.value.place.endswith(field)


def test_draft_for_event_rejects_another_engagements_event() -> None:
    """An event of one engagement cannot draft an invoice for another."""
    event = deal_won_event(make_fixed(key="hubspot:deal:1"), billing_start=BILLING_START)
    assert event is not None
    with pytest.raises(ValidationFailed, match="belongs to engagement"):
        draft_for_event(event, make_fixed(), make_client(), issue_date=date(2024, 3, 5))


def test_issue_date_is_the_date_in_the_clients_zone() -> None:
    """An instant after midnight UTC is still the previous day in New York."""
    at = datetime(2024, 3, 1, 3, 30, tzinfo=UTC)
    assert issue_date_for(at, "America/New_York") == date(2024, 2, 29)
    assert issue_date_for(at, "Asia/Tokyo") == date(2024, 3, 1)
    assert issue_date_for(at, "UTC") == date(2024, 3, 1)


def test_issue_date_refuses_a_naive_datetime() -> None:
    """A naive datetime has no date in a zone and is refused."""
    with pytest.raises(ValueError, match="timezone-aware"):
        issue_date_for(datetime(2024, 3, 1, 3, 30), "UTC")


# ---------------------------------------------------------------------------
# Acceptance, milestones and the combined due list
# ---------------------------------------------------------------------------


def test_acceptance_billing_invoices_when_accepted_not_when_won() -> None:
    """A one-time engagement billed on acceptance invoices once, when accepted."""
    accepted = datetime(2024, 4, 2, 9, tzinfo=UTC)
    open_one = make_fixed(bill_on="accepted")
    assert deal_won_event(open_one, billing_start=BILLING_START) is None
    assert accepted_event(open_one, billing_start=BILLING_START) is None
    done = make_fixed(bill_on="accepted", accepted_at=accepted)
    event = accepted_event(done, billing_start=BILLING_START)
    assert event is not None
    assert (event.kind, event.occurrence, event.occurred_at) == (
        BillingEventKind.DELIVERABLE_ACCEPTED,
        "accepted",
        accepted,
    )
    draft = draft_for_event(event, done, make_client(), issue_date=date(2024, 4, 2))
    assert draft.lines == done.lines
    assert accepted_event(done, billing_start=accepted + timedelta(seconds=1)) is None


def milestone_project(**changes: object) -> Engagement:
    """A won milestone engagement with one milestone done and one open."""
    values: dict[str, object] = {
        "type": EngagementType.MILESTONE,
        "lines": (),
        "milestones": (
            Milestone(id="m1", name="Discovery", amount=Decimal("2500.00"), done_at=datetime(2024, 3, 20, tzinfo=UTC)),
            Milestone(id="m2", name="Launch", amount=Decimal("7500.00")),
        ),
    }
    values.update(changes)
    return make_fixed(**values)


def test_a_date_only_trigger_is_in_scope_if_any_part_of_its_local_day_is() -> None:
    """Go-live at 08:00 New York: a milestone done "today" (local midnight) counts; one done yesterday does not."""
    start = datetime(2024, 3, 20, 13, 0, tzinfo=UTC)  # 08:00 in New York
    zone = ZoneInfo("America/New_York")
    today = datetime(2024, 3, 20, tzinfo=zone)
    yesterday = datetime(2024, 3, 19, tzinfo=zone)
    at_seven = datetime(2024, 3, 20, 7, tzinfo=zone)  # a real time before go-live stays out
    for done, expected in ((today, ["m1"]), (yesterday, []), (at_seven, [])):
        engagement = milestone_project(
            milestones=(Milestone(id="m1", name="Discovery", amount=Decimal("2500.00"), done_at=done),)
        )
        events = milestone_events(engagement, billing_start=start, timezone="America/New_York")
        assert [event.occurrence for event in events] == expected, done
    assert (
        milestone_events(
            milestone_project(milestones=(Milestone(id="m1", name="D", amount=Decimal(1), done_at=today),)),
            billing_start=start,
        )
        == []
    )  # without the client's zone a date cannot be told from a time
    won_today = make_fixed(won_at=today)
    assert deal_won_event(won_today, billing_start=start, timezone="America/New_York") is not None
    recorded_before = won_today.model_copy(update={"won_recorded_at": datetime(2024, 3, 19, 20, tzinfo=UTC)})
    assert deal_won_event(recorded_before, billing_start=start, timezone="America/New_York") is None


def test_a_done_milestone_invoices_its_amount() -> None:
    """Each done milestone is one event, keyed by its id, billing its amount."""
    engagement = milestone_project()
    events = milestone_events(engagement, billing_start=BILLING_START)
    assert [event.occurrence for event in events] == ["m1"]
    draft = draft_for_event(events[0], engagement, make_client(), issue_date=date(2024, 3, 20))
    assert [(line.description, line.amount("USD")) for line in draft.lines] == [("Discovery", Decimal("2500.00"))]
    assert milestone_events(engagement.model_copy(update={"won_at": None}), billing_start=BILLING_START) == []


def test_a_milestone_missing_from_the_engagement_is_refused() -> None:
    """A milestone event whose milestone is gone names the milestone."""
    events = milestone_events(milestone_project(), billing_start=BILLING_START)
    with pytest.raises(ValidationFailed, match="no milestone with id 'm1'"):
        draft_for_event(events[0], milestone_project(milestones=()), make_client(), issue_date=date(2024, 3, 20))


def test_due_events_collects_every_kind_once() -> None:
    """due_events returns won, accepted and milestone events in order, and none already billed."""
    engagement = milestone_project()
    as_of = datetime(2024, 4, 1, tzinfo=UTC)
    events = due_events(engagement, as_of=as_of, timezone="UTC", billing_start=BILLING_START)
    assert [event.occurrence for event in events] == ["m1"]
    assert (
        due_events(engagement, as_of=as_of, timezone="UTC", billing_start=BILLING_START, billed={events[0].key}) == []
    )
    fixed = due_events(make_fixed(), as_of=as_of, timezone="UTC", billing_start=BILLING_START)
    assert [event.kind for event in fixed] == [BillingEventKind.DEAL_WON]
    assert (
        due_events(make_fixed(), as_of=datetime(2024, 3, 1, tzinfo=UTC), timezone="UTC", billing_start=BILLING_START)
        == []
    )


def test_a_period_draft_of_an_open_deal_is_refused() -> None:
    """A retainer that is not won has no periods to draft."""
    retainer = make_fixed(type=EngagementType.RETAINER, amount=Decimal(100), cycle="monthly", start=date(2024, 1, 1))
    event = due_events(retainer, as_of=datetime(2024, 3, 6, tzinfo=UTC), timezone="UTC", billing_start=BILLING_START)[0]
    with pytest.raises(ValidationFailed, match="not won"):
        draft_for_event(event, retainer.model_copy(update={"won_at": None}), make_client(), issue_date=date(2024, 1, 1))


def test_a_recurring_engagement_without_amount_is_refused() -> None:
    """A retainer without an amount names the field instead of billing nothing."""
    retainer = make_fixed(type=EngagementType.RETAINER, cycle="monthly", start=date(2024, 1, 1))
    with pytest.raises(ValidationFailed) as caught:
        due_events(retainer, as_of=datetime(2024, 3, 6, tzinfo=UTC), timezone="UTC", billing_start=BILLING_START)
    assert caught.value.place == "engagement hubspot:deal:8812: amount"


def test_an_unknown_change_occurrence_is_refused() -> None:
    """An engagement_changed event with no matching change on the engagement is refused."""
    retainer = make_fixed(type=EngagementType.RETAINER, amount=Decimal(100), cycle="monthly", start=date(2024, 1, 1))
    event = billing_event(
        retainer, BillingEventKind.ENGAGEMENT_CHANGED, "change:v404", datetime(2024, 2, 1, tzinfo=UTC)
    )
    with pytest.raises(ValidationFailed, match="no change to settle"):
        draft_for_event(event, retainer, make_client(), issue_date=date(2024, 2, 1))


# ---------------------------------------------------------------------------
# Hours
# ---------------------------------------------------------------------------

UPDATED = datetime(2024, 5, 1, tzinfo=UTC)


def entry(entry_id: str, day: int, hours: str, **changes: object) -> TimeEntry:
    """A billable time entry of project p1 in April 2024."""
    values: dict[str, object] = {
        "id": entry_id,
        "project_id": "p1",
        "task": "Design",
        "person": "Ada",
        "spent_date": date(2024, 4, day),
        "hours": Decimal(hours),
        "updated_at": UPDATED + timedelta(minutes=day),
    }
    values.update(changes)
    return TimeEntry.model_validate(values)


def hourly(**changes: object) -> Engagement:
    """A won hourly engagement at 100/h, invoiced monthly."""
    values: dict[str, object] = {
        "type": EngagementType.HOURLY,
        "lines": (),
        "rate": Decimal(100),
        "cycle": "monthly",
        "anchor_day": 1,
        "start": date(2024, 4, 1),
        "won_at": datetime(2024, 3, 25, tzinfo=UTC),
    }
    values.update(changes)
    return make_fixed(**values)


OPTIONS = DraftOptions(issue_date=date(2024, 5, 1))


def april_event(engagement: Engagement) -> BillingEvent:
    """The April period event of an hourly engagement, due on May 1."""
    events = due_events(engagement, as_of=datetime(2024, 5, 2, tzinfo=UTC), timezone="UTC", billing_start=BILLING_START)
    assert [event.occurrence for event in events] == ["2024-04-01"]
    assert events[0].occurred_at == datetime(2024, 5, 1, tzinfo=UTC)
    return events[0]


def test_an_hourly_period_bills_logged_hours_grouped_by_task() -> None:
    """An hourly period invoices billable, uninvoiced hours up to its end, one line per task and rate."""
    engagement = hourly()
    entries = [
        entry("e1", 2, "3.5"),
        entry("e2", 3, "2", task="Build"),
        entry("e3", 9, "1.25"),
        entry("e4", 10, "4", billable=False),
        entry("e5", 11, "1", invoiced=True),
        entry("e6", 12, "2"),
        entry("e7", 30, "1", spent_date=date(2024, 5, 2)),
    ]
    result = hours_draft(april_event(engagement), engagement, make_client(), entries, invoiced={"e6"}, options=OPTIONS)
    assert result is not None
    assert result.entry_ids == {"e1", "e2", "e3"}
    assert [(line.description, line.quantity, line.unit_price) for line in result.draft.lines] == [
        ("Website: Build, 2024-04-03 – 2024-04-03", Decimal(2), Decimal(100)),
        ("Website: Design, 2024-04-02 – 2024-04-09", Decimal("4.75"), Decimal(100)),
    ]
    assert result.draft.subtotal() == Decimal("675.00")


@pytest.mark.parametrize(
    ("group_by", "labels"),
    [("person", ["Ada", "Bob"]), ("project", ["p1", "p2"]), ("task", ["Build", "Design"])],
)
def test_hours_group_by_person_project_or_task(group_by: str, labels: list[str]) -> None:
    """The grouping field decides the lines."""
    engagement = hourly(group_hours_by=group_by)
    entries = [entry("e1", 2, "1"), entry("e2", 3, "1", person="Bob", project_id="p2", task="Build")]
    result = hours_draft(april_event(engagement), engagement, make_client(), entries, invoiced=(), options=OPTIONS)
    assert result is not None
    assert [line.description.split(": ")[1].split(",")[0] for line in result.draft.lines] == labels


def test_an_hourly_period_without_hours_bills_nothing() -> None:
    """A period whose hours are all invoiced or not billable gives no draft."""
    engagement = hourly()
    entries = [entry("e1", 2, "3", billable=False), entry("e2", 3, "1")]
    assert (
        hours_draft(april_event(engagement), engagement, make_client(), entries, invoiced={"e2"}, options=OPTIONS)
        is None
    )


def test_hourly_events_must_be_drafted_with_hours() -> None:
    """draft_for_event refuses hourly events, which need time entries."""
    engagement = hourly()
    with pytest.raises(ValidationFailed, match="hours_draft"):
        draft_for_event(april_event(engagement), engagement, make_client(), issue_date=date(2024, 5, 1))


def test_rate_precedence_is_configurable() -> None:
    """The first source in the precedence with a rate wins; none at all names the entry."""
    card = RateCard(projects={"p1": Decimal(120)}, tasks={"Design": Decimal(90)}, people={"Ada": Decimal(80)})
    item = entry("e1", 2, "1", billable_rate=Decimal(70))
    assert rate_for(item, hourly(), card) == Decimal(100)
    assert rate_for(item, hourly(rate=None), card) == Decimal(120)
    assert rate_for(item, hourly(), RateCard(tasks=card.tasks, precedence=("task", "engagement"))) == Decimal(90)
    assert rate_for(item, hourly(), RateCard(people=card.people, precedence=("person",))) == Decimal(80)
    assert rate_for(item, hourly(rate=None), RateCard()) == Decimal(70)
    with pytest.raises(ValidationFailed) as caught:
        rate_for(item.model_copy(update={"billable_rate": None}), hourly(rate=None), RateCard())
    assert caught.value.place == "engagement hubspot:deal:8812: time entry e1.rate"


def test_cap_steps_are_every_configured_percent_of_the_cap() -> None:
    """With a 40 h cap in 25 % steps the steps are at 10, 20, 30 and 40 h, and more only when billing over the cap."""
    engagement = hourly(cap_hours=Decimal(40), cap_step_percent=Decimal(25))
    assert [cap_step_hours(engagement, index) for index in range(1, 6)] == [10, 20, 30, 40, None]
    over = engagement.model_copy(update={"over_cap": "bill"})
    assert cap_step_hours(over, 5) == 50
    uneven = engagement.model_copy(update={"cap_step_percent": Decimal(30)})
    assert [cap_step_hours(uneven, index) for index in range(1, 6)] == [12, 24, 36, 40, None]
    assert cap_step_hours(hourly(), 1) is None


def test_a_cap_step_invoices_the_hours_not_yet_invoiced() -> None:
    """Reaching a step raises one event keyed by the step; its invoice bills the uninvoiced hours."""
    engagement = hourly(cycle=None, cap_hours=Decimal(40), cap_step_percent=Decimal(25))
    entries = [entry("e1", 2, "6"), entry("e2", 3, "5"), entry("e3", 4, "3")]
    events = cap_events(engagement, entries, billing_start=BILLING_START)
    assert [(event.occurrence, event.occurred_at) for event in events] == [("1", entries[1].updated_at)]
    assert events[0].kind is BillingEventKind.HOURS_CAP_REACHED
    result = hours_draft(events[0], engagement, make_client(), entries, invoiced=(), options=OPTIONS)
    assert result is not None
    assert result.entry_ids == {"e1", "e2", "e3"}
    assert cap_events(engagement, entries, billing_start=BILLING_START, billed={events[0].key}) == []
    more = [*entries, entry("e4", 5, "7")]
    again = cap_events(engagement, more, billing_start=BILLING_START, billed={events[0].key})
    assert [event.occurrence for event in again] == ["2"]
    second = hours_draft(again[0], engagement, make_client(), more, invoiced=result.entry_ids, options=OPTIONS)
    assert second is not None
    assert second.entry_ids == {"e4"}


def test_steps_reached_together_are_one_event() -> None:
    """Hours that cross several steps at once raise one event for the highest step."""
    engagement = hourly(cycle=None, cap_hours=Decimal(40), cap_step_percent=Decimal(25))
    events = cap_events(engagement, [entry("e1", 2, "25")], billing_start=BILLING_START)
    assert [event.occurrence for event in events] == ["2"]
    assert cap_events(engagement, [entry("e1", 2, "25")], billing_start=UPDATED + timedelta(days=1)) == []
    assert (
        cap_events(engagement.model_copy(update={"won_at": None}), [entry("e1", 2, "25")], billing_start=BILLING_START)
        == []
    )


def test_over_cap_hours_are_held_or_billed() -> None:
    """With over_cap=hold the entry that crosses the cap is billed up to it and the rest held; bill bills all."""
    held = hourly(cycle=None, cap_hours=Decimal(10))
    entries = [entry("e1", 2, "4"), entry("e2", 3, "4"), entry("e3", 4, "4"), entry("e4", 5, "1")]
    events = cap_events(held, entries, billing_start=BILLING_START)
    assert [event.occurrence for event in events] == ["1"]
    result = hours_draft(events[0], held, make_client(), entries, invoiced=(), options=OPTIONS)
    assert result is not None
    assert result.entry_ids == {"e1", "e2", "e3"}
    assert result.split == {"e3": Decimal(2)}
    assert result.held == {"e3", "e4"}
    assert result.draft.subtotal() == sum((line.amount("USD") for line in result.draft.lines), Decimal(0))
    assert sum((line.quantity for line in result.draft.lines), Decimal(0)) == Decimal(10)
    billed = held.model_copy(update={"over_cap": "bill"})
    result = hours_draft(events[0], billed, make_client(), entries, invoiced=(), options=OPTIONS)
    assert result is not None
    assert result.entry_ids == {"e1", "e2", "e3", "e4"}
    # as the store gives them back after that invoice: e3's billed part, and its rest on its own
    after = [*entries[:2], entry("e3", 4, "2"), entry("e3" + OVER_CAP_SUFFIX, 4, "2"), entries[3]]
    assert hours_draft(events[0], held, make_client(), after, invoiced={"e1", "e2", "e3"}, options=OPTIONS) is None
    released = [*after[:3], after[3].model_copy(update={"released": True}), after[4]]
    result = hours_draft(events[0], held, make_client(), released, invoiced={"e1", "e2", "e3"}, options=OPTIONS)
    assert result is not None
    assert result.entry_ids == {"e3" + OVER_CAP_SUFFIX}
    assert result.held == {"e4"}


def test_hours_draft_refuses_other_engagements_and_events() -> None:
    """Only hourly engagements' period and cap events bill hours."""
    with pytest.raises(ValidationFailed, match="only hourly"):
        hours_draft(
            deal_won_event(make_fixed(), billing_start=BILLING_START) or pytest.fail("no deal_won event"),
            make_fixed(),
            make_client(),
            [],
            invoiced=(),
            options=OPTIONS,
        )
    engagement = hourly()
    won = billing_event(engagement, BillingEventKind.DEAL_WON, "won", UPDATED)
    with pytest.raises(ValidationFailed, match="does not bill hours"):
        hours_draft(won, engagement, make_client(), [], invoiced=(), options=OPTIONS)


# ---------------------------------------------------------------------------
# Deposits and the first period on winning
# ---------------------------------------------------------------------------

WON_AT = datetime(2024, 3, 5, 15, 0, tzinfo=UTC)


def subtotals(engagement: Engagement, as_of: datetime) -> list[tuple[str, Decimal]]:
    """Every due event's occurrence and the subtotal of its draft."""
    events = due_events(engagement, as_of=as_of, timezone="UTC", billing_start=BILLING_START)
    drafts = [draft_for_event(event, engagement, make_client(), issue_date=date(2024, 5, 1)) for event in events]
    return [(event.occurrence, draft.subtotal()) for event, draft in zip(events, drafts, strict=True)]


def test_a_one_time_deposit_is_invoiced_when_won_and_deducted_on_acceptance() -> None:
    """A deposit is invoiced when the deal is won and deducted once from the acceptance invoice."""
    accepted = datetime(2024, 4, 2, 9, tzinfo=UTC)
    engagement = make_fixed(bill_on="accepted", deposit_percent=Decimal(30), accepted_at=accepted)
    # Lines: 1,500.00 + 2.5 x 1,000.005 = 2,500.0125 -> 2,500.01; total 4,000.01; 30% = 1,200.003 -> 1,200.00.
    assert subtotals(engagement, accepted - timedelta(days=1)) == [("deposit", Decimal("1200.00"))]
    assert subtotals(engagement, accepted) == [("deposit", Decimal("1200.00")), ("accepted", Decimal("2800.01"))]
    event = accepted_event(engagement, billing_start=BILLING_START)
    assert event is not None
    draft = draft_for_event(event, engagement, make_client(), issue_date=date(2024, 4, 2))
    assert draft.lines[-1].description == "Website: less deposit, 30%"
    assert draft.lines[-1].unit_price == Decimal("-1200.00")


def test_milestones_each_deduct_their_share_of_the_deposit() -> None:
    """A milestone deposit is one invoice when won; each milestone invoice deducts its own share."""
    done = datetime(2024, 4, 1, tzinfo=UTC)
    engagement = milestone_project(
        deposit_percent=Decimal("12.5"),
        milestones=(
            Milestone(id="m1", name="Discovery", amount=Decimal("2500.00"), done_at=done),
            Milestone(id="m2", name="Launch", amount=Decimal("7500.10"), done_at=done),
        ),
    )
    # Shares: 12.5% of 2,500.00 = 312.50; 12.5% of 7,500.10 = 937.5125 -> 937.51; deposit 1,250.01.
    assert subtotals(engagement, done) == [
        ("deposit", Decimal("1250.01")),
        ("m1", Decimal("2187.50")),
        ("m2", Decimal("6562.59")),
    ]


def test_a_fixed_fee_billed_when_won_ignores_the_deposit() -> None:
    """A one-time engagement billed on winning invoices its total once, with no deposit."""
    engagement = make_fixed(deposit_percent=Decimal(50))
    assert deposit_event(engagement, billing_start=BILLING_START) is None
    assert subtotals(engagement, datetime(2024, 4, 1, tzinfo=UTC)) == [("won", Decimal("4000.01"))]


def test_a_deposit_won_before_billing_start_is_not_invoiced_but_still_deducted() -> None:
    """A deposit of a deal won before billing_start was billed by other means; the later invoice still deducts it."""
    accepted = datetime(2024, 4, 2, 9, tzinfo=UTC)
    engagement = make_fixed(bill_on="accepted", deposit_percent=Decimal(30), accepted_at=accepted)
    late_start = WON_AT + timedelta(seconds=1)
    assert deposit_event(engagement, billing_start=late_start) is None
    event = accepted_event(engagement, billing_start=late_start)
    assert event is not None
    draft = draft_for_event(event, engagement, make_client(), issue_date=date(2024, 4, 2))
    assert draft.subtotal() == Decimal("2800.01")


@pytest.mark.parametrize("percent", ["0", "-5", "100.01"])
def test_a_deposit_percentage_out_of_range_is_refused(percent: str) -> None:
    """A deposit percentage outside (0, 100] is refused, naming the field."""
    engagement = make_fixed(bill_on="accepted", deposit_percent=Decimal(percent))
    with pytest.raises(ValidationFailed, match="deposit_percent"):
        due_events(engagement, as_of=datetime(2024, 4, 1, tzinfo=UTC), timezone="UTC", billing_start=BILLING_START)


cents = st.decimals(min_value=Decimal("0.01"), max_value=Decimal("100000"), places=3)
percents = st.decimals(min_value=Decimal("0.01"), max_value=Decimal(100), places=2)


@settings(max_examples=200, deadline=None)
@given(amounts=st.lists(cents, min_size=1, max_size=6), percent=percents, as_milestones=st.booleans())
def test_deposit_and_later_invoices_add_up_to_the_total(
    amounts: list[Decimal], percent: Decimal, as_milestones: bool
) -> None:
    """Deposit plus the later invoices sum to the engagement's total exactly, to the minor unit, none negative."""
    done = datetime(2024, 4, 1, tzinfo=UTC)
    if as_milestones:
        milestones = tuple(
            Milestone(id=f"m{index}", name=f"Step {index}", amount=amount, done_at=done)
            for index, amount in enumerate(amounts)
        )
        engagement = milestone_project(deposit_percent=percent, milestones=milestones)
        total = sum((round_money(amount, "USD") for amount in amounts), Decimal(0))
    else:
        lines = tuple(
            InvoiceLine(description=f"Item {index}", quantity=Decimal(1), unit_price=amount)
            for index, amount in enumerate(amounts)
        )
        engagement = make_fixed(bill_on="accepted", accepted_at=done, deposit_percent=percent, lines=lines)
        total = sum((line.amount("USD") for line in lines), Decimal(0))
    billed = subtotals(engagement, done)
    later = [occurrence for occurrence, _ in billed if occurrence != "deposit"]
    assert len(billed) - len(later) <= 1
    assert len(later) == (len(amounts) if as_milestones else 1)
    assert all(amount >= 0 for _, amount in billed)
    assert sum((amount for _, amount in billed), Decimal(0)) == total


def monthly_retainer(**changes: object) -> Engagement:
    """A $1,000 monthly retainer billed in advance on the 1st, starting April 1 2024."""
    values: dict[str, object] = {
        "type": EngagementType.RETAINER,
        "lines": (),
        "amount": Decimal(1000),
        "cycle": "monthly",
        "anchor_day": 1,
        "start": date(2024, 4, 1),
    }
    values.update(changes)
    return make_fixed(**values)


def test_a_period_due_before_the_win_is_invoiced_when_won() -> None:
    """A retainer whose first period started before the win invoices that period at the win, with no setting."""
    engagement = monthly_retainer(start=date(2024, 3, 1))
    events = due_events(engagement, as_of=WON_AT, timezone="UTC", billing_start=BILLING_START)
    assert [(event.occurrence, event.occurred_at) for event in events] == [("2024-03-01", WON_AT)]


@pytest.mark.parametrize(
    ("on_won", "first_at"),
    [(False, datetime(2024, 4, 1, tzinfo=UTC)), (True, WON_AT)],
)
def test_first_period_on_won_invoices_a_later_first_period_at_the_win(on_won: bool, first_at: datetime) -> None:
    """With first_period_on_won, the first period of service starting after the win is invoiced at the win; later ones on their date."""
    engagement = monthly_retainer(first_period_on_won=on_won)
    as_of = datetime(2024, 5, 1, tzinfo=UTC)
    events = due_events(engagement, as_of=as_of, timezone="UTC", billing_start=BILLING_START)
    assert [(event.occurrence, event.occurred_at) for event in events] == [
        ("2024-04-01", first_at),
        ("2024-05-01", as_of),
    ]
    draft = draft_for_event(events[0], engagement, make_client(), issue_date=date(2024, 3, 5))
    assert draft.subtotal() == Decimal("1000.00")
    arrears = monthly_retainer(first_period_on_won=on_won, billing_timing="arrears")
    late = due_events(arrears, as_of=as_of, timezone="UTC", billing_start=BILLING_START)
    assert [(event.occurrence, event.occurred_at) for event in late] == [("2024-04-01", as_of)]


# ---------------------------------------------------------------------------
# Line kinds and ledger codes
# ---------------------------------------------------------------------------


def kinds_due(engagement: Engagement, as_of: datetime) -> list[tuple[str, tuple[str, ...]]]:
    """Every due event's occurrence with its draft's kind and line kinds."""
    events = due_events(engagement, as_of=as_of, timezone="UTC", billing_start=BILLING_START)
    drafts = [draft_for_event(event, engagement, make_client(), issue_date=date(2024, 5, 1)) for event in events]
    return [
        (f"{draft.kind}:{event.occurrence}", tuple(line.kind for line in draft.lines))
        for event, draft in zip(events, drafts, strict=True)
    ]


def test_each_generator_names_the_kind_of_line_it_makes() -> None:
    """Periods, prorations, upgrades, credits, deposits, deductions, milestones and hours carry their kind."""
    retainer = monthly_retainer(
        start=date(2024, 4, 10),
        cancel_date=date(2024, 5, 20),
        cancelled_at=datetime(2024, 5, 10, tzinfo=UTC),
        amount_changes=(
            AmountChange(
                version="v2",
                effective=date(2024, 5, 15),
                amount=Decimal(2000),
                recorded_at=datetime(2024, 5, 5, tzinfo=UTC),
            ),
        ),
    )
    assert kinds_due(retainer, datetime(2024, 5, 31, tzinfo=UTC)) == [
        ("invoice:2024-04-01", ("proration",)),
        ("invoice:2024-05-01", ("period",)),
        ("invoice:change:v2", ("adjustment",)),
        ("credit_note:cancel:2024-05-20", ("credit",)),
    ]
    accepted = datetime(2024, 4, 2, 9, tzinfo=UTC)
    fixed = make_fixed(bill_on="accepted", deposit_percent=Decimal(30), accepted_at=accepted)
    assert kinds_due(fixed, accepted) == [
        ("invoice:deposit", ("deposit",)),
        ("invoice:accepted", ("item", "item", "deduction")),
    ]
    done = datetime(2024, 4, 5, tzinfo=UTC)
    milestones = milestone_project(milestones=(Milestone(id="m1", name="Design", amount=Decimal(500), done_at=done),))
    assert kinds_due(milestones, done)[-1] == ("invoice:m1", ("milestone",))
    engagement = hourly()
    found = hours_draft(
        april_event(engagement), engagement, make_client(), [entry("e1", 3, "2")], invoiced=(), options=OPTIONS
    )
    assert found is not None
    assert [line.kind for line in found.draft.lines] == ["hours"]


RULES = LedgerRules(
    accounts=CodeRule(default="200", by_line_kind={"deposit": "210"}, by_engagement_type={"retainer": "220"}),
    tax_types=CodeRule(by_engagement_type={"retainer": "OUTPUT"}),
    client_places={"account_code": "mappings/x.toml:12 [client].account_code"},
)


def coded(
    lines: tuple[InvoiceLine, ...], engagement_type: EngagementType, client: Client | None = None
) -> list[tuple[str | None, str | None]]:
    draft = InvoiceDraft(
        key="k",
        client=client or make_client(),
        engagement_key="hubspot:deal:1",
        engagement_type=engagement_type,
        currency="USD",
        issue_date=date(2024, 5, 1),
        due_date=date(2024, 5, 15),
        lines=lines,
    )
    return [(line.account_code, line.tax_type) for line in with_ledger_codes(draft, RULES).lines]


def line(kind: str = "item", **changes: object) -> InvoiceLine:
    values: dict[str, object] = {"description": "x", "quantity": Decimal(1), "unit_price": Decimal(1), "kind": kind}
    values.update(changes)
    return InvoiceLine.model_validate(values)


def test_ledger_codes_resolve_line_then_client_then_kind_then_engagement_type_then_default() -> None:
    """The most specific code wins; a tax type that resolves to nothing stays unset."""
    own = line(account_code="400", tax_type="NONE")
    assert coded((own, line("deposit"), line("period")), EngagementType.RETAINER) == [
        ("400", "NONE"),
        ("210", "OUTPUT"),
        ("220", "OUTPUT"),
    ]
    assert coded((line("hours"),), EngagementType.HOURLY) == [("200", None)]
    client = make_client(account_code="260", tax_type="EXEMPTOUTPUT")
    assert coded((own, line("deposit"), line("period")), EngagementType.RETAINER, client) == [
        ("400", "NONE"),
        ("260", "EXEMPTOUTPUT"),
        ("260", "EXEMPTOUTPUT"),
    ]


def test_a_client_code_unknown_to_the_ledger_fails_the_record_naming_the_mapping_key() -> None:
    """With the ledger's codes known, a client's own code missing from them is a MappingError at its key."""
    draft = draft_for_event(
        deal_won_event(make_fixed(), billing_start=BILLING_START),  # type: ignore[arg-type]
        make_fixed(),
        make_client(account_code="999"),
        issue_date=date(2024, 4, 1),
    )
    known = {"account_code": frozenset({"200", "260"})}
    with pytest.raises(MappingError) as caught:
        with_ledger_codes(draft, RULES, known=known)
    assert caught.value.place == "mappings/x.toml:12 [client].account_code"
    assert "'999'" in caught.value.message
    assert "it has: 200, 260" in caught.value.message
    assert with_ledger_codes(draft, RULES).lines[0].account_code == "999"
    assert draft.engagement_type is EngagementType.ONE_TIME


def test_the_engagements_tracking_goes_on_every_line_without_its_own() -> None:
    """Lines take the engagement's tracking options unless they carry their own."""
    region = (TrackingOption(name="Region", option="North"),)
    own = (TrackingOption(name="Region", option="South"),)
    engagement = make_fixed(
        tracking=region,
        lines=(line(), line(tracking=own)),
    )
    event = deal_won_event(engagement, billing_start=BILLING_START)
    assert event is not None
    drafted = draft_for_event(event, engagement, make_client(), issue_date=date(2024, 4, 1))
    assert [item.tracking for item in drafted.lines] == [region, own]


CODES = st.sampled_from(["200", "210", "260"])


@settings(max_examples=200, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(list(LINE_KINDS)), min_size=1, max_size=6),
    engagement_type=st.sampled_from(list(EngagementType)),
    own=st.lists(st.one_of(st.none(), CODES), min_size=6, max_size=6),
    by_kind=st.dictionaries(st.sampled_from(list(LINE_KINDS)), CODES),
    by_type=st.dictionaries(st.sampled_from([str(kind) for kind in EngagementType]), CODES),
    client_code=st.one_of(st.none(), CODES),
)
def test_with_ledger_codes_gives_every_line_the_most_specific_code(
    kinds: list[str],
    engagement_type: EngagementType,
    own: list[str | None],
    by_kind: dict[str, str],
    by_type: dict[str, str],
    client_code: str | None,
) -> None:
    """With a default, every line gets a code: its own, else the client's, else by kind, type, default; twice is once."""
    rules = LedgerRules(accounts=CodeRule(default="999", by_line_kind=by_kind, by_engagement_type=by_type))
    lines = tuple(line(kind, account_code=own[index]) for index, kind in enumerate(kinds))
    draft = InvoiceDraft(
        key="k",
        client=make_client(account_code=client_code),
        engagement_key="hubspot:deal:1",
        engagement_type=engagement_type,
        currency="USD",
        issue_date=date(2024, 5, 1),
        due_date=date(2024, 5, 15),
        lines=lines,
    )
    coded_draft = with_ledger_codes(draft, rules)
    for original, result in zip(lines, coded_draft.lines, strict=True):
        expected = (
            original.account_code
            or client_code
            or by_kind.get(original.kind)
            or by_type.get(str(engagement_type))
            or "999"
        )
        assert result.account_code == expected
        assert result.tax_type is None
        assert result.model_copy(update={"account_code": original.account_code}) == original
    assert with_ledger_codes(coded_draft, rules) == coded_draft
