"""``python -m bench``: every measurement's quick profile, one table (``--full`` for the long one).

Options: ``--full`` (the long profile), ``--only NAME ...`` (some measurements),
``--json FILE`` and ``--markdown FILE`` (also write the rows). A measurement that fails to run shows as a row
saying so, and the others still run.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import traceback
from pathlib import Path

from bench import backfill, budget, e2e, ingest, monthstart, poll, report, store
from bench.report import Measure, Profile, Row

MEASUREMENTS: dict[str, Measure] = {
    "ingest": ingest.run,
    "e2e": e2e.run,
    "budget": budget.run,
    "monthstart": monthstart.run,
    "backfill": backfill.run,
    "poll": poll.run,
    "store": store.run,
}


async def run_all(profile: Profile, names: list[str]) -> list[Row]:
    """Run the named measurements in order; a failure becomes a row, not an exit."""
    rows: list[Row] = []
    for name in names:
        started = time.monotonic()
        try:
            rows += await MEASUREMENTS[name](profile)
        except Exception as exc:  # a broken measurement must not hide the others' numbers
            traceback.print_exc()
            rows.append(
                Row(measurement=name, setting="", metric="error", value=None, note=f"{type(exc).__name__}: {exc}"[:300])
            )
        print(f"bench: {name} done in {time.monotonic() - started:.0f} s", flush=True)
    return rows


def main() -> None:
    """The command line."""
    parser = argparse.ArgumentParser(prog="python -m bench", description="syncd's benchmarks (BENCHMARKS.md)")
    parser.add_argument("--full", action="store_true", help="the long profile (full sizes and durations)")
    parser.add_argument(
        "--only", nargs="+", choices=sorted(MEASUREMENTS), default=list(MEASUREMENTS), help="measurements to run"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    parser.add_argument("--markdown", type=Path, default=None, help="also write the rows as a Markdown table")
    args = parser.parse_args()
    profile = report.FULL if args.full else report.QUICK
    report.quiet_logs()
    started = time.monotonic()
    rows = asyncio.run(run_all(profile, args.only))
    report.show(
        rows, title=f"syncd benchmarks ({profile.name} profile)", out=args.json, md=args.markdown, started=started
    )


if __name__ == "__main__":
    main()
