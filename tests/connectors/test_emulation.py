"""The emulators' shared fault plans: seeded, deterministic, off by default, faithful to each fault."""

from __future__ import annotations

from collections import Counter

import httpx
import pytest

from connectors.emulation import (
    DroppedResponse,
    Fault,
    FaultPlan,
    FaultRates,
    HungResponse,
    WebhookFaults,
    WebhookSender,
)
from connectors.xero.emulator import XeroEmulator

ROUTES = [("GET", "/api.xro/2.0/Invoices"), ("PUT", "/api.xro/2.0/Invoices"), ("GET", "/crm/v3/objects/deals/1001")]
RATES = FaultRates(rate_limited=0.1, server_error=0.1, slow=0.05, timeout=0.05, lost_answer=0.1)


def draws(plan: FaultPlan, requests: int = 300) -> list[str | None]:
    taken = [plan.take(*ROUTES[n % len(ROUTES)]) for n in range(requests)]
    return [None if fault is None else f"{fault.kind}:{fault.status}" for fault in taken]


def test_a_plan_is_off_by_default() -> None:
    """No seed and nothing queued: no request gets a fault."""
    assert set(draws(FaultPlan())) == {None}
    assert set(draws(FaultPlan(seed=7))) == {None}  # a seed without rates draws nothing either


def test_the_same_seed_draws_the_same_faults_whatever_the_ids_and_the_interleaving() -> None:
    """A seed replays its faults per route; ids in paths and the order across routes do not matter."""
    one = FaultPlan(seed=42, rates=RATES)
    two = FaultPlan(seed=42, rates=RATES)
    first = [one.take("GET", f"/crm/v3/objects/deals/{1000 + n}") for n in range(50)]
    for _ in range(50):  # another route's calls in between change nothing for this one
        two.take("PUT", "/api.xro/2.0/Invoices")
    second = [two.take("GET", f"/crm/v3/objects/deals/{5000 + n}") for n in range(50)]
    assert [(f.kind, f.status) if f else None for f in first] == [(f.kind, f.status) if f else None for f in second]
    assert draws(FaultPlan(seed=1, rates=RATES)) != draws(FaultPlan(seed=2, rates=RATES))


def test_seeded_faults_come_at_their_rates_and_lost_answers_only_on_writes() -> None:
    """Over many requests each kind shows up at about its share; a read never loses its answer."""
    plan = FaultPlan(seed=3, rates=RATES)
    kinds = Counter(fault.kind if fault else None for fault in (plan.take("GET", "/x") for _ in range(4000)))
    assert "drop_response" not in kinds
    assert 0.04 < kinds["hang"] / 4000 < 0.06
    writes = Counter(fault.kind if fault else None for fault in (plan.take("PUT", "/x") for _ in range(4000)))
    assert 0.07 < writes["drop_response"] / 4000 < 0.13
    assert plan.injected["hang"] == kinds["hang"] + writes["hang"]


def test_the_token_endpoints_are_spared_and_queued_faults_come_first() -> None:
    """Seeded faults never touch the token endpoints; a queued fault is taken before any draw."""
    plan = FaultPlan(seed=5, rates=FaultRates(server_error=1.0))
    assert plan.take("POST", "/connect/token") is None
    assert plan.take("POST", "/oauth/v1/token") is None
    queued = plan.add(Fault(kind="status", status=429, retry_after_s=9))
    assert plan.take("GET", "/x") is queued
    assert plan.take("GET", "/x").status in (500, 502, 503)  # type: ignore[union-attr]


def test_rates_beyond_one_are_refused() -> None:
    """Shares must each lie in 0..1 and sum to at most 1."""
    with pytest.raises(ValueError, match="sum to at most 1"):
        FaultRates(rate_limited=0.6, server_error=0.6)


async def test_hung_and_lost_answers_reach_the_client_as_a_socket_would_give_them() -> None:
    """In process, a hung request is a read timeout (nothing done); a lost answer a protocol error after the commit."""
    xero = XeroEmulator(rate_limits=False)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=xero.app), base_url="http://xero.test") as client:
        xero.faults.add(Fault(kind="hang", latency_s=0.01))
        with pytest.raises(httpx.ReadTimeout):
            await client.post("/connect/token", data={"grant_type": "client_credentials"})
        assert xero.calls["token"] == 0  # never served
        xero.faults.add(Fault(kind="drop_response"))
        with pytest.raises(httpx.RemoteProtocolError):
            await client.post(
                "/connect/token", data={"grant_type": "client_credentials"}, auth=(xero.client_id, xero.client_secret)
            )
        assert xero.calls["token:client_credentials"] == 1  # served, answer lost
    assert issubclass(HungResponse, httpx.TimeoutException)
    assert issubclass(DroppedResponse, httpx.TransportError)


async def test_webhook_faults_duplicate_and_reorder_deliveries_by_seed() -> None:
    """With WebhookFaults, deliveries come more than once and some after the next; the same seed, the same pattern."""
    received: list[bytes] = []

    async def subscriber(request: httpx.Request) -> httpx.Response:
        received.append(request.content)
        return httpx.Response(200 if len(received) % 5 else 503)

    async def run(seed: int) -> list[bytes]:
        received.clear()
        sender = WebhookSender()
        sender.faults = WebhookFaults(seed=seed, duplicate=0.5, reorder=0.3)
        async with httpx.AsyncClient(transport=httpx.MockTransport(subscriber)) as client:
            sender.subscribe("http://syncd.test/webhooks/x", client)
            for n in range(20):
                await sender.send(str(n).encode(), {})
            await sender.flush()
            retried = len(sender.failed)
            assert await sender.retry_failed() <= retried
        return list(received)

    first, again = await run(11), await run(11)
    assert first == again
    assert sorted(set(first), key=int) == [str(n).encode() for n in range(20)]  # nothing lost
    assert len(first) > 20  # some came twice
    order = [int(body) for body in dict.fromkeys(first)]
    assert order != sorted(order)  # some came after a later one
