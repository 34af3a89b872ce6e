"""Numbers and how they are shown: result rows, targets, percentiles, the table, the CLI.

Every measurement module returns a list of :class:`Row`; ``python -m bench`` gathers
them into one table, and each module run alone (``python -m bench.ingest``) prints
its own rows the same way. Nothing here asserts a time: a missed target is a row
marked ``miss``, never an exception.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import sys
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.table import Table


@dataclass(frozen=True, kw_only=True)
class Target:
    """A goal from BENCHMARKS.md: ``value <op> limit``.

    Attributes:
        op: ``<=`` (at most) or ``>=`` (at least).
        limit: the bound, in the row's unit.
    """

    op: Literal["<=", ">="]
    limit: float

    def met(self, value: float) -> bool:
        """Whether ``value`` meets the target."""
        return value <= self.limit if self.op == "<=" else value >= self.limit

    def text(self, unit: str) -> str:
        """The target as shown in the table (``≤ 50 ms``)."""
        sign = "≤" if self.op == "<=" else "≥"
        return f"{sign} {_number(self.limit)} {unit}".strip()


@dataclass(frozen=True, kw_only=True)
class Row:
    """One number of one measurement.

    Attributes:
        measurement: which benchmark (``ingest``, ``e2e`` ...).
        setting: what was varied (``sqlite c=16``).
        metric: what was measured (``p99 ack``).
        value: the number, or ``None`` when it could not be measured (see ``note``).
        unit: its unit (``ms``, ``req/s``, ``MB``).
        target: the issue's target for it, if there is one.
        note: anything a reader needs to interpret the number.
    """

    measurement: str
    setting: str
    metric: str
    value: float | None
    unit: str = ""
    target: Target | None = None
    note: str = ""

    @property
    def verdict(self) -> str:
        """``pass``, ``miss``, or ``""`` when there is no target (or no value)."""
        if self.target is None or self.value is None:
            return ""
        return "pass" if self.target.met(self.value) else "miss"


@dataclass(frozen=True, kw_only=True)
class Latencies:
    """A latency sample summarised.

    Attributes:
        count: how many samples.
        p50_ms / p95_ms / p99_ms / max_ms: percentiles in milliseconds.
    """

    count: int
    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Latencies:
        """Summarise latencies given in seconds (all zero for an empty sample)."""
        ordered = sorted(seconds)
        return cls(
            count=len(ordered),
            p50_ms=percentile(ordered, 50) * 1000,
            p95_ms=percentile(ordered, 95) * 1000,
            p99_ms=percentile(ordered, 99) * 1000,
            max_ms=(ordered[-1] if ordered else 0.0) * 1000,
        )

    def rows(self, measurement: str, setting: str, what: str, *, p99_target: Target | None = None) -> list[Row]:
        """p50/p95/p99 rows (the p99 one may carry a target)."""
        note = f"n={self.count}, max {self.max_ms:.1f} ms"
        return [
            Row(measurement=measurement, setting=setting, metric=f"p50 {what}", value=self.p50_ms, unit="ms"),
            Row(measurement=measurement, setting=setting, metric=f"p95 {what}", value=self.p95_ms, unit="ms"),
            Row(
                measurement=measurement,
                setting=setting,
                metric=f"p99 {what}",
                value=self.p99_ms,
                unit="ms",
                target=p99_target,
                note=note,
            ),
        ]


def percentile(ordered: Sequence[float], pct: float) -> float:
    """The ``pct`` percentile of an already sorted sample, linearly interpolated (numpy's default)."""
    if not ordered:
        return 0.0
    rank = (len(ordered) - 1) * pct / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


@dataclass(frozen=True, kw_only=True)
class Profile:
    """How big and how long each measurement runs.

    Attributes:
        name: ``quick`` (``python -m bench``), ``full`` (``--full``) or ``tiny`` (the test).
        ingest_s / ingest_warmup_s: seconds per ingest run, and the part discarded first.
        ingest_concurrency: closed-loop clients of the ingest runs.
        paced_rate: requests per second of the paced ingest run (the issue's 200/s).
        e2e_s / e2e_warmup_s: seconds per end-to-end run at no added latency.
        e2e_slow_s / e2e_slow_warmup_s: the same with 100 ms added vendor latency.
        e2e_concurrency: closed-loop clients of the end-to-end runs.
        e2e_pool: deals seeded per end-to-end run (the most it can complete).
        budget_deals: deals pushed through the rate-limited Xero emulator.
        monthstart_clients: retainer clients due at once on the 1st (``bench.monthstart``).
        backfill_sizes: deal counts of the backfill runs.
        poll_total / poll_changed: deals at the CRM, and how many of them changed.
        store_s: seconds per run of the store benchmark (each model, each concurrency).
        postgres: whether to run the PostgreSQL variants (when a server answers).
    """

    name: str
    ingest_s: float = 5.0
    ingest_warmup_s: float = 1.0
    ingest_concurrency: tuple[int, ...] = (1, 16, 64)
    paced_rate: float = 200.0
    e2e_s: float = 8.0
    e2e_warmup_s: float = 1.5
    e2e_slow_s: float = 12.0
    e2e_slow_warmup_s: float = 3.0
    e2e_concurrency: tuple[int, ...] = (1, 16)
    e2e_pool: int = 3000
    budget_deals: int = 200
    monthstart_clients: int = 100
    backfill_sizes: tuple[int, ...] = (10_000,)
    poll_total: int = 10_000
    poll_changed: int = 10
    store_s: float = 4.0
    postgres: bool = True


QUICK = Profile(name="quick")
FULL = Profile(
    name="full",
    ingest_s=20.0,
    ingest_warmup_s=3.0,
    e2e_s=30.0,
    e2e_warmup_s=5.0,
    e2e_slow_s=40.0,
    e2e_slow_warmup_s=8.0,
    e2e_pool=15_000,
    budget_deals=1000,
    monthstart_clients=1000,
    backfill_sizes=(10_000, 50_000, 100_000),
    poll_total=100_000,
    store_s=15.0,
)
TINY = Profile(
    name="tiny",
    ingest_s=0.6,
    ingest_warmup_s=0.1,
    ingest_concurrency=(1, 4),
    paced_rate=20.0,
    e2e_s=1.0,
    e2e_warmup_s=0.0,
    e2e_slow_s=1.0,
    e2e_slow_warmup_s=0.0,
    e2e_concurrency=(2,),
    e2e_pool=40,
    budget_deals=5,
    monthstart_clients=4,
    backfill_sizes=(250,),
    poll_total=300,
    poll_changed=5,
    store_s=1.0,
    postgres=False,
)


def _number(value: float) -> str:
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def table(rows: Sequence[Row], *, title: str) -> Table:
    """The rows as one rich table."""
    out = Table(title=title, title_justify="left")
    for column in ("measurement", "setting", "metric", "value", "target", "", "note"):
        out.add_column(column, justify="right" if column == "value" else "left", overflow="fold")
    for row in rows:
        value = "n/a" if row.value is None else f"{_number(row.value)} {row.unit}".strip()
        target = row.target.text(row.unit) if row.target else ""
        mark = {"pass": "[green]pass[/green]", "miss": "[red]miss[/red]"}.get(row.verdict, "")
        out.add_row(row.measurement, row.setting, row.metric, value, target, mark, row.note)
    return out


def markdown(rows: Sequence[Row]) -> str:
    """The rows as a Markdown table (for ``BENCHMARKS.md``)."""
    lines = ["| measurement | setting | metric | value | target | | note |", "|---|---|---|--:|---|---|---|"]
    for row in rows:
        value = "n/a" if row.value is None else f"{_number(row.value)} {row.unit}".strip()
        target = row.target.text(row.unit) if row.target else ""
        note = row.note.replace("|", "/")
        lines.append(
            f"| {row.measurement} | {row.setting} | {row.metric} | {value} | {target} | {row.verdict} | {note} |"
        )
    return "\n".join(lines) + "\n"


def machine() -> dict[str, str]:
    """What the numbers ran on: cores, memory, CPU model, Python."""
    cpu = "unknown"
    mem = "unknown"
    cpuinfo, meminfo = Path("/proc/cpuinfo"), Path("/proc/meminfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    if meminfo.exists():
        total_kb = int(meminfo.read_text().split()[1])
        mem = f"{total_kb / 1024 / 1024:.1f} GiB"
    return {
        "cores": str(os.cpu_count()),
        "memory": mem,
        "cpu": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def show(
    rows: Sequence[Row], *, title: str, out: Path | None = None, md: Path | None = None, started: float | None = None
) -> None:
    """Print the table (and the machine); optionally write the rows as JSON and as Markdown."""
    console = Console(width=200)
    info = machine()
    console.print(table(rows, title=title))
    spent = f", {time.monotonic() - started:.0f} s" if started is not None else ""
    console.print(
        f"machine: {info['cores']} cores, {info['memory']}, {info['cpu']}, Python {info['python']}{spent}",
        highlight=False,
    )
    if out is not None:
        payload = {"title": title, "machine": info, "rows": [asdict(row) for row in rows]}
        out.write_text(json.dumps(payload, indent=2) + "\n", encoding="utf-8")
    if md is not None:
        md.write_text(markdown(rows), encoding="utf-8")


def quiet_logs() -> None:
    """Keep the in-process parts (connectors, runtime) to warnings: the table is the output."""
    from syncd.plumbing import logging as syncd_logging

    syncd_logging.configure("warning")


Measure = Callable[[Profile], Coroutine[Any, Any, list[Row]]]


def main(name: str, measure: Measure, argv: Sequence[str] | None = None) -> None:
    """Command line of one measurement module: ``--full``, ``--json FILE``, ``--markdown FILE``."""
    parser = argparse.ArgumentParser(prog=f"python -m bench.{name}", description=f"syncd benchmark: {name}")
    parser.add_argument("--full", action="store_true", help="the long profile (full sizes and durations)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the rows as a Markdown table")
    args = parser.parse_args(argv)
    profile = FULL if args.full else QUICK
    quiet_logs()
    started = time.monotonic()
    rows = asyncio.run(measure(profile))
    show(rows, title=f"syncd bench: {name} ({profile.name})", out=args.json, md=args.markdown, started=started)
    sys.stdout.flush()
