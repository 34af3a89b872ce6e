"""Alerts: what a person should know now, posted to a Slack incoming webhook, grouped by kind.

**What is an alert.** Each kind has one place that records it:

================== ===================================================================
``dead_letter``    a new open dead letter (:meth:`syncd.store.db.Store.dead_letter`)
``attention``      a new outcome that needs a person (:meth:`syncd.store.db.Store.add_outcome`)
``auth_lost``      a connection whose credentials were rejected (:func:`auth_lost`, from
                   the workers and the polls); once per connection and day
``vendor_errors``  a connection whose calls kept failing for ``vendor_errors_after_s``
                   with none succeeding on any replica (:class:`VendorHealth`, a streak
                   shared through the database); once per such streak
``client_conflict`` a conflicting edit of a client's billing record, recorded by
                   :mod:`syncd.engine.clients` through the alert hook
                   (:meth:`syncd.store.db.Store.add_alert`, source ``client``)
``audit_trend``    a rising share the monthly audit flags (:mod:`syncd.engine.audit`,
                   through the same hook, source ``audit``)
``audit_report``   the whole monthly audit report, once per month
                   (:func:`syncd.engine.audit.run_monthly`): a message of its own
                   (:attr:`~syncd.store.db.AlertRow.body`), not a line of a grouped one
================== ===================================================================

The hook's rows (``pending_alerts``) are taken into the queue by the sender as it runs,
each keeping its time.

**Where alerts wait.** In the ``alerts`` table (:class:`~syncd.store.db.AlertRow`), written
in the same transaction as their cause where there is one: a crash between the cause
and its alert cannot lose the alert, a restart sends what was pending, replicas share
one queue, and a delivery that fails leaves them there. A key per alert makes recording
idempotent. Nothing is recorded while ``[alerts] webhook_url`` is unset.

**Sending** (:class:`AlertSender`) is a task of ``syncd run`` of its own: the workers only
insert rows, so a slow or failing receiver never holds up an invoice. Every few seconds
it looks whether a message is due: the oldest pending alert has waited
``group_window_s`` (so those that follow join it), the last message went out at least
``min_interval_s`` ago (an outage sends a summary, not a flood), and no back-off is
running. It then claims every pending alert with a lease (one replica sends), posts
*one* message grouped by kind, then each alert that carries a message of its own (the
monthly audit report), and marks them sent. A failed post (a transport error, a
non-2xx answer) leaves them pending and the next attempt waits 5·2ⁿ seconds up to
``retry_max_s``, or the receiver's ``Retry-After`` on a 429; alerts recorded meanwhile
join that attempt. Sent alerts are kept 30 days.

**The message.** Slack's incoming webhooks take a JSON body with ``text`` (shown in
notifications, and where blocks cannot be) and ``blocks`` (Block Kit)
(https://api.slack.com/messaging/webhooks). A ``header`` block's text is plain text of
at most 150 characters, a ``section``'s text at most 3000, a message at most 50 blocks
(https://api.slack.com/reference/block-kit/blocks); ``&``, ``<`` and ``>`` in text are
escaped as Slack asks (https://api.slack.com/reference/surfaces/formatting#escaping).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, Protocol

import httpx
import sqlalchemy as sa
import structlog

from syncd.plumbing.http import retry_after_s
from syncd.plumbing.settings import AlertSettings, Config
from syncd.store.db import AlertRow, PendingAlertRow, Store, table_of

log = structlog.get_logger("syncd.engine.alerts")

KINDS: dict[str, str] = {
    "dead_letter": "Dead letters",
    "attention": "Needs attention",
    "auth_lost": "Lost authorisation",
    "vendor_errors": "Sustained vendor errors",
    "client_conflict": "Client record conflicts",
    "audit_trend": "Audit trends",
    "audit_report": "Monthly audit",
    "other": "Other alerts",
}
"""Each kind of alert and its heading, in the order a message shows them."""

HOOK_KINDS = {"client": "client_conflict", "audit": "audit_trend"}
"""The kind of an alert recorded through the hook (``pending_alerts.source``); others are ``other``."""
MAX_BATCH = 500  # alerts in one message at most; the rest go in the next one
LINES_PER_KIND = 5  # alerts listed by name per kind; the others are counted
SECTION_MAX = 3000  # characters in a section's text (Block Kit)
HEADER_MAX = 150  # characters in a header's text (Block Kit)
LEASE_S = 120  # a claimed batch is another replica's after this
KEEP_SENT_DAYS = 30
BACKOFF_BASE_S = 5
POLL_S = 5.0


# -- recording ------------------------------------------------------------------------


async def record(
    store: Store,
    *,
    kind: str,
    key: str,
    title: str,
    detail: str,
    now: datetime,
    place: str | None = None,
    connection: str | None = None,
    body: Mapping[str, Any] | None = None,
) -> bool:
    """Queue an alert once per ``key`` (its own transaction); whether it was new.

    With ``body`` (a whole Slack message) the alert is posted alone as that message.

    Raises:
        ValueError: ``kind`` is not one of :data:`KINDS`.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown alert kind {kind!r}; expected one of {', '.join(KINDS)}")
    return await store.queue_alert(
        None, key=key, kind=kind, title=title, detail=detail, now=now, place=place, connection=connection, body=body
    )


