"""Retention: the daily job that deletes what syncd no longer needs, in bounded batches.

What goes, each after its ``[retention]`` age (:class:`~syncd.plumbing.settings.RetentionSettings`;
``0`` keeps it forever):

* processed inbox events (``events``, status ``done``), by ``received_at``: a vendor
  re-delivering one after that only makes syncd read the record again, and the keys
  create nothing twice (docs/architecture.md, "Invariants");
* finished outbox effects (``effects``, status ``done``) other than invoice creations:
  CRM write-backs, credit allocations and voids, by ``updated_at``;
* scheduler tick rows (``ticks``), by ``started_at``; a window long past is never
  claimed again;
* outcomes (``outcomes``) that need no one any more, by ``created_at``: skips, simulated
  events and resolved attention; an outcome still open for a person stays;
* finished invoice creations (``effects`` of kind ``create_invoice``, status ``done``),
  which hold the payload syncd sent, by ``updated_at``.

The last two are billing records: their ages are at least 13 months or the config is
refused, naming the key (:data:`~syncd.plumbing.settings.MIN_RECORD_MONTHS`).

What stays, whatever the config: billing events and invoices (their keys are what makes
each billing event invoice once: a period whose billing event was deleted would be
billed again), time entries and their invoice stamps, clients and engagements, dead
letters (open or replayed), effects that are pending, dead or simulated (``syncd
backfill`` makes those real) and source records. ``source_records`` holds one row per
record, the newest snapshot, replaced on every read; ``syncd preview --mapping``
compares mappings over it, so it is never pruned, however old.

Each rule deletes ``batch_size`` rows per transaction (``DELETE ... WHERE <key> IN
(SELECT <key> ... ORDER BY <key> LIMIT n)``, the same on SQLite and PostgreSQL) until a
batch comes back short: no transaction holds SQLite's one writer or PostgreSQL's locks
for long, and a replica's workers go on between batches. The job runs at start and then
once a day across replicas (:func:`syncd.engine.scheduler.tick_retention`) and logs one
``retention_pruned`` line with the count per rule.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa
import structlog
from dateutil.relativedelta import relativedelta
from sqlmodel import SQLModel

from syncd.plumbing.settings import RetentionSettings
from syncd.store.db import EffectRow, EventRow, OutcomeRow, Store, TickRow, table_of

log = structlog.get_logger("syncd.store.retention")

CREATE_INVOICE = "create_invoice"  # the effect kind that holds the payload sent (syncd/engine/loop.py)


@dataclass(frozen=True, kw_only=True)
class Rule:
    """One kind of row retention deletes.

    Attributes:
        name: the rule's name in the log line (``events``, ``sent_payloads`` ...).
        model: the table.
        key: the setting that sets its age (``events_days``).
        older: the rows past a cutoff that may go (a SQL condition on the table).
    """

    name: str
    model: type[SQLModel]
    key: str
    older: Callable[[datetime], Any]

    def cutoff(self, settings: RetentionSettings, now: datetime) -> datetime | None:
        """The moment before which rows go; ``None`` when the setting keeps them forever."""
        age = int(getattr(settings, self.key))
        if age == 0:
            return None
        if self.key.endswith("_months"):
            return now - relativedelta(months=age)
        return now - timedelta(days=age)


def _events(cutoff: datetime) -> Any:
    table = table_of(EventRow)
    return sa.and_(table.c.status == "done", table.c.received_at < cutoff)


def _effects(cutoff: datetime) -> Any:
    table = table_of(EffectRow)
    return sa.and_(table.c.status == "done", table.c.kind != CREATE_INVOICE, table.c.updated_at < cutoff)


def _ticks(cutoff: datetime) -> Any:
    return table_of(TickRow).c.started_at < cutoff


def _outcomes(cutoff: datetime) -> Any:
    table = table_of(OutcomeRow)
    needs_someone = sa.and_(table.c.kind == "attention", table.c.status == "open")
    return sa.and_(table.c.created_at < cutoff, sa.not_(needs_someone))


def _sent_payloads(cutoff: datetime) -> Any:
    table = table_of(EffectRow)
    return sa.and_(table.c.status == "done", table.c.kind == CREATE_INVOICE, table.c.updated_at < cutoff)


RULES = (
    Rule(name="events", model=EventRow, key="events_days", older=_events),
    Rule(name="effects", model=EffectRow, key="effects_days", older=_effects),
    Rule(name="ticks", model=TickRow, key="ticks_days", older=_ticks),
    Rule(name="outcomes", model=OutcomeRow, key="outcomes_months", older=_outcomes),
    Rule(name="sent_payloads", model=EffectRow, key="sent_payloads_months", older=_sent_payloads),
)


async def prune(store: Store, settings: RetentionSettings, *, now: datetime) -> dict[str, int]:
    """Delete every row past its age, rule by rule, in batches; how many per rule.

    Args:
        store: the database.
        settings: the ``[retention]`` ages and the batch size.
        now: the moment ages count back from (aware).

    Returns:
        rule name → rows deleted (a rule kept forever is absent).
    """
    pruned: dict[str, int] = {}
    for rule in RULES:
        cutoff = rule.cutoff(settings, now)
        if cutoff is None:
            continue
        pruned[rule.name] = await store.delete_in_batches(rule.model, rule.older(cutoff), batch=settings.batch_size)
    log.info("retention_pruned", **pruned, batch_size=settings.batch_size)
    return pruned
