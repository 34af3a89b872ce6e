"""The ``syncd`` command line: run, check, status, db, setup, auth, dead letters, demo,
simulate, unbilled, backfill, preview, audit, invoice show, client.

A problem of the user's (a bad config or mapping, an unreachable database or vendor,
rejected credentials, an unknown id, a missing file) never shows a Python traceback: the
command group (:class:`_Commands`) translates it, for every command at once, into one
line per problem on stderr and an exit code (:data:`EXIT_CODES`, listed in
``syncd --help`` and in the README). ``syncd --debug COMMAND`` shows the traceback.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import enum
import io
import json
import logging
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import httpx
import typer
from cryptography.fernet import Fernet
from rich.console import Console
from rich.table import Table
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import make_url
from typer._click.core import Context as ClickContext  # the type TyperGroup.invoke takes (typer vendors click)
from typer.core import TyperGroup

from syncd.core.errors import AuthError, ConfigError, MappingError, RetriableError, SyncdError
from syncd.plumbing import failpoints
from syncd.plumbing import logging as syncd_logging
from syncd.plumbing.settings import Config, Connection, Inspection, inspect_config, load_config, redact_url

if TYPE_CHECKING:
    from syncd.store.db import Store

EXIT_OK = 0
EXIT_PROBLEMS = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3
_MIGRATE = "run `syncd db upgrade` (or `syncd run`, which migrates first)"
EXIT_CODES = (
    "Exit codes: 0 ok; 1 problems found (`check`) or the work failed (a record, an unknown id); "
    "2 usage or configuration error (bad option, config, mapping, credentials, missing file); "
    "3 the database or a vendor could not be reached (try again later)."
)


def _database_problem(exc: sa_exc.SQLAlchemyError) -> tuple[str, int]:
    """One line for a database error: the driver's first line, never the SQL or its parameters."""
    reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
    if "no such table" in reason or ("relation" in reason and "does not exist" in reason):
        return f"the database has no syncd tables yet: {_MIGRATE}", EXIT_USAGE
    if isinstance(exc, sa_exc.OperationalError | sa_exc.InterfaceError):
        return f"database unreachable: {reason}", EXIT_UNREACHABLE
    return f"database error: {reason}", EXIT_USAGE


def _explain(exc: Exception) -> tuple[list[str], int]:
    """The lines to print and the exit code for an error of the user's."""
    if isinstance(exc, ConfigError | MappingError):
        return list(exc.problems), EXIT_USAGE
    if isinstance(exc, RetriableError):
        return [str(exc)], EXIT_UNREACHABLE
    if isinstance(exc, AuthError):
        return [str(exc)], EXIT_USAGE
    if isinstance(exc, SyncdError):
        return [str(exc)], EXIT_PROBLEMS
    if isinstance(exc, sa_exc.SQLAlchemyError):
        line, code = _database_problem(exc)
        return [line], code
    if isinstance(exc, httpx.HTTPError):
        return [f"{_request_url(exc)} could not be reached: {type(exc).__name__}"], EXIT_UNREACHABLE
    if isinstance(exc, ConnectionError | TimeoutError):
        return [f"could not connect: {exc.strerror or type(exc).__name__}"], EXIT_UNREACHABLE
    if isinstance(exc, OSError):
        name = f"{exc.filename}: " if exc.filename else ""
        return [f"{name}{exc.strerror or exc}"], EXIT_USAGE
    raise TypeError(f"not a user's error: {type(exc).__name__}") from exc


def _request_url(exc: httpx.HTTPError) -> str:
    try:
        return redact_url(str(exc.request.url))
    except RuntimeError:  # httpx raises it when the error has no request
        return "a vendor"


# What a user can cause; anything else is a bug in syncd and keeps its traceback.
_USER_ERRORS = (SyncdError, sa_exc.SQLAlchemyError, httpx.HTTPError, OSError)


class _Commands(TyperGroup):
    """syncd's command group: a user's error is one line per problem and an exit code."""

    def invoke(self, ctx: ClickContext) -> Any:
        """Run the command; translate a user's error unless ``--debug`` was given."""
        try:
            return super().invoke(ctx)
        except _USER_ERRORS as exc:
            if ctx.params.get("debug"):
                raise
            lines, code = _explain(exc)
            for line in lines:
                _problem(line)
            raise typer.Exit(code) from None


app = typer.Typer(
    cls=_Commands,
    help="syncd: deal signed → invoice sent → cash collected.",
    epilog=EXIT_CODES,
    no_args_is_help=True,
)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
setup_app = typer.Typer(help="One-time set-up at a vendor.", no_args_is_help=True)
auth_app = typer.Typer(help="Connect an OAuth2 account.", no_args_is_help=True)
dead_app = typer.Typer(help="Records that could not be processed.", no_args_is_help=True)
preview_app = typer.Typer(
    help="What a mapping produces, with no effect: `preview deal ID`, or `preview --mapping FILE` "
    "to compare a proposed mapping with the current one over the stored deals.",
    invoke_without_command=True,
)
app.add_typer(db_app, name="db")
app.add_typer(setup_app, name="setup")
app.add_typer(auth_app, name="auth")
app.add_typer(dead_app, name="dead-letters")
app.add_typer(preview_app, name="preview")
hours_app = typer.Typer(help="Hours logged at the time tracker.", no_args_is_help=True)
app.add_typer(hours_app, name="hours")
outcomes_app = typer.Typer(
    help="Triggers that ended without an invoice, and what needs a person.", no_args_is_help=True
)
app.add_typer(outcomes_app, name="outcomes")

