"""End to end: deal-won webhook → invoice at the Xero emulator, syncd beside a minimal baseline.

End-to-end throughput and CPU per synced deal (BENCHMARKS.md). For each vendor latency (none,
and 100 ms added to every emulator answer) and each concurrency, a fresh pair of
emulators is seeded with won deals (each with its own company, billing contact and
two lines), and syncd (``python -m syncd run``, SQLite, in its own process) is
driven by closed-loop clients: each sends a signed deal-won webhook and waits until
the invoice for that deal is committed at the Xero emulator (seen through the
emulator's ``on_commit`` hook), then sends the next. The same runs are repeated with
batching switched off (``[daemon] batch_max = 1``: one vendor call per record, as the
baseline makes them), and with ``bench.baseline`` in place of syncd.

Reported per run: deals per second, latency webhook → invoice (p50/p95/p99), syncd's
resident memory under the load (peak of ``VmRSS`` sampled every 100 ms) and its CPU
per deal (``/proc/<pid>/stat`` user+system time from the start of the load until every
invoice of the run is also written back to the deal, divided by the deals). Over the
same span, divided by the same deals: the vendor calls per connection (HubSpot, Xero:
every API call but Xero's OAuth token requests) and their sum, and the database
transactions the process began (``syncd_db_transactions_total`` on syncd's
``/metrics``, read before the load and after the drain; reads and empty claims
included, the scrapes' own reads not; the baseline has no database, so 0).

Targets (no added latency, SQLite, everything on the 2 cores): ≥ 330 deals/s at
concurrency 16; p99 ≤ 13 ms at concurrency 1; RSS ≤ 140 MB; ≥ 0.8 of the baseline's
throughput; CPU ≤ 3.5 ms per deal; at concurrency 16 with batching on (syncd's default),
≤ 3 vendor calls and ≤ 4 transactions per deal (issue 12).

Run alone: ``python -m bench.e2e`` (``--full`` for the long profile).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bench import report, stack
from bench.load import DealWonWebhooks, Exhausted, LoopResult, closed_loop
from bench.report import Latencies, Profile, Row, Target
from connectors.hubspot.connector import BillingProperty

TRANSACTIONS = "syncd_db_transactions_total"
TARGET_TRANSACTIONS = Target(op="<=", limit=4.0)
TARGET_CALLS = Target(op="<=", limit=3.0)
UNBATCHED = 1  # ``[daemon] batch_max`` that switches batching off
INVOICE_NUMBER = BillingProperty.INVOICE_NUMBER.value  # the write-back's mark on the deal
SLOW_S = 0.1
SYNCD_WORKERS = 4  # syncd's default ``[daemon].workers``; a run uses max(this, clients)
# The targets of the batching-engine issue (BENCHMARKS.md), which replace the first benchmark issue's.
TARGET_RSS = Target(op="<=", limit=125.0)  # peak RSS, e2e c=16 on SQLite
TARGET_RATIO = Target(op=">=", limit=1.0)  # deals/s at c=16, syncd ÷ baseline, same run
TARGET_P99_RATIO = Target(op="<=", limit=1.0)  # p99 webhook → invoice at c=1, syncd ÷ baseline, same run
TARGET_CPU = Target(op="<=", limit=15.0)  # CPU per deal at c=16, ms


class InvoiceWatch:
    """Tells when each deal's invoice is committed at the Xero emulator (its ``on_commit`` hook).

    Args:
        deal_of_line: the first line's description → deal id (see :func:`bench.stack.seed_won_deals`).
    """

    def __init__(self, deal_of_line: Mapping[str, str]) -> None:
        self.deal_of_line = dict(deal_of_line)
        self.waiting: dict[str, asyncio.Future[float]] = {}
        self.count = 0
        self.invoiced: list[str] = []

    def committed(self, kind: str, document: dict[str, Any]) -> None:
        """The emulator stored an invoice: resolve the wait of its deal with the time."""
        if kind != "invoice":
            return
        self.count += 1
        lines = document.get("LineItems") or [{}]
        deal = self.deal_of_line.get(str(lines[0].get("Description")))
        if deal is not None:
            self.invoiced.append(deal)
        future = self.waiting.pop(deal, None) if deal else None
        if future is not None and not future.done():
            future.set_result(time.perf_counter())

    def expect(self, deal: str) -> asyncio.Future[float]:
        """A future resolved when ``deal``'s invoice is committed."""
        future: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self.waiting[deal] = future
        return future


