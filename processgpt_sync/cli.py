"""The `processgpt-sync` command: init-db, enqueue, status, health, serve, asked, respond, demo.

The only module that configures logging or prints.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from .errors import (
    ConfigurationError,
    ProcessGPTSyncError,
    SchemaMissing,
    ServerFailed,
    StorageError,
    StorageUnavailable,
)
from .settings import Settings
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


def configure_logging(level: str, log_format: str) -> None:
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)


def _storage(args: argparse.Namespace) -> Storage:
    """The configured backend, checked now: unreachable or schema-less fails with one line."""
    storage = connect(
        database_url=args.database_url or os.environ.get("DATABASE_URL"),
        supabase_url=getattr(args, "supabase_url", None) or os.environ.get("SUPABASE_URL"),
        supabase_key=os.environ.get("SUPABASE_KEY") or os.environ.get("SUPABASE_SERVICE_ROLE_KEY"),
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
    from .storage.postgres import install_schema

    url = args.database_url or os.environ.get("DATABASE_URL")
    if not url and os.environ.get("SUPABASE_URL"):
        raise ConfigurationError(
            "init-db needs a direct database connection: pass --database-url with the Supabase "
            "connection string, or paste sql/schema.sql then sql/functions.sql into the "
            "Supabase SQL editor"
        )
    if url:
        install_schema(url)
        print("schema installed")
    else:
        embedded.start()
        print(f"schema installed in the embedded database ({embedded.data_dir()})")
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


def cmd_status(args: argparse.Namespace) -> int:
    storage = _storage(args)
    try:
        while True:
            rows = storage.status(args.agent_orch)
            if args.watch and sys.stdout.isatty():
                print("\033[2J\033[H", end="")  # clear the screen, cursor home
            print(f"{'agent_orch':30}  {'draft_status':13}  {'count':>7}")
            for row in rows:
                print(f"{row['agent_orch'] or '-':30}  {row['draft_status'] or '(claimable)':13}"
                      f"  {row['count']:>7}")
            if not rows:
                print("(no todos)")
            if not args.watch:
                return 0
            print(flush=True)
            time.sleep(args.interval)
    finally:
        storage.close()


HEALTH_UNREACHABLE, HEALTH_SCHEMA, HEALTH_LISTEN = 3, 4, 5


def cmd_health(args: argparse.Namespace) -> int:
    """Container probe: exit 0 healthy, 3 database unreachable, 4 schema missing or outdated,
    5 LISTEN/NOTIFY not working (Postgres backends only)."""
    storage = connect(
        database_url=args.database_url or os.environ.get("DATABASE_URL"),
        supabase_url=os.environ.get("SUPABASE_URL"),
        supabase_key=os.environ.get("SUPABASE_KEY") or os.environ.get("SUPABASE_SERVICE_ROLE_KEY"),
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
            print(f"FAIL database: {exc}")
            return HEALTH_UNREACHABLE
        except SchemaMissing:
            pass
        print(f"ok   database reachable ({storage.backend})")
        try:
            storage.check_schema()
        except SchemaMissing as exc:
            print(f"FAIL schema: {exc}")
            return HEALTH_SCHEMA
        print("ok   schema: every required function installed")
        listener = storage.listener(["processgpt_sync_health"])
        if listener is None:
            print("ok   wake-ups by polling (no LISTEN on this backend)")
            return 0
        try:
            listener.connect()
            storage.call("notify_health", {})
            heard = any(channel == "processgpt_sync_health" for channel, _ in
                        listener.wait(3.0))
        except StorageError as exc:
            print(f"FAIL listen: {exc}")
            return HEALTH_LISTEN
        finally:
            listener.close()
        if not heard:
            print("FAIL listen: no NOTIFY received within 3 s (a transaction pooler? use a "
                  "session connection, e.g. Supabase port 5432)")
            return HEALTH_LISTEN
        print("ok   LISTEN/NOTIFY round trip")
        return 0
    finally:
        storage.close()


def cmd_asked(args: argparse.Namespace) -> int:
    storage = _storage(args)
    try:
        questions = storage.open_questions(args.agent_orch)
    finally:
        storage.close()
    if not questions:
        print("(no open questions)")
        return 0
    print(f"{'job_id':50}  {'todo':8}  {'agent_orch':20}  question")
    for q in questions:
        data = q["question"] if isinstance(q["question"], dict) else {"question": q["question"]}
        text = str(data.get("question") or data.get("text") or data)
        options = f" {data['options']}" if data.get("options") else ""
        print(f"{q['job_id']:50}  {str(q['todo_id'])[:8]:8}  {q['agent_orch'] or '-':20}  "
              f"{text}{options}")
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


def load_executor(target: str) -> Any:
    """Import ``module:attribute``; a class is instantiated without arguments."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(f"executor must be given as module:attribute, got {target!r}")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module_name!r}: {exc}") from exc
    try:
        obj = getattr(module, attribute)
    except AttributeError:
        raise ConfigurationError(f"{module_name!r} has no attribute {attribute!r}") from None
    return obj() if isinstance(obj, type) else obj