console = Console()
err = Console(stderr=True)
ConfigOption = Annotated[Path, typer.Option("--config", "-c", help="The TOML config file.", envvar="SYNCD_CONFIG")]
JsonOption = Annotated[bool, typer.Option("--json", help="Print a JSON list of objects instead of text.")]
_T = TypeVar("_T")


@app.callback()
def _options(
    debug: Annotated[bool, typer.Option("--debug", help="On an error, show the Python traceback too.")] = False,
) -> None:
    """Global options (read by :class:`_Commands`)."""


def _problem(text: str) -> None:
    """Print one problem line as is: no markup (``[daemon]`` is a TOML table, not a style), no wrapping."""
    err.print("✗", text, style="red", markup=False, highlight=False, soft_wrap=True)


def _load(path: Path) -> Config:
    """The validated config; a :class:`ConfigError` reaches :class:`_Commands` (exit 2)."""
    config = load_config(path)
    syncd_logging.register_secrets(config.secrets())
    syncd_logging.configure(config.daemon.log_level)
    return config


@app.command()
def run(
    config: ConfigOption = Path("config.toml"),
    log_format: Annotated[syncd_logging.LogFormat, typer.Option(help="Log lines as JSON or for a console.")] = (
        syncd_logging.LogFormat.json
    ),
) -> None:
    """Run the daemon: webhooks, health, metrics, poll ticks and workers (migrates first)."""
    from syncd.daemon import Daemon, Server

    cfg = _load(config)
    failpoints.arm_from_env()  # the fault suite's crash points (docs/reliability.md); none unless set
    # Migrate and read the mappings before uvicorn: a database or mapping problem is then
    # one line and exit code here, not a failed lifespan with a traceback in the log.
    asyncio.run(_prepare(cfg))
    daemon = Daemon(cfg)
    server = Server(daemon.server_config(log_format=log_format), daemon)
    # uvicorn drains on SIGTERM/SIGINT, then re-raises the signal with the handler that was
    # installed before it: make that one a no-op so a drained shutdown exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    # A refused start is said in one line below, not as uvicorn's traceback.
    uvicorn_errors = logging.getLogger("uvicorn.error")

    def unless_refused(_record: logging.LogRecord) -> bool:
        return daemon.refusal is None

    uvicorn_errors.addFilter(unless_refused)
    try:
        server.run()
    except SystemExit:  # uvicorn exits 3 when the lifespan fails to start
        if daemon.refusal is None:
            raise
    finally:
        uvicorn_errors.removeFilter(unless_refused)
    if not server.started:
        if daemon.refusal:
            _problem(daemon.refusal)
        raise typer.Exit(EXIT_PROBLEMS)


async def _prepare(config: Config) -> None:
    from syncd.core.mapping import load_mapping
    from syncd.store.db import Store

    for pipeline in config.settings.pipelines:
        load_mapping(config.mapping_path(pipeline))
    store = Store.open(config.daemon.database_url)
    try:
        await store.migrate()
    finally:
        await store.close()


@app.command()
def check(config: ConfigOption = Path("config.toml")) -> None:
    """Validate the config and mappings, check each connection's credentials, and the drift guard.

    Every problem is reported in one run, each with its file, line and key. Credentials
    are checked with a fresh token request where the connection has a token endpoint.
    The drift guard checks every mapping against the vendors' live schemas: each CRM
    property it reads exists, each account code, tax type and currency it can produce
    exists at the invoicing tool. Safe beside a running daemon: it spends no single-use
    refresh token (an access token it fetched for the drift guard may be stored, as the
    daemon would); on a database not created yet it creates nothing and says so.
    Exit 0 when all is fine, 1 when problems were found, 3 when the database could not
    be reached.
    """
    with tempfile.TemporaryDirectory(prefix="syncd-check-") as scratch:
        checked = asyncio.run(_check(config, Path(scratch)))
    for note in checked.notes:
        err.print("!", note, style="yellow", markup=False, highlight=False, soft_wrap=True)
    for problem in checked.problems:
        _problem(problem)
    if checked.problems:
        raise typer.Exit(EXIT_UNREACHABLE if checked.unreachable else EXIT_PROBLEMS)
    console.print("[green]✓[/green] config, mappings and connections are fine")


@dataclasses.dataclass(kw_only=True)
class _Checked:
    """What ``syncd check`` found."""

    problems: list[str] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)
    unreachable: bool = False


async def _check(path: Path, scratch: Path) -> _Checked:
    from syncd.core.mapping import load_mapping
    from syncd.engine.drift import check_pipelines
    from syncd.engine.runtime import Runtime
    from syncd.engine.selectors import stored_overlaps

    try:
        found = inspect_config(path)
    except ConfigError as exc:
        return _Checked(problems=list(exc.problems))
    checked = _Checked(problems=list(found.problems))
    config = found.config
    syncd_logging.configure(config.daemon.log_level)
    pipelines = []
    for pipeline in config.settings.pipelines:
        try:
            load_mapping(config.mapping_path(pipeline))
        except MappingError as exc:
            checked.problems += exc.problems
        else:
            pipelines.append(pipeline)
    connections = _buildable(found, checked)
    pipelines = [p for p in pipelines if {p.crm, p.invoicing, p.time_tracking} - {None} <= connections.keys()]
    ready = await _database_ready(config.daemon.database_url, found.place("daemon", "database_url"), checked)
    # Unless the database is there and migrated, the connectors are checked with a
    # throw-away store in ``scratch``: nothing is created where the config points.
    throwaway = f"sqlite:///{scratch / 'check.db'}"
    daemon = config.daemon if ready else config.daemon.model_copy(update={"database_url": throwaway})
    settings = config.settings.model_copy(update={"daemon": daemon, "pipelines": tuple(pipelines)})
    try:
        runtime = await Runtime.start(
            dataclasses.replace(config, settings=settings, connections=connections), migrate=not ready
        )
    except (ConfigError, MappingError) as exc:
        checked.problems += exc.problems
        return checked
    try:
        failed: set[str] = set()
        for name, connector in runtime.connectors.items():
            try:
                problems = [f"{found.place('connections', name)}: {p}" for p in await connector.check()]
            except SyncdError as exc:
                problems = [f"{found.place('connections', name)}: {exc}"]
            checked.problems += problems
            if problems:
                failed.add(name)
        # A connection whose credentials failed is not asked again (nor its token refreshed).
        checked.problems += [str(problem) for problem in await check_pipelines(runtime, skip=failed)]
        # Pipelines on one CRM must take disjoint deals (syncd/engine/selectors.py).
        # (A possible overlap no stored deal hits is logged as a warning, not a problem.)
        checked.problems += [str(overlap) for overlap in await stored_overlaps(runtime) if overlap.records]
    finally:
        await runtime.aclose()
    return checked


