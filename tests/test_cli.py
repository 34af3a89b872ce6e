"""The command line: status, db upgrade, keygen, dead letters, the OAuth2 code flow, the
example config, and errors as one line per problem with a documented exit code."""

from __future__ import annotations

import asyncio
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import sqlalchemy as sa
from cryptography.fernet import Fernet
from rich.console import Console
from typer.testing import CliRunner

from connectors.hubspot.emulator import HubSpotEmulator
from connectors.xero.emulator import XeroEmulator
from syncd.cli.main import app
from syncd.cli.oauth import authorize
from syncd.core.errors import ConfigError
from syncd.core.mapping import load_mapping
from syncd.plumbing.serving import free_port, serve
from syncd.plumbing.settings import load_config
from syncd.store.db import DbTokenStore, Store
from tests.harness import MAPPING, write_config
from tests.servers import invoke, serve_in_thread

MAPPING_TEXT = MAPPING.read_text(encoding="utf-8")


def test_status_lists_each_connection_with_its_backlog(tmp_path: Path) -> None:
    """`syncd status` shows every connection, never synced yet, with empty backlogs."""
    config = write_config(tmp_path, f"sqlite:///{tmp_path / 's.db'}", HubSpotEmulator(), XeroEmulator())
    runner = CliRunner()
    assert runner.invoke(app, ["db", "upgrade", "--config", str(config)]).exit_code == 0
    result = runner.invoke(app, ["status", "--config", str(config)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    lines = [line for line in result.output.splitlines() if "hubspot" in line or "xero" in line]
    assert len(lines) == 2
    assert all("never" in line for line in lines)
    assert "alerts: off (no [alerts] webhook_url)" in result.output.splitlines()
    listed = runner.invoke(app, ["dead-letters", "list", "--config", str(config)], env={"COLUMNS": "200"})
    assert listed.exit_code == 0
    assert listed.output == "no open dead letters\n"


def test_keygen_prints_a_usable_key() -> None:
    """`syncd keygen` prints a Fernet key that encrypts."""
    key = CliRunner().invoke(app, ["keygen"]).output.strip()
    assert Fernet(key.encode()).decrypt(Fernet(key.encode()).encrypt(b"x")) == b"x"


async def test_auth_xero_runs_the_code_flow_and_stores_tokens_encrypted(tmp_path: Path) -> None:
    """`syncd auth xero`: consent URL, localhost redirect with the code, tokens saved encrypted."""
    xero = XeroEmulator(rate_limits=False)
    port, callback = free_port(), free_port()
    base = f"http://127.0.0.1:{port}"
    key = Fernet.generate_key().decode()
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[daemon]
database_url = "sqlite:///{tmp_path / "s.db"}"
encryption_key = "{key}"

[connections.xero]
connector = "xero"
base_url = "{base}"
token_url = "{base}/connect/token"
authorize_url = "{base}/identity/connect/authorize"
connections_url = "{base}/connections"
client_id = "{xero.client_id}"
client_secret = "{xero.client_secret}"
grant = "authorization_code"
redirect_uri = "http://localhost:{callback}/callback"
"""
    )
    config = load_config(path)
    out = io.StringIO()
    async with serve(xero.app, port):
        flow = asyncio.create_task(authorize(config, "xero", Console(file=out, width=400)))
        for _ in range(500):
            if "http://" in out.getvalue() or flow.done():
                break
            await asyncio.sleep(0.01)
        consent = re.search(r"(http://\S+/identity/connect/authorize\S+)", out.getvalue())
        assert consent, out.getvalue()
        async with httpx.AsyncClient(follow_redirects=True) as browser:
            page = await browser.get(consent.group(1))
        assert page.status_code == 200
        await asyncio.wait_for(flow, 30)
    assert xero.tenant_id in out.getvalue()
    store = Store.open(config.daemon.database_url)
    try:
        tokens = await DbTokenStore(store, "xero", key).load()
    finally:
        await store.close()
    assert tokens is not None
    assert tokens["refresh_token"]
    assert tokens["refresh_token"] not in (tmp_path / "s.db").read_bytes().decode("latin-1")


# ------------------------------------------------------- the example config, errors, exit codes

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "config.example.toml"


def _copy_example(folder: Path) -> Path:
    """config.example.toml as is, with the mapping files it names, in ``folder``."""
    text = EXAMPLE.read_text(encoding="utf-8")
    for name in re.findall(r'^mapping = "([^"]+)"', text, re.M):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, folder / name)
    shutil.copy(EXAMPLE, folder / "config.toml")
    return folder / "config.toml"


def _example_env(hub: HubSpotEmulator, xero: XeroEmulator, hub_url: str, xero_url: str) -> dict[str, str]:
    """The variables the example names ("env:NAME"), and overrides pointing it at the emulators."""
    known = {
        "SYNCD_ENCRYPTION_KEY": Fernet.generate_key().decode(),
        "HUBSPOT_TOKEN": hub.token,
        "HUBSPOT_CLIENT_SECRET": hub.client_secret,
        "HUBSPOT_REFRESH_TOKEN": hub.refresh_token,
        "XERO_CLIENT_ID": xero.client_id,
        "XERO_CLIENT_SECRET": xero.client_secret,
        "XERO_WEBHOOK_KEY": xero.webhook_key,
        "HARVEST_TOKEN": "harvest-token",
        "HARVEST_ACCOUNT_ID": "123",
    }
    named = set(re.findall(r'^[^#\n]*"env:([A-Z0-9_]+)"', EXAMPLE.read_text(encoding="utf-8"), re.M))
    assert named <= known.keys(), f"the example names variables this test does not know: {named - known.keys()}"
    return {
        **{name: known[name] for name in named},
        "SYNCD_CONNECTIONS__HUBSPOT__BASE_URL": hub_url,
        "SYNCD_CONNECTIONS__XERO__BASE_URL": xero_url,
        "SYNCD_CONNECTIONS__XERO__TOKEN_URL": f"{xero_url}/connect/token",
        "SYNCD_DAEMON__LISTEN": f"127.0.0.1:{free_port()}",
    }


def _define_what_it_reads(hub: HubSpotEmulator, config: Path) -> None:
    for mapping in (config.parent / "mappings").glob("*.toml"):
        for read in load_mapping(mapping).source_reads:
            hub.define_property(read.object_type, read.name)


def _health(url: str, *, within_s: float) -> int:
    """The status of ``url`` once it answers (connection refused until the server listens), bounded."""
    deadline = time.monotonic() + within_s
    while True:
        try:
            return httpx.get(url).status_code
        except httpx.ConnectError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def test_the_example_config_as_is_checks_and_runs_from_another_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """config.example.toml copied as is: `check` passes and creates nothing; `run` from elsewhere uses its folder's database."""
    folder, elsewhere = tmp_path / "etc", tmp_path / "elsewhere"
    folder.mkdir()
    elsewhere.mkdir()
    config = _copy_example(folder)
    hub, xero = HubSpotEmulator(rate_limits=False), XeroEmulator(rate_limits=False)
    _define_what_it_reads(hub, config)
    with serve_in_thread(hub.app) as hub_url, serve_in_thread(xero.app) as xero_url:
        env = _example_env(hub, xero, hub_url, xero_url)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        checked = invoke("check", "--config", str(config))
        assert checked.exit_code == 0, checked.output
        assert "config, mappings and connections are fine" in checked.output
        assert "syncd db upgrade" in checked.output  # the database does not exist yet
        assert not (folder / "syncd.db").exists()

        proc = subprocess.Popen(
            [sys.executable, "-m", "syncd", "run", "--config", "../etc/config.toml"],
            cwd=elsewhere,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            stderr=subprocess.PIPE,
            text=True,
        )
        watchdog = threading.Timer(60, proc.kill)
        watchdog.start()
        try:
            lines = []
            assert proc.stderr is not None
            for line in proc.stderr:
                lines.append(line)
                if "syncd_started" in line:
                    break
            assert "syncd_started" in "".join(lines), "".join(lines)
            # syncd_started is logged once the daemon has started, just before uvicorn binds its socket
            assert _health(f"http://{env['SYNCD_DAEMON__LISTEN']}/healthz", within_s=10.0) == 200
            proc.send_signal(signal.SIGTERM)
            rest = proc.communicate(timeout=30)[1]
        finally:
            watchdog.cancel()
            proc.kill()
    assert proc.returncode == 0, rest
    # Only the start: a drift or poll tick still in flight at SIGTERM is cancelled, and
    # APScheduler logs that with a traceback (syncd/engine/scheduler.py), whatever the config.
    assert "Traceback" not in "".join(lines)
    assert (folder / "syncd.db").exists()
    assert not (elsewhere / "syncd.db").exists()


def test_check_on_a_missing_database_creates_nothing(tmp_path: Path) -> None:
    """`syncd check` before the first migration says what to run and leaves no file behind."""
    path = tmp_path / "config.toml"
    path.write_text('[daemon]\ndatabase_url = "sqlite:///fresh.db"\n')
    result = invoke("check", "--config", str(path))
    assert result.exit_code == 0, result.output
    assert f"database {tmp_path / 'fresh.db'} does not exist yet: run `syncd db upgrade`" in result.output
    assert not (tmp_path / "fresh.db").exists()
    assert list(tmp_path.iterdir()) == [path]


@pytest.mark.postgres
def test_check_on_an_empty_postgres_database_creates_no_table(tmp_path: Path, postgres_url: str) -> None:
    """On a reachable PostgreSQL database with no tables, `check` says so and creates none."""
    path = tmp_path / "config.toml"
    path.write_text(f'[daemon]\ndatabase_url = "{postgres_url}"\n')
    result = invoke("check", "--config", str(path))
    assert result.exit_code == 0, result.output
    assert "has no syncd tables yet: run `syncd db upgrade`" in result.output
    engine = sa.create_engine(postgres_url)
    try:
        with engine.connect() as conn:
            assert sa.inspect(conn).get_table_names() == []
    finally:
        engine.dispose()


def test_an_unreachable_database_is_one_line_and_exit_3(tmp_path: Path) -> None:
    """PostgreSQL on a closed port: `check` and `status` each say so in one line, exit 3, no traceback."""
    path = tmp_path / "config.toml"
    path.write_text(f'[daemon]\ndatabase_url = "postgresql+psycopg://syncd:pg-secret@127.0.0.1:{free_port()}/syncd"\n')
    for args in (["check"], ["dead-letters", "list"], ["db", "upgrade"]):
        result = invoke(*args, "--config", str(path))
        assert result.exit_code == 3, (args, result.output)
        assert isinstance(result.exception, SystemExit)
        problems = [line for line in result.output.splitlines() if line.startswith("✗")]
        assert len(problems) == 1, result.output
        assert "database unreachable" in problems[0]
        assert "pg-secret" not in result.output


def test_user_errors_are_one_line_with_a_documented_exit_code(tmp_path: Path) -> None:
    """A missing config, an unmigrated database, an unreadable config: one line each, exit 2, never a traceback."""
    missing = invoke("status", "--config", str(tmp_path / "nope.toml"))
    assert missing.exit_code == 2
    assert (
        missing.output.strip()
        == f"✗ {tmp_path / 'nope.toml'}: config file not found: {tmp_path / 'nope.toml'}; copy config.example.toml"
    )

    path = tmp_path / "config.toml"
    path.write_text(f'[daemon]\ndatabase_url = "sqlite:///{tmp_path / "s.db"}"\n')
    unmigrated = invoke("dead-letters", "list", "--config", str(path))
    assert unmigrated.exit_code == 2
    assert "the database has no syncd tables yet: run `syncd db upgrade`" in unmigrated.output

    folder = invoke("status", "--config", str(tmp_path))
    assert folder.exit_code == 2
    assert folder.output.startswith(f"✗ {tmp_path}: cannot read the config file: [Errno 21] Is a directory")
    for result in (missing, unmigrated, folder):
        assert isinstance(result.exception, SystemExit)
        assert "Traceback" not in result.output


def test_debug_shows_the_traceback_and_help_lists_the_exit_codes(tmp_path: Path) -> None:
    """`syncd --debug` lets the error through; `syncd --help` documents the exit codes."""
    result = invoke("--debug", "status", "--config", str(tmp_path / "nope.toml"))
    assert isinstance(result.exception, ConfigError)
    help_text = invoke("--help").output
    assert "--debug" in help_text
    assert "Exit codes: 0 ok; 1 problems found" in " ".join(help_text.replace("│", " ").split())


def test_check_reports_config_mapping_credential_problems_together(tmp_path: Path) -> None:
    """One `check` names an unknown key, a mapping error and a wrong Xero secret, though a valid token is stored."""
    hub, xero = HubSpotEmulator(rate_limits=False), XeroEmulator(rate_limits=False)
    key = Fernet.generate_key().decode()
    mapping = tmp_path / "broken.toml"
    mapping.write_text(MAPPING_TEXT.replace("[client]", "[client]\nnmae = 'x'", 1))
    with serve_in_thread(hub.app) as hub_url, serve_in_thread(xero.app) as xero_url:
        db = tmp_path / "s.db"
        path = tmp_path / "config.toml"
        text = f"""
[daemon]
database_url = "sqlite:///{db}"
encryption_key = "{key}"
workers = 2

[connections.hubspot]
connector = "hubspot"
base_url = "{hub_url}"
token = "{hub.token}"

[connections.xero]
connector = "xero"
base_url = "{xero_url}"
token_url = "{xero_url}/connect/token"
client_id = "{xero.client_id}"
client_secret = "{xero.client_secret}"

[[pipelines]]
crm = "hubspot"
invoicing = "xero"
mapping = "broken.toml"
"""
        path.write_text(text)
        assert invoke("db", "upgrade", "--config", str(path)).exit_code == 0
        asyncio.run(_store_a_valid_xero_token(f"sqlite:///{db}", key, f"{xero_url}/connect/token", xero))
        text = text.replace(f'client_secret = "{xero.client_secret}"', 'client_secret = "wrong-secret"')
        path.write_text(text.replace("workers = 2", "workerz = 2"))
        result = invoke("check", "--config", str(path))
    assert result.exit_code == 1, result.output
    out = result.output
    assert f'{path}:5 [daemon].workerz: unknown key (did you mean "workers"?)' in out
    assert f"{mapping}:" in out
    assert "nmae" in out
    assert f"{path}:7 [connections.hubspot]: webhook_secret is not set" in out
    assert f"{path}:12 [connections.xero]: xero: token endpoint refused client_credentials (invalid_client)" in out
    assert "wrong-secret" not in out


async def _store_a_valid_xero_token(url: str, key: str, token_url: str, xero: XeroEmulator) -> None:
    async with httpx.AsyncClient() as client:
        answer = await client.post(
            token_url, data={"grant_type": "client_credentials"}, auth=(xero.client_id, xero.client_secret)
        )
    answer.raise_for_status()
    payload = answer.json()
    store = Store.open(url)
    try:
        await DbTokenStore(store, "xero", key).save(
            {
                "access_token": payload["access_token"],
                "expires_at": int(time.time()) + 1800,
                "grant": "client_credentials",
            }
        )
    finally:
        await store.close()


def test_check_asks_hubspot_for_a_token_with_the_configured_oauth_secret(tmp_path: Path) -> None:
    """A wrong HubSpot OAuth client secret is reported even while a stored access token still works."""
    hub = HubSpotEmulator(rate_limits=False)
    key = Fernet.generate_key().decode()
    db = tmp_path / "s.db"
    with serve_in_thread(hub.app) as hub_url:
        path = tmp_path / "config.toml"
        text = f"""
[daemon]
database_url = "sqlite:///{db}"
encryption_key = "{key}"

[connections.hubspot]
connector = "hubspot"
base_url = "{hub_url}"
token_url = "{hub_url}/oauth/v3/token"
client_id = "{hub.client_id}"
client_secret = "{hub.client_secret}"
refresh_token = "{hub.refresh_token}"
"""
        path.write_text(text)
        assert invoke("db", "upgrade", "--config", str(path)).exit_code == 0
        fine = invoke("check", "--config", str(path))  # refreshes and stores a valid access token
        assert fine.exit_code == 0, fine.output
        path.write_text(text.replace(f'client_secret = "{hub.client_secret}"', 'client_secret = "wrong-secret"'))
        result = invoke("check", "--config", str(path))
    assert result.exit_code == 1, result.output
    assert f"{path}:6 [connections.hubspot]: hubspot: hubspot: token refresh rejected (400" in result.output
    assert "wrong-secret" not in result.output


def test_demo_keep_says_where_it_kept_its_files_and_they_show_the_invoice() -> None:
    """`syncd demo --keep` prints the folder, config and database it kept; `syncd status` on them shows the invoice."""
    result = invoke("demo", "--keep")
    assert result.exit_code == 0, result.output
    found = dict(re.findall(r"^  (config|database):\s+(\S+)$", result.output, re.M))
    folder = re.search(r"^kept in (\S+):$", result.output, re.M)
    assert folder is not None, result.output
    try:
        config, database = Path(found["config"]), Path(found["database"])
        assert config.parent == database.parent == Path(folder.group(1))
        assert config.is_file()
        assert database.is_file()
        assert f"  look:     syncd status --config {config}" in result.output
        status = invoke("status", "--config", str(config))
        assert status.exit_code == 0, status.output
        assert "Northwind website rebuild" in status.output
        assert "client: Northwind Traders LLC" in status.output
    finally:
        shutil.rmtree(folder.group(1), ignore_errors=True)
