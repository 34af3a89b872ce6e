"""HubSpot webhook verification (v3 signatures) and parsing into change hints.

The v3 scheme, per https://developers.hubspot.com/docs/api-reference/legacy/webhooks/validating-requests
(legacy apps) and https://developers.hubspot.com/docs/apps/developer-platform/build-apps/authentication/request-validation:

* ``X-HubSpot-Signature-v3`` is base64(HMAC-SHA256(app client secret,
  method + URI + body + timestamp)), UTF-8 encoded;
* ``X-HubSpot-Request-Timestamp`` is epoch milliseconds; reject anything older than
  5 minutes;
* before signing, the URI has a fixed set of percent-encoded characters decoded
  (``%3A`` ``%2F`` ``%3F`` ``%40`` ``%21`` ``%24`` ``%27`` ``%28`` ``%29`` ``%2A``
  ``%2C`` ``%3B``). The table itself could not be read from the docs page here; the
  list is the one reproduced by several independent implementations that cite it
  (e.g. chiragchadha1/hubspot-oauth-generator ``hubspot-signature.js``).
* the introduction of v3: https://developers.hubspot.com/changelog/introducing-version-3-of-webhook-signatures

Everything a delivery carries is bounded before it is used: the timestamp is 1-16 ASCII
digits (compared as integers, never converted to a date first), the body is parsed with
nesting errors caught, and each event is validated by :class:`SignedEvent` (64-bit ids,
occurrence times a datetime can hold, a documented subscription type). An out-of-bounds
field is a :class:`~syncd.core.errors.RecordError` naming it, never a crash.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Callable, Sequence
from datetime import UTC, datetime, timedelta

from pydantic import Field, ValidationError, field_validator

from connectors.hubspot.models import WebhookEvent
from syncd.core.errors import AuthError, RecordError
from syncd.core.interfaces import ChangeHint, WebhookRequest

SIGNATURE_HEADER = "x-hubspot-signature-v3"
TIMESTAMP_HEADER = "x-hubspot-request-timestamp"
MAX_AGE = timedelta(minutes=5)
_MAX_AGE_MS = int(MAX_AGE.total_seconds() * 1000)
# 1-16 ASCII digits: epoch ms up to year 318857, far past any real clock, and an int
# compare cannot overflow. ``str.isdigit`` is not enough: it accepts "²" and 400 digits.
_TIMESTAMP = re.compile(r"[0-9]{1,16}")

# HubSpot ids are int64 ("integer formatted as int64" in the webhooks API reference,
# https://developers.hubspot.com/docs/api-reference/latest/webhooks-journal/subscriptions/create-subscription).
_INT64_MAX = 2**63 - 1
# The last millisecond a ``datetime`` can hold (9999-12-31T23:59:59.999Z).
_MAX_EPOCH_MS = 253_402_300_799_999

# The subscription types HubSpot documents for webhook subscriptions (``eventType`` enum of
# https://developers.hubspot.com/docs/api-reference/latest/webhooks/subscriptions/create-webhook-appId);
# generic ``object.*`` types per https://developers.hubspot.com/docs/api/webhooks.
_CRM_OBJECTS = ("company", "contact", "deal", "line_item", "product", "ticket", "object")
_CRM_CHANGES = ("associationChange", "creation", "deletion", "merge", "propertyChange", "restore")
SUBSCRIPTION_TYPES = frozenset(
    [f"{kind}.{change}" for kind in _CRM_OBJECTS for change in _CRM_CHANGES]
    + ["contact.privacyDeletion", "event.completed"]
    + [f"conversation.{c}" for c in ("creation", "deletion", "newMessage", "privacyDeletion", "propertyChange")]
)

_DECODED = {
    "3A": ":",
    "2F": "/",
    "3F": "?",
    "40": "@",
    "21": "!",
    "24": "$",
    "27": "'",
    "28": "(",
    "29": ")",
    "2A": "*",
    "2C": ",",
    "3B": ";",
}
_ENCODED = re.compile(r"%(3A|2F|3F|40|21|24|27|28|29|2A|2C|3B)", re.IGNORECASE)

# Generic ``object.*`` subscriptions name the object in ``objectTypeId``; ids per
# https://developers.hubspot.com/docs/api-reference/legacy/crm/understanding-the-crm
_OBJECT_TYPE_IDS = {"0-1": "contact", "0-2": "company", "0-3": "deal", "0-8": "line_item"}


def decode_uri(uri: str) -> str:
    """Decode the characters HubSpot decodes before signing a URI (one pass, no double decoding)."""
    return _ENCODED.sub(lambda match: _DECODED[match.group(1).upper()], uri)


def sign_v3(secret: str, *, method: str, uri: str, body: bytes, timestamp: str) -> str:
    """The ``X-HubSpot-Signature-v3`` value for a request (also used by the emulator)."""
    source = method.upper().encode() + decode_uri(uri).encode() + body + timestamp.encode()
    digest = hmac.new(secret.encode(), source, hashlib.sha256).digest()
    return base64.b64encode(digest).decode()


class HubSpotWebhookVerifier:
    """Verifies HubSpot v3-signed deliveries and turns their events into change hints.

    Args:
        connection: connection name stamped on the hints.
        secret: the app's client secret (the HMAC key).
        clock: current aware UTC time.
    """

    def __init__(self, *, connection: str, secret: str, clock: Callable[[], datetime]) -> None:
        self._connection = connection
        self._secret = secret
        self._clock = clock

    def verify(self, request: WebhookRequest) -> list[ChangeHint]:
        """Check the signature and freshness, then parse the events.

        Raises:
            AuthError: a signature header is missing, malformed, stale or wrong.
            RecordError: the body is correctly signed but is not a list of events.
        """
        signature = request.headers.get(SIGNATURE_HEADER)
        if not signature:
            raise AuthError("hubspot webhook: missing X-HubSpot-Signature-v3 header")
        timestamp = request.headers.get(TIMESTAMP_HEADER)
        if not timestamp:
            raise AuthError("hubspot webhook: missing X-HubSpot-Request-Timestamp header")
        self._check_fresh(timestamp)
        expected = sign_v3(self._secret, method=request.method, uri=request.url, body=request.body, timestamp=timestamp)
        if not hmac.compare_digest(expected.encode(), signature.encode()):
            raise AuthError("hubspot webhook: X-HubSpot-Signature-v3 header does not match the request")
        return [self._hint(event) for event in _events(request.body)]

    def _check_fresh(self, timestamp: str) -> None:
        if not _TIMESTAMP.fullmatch(timestamp.strip()):
            raise AuthError("hubspot webhook: X-HubSpot-Request-Timestamp header is not epoch milliseconds")
        age_ms = int(self._clock().timestamp() * 1000) - int(timestamp.strip())
        if age_ms > _MAX_AGE_MS:
            raise AuthError("hubspot webhook: X-HubSpot-Request-Timestamp header is older than 5 minutes")
        if -age_ms > _MAX_AGE_MS:
            raise AuthError("hubspot webhook: X-HubSpot-Request-Timestamp header is more than 5 minutes ahead")

    def _hint(self, event: SignedEvent) -> ChangeHint:
        return ChangeHint(
            connection=self._connection,
            object_type=object_type(event),
            object_id=str(event.object_id),
            event_id=event_key(event),
            occurred_at=datetime.fromtimestamp(event.occurred_at / 1000, tz=UTC),
            kind=event.subscription_type,
        )


def object_type(event: WebhookEvent) -> str:
    """Canonical object type of an event: ``deal.*`` → ``deal``; ``object.*`` by ``objectTypeId``."""
    prefix = event.subscription_type.split(".", 1)[0]
    if prefix == "object" and event.object_type_id:
        return _OBJECT_TYPE_IDS.get(event.object_type_id, event.object_type_id)
    return prefix


def event_key(event: WebhookEvent) -> str:
    """Dedupe key of an event.

    HubSpot documents ``eventId`` as "not guaranteed to be unique"
    (https://developers.hubspot.com/docs/apps/legacy-apps/public-apps/create-generic-webhook-subscriptions),
    so the key combines it with the subscription, the object and the occurrence time.
    ``attemptNumber`` is left out on purpose: a retry of the same event keeps its key.
    """
    return f"{event.subscription_id}:{event.event_id}:{event.object_id}:{event.occurred_at}"


class SignedEvent(WebhookEvent):
    """A delivered event with every field bounded before it reaches the inbox.

    Ids are non-negative int64, ``occurredAt`` is epoch ms a ``datetime`` can hold,
    ``subscriptionType`` is one HubSpot documents (:data:`SUBSCRIPTION_TYPES`) and the
    strings are short: a 400-digit id or an invented type is refused, not stored.
    """

    event_id: int = Field(alias="eventId", ge=0, le=_INT64_MAX)
    subscription_id: int = Field(alias="subscriptionId", ge=0, le=_INT64_MAX)
    portal_id: int | None = Field(default=None, alias="portalId", ge=0, le=_INT64_MAX)
    occurred_at: int = Field(alias="occurredAt", ge=0, le=_MAX_EPOCH_MS)
    subscription_type: str = Field(alias="subscriptionType", max_length=64)
    attempt_number: int = Field(default=0, alias="attemptNumber", ge=0, le=1000)
    object_id: int = Field(alias="objectId", ge=0, le=_INT64_MAX)
    # "0-3" for deals, "2-1234567" for custom objects.
    object_type_id: str | None = Field(default=None, alias="objectTypeId", pattern=r"^[0-9]{1,4}-[0-9]{1,12}$")
    property_name: str | None = Field(default=None, alias="propertyName", max_length=256)
    change_source: str | None = Field(default=None, alias="changeSource", max_length=64)

    @field_validator("subscription_type")
    @classmethod
    def _documented(cls, value: str) -> str:
        if value not in SUBSCRIPTION_TYPES:
            raise ValueError(f"unknown subscription type; expected one of {', '.join(sorted(SUBSCRIPTION_TYPES))}")
        return value


def _events(body: bytes) -> Sequence[SignedEvent]:
    try:
        payload = json.loads(body)
    except ValueError as exc:
        raise RecordError("hubspot webhook: body is not JSON", place="body") from exc
    except RecursionError as exc:
        raise RecordError("hubspot webhook: body is nested too deeply to be events", place="body") from exc
    if not isinstance(payload, list):
        raise RecordError("hubspot webhook: body must be a JSON array of events", place="body")
    return [_event(index, item) for index, item in enumerate(payload)]


def _event(index: int, item: object) -> SignedEvent:
    try:
        return SignedEvent.model_validate(item)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"]) or "(event)"
        place = f"body[{index}].{field}"
        raise RecordError(f"hubspot webhook: {place}: {error['msg']}", place=place) from exc