def _buildable(found: Inspection, checked: _Checked) -> dict[str, Connection]:
    """The connections whose webhook verifier can be built (a missing signing secret is a problem)."""
    from syncd.engine.runtime import utcnow

    buildable: dict[str, Connection] = {}
    for name, connection in found.config.connections.items():
        try:
            if connection.spec.verifier is not None:
                connection.spec.verifier(connection.settings, utcnow)
        except ConfigError as exc:
            checked.problems.append(f"{found.place('connections', name)}: {exc.message}")
        else:
            buildable[name] = connection
    return buildable


def _sqlite_file_there(url: str, place: str, checked: _Checked) -> bool:
    """False, with a note or problem, when the SQLite file of ``url`` does not exist (yet)."""
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or parsed.database in (None, "", ":memory:"):
        return True
    file = Path(parsed.database or "")
    if not file.parent.is_dir():
        checked.problems.append(f"{place}: the folder {file.parent} does not exist")
        return False
    if not file.exists():
        checked.notes.append(f"database {file} does not exist yet: {_MIGRATE}")
        return False
    return True


async def _database_ready(url: str, place: str, checked: _Checked) -> bool:
    """Whether the database is reachable and migrated; else a note or problem says what to do.

    Creates nothing: a SQLite file that does not exist is not opened.
    """
    import sqlalchemy as sa

    from syncd.store.db import Store

    shown = redact_url(url)
    if not _sqlite_file_there(url, place, checked):
        return False
    store = Store.open(url)
    try:
        async with store.connect() as conn:
            ready = await conn.run_sync(lambda sync: sa.inspect(sync).has_table("meta"))
    except sa_exc.SQLAlchemyError as exc:
        line, _ = _database_problem(exc)
        checked.problems.append(f"{place}: {line} ({shown})")
        checked.unreachable = True
        return False
    finally:
        await store.close()
    if not ready:
        checked.notes.append(f"database {shown} has no syncd tables yet: {_MIGRATE}")
    return bool(ready)


@app.command()
def status(config: ConfigOption = Path("config.toml"), as_json: JsonOption = False) -> None:
    """Per connection: last sync, backlog, dead letters, failing streak; the newest invoices; open outcomes; alerts."""
    from syncd.cli.listings import status as read_status
    from syncd.cli.listings import status_json, status_lines, terminal_width

    cfg = _load(config)
    alerting = cfg.settings.alerts.webhook_url is not None
    found = asyncio.run(_with_store(cfg, lambda store: read_status(store, list(cfg.connections), alerting=alerting)))
    if as_json:
        print(json.dumps(status_json(found), indent=2))
        return
    _lines(status_lines(found, terminal_width()))


async def _with_store(config: Config, read: Callable[[Store], Awaitable[_T]]) -> _T:
    """``read`` on the configured database, closed afterwards."""
    from syncd.store.db import Store

    store = Store.open(config.daemon.database_url)
    try:
        return await read(store)
    finally:
        await store.close()


def _lines(lines: list[str]) -> None:
    """Print lines already laid out to the terminal's width (no markup, no re-wrapping)."""
    for line in lines:
        print(line)


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = Path("config.toml")) -> None:
    """Migrate the database to the newest schema (under a database lock)."""
    from syncd.store.db import Store

    cfg = _load(config)

    async def go() -> None:
        store = Store.open(cfg.daemon.database_url)
        try:
            await store.migrate()
        finally:
            await store.close()

    asyncio.run(go())
    console.print("[green]✓[/green] database is at the newest schema")


@db_app.command("current")
def db_current(config: ConfigOption = Path("config.toml")) -> None:
    """Print the schema revision of the database and the newest one shipped; creates nothing."""
    from syncd.store.copy import NOT_INITIALISED, revision

    cfg = _load(config)
    try:
        found = asyncio.run(revision(cfg.daemon.database_url))
    except SyncdError as exc:
        _problem(str(exc))
        raise typer.Exit(1) from None
    print(f"database: {found.current or NOT_INITIALISED}")
    print(f"shipped:  {found.head}")
    if found.current is not None and not found.up_to_date:
        print("the database is behind; run syncd db upgrade")


@db_app.command("copy")
def db_copy(
    to: Annotated[str, typer.Option("--to", help="The empty target database URL (SQLite or PostgreSQL).")],
    config: ConfigOption = Path("config.toml"),
    batch_rows: Annotated[int, typer.Option(help="Rows per batch.", min=1)] = 1000,
) -> None:
    """Copy every row of the configured database into an empty database (migrated first); stop syncd before."""
    from syncd.store.copy import copy_database, redacted

    cfg = _load(config)
    try:
        copied = asyncio.run(copy_database(cfg.daemon.database_url, to, batch_rows=batch_rows))
    except SyncdError as exc:
        _problem(str(exc))
        raise typer.Exit(1) from None
    table = Table("table", "rows")
    for item in copied:
        table.add_row(item.table, str(item.target_rows))
    console.print(table)
    console.print(
        f"[green]✓[/green] copied to {redacted(to)}; every table has as many rows as the source", soft_wrap=True
    )


