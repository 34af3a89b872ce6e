"""HubSpot payloads as pydantic models, parsed at the edge of the connector.

Field names follow the official ``hubspot-api-client`` SDK models (generated from
HubSpot's OpenAPI specs), e.g. ``hubspot/crm/deals/models/simple_public_object_with_associations.py``
and ``hubspot/crm/associations/v4/models/multi_associated_object_with_label.py``.
HubSpot adds fields over time, so every model ignores unknown keys.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from syncd.core.errors import FatalError


class Wire(BaseModel):
    """Base of every HubSpot payload model: frozen, unknown keys ignored."""

    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True)


class NextPage(Wire):
    """``paging.next``: the cursor for the following page."""

    after: str


class Paging(Wire):
    """``paging`` of a list, search or associations response."""

    next: NextPage | None = None


class AssociatedId(Wire):
    """One entry of a v3 ``associations.<type>.results`` list (``{"id", "type"}``)."""

    id: str
    type: str


class AssociationCollection(Wire):
    """A v3 ``associations.<type>`` block embedded in an object read."""

    results: tuple[AssociatedId, ...] = ()
    paging: Paging | None = None


class ValueWithTimestamp(Wire):
    """One past value of a property (``propertiesWithHistory``; the SDK's ``ValueWithTimestamp``)."""

    value: str | None = None
    timestamp: AwareDatetime
    source_type: str | None = Field(default=None, alias="sourceType")


class CrmObject(Wire):
    """A CRM record (``SimplePublicObject``/``SimplePublicObjectWithAssociations``).

    Property values are strings (or ``null``), as HubSpot returns them.
    """

    id: str
    properties: dict[str, str | None]
    created_at: AwareDatetime = Field(alias="createdAt")
    updated_at: AwareDatetime = Field(alias="updatedAt")
    archived: bool = False
    associations: dict[str, AssociationCollection] = {}
    properties_with_history: dict[str, list[ValueWithTimestamp]] = Field(default={}, alias="propertiesWithHistory")

    def entered_current(self, name: str) -> AwareDatetime | None:
        """When ``name`` took its current value: the newest history entry, if it holds that value."""
        history = self.properties_with_history.get(name) or []
        newest = max(history, key=lambda entry: entry.timestamp, default=None)
        if newest is None or (newest.value or None) != (self.properties.get(name) or None):
            return None
        return newest.timestamp

    def as_data(self) -> dict[str, object]:
        """The record in syncd's nested shape (wire strings kept as they came)."""
        return {
            "id": self.id,
            "properties": dict(self.properties),
            "createdAt": _iso(self.created_at),
            "updatedAt": _iso(self.updated_at),
            "archived": self.archived,
        }


class ObjectPage(Wire):
    """``GET /crm/v3/objects/{type}``: one page of records."""

    results: tuple[CrmObject, ...] = ()
    paging: Paging | None = None


class SearchPage(Wire):
    """``POST /crm/v3/objects/{type}/search``: one page with the total count."""

    total: int = 0
    results: tuple[CrmObject, ...] = ()
    paging: Paging | None = None


class BatchRead(Wire):
    """``POST /crm/v3/objects/{type}/batch/read``: records found (207 lists misses in ``errors``)."""

    results: tuple[CrmObject, ...] = ()


class AssociationType(Wire):
    """v4 ``associationTypes[]`` entry: ``category``, ``typeId`` and ``label`` (``Primary`` ...)."""

    category: str
    type_id: int = Field(alias="typeId")
    label: str | None = None


class AssociatedObject(Wire):
    """v4 ``results[]`` entry: the associated record and every type/label linking it."""

    to_object_id: int = Field(alias="toObjectId")
    association_types: tuple[AssociationType, ...] = Field(default=(), alias="associationTypes")

    def labels(self) -> list[str]:
        """The non-empty labels of this association (``Primary``, ``Billing contact`` ...)."""
        return [kind.label for kind in self.association_types if kind.label]


class AssociationPage(Wire):
    """``GET /crm/v4/objects/{from}/{id}/associations/{to}``: one page."""

    results: tuple[AssociatedObject, ...] = ()
    paging: Paging | None = None


class PublicObjectId(Wire):
    """``{"id": ...}``: the record an association batch result is from (the SDK's ``PublicObjectId``)."""

    id: str


class AssociationBatchResult(Wire):
    """One ``results[]`` entry of ``POST /crm/v4/associations/{from}/{to}/batch/read``.

    The SDK's ``PublicAssociationMultiWithLabel`` (hubspot-api-client,
    crm/associations/v4/models/public_association_multi_with_label.py): ``from``, ``to``
    (``MultiAssociatedObjectWithLabel``) and ``paging`` when that record has more.
    """

    from_object: PublicObjectId = Field(alias="from")
    to: tuple[AssociatedObject, ...] = ()
    paging: Paging | None = None


class AssociationBatch(Wire):
    """``POST /crm/v4/associations/{from}/{to}/batch/read`` (200, or 207 with ``errors``).

    A record without associations of that type is not in ``results`` but in ``errors``
    (``NO_ASSOCIATIONS_FOUND``); the SDK's ``BatchResponsePublicAssociationMultiWithLabel``
    and ``...WithErrors``.
    """

    results: tuple[AssociationBatchResult, ...] = ()


class PropertyDefinition(Wire):
    """A property definition from ``GET /crm/v3/properties/{objectType}`` (name is enough here)."""

    name: str
    type: str = ""
    group_name: str = Field(default="", alias="groupName")


class PropertyList(Wire):
    """``GET /crm/v3/properties/{objectType}``."""

    results: tuple[PropertyDefinition, ...] = ()


class TokenResponse(Wire):
    """``POST /oauth/v3/token`` answer (refresh grant)."""

    access_token: str
    refresh_token: str | None = None
    expires_in: int
    token_type: str = "bearer"  # noqa: S105 - the token kind, not a secret


class ErrorDetail(Wire):
    """One entry of an error body's ``errors`` (``message``, ``context``)."""

    message: str = ""
    context: dict[str, Any] = Field(default_factory=dict)


class ErrorBody(Wire):
    """HubSpot's error answer: ``status``, ``message``, ``category``, ``errors[]``.

    A token without a scope an endpoint needs is answered 403 with category
    ``MISSING_SCOPES`` and the scopes in ``errors[].context.requiredGranularScopes``
    (HubSpot links https://developers.hubspot.com/scopes from that message; the body
    shape as HubSpot sends it is quoted in the HubSpot Community threads on 403
    MISSING_SCOPES).
    """

    message: str = ""
    category: str = ""
    errors: tuple[ErrorDetail, ...] = ()

    def messages(self) -> list[str]:
        """The top-level message, then each detail's, without repeats."""
        found = [self.message, *(detail.message for detail in self.errors)]
        return list(dict.fromkeys(text for text in found if text))

    def missing_scopes(self) -> list[str]:
        """The scopes a ``MISSING_SCOPES`` answer names."""
        scopes: list[str] = []
        for detail in self.errors:
            named = detail.context.get("requiredGranularScopes")
            scopes += [str(scope) for scope in named] if isinstance(named, list) else []
        return list(dict.fromkeys(scopes))


class WebhookEvent(Wire):
    """One event of a webhook delivery body (a JSON array of these).

    Fields per HubSpot's webhooks guide; ``eventId`` is documented as *not guaranteed
    to be unique*, so the dedupe key is built from several fields (see ``webhooks.py``).
    """

    event_id: int = Field(alias="eventId")
    subscription_id: int = Field(alias="subscriptionId")
    portal_id: int | None = Field(default=None, alias="portalId")
    occurred_at: int = Field(alias="occurredAt")
    subscription_type: str = Field(alias="subscriptionType")
    attempt_number: int = Field(default=0, alias="attemptNumber")
    object_id: int = Field(alias="objectId")
    object_type_id: str | None = Field(default=None, alias="objectTypeId")
    property_name: str | None = Field(default=None, alias="propertyName")
    property_value: str | None = Field(default=None, alias="propertyValue")
    change_source: str | None = Field(default=None, alias="changeSource")


class PollCursor(Wire):
    """The opaque ``poll_changes`` cursor: the window's lower bound and the page in it.

    Attributes:
        gte_ms: ``hs_lastmodifieddate`` lower bound (epoch ms, inclusive).
        after: the search ``after`` offset inside the current window, if paging.
    """

    v: int = 1
    gte_ms: int
    after: str | None = None

    def dump(self) -> str:
        """The cursor as the opaque string handed to the engine."""
        return self.model_dump_json()

    @classmethod
    def load(cls, text: str, *, connection: str) -> PollCursor:
        """Parse a cursor string produced by :meth:`dump`.

        Raises:
            FatalError: the stored cursor is not one of ours (reset it to resume).
        """
        try:
            return cls.model_validate(json.loads(text))
        except (ValueError, ValidationError) as exc:
            raise FatalError(
                f"{connection}: unreadable HubSpot poll cursor; reset the connection's cursor to poll from now"
            ) from exc


def _iso(moment: datetime) -> str:
    """HubSpot's timestamp format: ISO 8601 in UTC with milliseconds and ``Z``."""
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_ms(moment: datetime) -> str:
    """Format an aware datetime the way HubSpot does (``2024-09-13T20:23:03.333Z``)."""
    return _iso(moment)


def epoch_ms(moment: datetime) -> int:
    """Milliseconds since the epoch for an aware datetime."""
    return int(moment.timestamp() * 1000)


def parse_hubspot_time(value: str) -> datetime:
    """Parse a HubSpot time value: ISO 8601 (``...Z``) or epoch milliseconds.

    HubSpot accepts and may return either form (properties guide,
    https://developers.hubspot.com/docs/api-reference/legacy/crm/properties/guide).

    Raises:
        ValueError: neither form.
    """
    text = value.strip()
    if text.isdigit():
        return datetime.fromtimestamp(int(text) / 1000, tz=UTC)
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)
