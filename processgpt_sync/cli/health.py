"""``processgpt-sync health``: the container probe. Checks, in order, that the database
answers, that the schema is complete, and then either that LISTEN/NOTIFY works or that the named
servers' registry heartbeats are fresh; the first failure decides the exit code.

Owns the checks and their exit codes. Must not write anything but a test NOTIFY.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from rich.markup import escape

from .. import cli_terminal as terminal
from ..errors import SchemaMissing, StorageError, StorageUnavailable
from ..storage import Storage
from .backend import connect_storage

HEALTH_UNREACHABLE, HEALTH_SCHEMA, HEALTH_LISTEN, HEALTH_SERVER = 3, 4, 5, 6

Check = Callable[[str, bool, str], None]


def cmd_health(args: argparse.Namespace) -> int:
    """Container probe: exit 0 healthy, 3 database unreachable, 4 schema missing or outdated,
    5 LISTEN/NOTIFY not working (Postgres backends only), 6 a server named by --consumer or
    --agent-orch is not registered or its heartbeat is stale (stalled, or cut off)."""
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

    storage = connect_storage(args)
    try:
        try:
            ping = getattr(storage, "ping", None)
            if ping is not None:
                ping()
            else:
                storage.status("processgpt-sync-health")
        except SchemaMissing:
            pass
        except StorageError as exc:  # unreachable, or refused (a wrong key, no permission)
            check("database", False, str(exc))
            return HEALTH_UNREACHABLE
        check("database", True, f"reachable ({storage.backend})")
        try:
            storage.check_schema()
        except StorageUnavailable as exc:
            check("schema", False, f"could not be checked: {exc}")
            return HEALTH_UNREACHABLE
        except StorageError as exc:  # missing, or not readable by this role
            check("schema", False, str(exc))
            return HEALTH_SCHEMA
        try:
            warnings = storage.schema_warnings()
        except StorageUnavailable as exc:
            check("schema", False, f"could not be checked: {exc}")
            return HEALTH_UNREACHABLE
        check("schema", True, "; ".join(["every required function installed", *warnings]))
        if args.consumer or args.agent_orch:
            return _server_checks(storage, args.agent_orch, args.consumer, check)
        return _listen_check(storage, check)
    finally:
        storage.close()


def _server_checks(storage: Storage, agent_orch: str | None, consumer: str | None,
                   check: Check) -> int:
    """Running servers, from the registry: each must have sent a heartbeat lately (a server
    cut off from the database, or stalled, stops doing so)."""
    try:
        servers = storage.servers(agent_orch, consumer)
    except StorageError as exc:  # the database's answer, not the server's: 3, as above
        check("server", False, f"the server registry could not be read: {exc}")
        return HEALTH_UNREACHABLE
    if not servers:
        which = f"consumer {consumer!r}" if consumer else f"agent_orch {agent_orch!r}"
        check("server", False, f"none registered for {which} (not started, or stopped)")
        return HEALTH_SERVER
    for row in servers:
        check(f"server {row['consumer']}", bool(row["alive"]),
              f"last heartbeat {row['seen_seconds_ago']}s ago (every "
              f"{row['heartbeat_seconds']:g}s), {row['running']} running")
    return 0 if all(row["alive"] for row in servers) else HEALTH_SERVER


def _listen_check(storage: Storage, check: Check) -> int:
    """A NOTIFY sent must come back on a LISTEN connection within 3 s (a transaction pooler
    drops it); backends without LISTEN poll, which is healthy."""
    listener = storage.listener(["processgpt_sync_health"])
    if listener is None:
        check("listen", True, "wake-ups by polling (no LISTEN on this backend)")
        return 0
    try:
        listener.connect()
        storage.call("notify_health", {})
        heard = any(channel == "processgpt_sync_health" for channel, _ in listener.wait(3.0))
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