@app.command()
def keygen() -> None:
    """Print a new key for ``[daemon].encryption_key`` (OAuth tokens at rest)."""
    print(Fernet.generate_key().decode())


@setup_app.command("hubspot")
def setup_hubspot(
    config: ConfigOption = Path("config.toml"),
    connection: Annotated[str, typer.Option(help="The HubSpot connection name.")] = "hubspot",
) -> None:
    """Create, idempotently, the deal properties syncd writes (group ``syncd``), and list each one.

    With ``[collections] company_status``, the company properties too.
    """
    cfg = _load(config)
    methods = ["ensure_properties"]
    if cfg.settings.collections.company_status:
        methods.append("ensure_company_properties")
    try:
        results = asyncio.run(_with_connector(cfg, connection, *methods))
    except (AuthError, ConfigError) as exc:
        _problem(str(exc))
        raise typer.Exit(1) from None
    for object_type, result in zip(("deal", "company"), results, strict=False):
        group = "created" if result.group_created else "already present"
        line = f"{connection}: {object_type} property group 'syncd' {group}"
        console.print(line, markup=False, highlight=False)
        for name in (*result.created, *result.present):
            state = "created" if name in result.created else "already present"
            console.print(f"  {name:<28} {state}", markup=False, highlight=False)
        console.print(
            f"{len(result.created)} created, {len(result.present)} already present", markup=False, highlight=False
        )


async def _with_connector(config: Config, connection: str, *methods: str) -> list[Any]:
    from syncd.engine.runtime import Runtime

    if connection not in config.connections:
        err.print(f"no connection named {connection!r}; defined: {', '.join(config.connections)}")
        raise typer.Exit(2)
    runtime = await Runtime.start(config)
    try:
        return [await getattr(runtime.connectors[connection], method)() for method in methods]
    finally:
        await runtime.aclose()


@auth_app.command("xero")
def auth_xero(
    config: ConfigOption = Path("config.toml"),
    connection: Annotated[str, typer.Option(help="The Xero connection name.")] = "xero",
) -> None:
    """OAuth2 code flow: print the consent URL, take the redirect on localhost, store the tokens."""
    from syncd.cli.oauth import authorize

    cfg = _load(config)
    try:
        asyncio.run(authorize(cfg, connection, console))
    except ConfigError as exc:
        _problem(str(exc))
        raise typer.Exit(2) from None


@dead_app.command("list")
def dead_list(
    config: ConfigOption = Path("config.toml"),
    all_: Annotated[bool, typer.Option("--all", help="Replayed and dismissed ones too.")] = False,
    as_json: JsonOption = False,
) -> None:
    """List dead letters (open ones unless --all): reason, place, and the deal and client they are about."""
    from syncd.cli.listings import dead_letter_json, dead_letter_lines, dead_letters, terminal_width

    cfg = _load(config)

    async def read(store: Store) -> tuple[list[Any], dict[str, int]]:
        counts: dict[str, int] = {}
        for (_, state), n in (await store.dead_letter_counts()).items():
            counts[state] = counts.get(state, 0) + n
        return await dead_letters(store, every=all_), counts

    items, counts = asyncio.run(_with_store(cfg, read))
    if as_json:
        print(json.dumps([dead_letter_json(item) for item in items], indent=2))
        return
    _lines(dead_letter_lines(items, counts, every=all_, width=terminal_width()))


@dead_app.command("dismiss")
def dead_dismiss(
    letter_id: Annotated[int, typer.Argument(help="The dead letter id (as `dead-letters list` shows it).")],
    why: Annotated[str, typer.Option("--why", help="Why it needs no replay: what was done instead.")],
    config: ConfigOption = Path("config.toml"),
    by: Annotated[str | None, typer.Option("--by", help="Who dismisses it (default: the login name).")] = None,
) -> None:
    """Close a dead letter that needs no replay, keeping who, when and why; `list` then hides it."""
    from syncd.engine.replay import dismiss_dead_letter

    if not why.strip():
        raise typer.BadParameter("say why the dead letter needs no replay", param_hint="--why")
    who = by or _login_name()
    cfg = _load(config)
    now = datetime.now(UTC)
    asyncio.run(_with_store(cfg, lambda store: dismiss_dead_letter(store, letter_id, why=why.strip(), by=who, now=now)))
    print(f"dead letter {letter_id} dismissed by {who}")


def _login_name() -> str:
    """The login name of whoever runs the command (``unknown`` where the system cannot say)."""
    import getpass

    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no LOGNAME/USER and no passwd entry (a bare container)
        return "unknown"


@app.command()
def replay(
    ids: Annotated[list[int] | None, typer.Argument(help="Dead letter ids.")] = None,
    config: ConfigOption = Path("config.toml"),
    all_: Annotated[bool, typer.Option("--all", help="Replay every open dead letter.")] = False,
) -> None:
    """Re-run dead letters after the mapping or the data is fixed (no duplicate effects).

    An id that names no dead letter is an error (exit 1) and nothing is requeued.
    """
    from syncd.engine.replay import replay_dead_letters

    if not ids and not all_:
        err.print("name dead letter ids, or --all")
        raise typer.Exit(2)
    cfg = _load(config)
    done = asyncio.run(replay_dead_letters(cfg, ids or [], all_=all_))
    for letter_id, why_not in done.left:
        err.print(
            "!", f"dead letter {letter_id} left as it is: {why_not}", style="yellow", markup=False, highlight=False
        )
    console.print(f"requeued {done.count} record(s); the daemon processes them next")