@dataclass(frozen=True, kw_only=True)
class Outcome:
    """One end-to-end run.

    Attributes:
        system: ``syncd`` or ``baseline``.
        batch_max: syncd's ``[daemon] batch_max`` (``None``: its default; 1: batching off).
        clients: closed-loop clients.
        latency_s: vendor latency added.
        loop: the load loop's result.
        deals: invoices created from the start of the load until drained.
        cpu_ms_per_deal: the system's CPU per deal (load start → every write-back done).
        peak_rss_mb: the system's highest sampled resident memory during the load.
        hub_calls / xero_calls: vendor calls per deal during the load (Xero's token excluded).
        transactions: database transactions per deal in the system's process over the
            same span as ``cpu_ms_per_deal`` (``None`` for the baseline, which has none).
        drained: whether every invoice was also written back in time.
        cpu_busy / bench_busy: CPU share of the system and of the bench process during the load.
    """

    system: str
    batch_max: int | None
    clients: int
    latency_s: float
    loop: LoopResult
    deals: int
    cpu_ms_per_deal: float
    peak_rss_mb: float
    hub_calls: float
    xero_calls: float
    transactions: float | None
    drained: bool
    cpu_busy: float
    bench_busy: float

    @property
    def system_name(self) -> str:
        """``syncd``, ``syncd batch_max=1`` or ``baseline``."""
        return self.system if self.batch_max is None else f"{self.system} batch_max={self.batch_max}"

    @property
    def setting(self) -> str:
        """``syncd 0ms c=16`` (``syncd batch_max=1 0ms c=16`` with batching off)."""
        return f"{self.system_name} {self.latency_s * 1000:.0f}ms c={self.clients}"


# (system, batch_max) of each run: syncd with its default batching, syncd with batching
# off, the baseline.
SYSTEMS: tuple[tuple[str, int | None], ...] = (("syncd", None), ("syncd", UNBATCHED), ("baseline", None))


async def run(profile: Profile) -> list[Row]:
    """Every end-to-end row: each latency, each system, each concurrency; then the ratios."""
    rows: list[Row] = []
    for latency in (0.0, SLOW_S):
        outcomes: dict[tuple[str, int | None, int], Outcome] = {}
        for system, batch_max in SYSTEMS:
            for clients in profile.e2e_concurrency:
                outcome = await measure(profile, system=system, clients=clients, latency_s=latency, batch_max=batch_max)
                outcomes[system, batch_max, clients] = outcome
                rows += outcome_rows(outcome)
        rows += _ratios(outcomes, profile, latency)
    return rows


async def measure(
    profile: Profile, *, system: str, clients: int, latency_s: float, batch_max: int | None = None
) -> Outcome:
    """One run of ``system`` at ``clients`` concurrency and ``latency_s`` added vendor latency.

    The first deal goes through alone (it also pays one-time costs: the Xero token, any
    set-up reads); the load and every number measured start after it. ``batch_max`` is
    syncd's ``[daemon] batch_max`` (``None``: its default; 1: batching off).
    """
    slow = latency_s > 0
    duration = profile.e2e_slow_s if slow else profile.e2e_s
    warmup = profile.e2e_slow_warmup_s if slow else profile.e2e_warmup_s
    async with stack.vendors() as bench:
        lines = stack.seed_won_deals(bench.hub, profile.e2e_pool)
        watch = InvoiceWatch(lines)
        bench.xero.on_commit = watch.committed
        if latency_s:
            bench.add_latency(latency_s)
        async with _system(system, bench, workers=max(SYNCD_WORKERS, clients), batch_max=batch_max) as child:
            hooks = DealWonWebhooks(f"{child.url}/webhooks/hubspot", bench.hub.client_secret)
            async with contextlib.aclosing(hooks):
                deals = iter(lines.values())
                first = await deal_invoiced(hooks, watch, next(deals))
                if first is None or not await written_back(bench, watch.invoiced, 30.0):
                    raise RuntimeError(f"{system}: the first deal was not invoiced and written back: {child.tail()}")
                run = Run(
                    system=system,
                    batch_max=batch_max,
                    clients=clients,
                    latency_s=latency_s,
                    duration_s=duration,
                    warmup_s=warmup,
                )
                return await _load(run, child, bench, watch, hooks, deals)


