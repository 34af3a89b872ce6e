"""The command line: status, db upgrade, keygen, dead letters, and the OAuth2 code flow."""

from __future__ import annotations

import asyncio
import io
import re
from pathlib import Path

import httpx
from cryptography.fernet import Fernet
from rich.console import Console
from typer.testing import CliRunner

from connectors.hubspot.emulator import HubSpotEmulator
from connectors.xero.emulator import XeroEmulator
from syncd.cli import app
from syncd.demo import free_port, serve
from syncd.oauth import authorize
from syncd.settings import load_config
from syncd.store import DbTokenStore, Store
from tests.harness import write_config


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
    listed = runner.invoke(app, ["dead-letters", "list", "--config", str(config)], env={"COLUMNS": "200"})
    assert listed.exit_code == 0
    assert "reason" in listed.output


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
