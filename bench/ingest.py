"""Webhook ingest: acknowledgements per second and their latency (BENCHMARKS.md).

Signed HubSpot deal-won webhooks, each a new event, are posted to syncd's
``/webhooks/hubspot`` by closed-loop clients (1, 16 and 64 of them), on SQLite and on
PostgreSQL; then a paced run at the issue's 200 requests/s checks the latency target.
syncd runs as its receiver alone (``bench.receiver``: ``syncd run`` without workers), so
the number is the acknowledgement path itself: verify the signature, dedupe, store the
event, answer 200. The end-to-end benchmark measures the workers. One more paced run has
the workers running beside the receiver (``syncd run`` as deployed, SQLite): each event is
worked (its deal read from the HubSpot emulator, which does not have these ids, so the
event ends as ``deal_gone``), so the acknowledgements share the process with that work.

Target: p99 ≤ 50 ms at 200 requests/s, receiver alone and with the workers running, and
as many requests per second as the machine allows.

Run alone: ``python -m bench.ingest`` (``--full`` for the long profile).
"""

from __future__ import annotations

import contextlib
import itertools
import time
from collections.abc import Awaitable, Callable

from bench import report, stack
from bench.load import DealWonWebhooks, LoopResult, closed_loop, paced
from bench.report import Latencies, Profile, Row, Target

P99_TARGET = Target(op="<=", limit=50.0)


async def run(profile: Profile) -> list[Row]:
    """Every ingest row of ``profile``: each database, each concurrency, then the paced run."""
    rows: list[Row] = []
    databases = ["sqlite"]
    if profile.postgres:
        if stack.postgres_available():
            databases.append("postgres")
        else:
            rows.append(
                Row(
                    measurement="ingest",
                    setting="postgres",
                    metric="req/s",
                    value=None,
                    note="no PostgreSQL at " + stack.PG_ADMIN,
                )
            )
    for db in databases:
        rows += await _database(profile, db)
    rows += await _with_workers(profile)
    return rows


async def _with_workers(profile: Profile) -> list[Row]:
    """The paced run against ``syncd run`` with its workers (SQLite): acknowledgements beside the work."""
    async with stack.vendors() as bench, stack.syncd(bench, db="sqlite") as syncd:
        hooks = DealWonWebhooks(f"{syncd.url}/webhooks/hubspot", bench.hub.client_secret)
        async with contextlib.aclosing(hooks):
            deal_ids = itertools.count(7_000_000)

            async def work(_n: int) -> float | None:
                return time.perf_counter() if await hooks.send(next(deal_ids)) == 200 else None

            return await _paced(profile, work, f"sqlite paced {profile.paced_rate:.0f}/s, workers running")


async def _paced(profile: Profile, work: Callable[[int], Awaitable[float | None]], setting: str) -> list[Row]:
    """The paced run at ``profile.paced_rate``: its rate and its acknowledgement latencies (the p99 target)."""
    result = await paced(
        rate=profile.paced_rate, duration_s=profile.ingest_s, warmup_s=profile.ingest_warmup_s, work=work
    )
    return [
        Row(
            measurement="ingest",
            setting=setting,
            metric="req/s",
            value=result.per_s,
            unit="req/s",
            note=result.failures,
        ),
        *Latencies.of(result.latencies_s).rows("ingest", setting, "ack", p99_target=P99_TARGET),
    ]


async def _database(profile: Profile, db: str) -> list[Row]:
    rows: list[Row] = []
    async with stack.vendors() as bench, stack.syncd(bench, db=db, receiver_only=True) as syncd:
        hooks = DealWonWebhooks(f"{syncd.url}/webhooks/hubspot", bench.hub.client_secret)
        async with contextlib.aclosing(hooks):
            deal_ids = itertools.count(5_000_000)

            async def work(_n: int) -> float | None:
                return time.perf_counter() if await hooks.send(next(deal_ids)) == 200 else None

            await closed_loop(clients=4, duration_s=min(1.0, profile.ingest_s), warmup_s=0.0, work=work)  # warm up
            for clients in profile.ingest_concurrency:
                before_cpu, before_own = syncd.stats().cpu_s, stack.own_cpu_s()
                result = await closed_loop(
                    clients=clients, duration_s=profile.ingest_s, warmup_s=profile.ingest_warmup_s, work=work
                )
                cpu = syncd.stats().cpu_s - before_cpu
                rows += _rows(f"{db} c={clients}", result, cpu, stack.own_cpu_s() - before_own, profile.ingest_s)
            rows += await _paced(profile, work, f"{db} paced {profile.paced_rate:.0f}/s")
    return rows


def _rows(setting: str, result: LoopResult, syncd_cpu_s: float, bench_cpu_s: float, duration_s: float) -> list[Row]:
    note = f"{result.failures}; CPU busy: syncd {syncd_cpu_s / duration_s:.0%}, load+emulators {bench_cpu_s / duration_s:.0%}"
    per_request_ms = syncd_cpu_s / max(1, result.completed) * 1000 * (result.window_s / duration_s)
    return [
        Row(measurement="ingest", setting=setting, metric="req/s", value=result.per_s, unit="req/s", note=note),
        *Latencies.of(result.latencies_s).rows("ingest", setting, "ack"),
        Row(measurement="ingest", setting=setting, metric="syncd CPU/request", value=per_request_ms, unit="ms"),
    ]


if __name__ == "__main__":
    report.main("ingest", run)
