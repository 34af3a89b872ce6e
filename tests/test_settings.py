"""Configuration: every problem named with its file and key, secrets resolved, never shown."""

from __future__ import annotations

import re
from decimal import Decimal
from pathlib import Path

import pytest
from cryptography.fernet import Fernet
from pydantic import BaseModel
from typer.testing import CliRunner

from syncd.cli.main import app
from syncd.core.errors import ConfigError
from syncd.plumbing import registry
from syncd.plumbing.settings import (
    AlertSettings,
    CollectionsSettings,
    DaemonSettings,
    PilotSettings,
    PipelineSettings,
    RetentionSettings,
    inspect_config,
    load_config,
)

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


EXAMPLE = Path(__file__).resolve().parents[1] / "config.example.toml"


def _section(text: str, header: str) -> str:
    """The lines of ``header``'s table in ``text`` (commented out or not), up to the next table."""
    found = re.search(rf"^#? ?{re.escape(header)}[^\n]*\n(.*?)(?=^#? ?\[|\Z)", text, re.M | re.S)
    assert found, f"config.example.toml has no {header} table"
    return found.group(1)


def _models() -> list[tuple[str, type[BaseModel]]]:
    tables: list[tuple[str, type[BaseModel]]] = [
        ("[daemon]", DaemonSettings),
        ("[[pipelines]]", PipelineSettings),
        ("[pilot]", PilotSettings),
        ("[retention]", RetentionSettings),
        ("[collections]", CollectionsSettings),
        ("[alerts]", AlertSettings),
    ]
    for name in registry.available():
        tables.append((f"[connections.{name}]", registry.load(name).settings_model))
    return tables


@pytest.mark.parametrize(("header", "model"), _models(), ids=lambda item: item if isinstance(item, str) else "")
def test_every_settings_key_is_in_the_example(header: str, model: type[BaseModel]) -> None:
    """Each key of each settings model (daemon, pipelines, pilot, retention, every connector) is in config.example.toml."""
    section = _section(EXAMPLE.read_text(encoding="utf-8"), header)
    missing = [key for key in model.model_fields if not re.search(rf"^#? ?{key} *=", section, re.M)]
    assert not missing, f"config.example.toml {header} lacks {', '.join(missing)}"


def test_the_section_helper_fails_on_a_missing_key() -> None:
    """The example check notices a key that is absent (the test above can fail)."""
    section = _section("[daemon]\nlisten = 1\n# workers = 4\n[pilot]\nclients = []\n", "[daemon]")
    assert re.search(r"^#? ?workers *=", section, re.M)
    assert not re.search(r"^#? ?clients *=", section, re.M)


def test_daemon_secrets_come_from_env_and_files(tmp_path: Path) -> None:
    """`env:` and `X_file` work in [daemon] too; a relative file is read from the config's folder."""
    key = Fernet.generate_key().decode()
    (tmp_path / "key.txt").write_text(key + "\n")
    path = tmp_path / "config.toml"
    path.write_text('[daemon]\nencryption_key_file = "key.txt"\ndatabase_url = "env:SYNCD_TEST_DB"\n')
    config = load_config(path, environ={"SYNCD_TEST_DB": "postgresql+psycopg://syncd:pw-in-env@db.test/syncd"})
    assert config.daemon.encryption_key is not None
    assert config.daemon.encryption_key.get_secret_value() == key
    assert config.daemon.database_url == "postgresql+psycopg://syncd:pw-in-env@db.test/syncd"
    assert "pw-in-env" in config.secrets()  # redacted from logs


def test_the_alert_webhook_url_is_a_secret_from_env_or_a_file(tmp_path: Path) -> None:
    """[alerts].webhook_url takes `env:` and `webhook_url_file`, and is redacted from logs."""
    url = "https://hooks.slack.com/services/T000/B000/XXXXsecret"
    path = tmp_path / "config.toml"
    path.write_text('[alerts]\nwebhook_url = "env:SYNCD_TEST_ALERTS"\ngroup_window_s = 30\n')
    config = load_config(path, environ={"SYNCD_TEST_ALERTS": url})
    assert config.settings.alerts.webhook_url is not None
    assert config.settings.alerts.webhook_url.get_secret_value() == url
    assert url in config.secrets()
    (tmp_path / "hook.txt").write_text(url + "\n")
    path.write_text('[alerts]\nwebhook_url_file = "hook.txt"\n')
    assert load_config(path).settings.alerts.webhook_url == config.settings.alerts.webhook_url


def test_a_bad_alert_webhook_url_is_reported_without_showing_it(tmp_path: Path) -> None:
    """The URL is the secret (Slack's token is in its path): the problem names the key, not the value."""
    path = tmp_path / "config.toml"
    path.write_text('[alerts]\nwebhook_url = "hooks.slack.com/services/T000/B000/XXXXsecret"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        f"{path}:2 [alerts].webhook_url: not an http(s) URL (not shown: the URL is the secret)"
    ]


