"""Backfill: a first full read of every deal through the HubSpot list endpoint.

Backfill (BENCHMARKS.md). The HubSpot emulator (limits off) holds N deals; a separate
process builds syncd's runtime from a config (as ``syncd run`` does: store, HTTP
client, connectors) and iterates ``HubSpotConnector.iter_deals()`` (``GET
/crm/v3/objects/deals``, 100 per page; the search endpoint stops at 10,000 results).
It reports the wall time of the read, and its own peak resident memory (``VmHWM``),
so the emulator's memory is not counted. API calls are counted at the emulator.

syncd has no backfill command yet: this measures the connector's read, which such a
command would stream through; nothing is stored.

Target: peak RSS ≤ 150 MB and flat as the count grows (10k, 50k, 100k).

Run alone: ``python -m bench.backfill`` (``--full`` for 10k, 50k and 100k).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from bench import report, stack
from bench.report import Profile, Row, Target
from syncd.plumbing.serving import free_port

MARK = "BACKFILL "
LIST_CALL = "GET /crm/v3/objects/deals"
TARGET_RSS = Target(op="<=", limit=150.0)


async def run(profile: Profile) -> list[Row]:
    """One backfill per size of ``profile.backfill_sizes``."""
    rows: list[Row] = []
    peaks: list[float] = []
    for size in profile.backfill_sizes:
        result = await measure(size)
        peaks.append(result["peak_rss_mb"])
        setting = f"{size:,} deals"
        note = f"{result['deals']:,} deals read; RSS before the read {result['start_rss_mb']:.0f} MB"
        rows += [
            Row(
                measurement="backfill",
                setting=setting,
                metric="wall time",
                value=result["seconds"],
                unit="s",
                note=note,
            ),
            Row(measurement="backfill", setting=setting, metric="API calls", value=float(result["calls"])),
            Row(
                measurement="backfill",
                setting=setting,
                metric="peak RSS",
                value=result["peak_rss_mb"],
                unit="MB",
                target=TARGET_RSS,
            ),
        ]
    if len(peaks) > 1:
        growth = peaks[-1] - peaks[0]
        rows.append(
            Row(
                measurement="backfill",
                setting=f"{profile.backfill_sizes[0]:,} → {profile.backfill_sizes[-1]:,}",
                metric="peak RSS growth",
                value=growth,
                unit="MB",
                note="flat means a few MB at most",
            )
        )
    return rows


async def measure(size: int) -> dict[str, float]:
    """Seed ``size`` deals, read them all from a child process; its numbers plus the calls made."""
    async with stack.vendors() as bench:
        for index in range(size):
            bench.hub.add_deal(
                {
                    "dealname": f"Deal {index}",
                    "amount": "12500.00",
                    "dealstage": "closedwon",
                    "pipeline": "default",
                    "deal_currency_code": "USD",
                }
            )
        bench.hub.calls.clear()
        with tempfile.TemporaryDirectory(prefix="syncd-bench-") as tmp:
            folder = Path(tmp)
            config = stack.write_config(
                folder, db_url=f"sqlite:///{folder / 'syncd.db'}", port=free_port(), bench=bench, workers=1
            )
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "bench.backfill",
                "--child",
                str(config),
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=stack.REPO,
            )
            try:
                out, err = await asyncio.wait_for(proc.communicate(), timeout=600)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise
    lines = [line for line in out.decode().splitlines() if line.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"backfill child failed ({proc.returncode}): {err.decode()[-2000:]}")
    result: dict[str, float] = json.loads(lines[-1].removeprefix(MARK))
    result["calls"] = bench.hub.calls[LIST_CALL]
    return result


async def child(config_path: Path) -> dict[str, float]:
    """In the child: build syncd's runtime and read every deal; seconds, deals and memory."""
    from syncd.engine.runtime import Runtime
    from syncd.plumbing.settings import load_config

    runtime = await Runtime.start(load_config(config_path))
    try:
        start_rss = stack.proc_stats(os.getpid()).rss_mb
        started = time.perf_counter()
        deals = 0
        async for _record in runtime.connectors["hubspot"].iter_deals():
            deals += 1
        seconds = time.perf_counter() - started
    finally:
        await runtime.aclose()
    stats = stack.proc_stats(os.getpid())
    return {"deals": deals, "seconds": seconds, "start_rss_mb": start_rss, "peak_rss_mb": stats.peak_rss_mb}


def main() -> None:
    """``--child CONFIG`` runs the read; otherwise the benchmark's command line."""
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        result = asyncio.run(child(Path(sys.argv[2])))
        print(MARK + json.dumps(result), flush=True)
        return
    report.main("backfill", run)


if __name__ == "__main__":
    main()