@dataclass(frozen=True, kw_only=True)
class Run:
    """What one run varies."""

    system: str
    batch_max: int | None
    clients: int
    latency_s: float
    duration_s: float
    warmup_s: float


def _calls(bench: stack.Vendors) -> tuple[int, int]:
    """API calls so far at each emulator (Xero's token requests left out)."""
    return sum(bench.hub.calls.values()), sum(n for op, n in bench.xero.calls.items() if not op.startswith("token"))


async def _load(
    run: Run,
    child: stack.Child,
    bench: stack.Vendors,
    watch: InvoiceWatch,
    hooks: DealWonWebhooks,
    deals: Iterator[str],
) -> Outcome:
    async def work(_n: int) -> float | None:
        deal = next(deals, None)
        if deal is None:
            raise Exhausted
        return await deal_invoiced(hooks, watch, deal)

    before_tx = await child.metric(TRANSACTIONS)
    before, before_own, before_count, before_calls = child.stats(), stack.own_cpu_s(), watch.count, _calls(bench)
    started = time.perf_counter()
    async with _sampling(child.stats) as peak:
        loop = await closed_loop(clients=run.clients, duration_s=run.duration_s, warmup_s=run.warmup_s, work=work)
        load_cpu = child.stats().cpu_s - before.cpu_s
        load_own = stack.own_cpu_s() - before_own
        load_s = time.perf_counter() - started
        drained = await written_back(bench, watch.invoiced, 60.0)
    after, calls = child.stats(), _calls(bench)
    after_tx = await child.metric(TRANSACTIONS)
    deals_done = max(1, watch.count - before_count)
    transactions = 0.0 if run.system == "baseline" else None  # the baseline has no database
    if before_tx is not None and after_tx is not None:
        transactions = (after_tx - before_tx) / deals_done  # the scrapes' own reads are not counted
    return Outcome(
        system=run.system,
        batch_max=run.batch_max,
        clients=run.clients,
        latency_s=run.latency_s,
        loop=loop,
        deals=watch.count - before_count,
        cpu_ms_per_deal=(after.cpu_s - before.cpu_s) / deals_done * 1000,
        peak_rss_mb=max(peak()),
        hub_calls=(calls[0] - before_calls[0]) / deals_done,
        xero_calls=(calls[1] - before_calls[1]) / deals_done,
        transactions=transactions,
        drained=drained,
        cpu_busy=load_cpu / load_s,
        bench_busy=load_own / load_s,
    )


@contextlib.asynccontextmanager
async def _system(
    system: str, bench: stack.Vendors, *, workers: int, batch_max: int | None
) -> AsyncIterator[stack.Child]:
    if system == "syncd":
        async with stack.syncd(bench, workers=workers, batch_max=batch_max) as child:
            yield child
    else:
        async with stack.baseline(bench) as child:
            yield child


async def deal_invoiced(hooks: DealWonWebhooks, watch: InvoiceWatch, deal: str) -> float | None:
    """Send the webhook for ``deal`` and wait for its invoice; when it was committed."""
    committed = watch.expect(deal)
    if await hooks.send(int(deal)) != 200:
        watch.waiting.pop(deal, None)
        return None
    try:
        return await asyncio.wait_for(committed, timeout=60.0)
    except TimeoutError:
        return None


