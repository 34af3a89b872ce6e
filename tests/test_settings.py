"""Configuration: every problem named with its file and key, secrets resolved, never shown."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from syncd.cli import app
from syncd.errors import ConfigError
from syncd.settings import load_config

BAD = """
[daemon]
listen = "127.0.0.1:8080"
colour = "blue"

[connections.hubspot]
connector = "hubspot"
base_url = "https://api.hubapi.com"
token = "env:SYNCD_TEST_MISSING_TOKEN"

[connections.xero]
connector = "xero"
base_url = "https://api.xero.com"
token_url = "htp:/identity.xero.com"
client_id = "abc"
client_secret = "shh-very-secret"
"""


def test_check_names_every_problem_with_file_and_key(tmp_path: Path) -> None:
    """An unknown key, a missing secret and a malformed URL are each named by file, line and key."""
    path = tmp_path / "config.toml"
    path.write_text(BAD)
    result = CliRunner().invoke(app, ["check", "--config", str(path)])
    assert result.exit_code != 0
    out = result.output
    assert f"{path}:4 [daemon].colour: unknown key" in out
    assert f"{path}:9 [connections.hubspot].token: environment variable SYNCD_TEST_MISSING_TOKEN is not set" in out
    assert f"{path}:14 [connections.xero].token_url: not an http(s) URL" in out
    assert "shh-very-secret" not in out


def test_secrets_come_from_env_and_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A secret is read from an env var named by "env:" or from a *_file path."""
    secret_file = tmp_path / "secret"
    secret_file.write_text("from-a-file\n")
    monkeypatch.setenv("SYNCD_TEST_TOKEN", "pat-from-env")
    path = tmp_path / "config.toml"
    path.write_text(
        f"""
[connections.hubspot]
connector = "hubspot"
base_url = "https://api.hubapi.com"
token = "env:SYNCD_TEST_TOKEN"
webhook_secret_file = "{secret_file}"
"""
    )
    config = load_config(path)
    settings = config.connections["hubspot"].settings
    assert settings.token.get_secret_value() == "pat-from-env"  # type: ignore[attr-defined]
    assert settings.webhook_secret.get_secret_value() == "from-a-file"  # type: ignore[attr-defined]
    assert "pat-from-env" not in repr(settings)


def test_env_overrides_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SYNCD_DAEMON__LISTEN overrides [daemon].listen."""
    path = tmp_path / "config.toml"
    path.write_text('[daemon]\nlisten = "127.0.0.1:8080"\n')
    monkeypatch.setenv("SYNCD_DAEMON__LISTEN", "0.0.0.0:9090")
    assert load_config(path).daemon.listen == "0.0.0.0:9090"


def test_unknown_connector_lists_the_installed_ones(tmp_path: Path) -> None:
    """A connector name that is not installed is an error listing those that are."""
    path = tmp_path / "config.toml"
    path.write_text('[connections.crm]\nconnector = "hubspott"\nbase_url = "https://x.test"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert any("unknown connector 'hubspott'" in p and "hubspot" in p for p in info.value.problems)


def test_pipeline_names_must_exist(tmp_path: Path) -> None:
    """A pipeline naming an undefined connection or a missing mapping file is an error."""
    path = tmp_path / "config.toml"
    path.write_text('[[pipelines]]\ncrm = "nope"\ninvoicing = "nada"\nmapping = "missing.toml"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = "\n".join(info.value.problems)
    assert "[[pipelines]] #1.crm: no connection named 'nope'" in text
    assert "[[pipelines]] #1.mapping: file not found" in text
