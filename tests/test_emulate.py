"""`syncd emulate` (syncd/cli/emulate.py) and the README's "Quick start without accounts", run as written.

The quick start's shell commands are read out of README.md, so the README and this test
cannot drift apart, and run as real processes in a shell: `syncd` is the installed
command (a shim running ``sys.executable -m syncd`` comes first on ``PATH``), `curl` is
curl. The only change made to them is the ports: the emulators and syncd take free ones
(``SYNCD_EMULATE_*_PORT=0``), and the README's default ports in the `curl` commands are
replaced by the ones bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog

from syncd.cli.emulate import MARK, Options, Ports, claim_config, emulate
from syncd.core.errors import ConfigError
from syncd.plumbing.settings import load_config
from tests.harness import REPO
from tests.servers import invoke

README = REPO / "README.md"
DEFAULT_PORTS = {"hubspot": 8101, "xero": 8102, "harvest": 8103, "syncd": 8080}
FREE_PORTS = {f"SYNCD_EMULATE_{name.upper()}_PORT": "0" for name in DEFAULT_PORTS}
SHELL = shutil.which("bash") or "/bin/sh"
WAIT_S = 60.0  # an upper bound for a process on a busy machine, not a timing assertion


@pytest.fixture(autouse=True)
def default_structlog() -> None:
    """Log through structlog's defaults: a CLI test run earlier may have left it on a closed stream."""
    structlog.reset_defaults()


def quick_start() -> tuple[list[list[str]], list[list[str]]]:
    """The shell commands of the README's quick start and of its "More to try", block by block."""
    text = README.read_text(encoding="utf-8")
    section = text.split("\n## Quick start without accounts\n", 1)[1].split("\n## ", 1)[0]
    start, more = section.split("\n### More to try\n", 1)
    return _blocks(start), _blocks(more)


def _blocks(text: str) -> list[list[str]]:
    blocks = re.findall(r"^```sh\n(.*?)^```", text, re.M | re.S)
    return [[line for line in block.replace("\\\n", " ").splitlines() if line.strip()] for block in blocks]


def on_bound_ports(command: str, ports: dict[str, int]) -> str:
    """The command with the README's default ports replaced by the ones bound."""
    for name, default in DEFAULT_PORTS.items():
        command = command.replace(f"127.0.0.1:{default}/", f"127.0.0.1:{ports[name]}/")
    return command


def shim(folder: Path) -> Path:
    """A `syncd` command running this interpreter's syncd, in a folder to put first on PATH."""
    folder.mkdir()
    script = folder / "syncd"
    script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m syncd "$@"\n', encoding="utf-8")
    script.chmod(0o755)
    return folder


class Processes:
    """Long-running shell commands, each stopped by a signal when the test ends."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.cwd, self.env = cwd, env
        self.running: list[subprocess.Popen[str]] = []

    def start(self, command: str, **streams: Any) -> subprocess.Popen[str]:
        # exec: the signal reaches syncd itself, not the shell around it.
        proc = subprocess.Popen([SHELL, "-c", f"exec {command}"], cwd=self.cwd, env=self.env, text=True, **streams)
        self.running.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.running:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@contextlib.contextmanager
def processes(cwd: Path, env: dict[str, str]) -> Iterator[Processes]:
    procs = Processes(cwd, env)
    watchdog = threading.Timer(5 * WAIT_S, procs.kill_all)
    watchdog.start()
    try:
        yield procs
    finally:
        watchdog.cancel()
        procs.kill_all()


def run(command: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """One README command in a shell, to its end."""
    return subprocess.run([SHELL, "-c", command], cwd=cwd, env=env, text=True, capture_output=True, timeout=WAIT_S)


def wait_until(what: str, check: Any) -> Any:
    """Poll ``check`` until it returns something true (a real daemon works at its own pace)."""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, sqlite3.Error):
            found = check()
            if found:
                return found
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def xero_invoices(base_url: str, config: dict[str, Any]) -> list[dict[str, Any]]:
    """The invoices at the Xero emulator, read over Xero's API with the config's credentials."""
    xero = config["connections"]["xero"]
    token = httpx.post(
        xero["token_url"],
        data={"grant_type": "client_credentials"},
        auth=(xero["client_id"], xero["client_secret"]),
    ).json()["access_token"]
    answer = httpx.get(
        f"{base_url}/api.xro/2.0/Invoices",
        headers={"Authorization": f"Bearer {token}", "xero-tenant-id": xero["tenant_id"], "Accept": "application/json"},
    )
    answer.raise_for_status()
    invoices: list[dict[str, Any]] = answer.json()["Invoices"]
    return invoices


def stored_invoices(database: Path) -> list[tuple[str, str, str, str]]:
    """(deal id, number, total, currency) of each invoice in syncd's store."""
    with contextlib.closing(sqlite3.connect(database)) as db:
        return list(db.execute("SELECT crm_object_id, number, total, currency FROM invoices"))


