"""Webhook fuzzing: whatever arrives at ``/webhooks/{connection}``, syncd never answers 500.

Hypothesis draws bodies (event-shaped JSON with fields of every type and size, any JSON,
any bytes) and headers, and posts them to syncd's app three ways: signed correctly as
HubSpot signs (v3, fresh timestamp), signed as Xero signs, and not signed or signed
wrongly. Validly signed deliveries are answered 200 (stored) or 400 (kept as a dead
letter, one per 400); unsigned ones 401; unknown connections 404. Nothing else, and
never 500 (``syncd/web/webhooks.py``).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from pathlib import Path
from typing import Any

import hypothesis.strategies as st
from hypothesis import HealthCheck, given, settings

from connectors.hubspot.webhooks import sign_v3
from syncd.store.db import DeadLetterRow
from tests.faults.conftest import seed_count
from tests.harness import SYNCD_URL, Stack, stack

SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
)
ANY_JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
HUBSPOT_EVENT = st.fixed_dictionaries(
    {},
    optional={
        "eventId": SCALARS,
        "subscriptionId": SCALARS,
        "portalId": SCALARS,
        "appId": SCALARS,
        "occurredAt": st.one_of(SCALARS, st.integers(min_value=0, max_value=2**64)),
        "subscriptionType": st.one_of(
            st.sampled_from(["deal.propertyChange", "deal.creation", "contact.deletion"]), SCALARS
        ),
        "attemptNumber": SCALARS,
        "objectId": st.one_of(SCALARS, st.integers(min_value=-(2**65), max_value=2**65)),
        "propertyName": SCALARS,
        "propertyValue": SCALARS,
        "changeSource": SCALARS,
    },
)
XERO_EVENT = st.fixed_dictionaries(
    {},
    optional={
        "resourceUrl": SCALARS,
        "resourceId": st.one_of(SCALARS, st.uuids().map(str)),
        "tenantId": st.one_of(SCALARS, st.uuids().map(str)),
        "tenantType": SCALARS,
        "eventCategory": st.one_of(st.sampled_from(["INVOICE", "CONTACT", "CREDITNOTE"]), SCALARS),
        "eventType": st.one_of(st.sampled_from(["UPDATE", "CREATE"]), SCALARS),
        "eventDateUtc": SCALARS,
    },
)


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


BODIES = st.one_of(
    st.lists(HUBSPOT_EVENT, max_size=5).map(_json),
    st.fixed_dictionaries(
        {"events": st.lists(XERO_EVENT, max_size=5)},
        optional={"lastEventSequence": SCALARS, "firstEventSequence": SCALARS, "entropy": SCALARS},
    ).map(_json),
    ANY_JSON.map(_json),
    st.binary(max_size=300),
)
HEADERS = st.dictionaries(
    st.sampled_from(
        ["x-hubspot-signature-v3", "x-hubspot-request-timestamp", "x-xero-signature", "content-type", "x-other"]
    ),
    st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=60),
    max_size=4,
)


async def post(s: Stack, path: str, body: bytes, headers: dict[str, str]) -> int:
    return (await s.web.post(path, content=body, headers=headers)).status_code


async def signed_hubspot(s: Stack, body: bytes) -> int:
    timestamp = str(int(time.time() * 1000))
    url = f"{SYNCD_URL}/webhooks/hubspot"
    signature = sign_v3(s.hub.client_secret, method="POST", uri=url, body=body, timestamp=timestamp)
    headers = {
        "x-hubspot-signature-v3": signature,
        "x-hubspot-request-timestamp": timestamp,
        "content-type": "application/json",
    }
    return await post(s, "/webhooks/hubspot", body, headers)


async def signed_xero(s: Stack, body: bytes) -> int:
    signature = base64.b64encode(hmac.new(s.xero.webhook_key.encode(), body, hashlib.sha256).digest()).decode()
    return await post(s, "/webhooks/xero", body, {"x-xero-signature": signature, "content-type": "application/json"})


def test_no_webhook_body_or_header_is_answered_500(tmp_path: Path, sqlite_url: str) -> None:
    """Signed, unsigned and misrouted deliveries of any shape: 200, 400 (with a dead letter), 401 or 404, never 500."""
    seen: dict[str, set[int]] = {"hubspot": set(), "xero": set(), "unsigned": set(), "unknown": set()}
    with asyncio.Runner() as runner:
        running = stack(tmp_path, sqlite_url)
        s = runner.run(running.__aenter__())
        try:

            async def dead_letters() -> int:
                return await s.daemon.runtime.store.count(DeadLetterRow)

            @settings(max_examples=60 * seed_count(), suppress_health_check=[HealthCheck.too_slow], deadline=None)
            @given(body=BODIES, headers=HEADERS, target=st.sampled_from(sorted(seen)), name=st.text(max_size=20))
            def example(body: bytes, headers: dict[str, str], target: str, name: str) -> None:
                before = runner.run(dead_letters())
                if target == "hubspot":
                    status = runner.run(signed_hubspot(s, body))
                    allowed = {200, 400}
                elif target == "xero":
                    status = runner.run(signed_xero(s, body))
                    allowed = {200, 400}
                elif target == "unsigned":
                    connection = "hubspot" if len(body) % 2 else "xero"
                    status = runner.run(post(s, f"/webhooks/{connection}", body, headers))
                    allowed = {401, 400}
                else:
                    status = runner.run(post(s, f"/webhooks/nope-{name.encode().hex()}", body, headers))
                    allowed = {404}
                seen[target].add(status)
                assert status in allowed, f"{target}: answered {status}"
                assert runner.run(dead_letters()) - before == (1 if status == 400 else 0)

            example()
        finally:
            runner.run(running.__aexit__(None, None, None))
    assert {200, 400} <= seen["hubspot"] | seen["xero"]  # both kinds of answer were reached
