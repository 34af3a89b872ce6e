"""``make soak``: the fault suite over many seeds, summed up in RELIABILITY.md.

Runs ``pytest tests/faults`` with ``SYNCD_SOAK_SEEDS`` seeds per seeded scenario (20 by
default; Hypothesis scenarios draw proportionally more examples) and every checker report
collected through ``SYNCD_SOAK_REPORT`` (``tests/faults/checker.py``), then writes the
table: per scenario, the runs and seeds, invoices, duplicates, losses, dead letters and
runs whose checker found a problem, and which tests failed.

Usage: ``make soak SYNCD_SOAK_SEEDS=50`` (or ``.venv/bin/python -m tests.faults.soak``);
``SYNCD_SOAK_OUT`` names another file than ``RELIABILITY.md``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tests.faults.checker import REPORT_ENV
from tests.faults.conftest import SOAK_ENV

REPO = Path(__file__).resolve().parents[2]
DEFAULT_SEEDS = 20


def main() -> int:
    """Run the suite, write the summary; the exit code is pytest's."""
    seeds = os.environ.get(SOAK_ENV) or str(DEFAULT_SEEDS)
    out = Path(os.environ.get("SYNCD_SOAK_OUT", REPO / "RELIABILITY.md"))
    with tempfile.TemporaryDirectory(prefix="syncd-soak-") as folder:
        reports, junit = Path(folder) / "reports.jsonl", Path(folder) / "junit.xml"
        env = {**os.environ, SOAK_ENV: seeds, REPORT_ENV: str(reports)}
        command = [sys.executable, "-m", "pytest", "tests/faults", "-q", "-p", "no:logging", f"--junitxml={junit}"]
        command += ["--basetemp", str(Path(folder) / "tmp")]
        started = time.monotonic()
        done = subprocess.run(command, cwd=REPO, env=env, check=False)
        elapsed = time.monotonic() - started
        rows = [json.loads(line) for line in reports.read_text().splitlines()] if reports.exists() else []
        outcomes = _outcomes(junit)
    out.write_text(render(rows, outcomes, seeds=int(seeds), elapsed_s=elapsed, exit_code=done.returncode))
    print(f"wrote {out} ({len(rows)} checked runs, {elapsed:.0f} s)")
    return done.returncode


def _outcomes(junit: Path) -> dict[str, str]:
    """Each test's outcome (passed, failed, skipped, or xfailed with its reason) from pytest's JUnit XML."""
    if not junit.exists():
        return {}
    found: dict[str, str] = {}
    for case in ET.parse(junit).getroot().iter("testcase"):  # noqa: S314 - our own pytest's file
        name = f"{case.get('classname', '').rsplit('.', 1)[-1]}::{case.get('name')}"
        kinds = [child.tag for child in case]
        skipped = next((child for child in case if child.tag == "skipped"), None)
        if "failure" in kinds or "error" in kinds:
            found[name] = "failed"
        elif skipped is not None:
            message = skipped.get("message", "")
            found[name] = (
                f"xfailed (a known defect: {message.removeprefix('xfail').strip(' :')})"
                if ("xfail" in skipped.get("type", "") + message)
                else "skipped"
            )
        else:
            found[name] = "passed"
    return found


def render(
    rows: list[dict[str, Any]], outcomes: dict[str, str], *, seeds: int, elapsed_s: float, exit_code: int
) -> str:
    """RELIABILITY.md's text."""
    by_scenario: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        by_scenario[row["scenario"]].append(row)
    lines = [
        "# Reliability: the fault suite's last soak run",
        "",
        "Written by `make soak` (`tests/faults/soak.py`); how to run it and read this is in",
        "[`docs/reliability.md`](docs/reliability.md). Every run ends with the checker",
        "(`tests/faults/checker.py`): at most one vendor invoice per billing-event key, every",
        "billing event ending as one invoice, dead letter or outcome, the store and the vendor",
        "one to one, the CRM showing the vendor's state and never going backwards, and no",
        "secret in any log line, error or dead letter.",
        "",
        f"- when: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}; commit {_commit()}",
        f"- seeds per seeded scenario: {seeds} (`SYNCD_SOAK_SEEDS`); Hypothesis scenarios drew proportionally more examples",
        f"- machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; wall time {elapsed_s / 60:.1f} min",
        f"- pytest exit code: {exit_code}",
        "",
        "| scenario | runs | seeds | invoices | duplicates | losses | dead letters | outcomes | runs with problems |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    totals = defaultdict(int)
    for scenario in sorted(by_scenario):
        runs = by_scenario[scenario]
        seeded = {row["seed"] for row in runs if row["seed"] is not None}
        sums = {
            key: sum(row[key] for row in runs)
            for key in ("invoices", "duplicates", "losses", "dead_letters", "outcomes")
        }
        bad = sum(1 for row in runs if row["problems"])
        for key, value in {**sums, "runs": len(runs), "bad": bad}.items():
            totals[key] += value
        lines.append(
            f"| {scenario} | {len(runs)} | {len(seeded) or '-'} | {sums['invoices']} | {sums['duplicates']} | "
            f"{sums['losses']} | {sums['dead_letters']} | {sums['outcomes']} | {bad} |"
        )
    lines.append(
        f"| **all** | {totals['runs']} | | {totals['invoices']} | {totals['duplicates']} | {totals['losses']} | "
        f"{totals['dead_letters']} | {totals['outcomes']} | {totals['bad']} |"
    )
    problems = [(row["scenario"], row["seed"], problem) for row in rows for problem in row["problems"]]
    if problems:
        lines += ["", "## Problems the checker found", ""]
        lines += [f"- {scenario} (seed {seed}): {problem}" for scenario, seed, problem in problems[:50]]
    counts = defaultdict(int)
    for outcome in outcomes.values():
        counts[outcome.split(" ", 1)[0]] += 1
    lines += ["", "## Tests", "", ", ".join(f"{n} {kind}" for kind, n in sorted(counts.items())) or "none ran", ""]
    lines += [f"- {outcome}: `{name}`" for name, outcome in sorted(outcomes.items()) if outcome != "passed"]
    return "\n".join(lines).rstrip() + "\n"


def _commit() -> str:
    git = shutil.which("git")
    if git is None:
        return "unknown"
    done = subprocess.run([git, "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=False)
    return done.stdout.strip() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