def _port_option(name: str, what: str) -> Any:
    """A port option of `syncd emulate`, also read from ``SYNCD_EMULATE_<NAME>_PORT``."""
    return typer.Option(
        f"--{name}-port",
        envvar=f"SYNCD_EMULATE_{name.upper()}_PORT",
        min=0,
        max=65535,
        help=f"Port on 127.0.0.1 for {what} (0: a free one, printed).",
    )


@app.command()
def emulate(
    write_config: Annotated[
        Path | None, typer.Option("--write-config", help="Also write the config to this file (its database beside it).")
    ] = None,
    hubspot_port: Annotated[int, _port_option("hubspot", "the HubSpot emulator")] = 8101,
    xero_port: Annotated[int, _port_option("xero", "the Xero emulator")] = 8102,
    harvest_port: Annotated[int, _port_option("harvest", "the Harvest emulator")] = 8103,
    syncd_port: Annotated[int, _port_option("syncd", "syncd's webhooks ([daemon].listen)")] = 8080,
) -> None:
    """Serve seeded HubSpot, Xero and Harvest emulators on 127.0.0.1 and print a config for them; Ctrl-C stops.

    Deals changed over the HubSpot emulator's API reach syncd as signed webhooks.
    """
    from syncd.cli.emulate import Options, Ports
    from syncd.cli.emulate import emulate as serve_emulators

    syncd_logging.configure("warning")
    ports = Ports(hubspot=hubspot_port, xero=xero_port, harvest=harvest_port, syncd=syncd_port)
    options = Options(ports=ports, write_config=write_config)

    async def until_stopped() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await serve_emulators(options, lambda line: print(line, flush=True), stop)

    asyncio.run(until_stopped())


@app.command()
def demo(
    keep: Annotated[bool, typer.Option(help="Keep the temporary folder (config, database) and print where.")] = False,
) -> None:
    """Run the end-to-end demo against the HubSpot and Xero emulators, and exit."""
    from syncd.cli.demo import run_demo

    syncd_logging.configure("warning")
    summary = asyncio.run(run_demo(keep=keep))
    if not summary.get("ok"):
        raise typer.Exit(1)


def _day(text: str, option: str) -> date:
    """A ``YYYY-MM-DD`` option value, or a usage error naming the option."""
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise typer.BadParameter(f"{text!r} is not a date (YYYY-MM-DD)", param_hint=option) from None


@app.command()
def simulate(
    client: Annotated[str, typer.Option("--client", help="The client's key, e.g. hubspot:company:501.")],
    from_: Annotated[str, typer.Option("--from", help="First day simulated (YYYY-MM-DD).")],
    to: Annotated[str, typer.Option("--to", help="First day no longer simulated (YYYY-MM-DD).")],
    json_: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    config: ConfigOption = Path("config.toml"),
) -> None:
    """Run one client's full billing cycle over a range with no effects; print every event and draft."""
    start, end = _day(from_, "--from"), _day(to, "--to")
    if end <= start:
        raise typer.BadParameter("must be after --from", param_hint="--to")
    cfg = _load(config)
    try:
        found = asyncio.run(_simulate(cfg, client, start, end))
    except SyncdError as exc:
        _problem(str(exc))
        raise typer.Exit(1) from None
    if json_:
        print(json.dumps([_simulated_json(item) for item in found], indent=2))
        return
    table = Table("day", "engagement", "event", "status", "draft", "lines", "total", title=f"{client}: {start} – {end}")
    for item in found:
        table.add_row(*_simulated_row(item))
    console.print(table)


async def _simulate(config: Config, client: str, start: date, end: date) -> list[Any]:
    from syncd.engine.recurring import simulate as simulate_client
    from syncd.engine.runtime import Runtime

    runtime = await Runtime.start(config, migrate=False)
    try:
        return await simulate_client(runtime, client, start, end)
    finally:
        await runtime.aclose()


def _simulated_json(item: Any) -> dict[str, Any]:
    draft = item.draft
    return {
        "day": item.day.isoformat(),
        "engagement": item.event.engagement_key,
        "kind": str(item.event.kind),
        "occurrence": item.event.occurrence,
        "key": item.event.key,
        "status": item.status,
        "draft_kind": str(draft.kind) if draft is not None else None,
        "total": format(draft.subtotal(), "f") if draft is not None else None,
        "currency": draft.currency if draft is not None else None,
        "draft": draft.model_dump(mode="json") if draft is not None else None,
        "note": item.note,
    }


def _simulated_row(item: Any) -> list[str]:
    draft = item.draft
    lines = (
        "" if draft is None else "\n".join(f"{line.description}: {line.amount(draft.currency)}" for line in draft.lines)
    )
    return [
        item.day.isoformat(),
        item.event.engagement_key,
        f"{item.event.kind} {item.event.occurrence}",
        item.status,
        str(draft.kind) if draft is not None else "-",
        lines or item.note,
        f"{draft.subtotal()} {draft.currency}" if draft is not None else "",
    ]


@app.command()
def unbilled(config: ConfigOption = Path("config.toml"), as_json: JsonOption = False) -> None:
    """Billable hours logged at the time tracker but on no invoice, per client and project, with their worth."""
    from syncd.cli.listings import terminal_width, unbilled_json, unbilled_lines

    cfg = _load(config)
    try:
        found = asyncio.run(_unbilled(cfg))
    except SyncdError as exc:
        _problem(str(exc))
        raise typer.Exit(1) from None
    if as_json:
        print(json.dumps([unbilled_json(item) for item in found], indent=2))
        return
    _lines(unbilled_lines(found, terminal_width()))


