"""``processgpt-sync status``: todo counts by agent_orch and draft_status, the load per tenant
and the server registry; once, or refreshed with ``--watch``.

Owns these tables and the refresh loop. Must not write to the database.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from rich.console import Group
from rich.live import Live
from rich.text import Text

from .. import cli_terminal as terminal
from ..errors import StorageUnavailable
from ..storage import Storage
from .backend import checked_storage


def cmd_status(args: argparse.Namespace) -> int:
    out = terminal.console()
    storage = checked_storage(args)
    try:
        if not args.watch:
            _show(out, _snapshot(storage, args), args.json)
            return 0
        if args.json or not out.is_terminal:  # one snapshot per interval, for logs and scripts
            while True:
                _show(out, _watched(storage, args), args.json)
                time.sleep(args.interval)
        with Live(_snapshot(storage, args), console=out, auto_refresh=False) as live:
            while True:
                time.sleep(args.interval)
                live.update(_watched(storage, args), refresh=True)
    finally:
        storage.close()


def _watched(storage: Storage, args: argparse.Namespace) -> Any:
    """A reading for ``--watch``, which refreshes until Ctrl+C: an outage is shown, not the
    end of the watch (a restart of the database, a dropped link)."""
    try:
        return _snapshot(storage, args)
    except StorageUnavailable as exc:
        problem = f"{exc} (trying again every {args.interval:g}s)"
        return {"error": problem} if args.json else Text(f"database unreachable: {problem}")


def _snapshot(storage: Storage, args: argparse.Namespace) -> Any:
    """One reading: a JSON-ready dict with ``--json``, else the tables to print."""
    rows = storage.status(args.agent_orch)
    load = storage.tenant_load(args.agent_orch)
    servers = storage.servers(args.agent_orch)
    if args.json:
        return {"counts": [dict(row) for row in rows], "tenants": [dict(r) for r in load],
                "servers": [dict(r) for r in servers]}
    table_rows, unclaimable, waiting, trashed = [], 0, 0, 0
    for row in rows:
        state, claimable = row["draft_status"], row.get("claimable", True)
        if row.get("in_trash"):
            state = f"{state or ''} (in the trash)".lstrip()
            trashed += int(row["count"])
        elif state is None:
            state = "(claimable)" if claimable else "(not claimable)"
            unclaimable += 0 if claimable else int(row["count"])
        elif state == "FB_REQUESTED" and not claimable:
            state = "FB_REQUESTED (not claimable)"
            waiting += int(row["count"])
        table_rows.append((row["agent_orch"], state, row["count"]))
    parts: list[Any] = [terminal.table(("agent_orch", "draft_status", "count"), table_rows,
                                       right=("count",))]
    if not rows:
        parts.append("(no todos)")
    if unclaimable:
        parts.append(f"\n{terminal.counted(unclaimable, 'todo')} without draft_status "
                     f"{_are(unclaimable)} not claimable: a server claims rows with status "
                     "IN_PROGRESS, agent_mode DRAFT or COMPLETE and no draft (see README, Own "
                     "database)")
    if waiting:
        parts.append(f"\n{terminal.counted(waiting, 'answered or revised todo')} "
                     f"{_are(waiting)} not claimable: their step is not IN_PROGRESS (they run "
                     "once their process puts it in progress), or the UI cancelled them, or "
                     "the process finished the step (DONE)")
    if trashed:
        parts.append(f"\n{terminal.counted(trashed, 'waiting todo')} "
                     f"{'belongs' if trashed == 1 else 'belong'} to process instances in the "
                     "ProcessGPT trash: they run if the instance is restored")
    if load:
        parts += ["", _tenant_load(load)]
    parts += ["", _servers(servers)]
    return Group(*parts)


def _are(count: int) -> str:
    return "is" if count == 1 else "are"


def _show(out: Any, value: Any, as_json: bool) -> None:
    if as_json:
        terminal.print_json(value)
    else:
        out.print(value)


def _tenant_load(rows: list[Any]) -> Any:
    """Queued and running todos per tenant: what fair claims balance and limits cap."""
    return terminal.table(
        ("agent_orch", "tenant", "queued", "running"),
        ((row["agent_orch"], row["tenant_id"], row["queued"], row["running"]) for row in rows),
        right=("queued", "running"))


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