async def auth_lost(store: Store, connection: str, error: str, now: datetime) -> bool:
    """A connection's credentials were rejected: one alert per connection and (UTC) day."""
    return await record(
        store,
        kind="auth_lost",
        key=f"auth_lost:{connection}:{now.date().isoformat()}",
        title=connection,
        detail=error,
        now=now,
        place=f"[connections.{connection}]",
        connection=connection,
    )


class VendorHealth:
    """Each connection's failing streak, shared by every replica through the store.

    The workers and the polls report each retriable failure (:meth:`failed`) and each
    success (:meth:`succeeded`); a connection failing for ``after_s`` with nothing
    succeeding in between, on any replica, is one ``vendor_errors`` alert per streak.

    **Why shared, not per process.** With N replicas an outage fails calls on all of
    them: per-process streaks would report it N times (each with its own start), a
    replica whose share of the calls is small might never see ``after_s`` of them, and a
    process restarted more often than ``after_s`` (a crash loop during the outage) would
    never report it at all. So the streak lives in one row per connection
    (``vendor_health``, :meth:`~syncd.store.db.Store.vendor_failed`): a failure is one
    atomic upsert that starts the streak or counts it, and the alert's key is the
    streak's shared start, so every replica records the same alert once.

    **Successes stay cheap.** A success is the hot path (every vendor call), so
    :meth:`succeeded` only notes the time in memory; :meth:`flush` writes it (one
    ``UPDATE`` per connection that had one), from the alert sender's loop every few
    seconds and before this process counts a failure. A success ends a streak that began
    by then; a streak that began after it goes on. A success another replica has not
    flushed yet is unknown to the others for at most that interval
    (:data:`POLL_S`), so a streak can be reported up to that long after a success that
    ended it, never earlier than ``after_s`` after its first failure.

    Nothing is read or written while alerting is off (``[alerts] webhook_url`` unset).

    Args:
        clock: the process's clock (a success is dated by it).
    """

    def __init__(self, clock: Callable[[], datetime] | None = None) -> None:
        self._clock = clock or (lambda: datetime.now(UTC))
        self._succeeded: dict[str, datetime] = {}  # the latest success not yet written, per connection

    def succeeded(self, connection: str) -> None:
        """A call of ``connection`` went through: its streak ends (written by the next :meth:`flush`)."""
        self._succeeded[connection] = self._clock()

    async def flush(self, store: Store) -> int:
        """Write the successes noted since the last flush; how many streaks they ended."""
        noted, self._succeeded = self._succeeded, {}
        if not store.alerting:
            return 0
        ended = 0
        for connection, at in sorted(noted.items()):
            ended += await store.vendor_succeeded(connection, at)
        return ended

    async def failed(self, store: Store, connection: str, error: str, now: datetime, *, after_s: int) -> bool:
        """A retriable failure of ``connection``; whether it made an alert."""
        if not store.alerting:
            return False
        restart = self._succeeded.pop(connection, None) is not None  # this process saw it work since
        since, failures = await store.vendor_failed(connection, error, now, restart=restart)
        if (now - since).total_seconds() < after_s:
            return False
        minutes = int((now - since).total_seconds() // 60)
        return await record(
            store,
            kind="vendor_errors",
            key=f"vendor_errors:{connection}:{since.isoformat()}",
            title=connection,
            detail=f"{failures} failures in {minutes} min, none succeeding; last: {error}",
            now=now,
            place=f"[connections.{connection}]",
            connection=connection,
        )


# -- the message ----------------------------------------------------------------------


def escape(text: str) -> str:
    """Text safe inside Slack ``mrkdwn`` (``&``, ``<``, ``>`` escaped: no mentions or links injected)."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def clip(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, an ellipsis marking the cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def message(alerts: Sequence[AlertRow]) -> dict[str, Any]:
    """One Slack incoming-webhook body for ``alerts``: a header, a section per kind, a hint.

    Each section lists the first :data:`LINES_PER_KIND` alerts of its kind and counts
    the rest, within Block Kit's limits.
    """
    groups = {kind: [row for row in alerts if row.kind == kind] for kind in KINDS}
    groups = {kind: rows for kind, rows in groups.items() if rows}
    summary = "; ".join(f"{KINDS[kind]}: {len(rows)}" for kind, rows in groups.items())
    blocks: list[dict[str, Any]] = [
        {
            "type": "header",
            "text": {"type": "plain_text", "text": clip(f"syncd: {_plural(len(alerts), 'alert')}", HEADER_MAX)},
        }
    ]
    for kind, rows in groups.items():
        lines = [_line(row) for row in rows[:LINES_PER_KIND]]
        if len(rows) > LINES_PER_KIND:
            lines.append(f"… and {len(rows) - LINES_PER_KIND} more")
        text = f"*{KINDS[kind]} ({len(rows)})*\n" + "\n".join(lines)
        blocks.append({"type": "section", "text": {"type": "mrkdwn", "text": clip(text, SECTION_MAX)}})
    hint = "Details: `syncd dead-letters list`, `syncd outcomes list --kind attention`, `syncd status`"
    blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": hint}]})
    return {"text": f"syncd: {summary}", "blocks": blocks}


def _line(row: AlertRow) -> str:
    where = f" ({escape(row.place)})" if row.place else ""
    return f"• *{escape(clip(row.title, 150))}*: {escape(clip(row.detail, 300))}{where}"


# -- sending --------------------------------------------------------------------------


class Process(Protocol):
    """What the sender uses of the process's runtime (:class:`syncd.engine.runtime.Runtime`)."""

    config: Config
    store: Store
    client: httpx.AsyncClient
    owner: str
    health: VendorHealth

    def clock(self) -> datetime:
        """The current aware time."""
        ...


class AlertSender:
    """Posts pending alerts to ``[alerts] webhook_url``, grouped, rate-limited, retried.

    Args:
        runtime: the process's runtime (store, clock, shared HTTP client, settings).
    """

    def __init__(self, runtime: Process) -> None:
        self.rt = runtime
        self.store = runtime.store

    @property
    def settings(self) -> AlertSettings:
        """``[alerts]`` as configured."""
        return self.rt.config.settings.alerts

    async def run(self, stop: asyncio.Event, *, poll_s: float = POLL_S) -> None:
        """Deliver what is due every ``poll_s`` seconds until ``stop`` is set."""
        while not stop.is_set():
            try:
                await self.deliver_due()
            except Exception:  # the database is away, or a bug: alerts never stop the process
                log.exception("alerts_sender_error")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=poll_s)

    async def deliver_due(self) -> int:
        """Send what is due (see the module docstring); how many alerts went out.

        The alerts claimed go out as one grouped message, and each alert that carries a
        message of its own (the monthly audit report, :attr:`AlertRow.body`) as that
        message, in turn. The first post that fails stops the turn: it and the ones not
        tried yet wait the same back-off.
        """
        await self.rt.health.flush(self.store)  # this process's successes end shared streaks
        url = self.settings.webhook_url
        now = self.rt.clock()
        if url is None:
            return 0
        await self._take_hooked(now)
        if not await self._due(now):
            return 0
        rows = await self.store.claim(AlertRow, owner=self.rt.owner, limit=MAX_BATCH, lease_s=LEASE_S, now=now)
        grouped = [row for row in rows if row.body is None]
        posts = ([(message(grouped), grouped)] if grouped else []) + [(row.body, [row]) for row in rows if row.body]
        sent = 0
        for index, (body, batch) in enumerate(posts):
            failure, wait_hint = await self._post(url.get_secret_value(), body)
            if failure is not None:
                await self._back_off([row for _, rest in posts[index:] for row in rest], now, failure, wait_hint)
                return sent
            await self._settle(
                [row.id for row in batch], {"status": "sent", "sent_at": self.rt.clock(), "last_error": None}
            )
            log.info("alerts_sent", alerts=len(batch), kinds=sorted({row.kind for row in batch}))
            sent += len(batch)
        if sent:
            await self._prune(now)
        return sent

    async def _back_off(self, rows: Sequence[AlertRow], now: datetime, failure: str, wait_hint: float | None) -> None:
        """A post failed: ``rows`` stay pending and wait 5·2ⁿ s (or the receiver's Retry-After), at most ``retry_max_s``."""
        attempt = max(row.attempts for row in rows)
        wait = min(float(self.settings.retry_max_s), wait_hint or BACKOFF_BASE_S * 2 ** (attempt - 1))
        await self._settle([row.id for row in rows], {"next_at": now + timedelta(seconds=wait), "last_error": failure})
        log.warning("alerts_delivery_failed", alerts=len(rows), attempt=attempt, wait_s=wait, error=failure)

    async def _take_hooked(self, now: datetime) -> int:
        """Move what other code recorded through the alert hook (``pending_alerts``) into the queue.

        One transaction: each row becomes an alert of its kind (:data:`HOOK_KINDS`) at its
        own time and is marked taken, so none is queued twice or lost.
        """
        rows = await self.store.pending_alerts(limit=MAX_BATCH)
        if not rows:
            return 0
        table = table_of(PendingAlertRow)
        async with self.store.begin() as conn:
            for row in rows:
                await self.store.queue_alert(
                    conn,
                    key=f"hook:{row.key}",
                    kind=HOOK_KINDS.get(row.source, "other"),
                    title=row.title,
                    detail=row.text,
                    now=row.created_at,
                )
            ids = [row.id for row in rows if row.id is not None]
            await conn.execute(
                sa.update(table).where(table.c.id.in_(ids), table.c.sent_at.is_(None)).values(sent_at=now)
            )
        return len(rows)

    async def _due(self, now: datetime) -> bool:
        table = table_of(AlertRow)
        pending = table.c.status == "pending"
        async with self.store.connect() as conn:
            oldest = await conn.scalar(sa.select(sa.func.min(table.c.created_at)).where(pending))
            backing_off = await conn.scalar(
                sa.select(sa.func.count()).where(pending, table.c.attempts > 0, table.c.next_at > now)
            )
            last_sent = await conn.scalar(sa.select(sa.func.max(table.c.sent_at)))
        if oldest is None or backing_off:
            return False
        if _aware(oldest) + timedelta(seconds=self.settings.group_window_s) > now:
            return False
        return last_sent is None or _aware(last_sent) + timedelta(seconds=self.settings.min_interval_s) <= now

    async def _post(self, url: str, body: dict[str, Any]) -> tuple[str | None, float | None]:
        """Post ``body``; ``(None, None)`` on success, else (what failed, the receiver's Retry-After).

        The URL is never part of a message (it is the secret).
        """
        try:
            response = await self.rt.client.post(url, json=body, timeout=self.settings.timeout_s)
        except httpx.TimeoutException:
            return "timed out", None
        except httpx.HTTPError as exc:
            return f"{type(exc).__name__}", None
        if response.is_success:
            return None, None
        wait = retry_after_s(response.headers) if response.status_code == 429 else None
        return f"HTTP {response.status_code}: {response.text[:200]}", wait

    async def _settle(self, ids: Iterable[int | None], values: dict[str, Any]) -> None:
        table = table_of(AlertRow)
        values = {**values, "lease_owner": None, "lease_until": None}
        async with self.store.begin() as conn:
            await conn.execute(
                sa.update(table)
                .where(table.c.id.in_([i for i in ids if i is not None]), table.c.lease_owner == self.rt.owner)
                .values(**values)
            )

    async def _prune(self, now: datetime) -> None:
        table = table_of(AlertRow)
        cutoff = now - timedelta(days=KEEP_SENT_DAYS)
        async with self.store.begin() as conn:
            await conn.execute(sa.delete(table).where(table.c.status == "sent", table.c.sent_at < cutoff))


def _aware(moment: datetime) -> datetime:
    """A stored timestamp as an aware UTC datetime (the store keeps UTC)."""
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