def test_collections_amounts_are_decimal_text_per_currency_and_steps_are_days(tmp_path: Path) -> None:
    """at_risk_overdue_above takes decimal text per ISO currency (a float is refused); steps are 1 or more."""
    path = tmp_path / "config.toml"
    path.write_text(
        '[collections]\nat_risk_overdue_above = { USD = "5000.50", EUR = 4000 }\nfollow_up_days = [30, 7]\n'
    )
    collections = load_config(path).settings.collections
    assert collections.at_risk_overdue_above == {"USD": Decimal("5000.50"), "EUR": Decimal(4000)}
    assert collections.task_steps() == (1, 7, 30)
    path.write_text('[collections]\nat_risk_overdue_above = { USD = 5000.5, usd = "1" }\nfollow_up_days = [0]\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = "\n".join(info.value.problems)
    assert "[collections].at_risk_overdue_above: write amounts as decimal text" in text
    assert "[collections].follow_up_days: days overdue are 1 or more" in text


def test_a_bad_encryption_key_says_run_keygen(tmp_path: Path) -> None:
    """A key that is not a Fernet key is named with file, line and key, and not shown."""
    path = tmp_path / "config.toml"
    path.write_text('[daemon]\nlisten = "127.0.0.1:8080"\nencryption_key = "not-a-fernet-key-but-secret"\n')
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [f"{path}:3 [daemon].encryption_key: not a valid key; run syncd keygen"]


def test_urls_are_never_shown_with_their_secrets(tmp_path: Path) -> None:
    """A bad URL is shown without user info or query; so is a bad database URL."""
    path = tmp_path / "config.toml"
    path.write_text(
        '[daemon]\ndatabase_url = "mysql://root:db-pass@db.test/x"\n'
        '[connections.hubspot]\nconnector = "hubspot"\ntoken = "t"\n'
        'base_url = "ftp://user:url-pass@api.test/v3?hapikey=query-secret"\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    text = "\n".join(info.value.problems)
    assert f"{path}:6 [connections.hubspot].base_url: not an http(s) URL: 'ftp://***@api.test/v3?***'" in text
    assert f"{path}:2 [daemon].database_url: unsupported database 'mysql'" in text
    assert not {"url-pass", "query-secret", "db-pass"} & set(re.findall(r"[\w-]+", text))


def test_unknown_keys_get_the_closest_known_key(tmp_path: Path) -> None:
    """An unknown key in [daemon], a connection or a pipeline says which key was probably meant."""
    path = tmp_path / "config.toml"
    (tmp_path / "m.toml").write_text("")
    path.write_text(
        '[daemon]\nlisen = "127.0.0.1:1"\n\n'
        '[connections.hubspot]\nconnector = "hubspot"\ntoken = "t"\nrate_limit_per_10 = 5\n\n'
        '[[pipelines]]\ncrm = "hubspot"\ninvoicing = "hubspot"\nmaping = "m.toml"\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(path)
    problems = info.value.problems
    assert f'{path}:2 [daemon].lisen: unknown key (did you mean "listen"?)' in problems
    assert (
        f'{path}:7 [connections.hubspot].rate_limit_per_10: unknown key (did you mean "rate_limit_per_10s"?)'
        in problems
    )
    assert f'{path}:12 [[pipelines]] #1.maping: unknown key (did you mean "mapping"?)' in problems
    assert f"{path}:9 [[pipelines]] #1.mapping: missing (required)" in problems
    assert problems == sorted(problems, key=lambda p: int(p.split(":")[1].split()[0]))  # file order


def test_an_unset_variable_is_reported_once(tmp_path: Path) -> None:
    """Two keys naming the same unset variable give one problem that names both keys."""
    path = tmp_path / "config.toml"
    path.write_text(
        '[connections.hubspot]\nconnector = "hubspot"\n'
        'client_id = "app"\nclient_secret = "env:SYNCD_TEST_UNSET"\nrefresh_token = "r"\n'
        'webhook_secret = "env:SYNCD_TEST_UNSET"\n'
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, environ={})
    assert info.value.problems == [
        f"{path}:4 [connections.hubspot].client_secret: environment variable SYNCD_TEST_UNSET is not set "
        "(also named by [connections.hubspot].webhook_secret)"
    ]


def test_relative_paths_are_relative_to_the_config_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A relative SQLite file and mapping resolve against the config's folder, whatever the working directory."""
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "m.toml").write_text("")
    (folder / "config.toml").write_text(
        '[daemon]\ndatabase_url = "sqlite:///./data.db"\n'
        '[connections.hubspot]\nconnector = "hubspot"\ntoken = "t"\n'
        '[connections.xero]\nconnector = "xero"\nclient_id = "i"\nclient_secret = "s"\n'
        '[[pipelines]]\ncrm = "hubspot"\ninvoicing = "xero"\nmapping = "m.toml"\n'
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    found = inspect_config(Path("../etc/config.toml"))
    assert found.config.daemon.database_url == f"sqlite:///{folder / 'data.db'}"
    assert found.config.mapping_path(found.config.settings.pipelines[0]).resolve() == folder / "m.toml"
    assert found.problems == []


def test_max_attempts_is_refused_naming_give_up_after_s(tmp_path: Path) -> None:
    """A config that still sets max_attempts fails at its line, naming give_up_after_s that replaced it."""
    path = tmp_path / "config.toml"
    path.write_text('[daemon]\nlisten = "127.0.0.1:8080"\nmax_attempts = 8\nlease_s = 30\n')
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    (problem,) = caught.value.problems
    assert problem.startswith(f"{path}:3 [daemon].max_attempts: no longer a setting")
    assert "give_up_after_s" in problem
    assert "did you mean" not in problem
