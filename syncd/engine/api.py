"""The small engine API that workflows call (recurring billing, hours, credits).

Workflows depend on this protocol, never on the engine module: the engine drives a
workflow and the workflow queues its results through these methods, so imports run one
way (see docs/architecture.md).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from syncd.core.billing import ManualCredit
    from syncd.core.interfaces import BillingEvent, Client, Engagement, InvoiceDraft
    from syncd.engine.runtime import Pipeline, Runtime
    from syncd.store.db import Connection


class BillingQueue(Protocol):
    """What a workflow may ask of the engine: record events and outcomes, queue invoices."""

    @property
    def rt(self) -> Runtime:
        """The runtime (store, clock, connections, pipelines)."""
        ...

    def notify(self) -> None:
        """Wake a worker: rows were queued in a transaction the workflow committed itself."""
        ...

    async def record_event(self, event: BillingEvent, client_key: str, *, conn: Connection | None = None) -> str | None:
        """Record a billing event that invoices nothing (the key if new), in ``conn`` if given."""
        ...

    async def record_outcome(
        self, *, key: str, kind: str, reason: str, detail: str, conn: Any = None, **ctx: Any
    ) -> bool:
        """Record how a trigger ended without an invoice (whether it was new)."""
        ...

    async def surface_credit(
        self, pipeline: Pipeline, credit: ManualCredit, *, conn: Connection | None = None
    ) -> str | None:
        """Record a credit the ledger cannot issue, as a dead letter (the key if new), in ``conn`` if given."""
        ...

    async def queue_invoice(
        self,
        pipeline: Pipeline,
        event: BillingEvent,
        engagement: Engagement,
        client: Client,
        crm_object_id: str,
        *,
        conn: Connection | None = None,
    ) -> str | None:
        """Draft and queue the invoice for a billing event (the key if new), in ``conn`` if given."""
        ...

    async def queue_draft(
        self,
        pipeline: Pipeline,
        event: BillingEvent,
        draft: InvoiceDraft,
        crm_object_id: str,
        *,
        on_recorded: Callable[[Connection], Awaitable[None]] | None = None,
        conn: Connection | None = None,
    ) -> str | None:
        """Queue a draft built by the workflow (the key if new), in ``conn`` if given."""
        ...