def cmd_serve(args: argparse.Namespace) -> int:
    from .server import Server

    executor = load_executor(args.executor)
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
    )
    server = Server(executor, settings)
    if args.metrics_port:
        from .metrics import serve_metrics

        serve_metrics(server, args.metrics_port)
    server.run_forever()
    lingering = server.stats()["executor_threads"]
    if lingering:
        # Every write is done; only executors that ignore todo.cancelled still run, and their
        # todos were given back. Do not let them hold the process.
        logger.warning("exiting with %d executor threads still running", lingering)
        logging.shutdown()
        os._exit(0)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    return demo.run(database_url=args.database_url or os.environ.get("DATABASE_URL"),
                    todos=args.todos, workers=args.workers)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="processgpt-sync", description=__doc__)
    parser.add_argument("--log-level", default=os.environ.get("PROCESSGPT_LOG_LEVEL", "INFO"))
    parser.add_argument("--log-format", choices=("text", "json"), default="text")
    parser.add_argument("--env-file", help="load environment variables from this .env file")
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.add_argument("--database-url", help="PostgreSQL URL (default: $DATABASE_URL, "
                         "else Supabase from $SUPABASE_URL/$SUPABASE_KEY, else embedded)")
        return sub

    command("init-db", "install or upgrade the schema and functions (idempotent)").set_defaults(
        func=cmd_init_db)

    enqueue = command("enqueue", "insert a claimable todo and print its id")
    enqueue.add_argument("--agent-orch", required=True)
    enqueue.add_argument("--input", required=True)
    enqueue.add_argument("--mode", choices=("COMPLETE", "DRAFT"), default="COMPLETE")
    enqueue.add_argument("--tenant")
    enqueue.add_argument("--count", type=int, default=1)
    enqueue.set_defaults(func=cmd_enqueue)

    status = command("status", "todo counts by agent_orch and draft_status")
    status.add_argument("--agent-orch")
    status.add_argument("--watch", action="store_true", help="refresh until Ctrl+C")
    status.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    status.set_defaults(func=cmd_status)

    command("health", "check the database, the schema and LISTEN; exit 0 when healthy, 3 "
            "unreachable, 4 schema missing, 5 LISTEN not working").set_defaults(func=cmd_health)

    serve = command("serve", "serve an executor until SIGINT/SIGTERM")
    serve.add_argument("executor", help="module:attribute of a function, object or class")
    serve.add_argument("--agent-orch")
    serve.add_argument("--workers", type=int)
    serve.add_argument("--supabase-url", help="Supabase URL (the key comes from $SUPABASE_KEY)")
    serve.add_argument("--lease-seconds", type=int)
    serve.add_argument("--max-claims", type=int)
    serve.add_argument("--grace-seconds", type=float)
    serve.add_argument("--timeout", type=float, help="per-todo time limit in seconds")
    serve.add_argument("--tenant", help="serve only this tenant's todos")
    serve.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port")
    serve.set_defaults(func=cmd_serve)

    asked = command("asked", "questions to people that wait for an answer")
    asked.add_argument("--agent-orch")
    asked.set_defaults(func=cmd_asked)

    respond = command("respond", "answer a question as the ProcessGPT UI does")
    respond.add_argument("job_id")
    respond.add_argument("answer", help="the answer (JSON if it parses as JSON, else text)")
    respond.add_argument("--user-id")
    respond.set_defaults(func=cmd_respond)

    demo = command("demo", "enqueue and serve a few todos on the embedded database")
    demo.add_argument("--todos", type=int, default=8)
    demo.add_argument("--workers", type=int, default=4)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.env_file:
        from dotenv import load_dotenv

        load_dotenv(args.env_file)
    level = args.log_level if args.command == "serve" else "WARNING"
    configure_logging(level, args.log_format)
    try:
        return int(args.func(args))
    except ServerFailed as exc:
        print(f"processgpt-sync: error: {exc}", file=sys.stderr)
        return 1
    except ProcessGPTSyncError as exc:
        print(f"processgpt-sync: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