async def written_back(bench: stack.Vendors, deals: Sequence[str], timeout_s: float) -> bool:
    """Wait (bounded) until each of ``deals`` carries its invoice number at the CRM.

    The deal's state is read, not the calls counted: a write-back may come one deal per
    ``PATCH`` or many per ``batch/update``.
    """
    pending = set(deals)
    deadline = time.monotonic() + timeout_s
    while True:
        pending = {deal for deal in pending if not bench.hub.deal(deal)["properties"].get(INVOICE_NUMBER)}
        if not pending:
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def _sampling(
    read: Callable[[], stack.ProcStats], every_s: float = 0.1
) -> AsyncIterator[Callable[[], list[float]]]:
    """Sample a process's RSS every ``every_s`` while the block runs; yields the samples."""
    samples = [read().rss_mb]

    async def sample() -> None:
        while True:
            await asyncio.sleep(every_s)
            samples.append(read().rss_mb)

    task = asyncio.create_task(sample())
    try:
        yield lambda: samples
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def outcome_rows(outcome: Outcome) -> list[Row]:
    """The rows of one run, with the issue's targets where they apply (syncd's default batching)."""
    headline = outcome.system == "syncd" and outcome.batch_max is None and outcome.latency_s == 0
    fast = headline and outcome.clients >= 16
    setting = outcome.setting
    note = (
        f"{outcome.loop.failures}; {outcome.deals} deals; CPU busy: {outcome.system} {outcome.cpu_busy:.0%}, "
        f"load+emulators {outcome.bench_busy:.0%}" + ("" if outcome.drained else "; write-backs NOT drained")
    )
    return [
        Row(
            measurement="e2e",
            setting=setting,
            metric="deals/s",
            value=outcome.loop.per_s,
            unit="deals/s",
            note=note,
        ),
        *Latencies.of(outcome.loop.latencies_s).rows("e2e", setting, "webhook→invoice"),
        Row(
            measurement="e2e",
            setting=setting,
            metric="peak RSS under load",
            value=outcome.peak_rss_mb,
            unit="MB",
            target=TARGET_RSS if fast else None,
        ),
        Row(
            measurement="e2e",
            setting=setting,
            metric="vendor calls/deal",
            value=outcome.hub_calls + outcome.xero_calls,
            target=TARGET_CALLS if fast else None,
            note=f"HubSpot {outcome.hub_calls:.2f} + Xero {outcome.xero_calls:.2f} (OAuth token calls excluded)",
        ),
        Row(measurement="e2e", setting=setting, metric="HubSpot calls/deal", value=outcome.hub_calls),
        Row(
            measurement="e2e",
            setting=setting,
            metric="Xero calls/deal",
            value=outcome.xero_calls,
            note="OAuth token calls excluded",
        ),
        Row(
            measurement="e2e",
            setting=setting,
            metric="transactions/deal",
            value=outcome.transactions,
            target=TARGET_TRANSACTIONS if fast else None,
            note=(
                "no database"
                if outcome.system == "baseline"
                else "begun in syncd's process, reads and empty claims included"
                + ("" if outcome.transactions is not None else "; /metrics gave no count")
            ),
        ),
        Row(
            measurement="cpu",
            setting=setting,
            metric="CPU per synced deal",
            value=outcome.cpu_ms_per_deal,
            unit="ms",
            target=TARGET_CPU if fast else None,
            note=f"process CPU / {outcome.deals} deals",
        ),
    ]


def _ratios(outcomes: Mapping[tuple[str, int | None, int], Outcome], profile: Profile, latency_s: float) -> list[Row]:
    rows = []
    for system, batch_max in SYSTEMS:
        if system == "baseline":
            continue
        for clients in profile.e2e_concurrency:
            ours, floor = outcomes[system, batch_max, clients], outcomes["baseline", None, clients]
            ratio = ours.loop.per_s / floor.loop.per_s if floor.loop.per_s else None
            target = TARGET_RATIO if latency_s == 0 and clients >= 16 and batch_max is None else None
            note = f"{ours.loop.per_s:.0f} vs {floor.loop.per_s:.0f} deals/s"
            rows.append(
                Row(
                    measurement="e2e",
                    setting=f"{latency_s * 1000:.0f}ms c={clients}",
                    metric=f"{ours.system_name}/baseline throughput",
                    value=ratio,
                    target=target,
                    note=note,
                )
            )
            if clients == 1 and ours.loop.latencies_s and floor.loop.latencies_s:
                p99 = Latencies.of(ours.loop.latencies_s).p99_ms, Latencies.of(floor.loop.latencies_s).p99_ms
                rows.append(
                    Row(
                        measurement="e2e",
                        setting=f"{latency_s * 1000:.0f}ms c=1",
                        metric=f"{ours.system_name}/baseline p99 webhook→invoice",
                        value=p99[0] / p99[1] if p99[1] else None,
                        target=TARGET_P99_RATIO if latency_s == 0 and batch_max is None else None,
                        note=f"{p99[0]:.0f} vs {p99[1]:.0f} ms",
                    )
                )
    return rows


if __name__ == "__main__":
    report.main("e2e", run)