async def _unbilled(config: Config) -> list[Any]:
    from syncd.cli.listings import unbilled_names
    from syncd.engine.hours import unbilled as unbilled_hours
    from syncd.engine.runtime import Runtime

    runtime = await Runtime.start(config, migrate=False)
    try:
        return await unbilled_names(runtime.store, await unbilled_hours(runtime))
    finally:
        await runtime.aclose()


@app.command()
def backfill(
    client: Annotated[str, typer.Option("--client", help="The client's key, e.g. hubspot:company:501.")],
    from_: Annotated[str | None, typer.Option("--from", help="Only events from this day on (YYYY-MM-DD).")] = None,
    config: ConfigOption = Path("config.toml"),
) -> None:
    """Turn a client's simulated (pilot) billing events into real ones; the daemon then invoices them."""
    since = _day(from_, "--from") if from_ is not None else None
    cfg = _load(config)
    try:
        keys = asyncio.run(_backfill(cfg, client, since))
    except SyncdError as exc:
        _problem(str(exc))
        raise typer.Exit(1) from None
    console.print(f"{len(keys)} billing event(s) of {client} made real; the daemon creates their invoices next")


async def _backfill(config: Config, client: str, since: date | None) -> list[str]:
    from syncd.engine.recurring import backfill as backfill_client
    from syncd.store.db import Store

    store = Store.open(config.daemon.database_url)
    try:
        return await backfill_client(store, client, since=since, now=datetime.now(UTC))
    finally:
        await store.close()


@preview_app.callback()
def preview(
    ctx: typer.Context,
    mapping: Annotated[
        Path | None, typer.Option("--mapping", help="A proposed mapping file to compare over the stored deals.")
    ] = None,
    pipeline: Annotated[
        int | None,
        typer.Option(
            "--pipeline", help="Which pipeline of the config, counted from 1 (needed when there are several)."
        ),
    ] = None,
    json_: JsonOption = False,
    config: ConfigOption = Path("config.toml"),
) -> None:
    """Compare a proposed mapping with the current one over the stored deals (counts and per-deal diffs)."""
    if ctx.invoked_subcommand is not None:
        if mapping is not None:
            raise typer.BadParameter("use either --mapping FILE or `preview deal ID`, not both", param_hint="--mapping")
        return
    if mapping is None:
        err.print(ctx.get_help(), markup=False, highlight=False)
        raise typer.Exit(2)
    from syncd.cli.preview import render_diff, run_mapping_preview

    cfg = _load(config)
    try:
        diff = asyncio.run(run_mapping_preview(cfg, mapping, pipeline=pipeline))
    except (ConfigError, MappingError) as exc:
        for problem in exc.problems:
            _problem(problem)
        raise typer.Exit(2) from None
    if json_:
        print(json.dumps(diff.as_json(), indent=2))
    else:
        render_diff(diff, console)


@preview_app.command("deal")
def preview_deal(
    deal_id: Annotated[str, typer.Argument(help="The CRM's deal id.")],
    json_: JsonOption = False,
    config: ConfigOption = Path("config.toml"),
) -> None:
    """Re-read a deal and print its client, engagement and invoice draft (no effect, nothing stored)."""
    from syncd.cli.preview import render_deal, run_deal_preview

    cfg = _load(config)
    try:
        previews = asyncio.run(run_deal_preview(cfg, deal_id))
    except SyncdError as exc:
        _problem(str(exc))
        raise typer.Exit(1) from None
    if json_:
        print(json.dumps([item.as_json() for item in previews], indent=2))
    else:
        render_deal(previews, console)
    if any(item.error for item in previews):
        raise typer.Exit(1)


@hours_app.command("release")
def hours_release(
    entries: Annotated[list[str], typer.Argument(help="Time entry ids (as `syncd unbilled` lists them).")],
    config: ConfigOption = Path("config.toml"),
    connection: Annotated[str | None, typer.Option("--connection", help="The time tracker connection.")] = None,
) -> None:
    """Let hours held over an engagement's cap be billed by its next hours invoice."""
    from datetime import UTC, datetime

    from syncd.engine.hours import release_over_cap
    from syncd.store.db import Store

    cfg = _load(config)
    trackers = [p.time_tracking for p in cfg.settings.pipelines if p.time_tracking]
    name = connection or (trackers[0] if len(set(trackers)) == 1 else None)
    if name is None:
        _problem("--connection: name the time tracker connection (none, or several, are configured)")
        raise typer.Exit(2)

    async def go() -> list[str]:
        store = Store.open(cfg.daemon.database_url)
        try:
            now = datetime.now(UTC)
            return [entry for entry in entries if not await release_over_cap(store, name, entry, now)]
        finally:
            await store.close()

    missing = asyncio.run(go())
    for entry in missing:
        _problem(f"{name}: no time entry {entry} held over a cap (or it was released already)")
    console.print(f"released {len(entries) - len(missing)} entr(y/ies); the next hours invoice bills them")
    if missing:
        raise typer.Exit(1)


KindOption = Annotated[str | None, typer.Option("--kind", help="skip, simulated or attention.")]