def test_the_quick_start_in_the_readme_runs_as_written(tmp_path: Path) -> None:
    """The README's quick start, run as written, makes the invoice at Xero and in syncd's store, and status shows it."""
    assert shutil.which("curl"), "the quick start uses curl"
    (emulate_block, run_block, win_block, look_block), (harvest_block,) = quick_start()
    assert emulate_block == ["syncd emulate --write-config emulated.toml"]
    assert run_block == ["syncd run --config emulated.toml"]
    assert win_block[0].startswith("curl -X PATCH http://127.0.0.1:8101/crm/v3/objects/deals/")
    assert look_block == ["syncd status --config emulated.toml", "syncd outcomes list --config emulated.toml"]
    env = {key: value for key, value in os.environ.items() if not key.startswith("SYNCD_")}
    env |= FREE_PORTS | {"PYTHONUNBUFFERED": "1", "COLUMNS": "80", "PATH": f"{shim(tmp_path / 'bin')}:{env['PATH']}"}
    work = tmp_path / "work"
    work.mkdir()

    with processes(work, env) as procs:
        emulator = procs.start(emulate_block[0], stdout=subprocess.PIPE)
        assert emulator.stdout is not None
        printed = []
        for line in emulator.stdout:
            printed.append(line)
            if line.startswith("ready"):
                break
        assert printed, "syncd emulate printed nothing"
        assert printed[-1].startswith("ready"), "".join(printed)
        config = tomllib.loads((work / "emulated.toml").read_text(encoding="utf-8"))
        urls = {name: config["connections"][name]["base_url"] for name in ("hubspot", "xero", "harvest")}
        ports = {name: int(url.split(":")[2].split("/")[0]) for name, url in urls.items()}
        ports["syncd"] = int(config["daemon"]["listen"].rsplit(":", 1)[1])
        assert "  syncd run --config emulated.toml\n" in printed  # the next step it prints is the README's

        with (work / "run.log").open("w") as log:
            daemon = procs.start(run_block[0], stderr=log)
            wait_until("syncd to be ready", lambda: httpx.get(f"http://127.0.0.1:{ports['syncd']}/readyz").is_success)

            won = run(on_bound_ports(win_block[0], ports), work, env)
            assert won.returncode == 0, won.stderr
            deal_id = win_block[0].split("/deals/")[1].split()[0]
            assert json.loads(won.stdout)["properties"]["dealstage"] == "closedwon"

            (invoice,) = wait_until("the invoice at Xero", lambda: xero_invoices(urls["xero"], config))
            stored = wait_until("the invoice in syncd's store", lambda: stored_invoices(work / "emulated.db"))
            assert stored == [(deal_id, invoice["InvoiceNumber"], "13750.00", "USD")]
            assert invoice["Contact"]["Name"] == "Northwind Traders LLC"
            assert invoice["Reference"].startswith("PO-4411")

            status, outcomes = (run(command, work, env) for command in look_block)
            assert (status.returncode, outcomes.returncode) == (0, 0), status.stderr + outcomes.stderr
            assert f"{invoice['InvoiceNumber']} · 13750.00 USD · authorised" in status.stdout
            assert f"deal:   Northwind website rebuild (hubspot:deal:{deal_id})" in status.stdout
            assert "client: Northwind Traders LLC (hubspot:company:" in status.stdout
            assert max(len(line) for line in status.stdout.splitlines()) <= 80
            assert run(f"{look_block[1]} --json", work, env).stdout.strip() == "[]"  # "none here"

            logged = run(on_bound_ports(harvest_block[0], ports), work, env)
            assert logged.returncode == 0, logged.stderr
            harvest = config["connections"]["harvest"]
            entries = httpx.get(
                f"{urls['harvest']}/time_entries",
                params={"project_id": "1005"},
                headers={
                    "Authorization": f"Bearer {harvest['token']}",
                    "Harvest-Account-Id": harvest["account_id"],
                    "User-Agent": harvest["user_agent"],
                },
            ).json()["time_entries"]
            assert sorted(entry["hours"] for entry in entries) == [2.5, 3.5, 6.0, 9.5]  # 3 seeded, 1 logged
            assert "2026-12-01" in {entry["spent_date"] for entry in entries if entry["hours"] == 9.5}
            assert {entry["task"]["id"] for entry in entries} == {1003}

            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(timeout=WAIT_S) == 0, (work / "run.log").read_text()
        emulator.send_signal(signal.SIGINT)
        rest = emulator.communicate(timeout=WAIT_S)[0]
        assert emulator.returncode == 0
        assert "stopping the emulators" in rest


@contextlib.asynccontextmanager
async def emulating(write_config: Path | None) -> AsyncIterator[list[str]]:
    """`syncd emulate` in this process on free ports, until the block exits; the lines it printed."""
    lines: list[str] = []
    ready, stop = asyncio.Event(), asyncio.Event()

    def say(line: str) -> None:
        lines.append(line)
        if line.startswith("ready"):
            ready.set()

    free = Ports(hubspot=0, xero=0, harvest=0, syncd=0)
    task = asyncio.create_task(emulate(Options(ports=free, write_config=write_config), say, stop))
    waiting = asyncio.create_task(ready.wait())
    await asyncio.wait([task, waiting], return_when=asyncio.FIRST_COMPLETED)
    if task.done():
        waiting.cancel()
        task.result()
    try:
        yield lines
    finally:
        stop.set()
        await task


