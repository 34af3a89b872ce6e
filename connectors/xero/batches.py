"""How the Xero connector packs many contacts and documents into few requests.

Pure helpers for :class:`~connectors.xero.connector.XeroConnector`'s batch methods
(:class:`~syncd.core.interfaces.CreatesInvoicesInBatches`): the size and count caps of
one write, the ``Idempotency-Key`` of a batch, the ``where`` filters that OR many
stamps, and how one element of an answer given with ``summarizeErrors=false`` reads.

Sources (Xero developer documentation):

* "A single POST to the Accounting or Payroll APIs has a size limit of 3.5MB. There is no
  limit to the number of elements within a request, provided the overall request size
  does not exceed 3.5MB ... we recommend you look to batch elements in bundles of up to
  50" (https://developer.xero.com/documentation/auth-and-limits/xero-api-limits, Request
  Size Limit). 3.5 MB is read as 3,500,000 bytes, the smaller of the two readings.
* ``summarizeErrors=false``: "If false return 200 OK and mix of successfully created
  objects and any with validation errors" (spec ``components.parameters.summarizeErrors``
  on ``PUT /Invoices``, ``/CreditNotes``, ``/Contacts``); "you'll always receive a HTTP
  200 response even though some of the elements may have failed"
  (https://developer.xero.com/documentation/api/http-response-codes). Each element then
  carries ``StatusAttributeString`` (``OK``/``ERROR``), ``HasErrors`` and
  ``ValidationErrors[].Message`` (spec schemas ``Invoice``, ``CreditNote``, ``Contact``
  and their ``StatusAttributeString: ERROR`` examples).
* ``Idempotency-Key``: "128 character max" (spec ``components.parameters.idempotencyKey``).
* ``where``: ``||``/``OR`` and parentheses, the null check before a string method on an
  optional field (https://developer.xero.com/documentation/api/accounting/requests-and-responses).
  Xero documents no limit on a URL's length; :data:`WHERE_MAX_CHARS` keeps each filter,
  URL-encoded, under 2,048 characters, the smallest default among common servers (IIS
  ``maxQueryString``), leaving room for the request's other parameters.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar
from urllib.parse import quote

from pydantic import Field

from connectors.xero.models import IDEMPOTENCY_KEY_MAX, Payload, XeroValidationMessage

REQUEST_MAX_BYTES = 3_500_000  # Xero's request size limit (module docstring)
BATCH_MAX = 50  # Xero's recommended elements per request (module docstring)
WHERE_MAX_CHARS = 1_800  # one ``where`` filter, URL-encoded (module docstring)
BATCH_KEY_PREFIX = "syncd-batch-"

T = TypeVar("T")


def batch_key(keys: Iterable[str]) -> str:
    """The ``Idempotency-Key`` of a request creating documents stamped with ``keys``.

    A hash of the sorted keys: the same members give the same key, whatever their order,
    so a resent request is replayed by Xero; any other set of members gives another key.
    76 characters, within Xero's 128.
    """
    digest = hashlib.sha256("\n".join(sorted(set(keys))).encode("utf-8")).hexdigest()
    return (BATCH_KEY_PREFIX + digest)[:IDEMPOTENCY_KEY_MAX]


def packed(
    items: Sequence[T], *, size: Callable[[T], int], max_count: int, max_bytes: int, overhead: int = 64
) -> list[list[T]]:
    """``items`` in order, cut into runs of at most ``max_count`` whose sizes sum within ``max_bytes``.

    ``size`` is an item's serialised size; ``overhead`` covers the envelope and separators.
    An item too big on its own still gets a run of its own (Xero then refuses it alone).
    """
    runs: list[list[T]] = []
    run: list[T] = []
    used = overhead
    for item in items:
        weight = size(item) + 1
        if run and (len(run) >= max_count or used + weight > max_bytes):
            runs.append(run)
            run, used = [], overhead
        run.append(item)
        used += weight
    if run:
        runs.append(run)
    return runs


def or_filters(clauses: Sequence[str], *, guard: str = "", max_chars: int = WHERE_MAX_CHARS) -> list[str]:
    """``where`` filters that together match any of ``clauses``, each within ``max_chars`` once URL-encoded.

    ``guard`` (such as ``Reference!=null``) is ANDed in front of each filter. One clause
    gives ``guard&&clause``, exactly the filter of a single look-up; several give
    ``guard&&(a||b||...)``.
    """
    filters: list[str] = []
    run: list[str] = []
    for clause in clauses:
        if run and len(quote(_joined(guard, [*run, clause]), safe="")) > max_chars:
            filters.append(_joined(guard, run))
            run = []
        run.append(clause)
    if run:
        filters.append(_joined(guard, run))
    return filters


def _joined(guard: str, clauses: Sequence[str]) -> str:
    body = clauses[0] if len(clauses) == 1 else "(" + "||".join(clauses) + ")"
    if not guard:
        return "||".join(clauses)
    return f"{guard}&&{body}"


class XeroElementResult(Payload):
    """How one element of a ``summarizeErrors=false`` answer went (spec ``StatusAttributeString``,
    ``HasErrors``, ``ValidationErrors`` on ``Invoice``, ``CreditNote`` and ``Contact``)."""

    status_attribute_string: str | None = Field(None, alias="StatusAttributeString")
    has_errors: bool = Field(False, alias="HasErrors")
    validation_errors: tuple[XeroValidationMessage, ...] = Field((), alias="ValidationErrors")

    @property
    def failed(self) -> bool:
        """Whether Xero refused this element."""
        return self.has_errors or (self.status_attribute_string or "").upper() == "ERROR" or bool(self.messages)

    @property
    def messages(self) -> list[str]:
        """Xero's validation messages for this element, in its words."""
        return [error.message for error in self.validation_errors if error.message]


def elements(data: Any, collection: str) -> list[Mapping[str, Any]]:
    """The raw elements of an answer's ``collection`` (``Invoices``, ``CreditNotes``, ``Contacts``)."""
    rows = data.get(collection) if isinstance(data, Mapping) else None
    return [row for row in rows if isinstance(row, Mapping)] if isinstance(rows, list) else []
