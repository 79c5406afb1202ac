"""Commands on one todo or question: ``enqueue``, ``show``, ``retry``, ``asked``, ``respond``.

Owns their arguments' meaning and their output; every read and write is one storage call (the
SQL functions all backends share). Must not change a todo other than the one named, and must
not decide a todo's state itself: the database refuses what is not allowed (``retry`` of a
running todo) and this module reports the reason.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping
from typing import Any

from .. import cli_terminal as terminal
from ..deep_json import shown_json, with_deep_values_noted
from ..errors import ConfigurationError, StorageError
from ..payload import strict_json
from .backend import checked_storage


def cmd_enqueue(args: argparse.Namespace) -> int:
    storage = checked_storage(args)
    try:
        for _ in range(args.count):
            print(storage.enqueue(args.agent_orch, args.input, agent_mode=args.mode,
                                  tenant_id=args.tenant))
    finally:
        storage.close()
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    shown = _call_on_todo(args, "show")
    if args.json:
        print(json.dumps(with_deep_values_noted(shown, indent=2, default=str),
                         ensure_ascii=False, indent=2, default=str))
        return 0
    row, lease = shown["row"], shown.get("lease")
    state = row.get("draft_status") or ("claimable" if shown["claimable"] else "not claimable")
    print(f"todo          {row['id']}")
    print(f"agent_orch    {row.get('agent_orch')}   mode {row.get('agent_mode')}   "
          f"tenant {row.get('tenant_id') or '-'}")
    print(f"state         {state}   (status {row.get('status')}, claimed "
          f"{row.get('claim_count') or 0} times)")
    claimed = row.get("draft_status") in ("STARTED", "HUMAN_ASKED")
    expired = bool(lease and lease.get("expired") and claimed)
    if lease:
        print(f"lease         held by {lease['consumer']} until {lease['expires_at']}")
        if expired:
            print("              expired: its server stopped renewing it; " + (
                "its process instance is in the ProcessGPT trash, so no server takes the "
                "todo over unless the instance is restored (never, once it is deleted for "
                "good)" if shown.get("instance_in_trash")
                else "a server takes the todo over" + (
                    "" if row.get("status") == "IN_PROGRESS"
                    else " once its process puts the step IN_PROGRESS")))
    if shown.get("in_trash"):
        print("              its process instance is in the ProcessGPT trash: no server runs it "
              "unless the instance is restored (never, once it is deleted for good: init-db "
              "then cancels it)")
    elif shown.get("instance_in_trash") and claimed and not expired:  # running, or upstream's
        print("              its process instance is in the ProcessGPT trash: a run under way "
              "goes on, and when its claim has run out no server takes the todo over unless the "
              "instance is restored (never, once it is deleted for good)")
    elif row.get("draft_status") is None and not shown["claimable"]:
        print("              a server claims rows with status IN_PROGRESS, agent_mode DRAFT or "
              "COMPLETE and no draft")
    elif (row.get("draft_status") == "FB_REQUESTED" and not shown["claimable"]
          and row.get("status") not in ("CANCELLED", "DONE")):
        print("              a revision runs once its process puts the step IN_PROGRESS")
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
    outcome = _call_on_todo(args, "retry")
    todo_id = outcome["matches"][0]
    if not outcome["retried"]:
        raise ConfigurationError(f"todo {todo_id} was not retried: {outcome['reason']}")
    print(f"todo {todo_id} is claimable again (was {outcome['draft_status']})")
    return 0


def cmd_asked(args: argparse.Namespace) -> int:
    storage = checked_storage(args)
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
        answer = strict_json(args.answer)
    except ValueError:  # plain text, or a number JSON has no form for ('NaN'): the text
        answer = args.answer
    except RecursionError:
        raise ConfigurationError("--answer is JSON nested deeper than Python reads; give a "
                                 "flatter value") from None
    storage = checked_storage(args)
    try:
        todo_id = storage.respond(args.job_id, answer, user_id=args.user_id, todo_id=args.todo)
        if todo_id is None:
            raise ConfigurationError(f"no question with job_id {args.job_id!r}; see "
                                     "`processgpt-sync asked`")
        print(f"answered {args.job_id} (todo {todo_id})")
        try:  # the answer is stored: a failure to look at its todo only costs the note
            shown = storage.call("show", {"p_todo_id": todo_id})
        except StorageError as exc:
            print(f"note: the answer is stored; whether a run will read it is unknown: the "
                  f"todo could not be read ({exc})", file=sys.stderr)
            return 0
    finally:
        storage.close()
    note = _unheard(todo_id, (shown or {}).get("row") or {})
    if note:
        print(f"note: {note}", file=sys.stderr)
    return 0


def _unheard(todo_id: str, row: Mapping[str, Any]) -> str | None:
    """Why no run reads an answer to this todo now (it is kept all the same), or None."""
    if not row:
        return f"todo {todo_id} no longer exists: nothing will read this answer"
    status, draft_status = row.get("status"), row.get("draft_status")
    if status == "DONE":
        return (f"todo {todo_id} is a step its process finished (status DONE): nothing will "
                "read this answer")
    again = "asks this question again, it gets this answer"
    if "CANCELLED" in (status, draft_status) or draft_status == "FAILED":
        ended = "was cancelled" if "CANCELLED" in (status, draft_status) else "failed"
        return (f"todo {todo_id} {ended}: nothing waits for this answer; if `processgpt-sync "
                f"retry {todo_id}` runs it and it {again}")
    if draft_status == "COMPLETED":
        return (f"todo {todo_id} completed without this answer: nothing waits for it; if a "
                f"revision runs it and it {again}")
    if draft_status == "FB_REQUESTED" and status != "IN_PROGRESS":
        return (f"todo {todo_id} resumes with this answer once its process puts the step in "
                f"progress (its status is {status or 'NULL'})")
    return None


def _call_on_todo(args: argparse.Namespace, function: str) -> Mapping[str, Any]:
    """Call the SQL function ``function`` on the todo ``args.todo_id`` names (the whole id or
    a unique prefix); its answer lists the matching ids in ``matches``."""
    storage = checked_storage(args)
    try:
        result: Mapping[str, Any] = storage.call(function, {"p_todo_id": args.todo_id}) or {}
    finally:
        storage.close()
    matches = list(result.get("matches") or [])
    if not matches:
        raise ConfigurationError(f"no todo with id {args.todo_id!r} (give the whole id or a "
                                 "unique prefix of at least 4 characters)")
    if len(matches) > 1:
        raise ConfigurationError(f"{args.todo_id!r} matches several todos "
                                 f"({', '.join(str(m)[:13] for m in matches)}...); give more of "
                                 "the id")
    return result


def _json_text(value: Any, limit: int | None = None) -> str:
    text = shown_json(value, ensure_ascii=False, default=str)
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."