async def test_the_config_it_writes_checks_clean_against_the_emulators(tmp_path: Path) -> None:
    """The written config loads, its credentials work and every mapping's properties and codes exist (`syncd check`)."""
    path = tmp_path / "emulated.toml"
    async with emulating(path) as lines:
        assert path.read_text(encoding="utf-8").startswith(MARK)
        config = load_config(path)
        assert [pipeline.mapping for pipeline in config.settings.pipelines] == [
            REPO / "mappings" / name
            for name in ("hubspot-xero.toml", "hubspot-xero-retainer.toml", "hubspot-harvest-xero.toml")
        ]
        assert config.daemon.database_url == f"sqlite:///{tmp_path / 'emulated.db'}"  # beside the config
        checked = await asyncio.to_thread(invoke, "check", "--config", str(path))
        printed = "\n".join(lines)
    assert checked.exit_code == 0, checked.output
    assert "config, mappings and connections are fine" in checked.output
    assert f"config written to {path}" in printed
    assert path.read_text(encoding="utf-8").strip() in printed  # the config is printed too


async def test_without_write_config_it_prints_the_config_and_writes_nothing(tmp_path: Path) -> None:
    """Without --write-config the config is printed only, and lists every seeded deal."""
    before = set(Path.cwd().iterdir())
    async with emulating(None) as lines:
        pass
    assert set(Path.cwd().iterdir()) == before
    text = "\n".join(lines)
    config = tomllib.loads(text.split("\n\n[[pipelines]]", 1)[0])
    assert config["connections"]["hubspot"]["token"] == "pat-emulator"
    for deal in ("1003  Northwind website rebuild", "1008  Globex care plan", "1011  Initech support"):
        assert deal in text
    assert "save the config above as emulated.toml" in text
    assert lines[-1] == "stopping the emulators"


def test_it_replaces_only_its_own_config_and_database(tmp_path: Path) -> None:
    """A config it wrote has its database removed for a fresh run; another file, or a stray database, is refused."""
    own = tmp_path / "emulated.toml"
    own.write_text(f"{MARK} earlier\n", encoding="utf-8")
    for leftover in ("emulated.db", "emulated.db-wal", "emulated.db-shm"):
        (tmp_path / leftover).write_text("old", encoding="utf-8")
    assert claim_config(own) == "sqlite:///./emulated.db"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["emulated.toml"]

    theirs = tmp_path / "config.toml"
    theirs.write_text("[daemon]\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"config\.toml exists and was not written by syncd emulate"):
        claim_config(theirs)
    (tmp_path / "fresh.db").write_text("someone's", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"fresh\.db exists"):
        claim_config(tmp_path / "fresh.toml")
    with pytest.raises(ConfigError, match=r"the folder .*missing does not exist"):
        claim_config(tmp_path / "missing" / "emulated.toml")
    assert theirs.read_text(encoding="utf-8") == "[daemon]\n"
    assert (tmp_path / "fresh.db").read_text(encoding="utf-8") == "someone's"


def test_a_refused_config_or_a_taken_port_is_one_line_and_exit_2(tmp_path: Path) -> None:
    """A foreign config file or a port in use is one line and exit 2; nothing is served, written or removed."""
    free = {f"--{name}-port": "0" for name in DEFAULT_PORTS}
    theirs = tmp_path / "config.toml"
    theirs.write_text("[daemon]\n", encoding="utf-8")
    refused = invoke("emulate", "--write-config", str(theirs), *_options(free))
    own, database = tmp_path / "emulated.toml", tmp_path / "emulated.db"
    own.write_text(f"{MARK} earlier\n", encoding="utf-8")
    database.write_text("a syncd from the earlier run may still use it", encoding="utf-8")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        busy = invoke("emulate", *_options({**free, "--hubspot-port": port}))
        syncd_busy = invoke("emulate", "--write-config", str(own), *_options({**free, "--syncd-port": port}))
    assert (refused.exit_code, busy.exit_code, syncd_busy.exit_code) == (2, 2, 2)
    assert (
        refused.output == f"✗ --write-config: {theirs} exists and was not written by syncd emulate; name a new file\n"
    )
    assert busy.output == f"✗ --hubspot-port: 127.0.0.1:{port} is in use; choose another port\n"
    assert syncd_busy.output == f"✗ --syncd-port: 127.0.0.1:{port} is in use; choose another port\n"
    assert database.exists()  # checked before the earlier run's database is replaced
    assert own.read_text(encoding="utf-8") == f"{MARK} earlier\n"


def _options(ports: dict[str, str]) -> list[str]:
    return [part for option, value in ports.items() for part in (option, value)]