@outcomes_app.command("list")
def outcomes_list(
    config: ConfigOption = Path("config.toml"),
    kind: KindOption = None,
    deal: Annotated[str | None, typer.Option("--deal", help="Only this CRM deal id.")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Resolved ones too.")] = False,
    as_json: JsonOption = False,
) -> None:
    """Recorded skips, simulated events and outcomes that need attention, with their reasons."""
    _print_outcomes(config, kind=kind, deal=deal, all_=all_, as_json=as_json)


@app.command()
def skipped(
    config: ConfigOption = Path("config.toml"),
    deal: Annotated[str | None, typer.Option("--deal", help="Only this CRM deal id.")] = None,
    as_json: JsonOption = False,
) -> None:
    """Triggers recorded as skipped, with the reason (same as ``outcomes list --kind skip``)."""
    _print_outcomes(config, kind="skip", deal=deal, all_=True, as_json=as_json)


@outcomes_app.command("resolve")
def outcomes_resolve(
    outcome_id: Annotated[int, typer.Argument(help="The outcome id.")],
    why: Annotated[str, typer.Option("--why", help="What was done about it.")],
    config: ConfigOption = Path("config.toml"),
) -> None:
    """Close an outcome that needed attention, recording what was done."""
    from syncd.core.errors import RecordError
    from syncd.store.db import Store
    from syncd.store.outcomes import resolve_outcome

    cfg = _load(config)

    async def go() -> None:
        store = Store.open(cfg.daemon.database_url)
        try:
            await resolve_outcome(store, outcome_id, why)
        finally:
            await store.close()

    try:
        asyncio.run(go())
    except RecordError as exc:
        _problem(str(exc))
        raise typer.Exit(1) from None
    console.print(f"outcome {outcome_id} resolved")


def _print_outcomes(config: Path, *, kind: str | None, deal: str | None, all_: bool, as_json: bool) -> None:
    from syncd.store.db import Store
    from syncd.store.outcomes import KINDS, list_outcomes
    from syncd.store.outcomes import as_json as outcome_json

    if kind is not None and kind not in KINDS:
        _problem(f"--kind: expected one of {', '.join(KINDS)}, got {kind!r}")
        raise typer.Exit(2)
    cfg = _load(config)

    async def go() -> list[Any]:
        store = Store.open(cfg.daemon.database_url)
        try:
            return await list_outcomes(store, kind=kind, include_resolved=all_, object_id=deal)
        finally:
            await store.close()

    rows = asyncio.run(go())
    if as_json:
        print(json.dumps([outcome_json(row) for row in rows], indent=2))
        return
    table = Table("id", "kind", "reason", "deal", "detail", "when", "status", width=max(console.width, 80))
    for row in rows:
        when = (row.trigger_at or row.created_at).isoformat(timespec="minutes")
        table.add_row(
            str(row.id), row.kind, row.reason, row.object_id or row.engagement_key or "", row.detail, when, row.status
        )
    console.print(table)


class Format(enum.StrEnum):
    """How a report is printed."""

    table = "table"
    json = "json"
    csv = "csv"


FormatOption = Annotated[Format, typer.Option("--format", help="table, json or csv.")]
invoice_app = typer.Typer(help="One invoice's trail.", no_args_is_help=True)
app.add_typer(invoice_app, name="invoice")
client_app = typer.Typer(help="The client billing record: fields, owners, change log, conflicts.", no_args_is_help=True)
app.add_typer(client_app, name="client")


@app.command("audit")
def audit_command(
    month: Annotated[
        str | None,
        typer.Option("--month", help="YYYY-MM, in the company's time zone; default: the last complete month."),
    ] = None,
    format_: FormatOption = Format.table,
    config: ConfigOption = Path("config.toml"),
    plot: Annotated[
        bool | None,
        typer.Option(
            "--plot/--no-plot",
            help="Add a text plot of the months' shares to the table; default: when stdout is a terminal. "
            "JSON and CSV never carry it.",
        ),
    ] = None,
) -> None:
    """The monthly audit: late invoices, hand corrections, the overdue share, trigger → issued latency, trends."""
    from syncd.engine import audit

    try:
        chosen = audit.Month.parse(month) if month is not None else None
    except ValueError as exc:
        _problem(f"--month: {exc}")
        raise typer.Exit(2) from None
    cfg = _load(config)
    target = chosen or audit.Month.last_complete(datetime.now(UTC), cfg.daemon.timezone)
    report = asyncio.run(_with_store(cfg, lambda store: audit.build_report(store, cfg, target)))
    if format_ is Format.json:
        print(json.dumps(report.as_json(), indent=2))
        return
    if format_ is Format.csv:
        print(audit.as_csv(report), end="")
        return
    console.print(
        f"audit of {report.month} ({report.zone}); invoice_delay_s: "
        + (", ".join(f"{name} {delay} s" for name, delay in report.delays.items()) or "-")
    )
    table = Table("", *(str(m.month) for m in report.history), "trend", width=max(console.width, 100))
    for row in audit.summary_rows(report):
        table.add_row(*row)
    console.print(table)
    worst = audit.worst_rows(report)
    if worst:
        late = Table("late invoice", "deal", "client", "triggered", "delay", "invoice_delay_s", title="latest invoices")
        for row in worst:
            late.add_row(*row)
        console.print(late)
    if plot if plot is not None else sys.stdout.isatty():
        _lines(["", *audit.plot_lines(report)])


@invoice_app.command("show")
def invoice_show(
    number: Annotated[str, typer.Argument(help="The ledger's invoice number (or syncd's key, or the ledger's id).")],
    format_: FormatOption = Format.table,
    config: ConfigOption = Path("config.toml"),
) -> None:
    """One invoice's trail: trigger, billing event, draft, what was sent, the ledger's answers, status changes, corrections."""
    from syncd.store.trail import invoice_trail

    cfg = _load(config)
    found = asyncio.run(_with_store(cfg, lambda store: invoice_trail(store, number)))
    if format_ is Format.json:
        print(json.dumps(found.as_json(), indent=2, default=str))
        return
    if format_ is Format.csv:
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(["at", "what", "actor", "summary"])
        for step in found.steps:
            writer.writerow([step.at.isoformat(), step.what, step.actor, step.summary])
        print(out.getvalue(), end="")
        return
    invoice = found.invoice
    console.print(
        f"{invoice.kind} {invoice.number or invoice.invoice_id} ({invoice.key}): {invoice.state}, "
        f"{invoice.total} {invoice.currency}, due {invoice.due_date or '-'}, deal {invoice.crm_object_id}",
        markup=False,
    )
    table = Table("at", "what", "by", "summary", width=max(console.width, 100))
    for step in found.steps:
        table.add_row(step.at.isoformat(timespec="seconds"), step.what, step.actor, step.summary)
    console.print(table)


@client_app.command("list")
def client_list(format_: FormatOption = Format.table, config: ConfigOption = Path("config.toml")) -> None:
    """Every client with its legal name, currency, payment terms, each system's id and open conflicts."""
    from syncd.engine.clients import list_clients
    from syncd.store.db import ClientConflictRow

    cfg = _load(config)

    async def go(store: Any) -> tuple[list[Any], dict[str, int]]:
        rows = await list_clients(store)
        conflicts = await store.select(ClientConflictRow, ClientConflictRow.status == "open")
        counts: dict[str, int] = {}
        for conflict in conflicts:
            counts[conflict.client_key] = counts.get(conflict.client_key, 0) + 1
        return rows, counts

    rows, counts = asyncio.run(_with_store(cfg, go))
    items = [
        {
            "key": row.key,
            "legal_name": row.legal_name,
            "currency": (row.record or {}).get("currency", row.data.get("currency")),
            "payment_terms_days": (row.record or {}).get("payment_terms_days", row.data.get("payment_terms_days")),
            "ids": {row.key.split(":", 1)[0]: row.key.rsplit(":", 1)[-1], **row.external_ids},
            "open_conflicts": counts.get(row.key, 0),
        }
        for row in rows
    ]
    if format_ is not Format.table:
        _print_items(items, format_)
        return
    table = Table("client", "legal name", "currency", "terms (days)", "ids", "open conflicts")
    for item in items:
        ids = ", ".join(f"{name} {ident}" for name, ident in item["ids"].items())
        table.add_row(
            item["key"],
            item["legal_name"],
            str(item["currency"]),
            str(item["payment_terms_days"]),
            ids,
            str(item["open_conflicts"]),
        )
    console.print(table)


@client_app.command("show")
def client_show(
    key: Annotated[str, typer.Argument(help="The client's key, e.g. hubspot:company:501 (`syncd client list`).")],
    format_: FormatOption = Format.table,
    config: ConfigOption = Path("config.toml"),
) -> None:
    """One client's record: each field's value, owner and value at each system; conflicts; the change log."""
    from syncd.engine.clients import client_record, show_value

    cfg = _load(config)
    record = asyncio.run(_with_store(cfg, lambda store: client_record(store, key, cfg)))
    if format_ is Format.json:
        print(json.dumps(record.as_json(), indent=2, default=str))
        return
    if format_ is Format.csv:
        _print_items(
            [
                {
                    "at": c.at.isoformat(),
                    "system": c.system,
                    "field": c.field,
                    "old": show_value(c.old),
                    "new": show_value(c.new),
                    "by": c.by,
                }
                for c in record.changes
            ],
            format_,
        )
        return
    console.print(
        f"{record.key}: {record.legal_name}; ids: " + ", ".join(f"{n} {i}" for n, i in record.ids.items()), markup=False
    )
    systems = sorted({system for item in record.fields for system in item.seen})
    fields = Table("field", "value in force", "owner", *(f"at {system}" for system in systems), "conflict")
    for item in record.fields:
        conflict = item.conflict
        fields.add_row(
            item.field,
            show_value(item.value),
            item.owner,
            *(show_value(item.seen[system]) if system in item.seen else "" for system in systems),
            f"open: {conflict.other} has {show_value(conflict.other_value)}" if conflict else "",
        )
    console.print(fields)
    log = Table("when", "system", "field", "old", "new", "by", title="change log")
    for change in record.changes:
        log.add_row(
            change.at.isoformat(timespec="seconds"),
            change.system,
            change.field,
            show_value(change.old),
            show_value(change.new),
            change.by,
        )
    console.print(log)


@client_app.command("resolve")
def client_resolve(
    key: Annotated[str, typer.Argument(help="The client's key.")],
    field: Annotated[str, typer.Argument(help="The field in conflict (`syncd client show KEY`).")],
    take: Annotated[str, typer.Option("--take", help="owner: keep the owner's value; other: take the other system's.")],
    config: ConfigOption = Path("config.toml"),
) -> None:
    """Settle a conflict: keep the owner's value (written over the other edit) or take the other system's (written to the owner)."""
    from syncd.engine.clients import resolve
    from syncd.engine.runtime import Runtime

    if take not in ("owner", "other"):
        _problem(f"--take: expected owner or other, got {take!r}")
        raise typer.Exit(2)
    cfg = _load(config)

    async def go() -> Any:
        runtime = await Runtime.start(cfg, migrate=False)
        try:
            return await resolve(runtime, key, field, take)
        finally:
            await runtime.aclose()

    conflict = asyncio.run(go())
    console.print(f"{key} {field}: took the {take}'s value; conflict {conflict.id} resolved", markup=False)


def _print_items(items: list[dict[str, Any]], format_: Format) -> None:
    if format_ is Format.json:
        print(json.dumps(items, indent=2, default=str))
        return
    out = io.StringIO()
    names = list(items[0]) if items else []
    writer = csv.DictWriter(out, fieldnames=names, lineterminator="\n")
    writer.writeheader()
    for item in items:
        writer.writerow({k: json.dumps(v) if isinstance(v, dict) else v for k, v in item.items()})
    print(out.getvalue(), end="")


def main() -> None:
    """Entry point of the ``syncd`` script."""
    app()
