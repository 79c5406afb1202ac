"""The storage interface: typed calls to the SQL functions of ``sql/functions.sql``.

A backend implements only ``call(query_name, params)`` (and optionally ``listener()``); every
typed method below is shared, so all backends speak exactly the same contract.
"""

from __future__ import annotations

import abc
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..deep_json import NestedDeeply, NestedDeeplyObject, too_deep
from ..errors import AccessDenied, PayloadError, SchemaMissing, StorageError, StorageUnavailable
from ..models import Claim, Claims, Released
from ..queries import required_functions

INSTALL_HINT = (
    "run `processgpt-sync init-db` (or paste sql/schema.sql and sql/functions.sql into the "
    "Supabase SQL editor)"
)
FOREIGN_KEY_VIOLATION = "23503"  # SQLSTATE: its detail names the key and the table it is not in
MISSING_SCHEMA_STATES = {"42883", "42P01", "42704"}  # undefined function / table / object
# PostgreSQL's "try again later", on either backend: the connection or the server (08; 53
# resources; 57 operator intervention and statement timeout; 58 system), a transaction given up
# for another's sake (40, but not 40002: a deferred constraint refused at commit), a lock wait
# given up (55P03), an object in use (55006), a read-only database (25006: a failover, or
# Supabase's read-only mode when its disk is full). Any other error is a refusal no retry would
# change (54: a program limit, as an index row too large; a site trigger's own error).
_TRANSIENT_CLASSES = ("08", "40", "53", "57", "58")
_TRANSIENT_STATES = {"55P03", "55006", "25006"}
_REFUSED_STATES = {"40002"}


def transient_sqlstate(code: str) -> bool:
    """Whether the SQLSTATE ``code`` means the call may succeed if sent again."""
    return code not in _REFUSED_STATES and (
        code[:2] in _TRANSIENT_CLASSES or code in _TRANSIENT_STATES)


@dataclass(frozen=True)
class WriteOutcome:
    """What a fenced write did: applied or refused (and why), and any rejected events."""

    applied: bool
    reason: str
    rejected: list[Mapping[str, Any]] = field(default_factory=list)
    error: str | None = None
    answer: Any = None
    answer_status: str | None = None
    """The answer's event status: REJECTED when the person declined (the UI's Cancel)."""
    job_id: str | None = None

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> WriteOutcome:
        events = value.get("events") or {}
        return cls(
            applied=bool(value.get("applied")),
            reason=str(value.get("reason")),
            rejected=list(events.get("rejected") or []),
            error=value.get("error"),
            answer=value.get("answer"),
            answer_status=value.get("answer_status"),
            job_id=value.get("job_id"),
        )


@dataclass(frozen=True)
class LeaseReport:
    """Result of one heartbeat: which todos were renewed, cancelled (by the UI, or under a
    process deleted for good), or lost."""

    renewed: frozenset[str]
    cancelled: frozenset[str]
    lost: frozenset[str]
    orphans: frozenset[str] = frozenset()
    """Leases of this server it did not know (claims whose answer was lost), given back."""
    deleted: frozenset[str] = frozenset()
    """The lost todos whose rows are gone (deleted, as with their tenant), not taken over."""
    superseded: bool = False
    """This run stopped, or a newer run took its consumer name: the heartbeat did nothing."""

    @classmethod
    def from_json(cls, value: Mapping[str, Any]) -> LeaseReport:
        return cls(
            renewed=frozenset(map(str, value.get("renewed") or [])),
            cancelled=frozenset(map(str, value.get("cancelled") or [])),
            lost=frozenset(map(str, value.get("lost") or [])),
            orphans=frozenset(map(str, value.get("orphans") or [])),
            deleted=frozenset(map(str, value.get("deleted") or [])),
            superseded=bool(value.get("superseded")),
        )


class Listener(Protocol):
    """A wake-up channel (LISTEN/NOTIFY). ``wait`` returns (channel, payload) pairs."""

    def connect(self) -> None: ...

    def wait(self, timeout: float) -> list[tuple[str, str]]: ...

    def probe(self) -> bool: ...

    def wake(self) -> None:
        """Make a ``wait`` in progress (on another thread) return now: the server stops."""

    def close(self) -> None: ...


class Storage(abc.ABC):
    """One database, reached through the processgpt-sync SQL functions."""

    backend = "base"
    last_success = 0.0
    """``time.monotonic()`` of the last call the database answered (0: none yet)."""

    @abc.abstractmethod
    def call(self, query: str, params: Mapping[str, Any]) -> Any:
        """Run the named query (one SQL function call) and return its JSON result."""

    def listener(self, channels: Sequence[str]) -> Listener | None:
        """A LISTEN connection for ``channels``, or None when the backend can only poll."""
        return None

    def close(self) -> None:  # noqa: B027 - most backends hold nothing to release
        """Release connections."""

    def check_schema(self) -> None:
        """Raise SchemaMissing naming every required function that is not installed."""
        try:
            installed = set(self.call("schema", {}))
        except SchemaMissing:
            installed = set()
        missing = sorted(required_functions() - installed)
        if missing:
            raise SchemaMissing(f"missing SQL functions: {', '.join(missing)}; {INSTALL_HINT}")

    def schema_warnings(self) -> list[str]:
        """What the installed schema does not yet know of this database (a platform column
        added after ``init-db``), each with its fix; empty when none. Advisory: a role that
        may not read them gets that said as the warning, rather than an error."""
        try:
            found = self.call("schema_warnings", {}) or []
        except AccessDenied as exc:
            return [f"the schema's warnings could not be read: {exc}"]
        except StorageUnavailable:
            raise
        except StorageError as exc:
            return [f"the schema's warnings could not be read: {exc}"]
        return [str(warning) for warning in found]

    def claim(
        self,
        *,
        agent_orch: str,
        consumer: str,
        limit: int,
        lease_seconds: int,
        max_claims: int,
        tenant_id: str | None = None,
        fair: bool = True,
        max_running: int | None = None,
        max_running_per_tenant: int | None = None,
        call_id: str | None = None,
        instance: str | None = None,
    ) -> Claims:
        """Claim up to ``limit`` todos in one call: tenants in turn (``fair``) or oldest first,
        within the fleet-wide limits; ``held_back`` on the list counts the todos left for a
        later call because another transaction held their process instance (or trashed it
        while the claim waited for it). ``call_id`` (a
        random UUID) names the call on its leases: if no answer arrives, the heartbeat names it
        and its todos are given back. ``instance`` names the server's run: a run that stopped
        or was superseded claims nothing."""
        items = self.call(
            "claim",
            {
                "p_agent_orch": agent_orch,
                "p_consumer": consumer,
                "p_limit": limit,
                "p_lease_seconds": int(lease_seconds),
                "p_max_claims": max_claims,
                "p_tenant_id": tenant_id,
                "p_fair": fair,
                "p_max_running": max_running,
                "p_max_running_per_tenant": max_running_per_tenant,
                "p_call": call_id,
                "p_instance": instance,
            },
        )
        return claims_from_answer(items)

    def record_events(self, events: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
        """Write events in order; return the rejected ones as {index, reason}."""
        if not events:
            return []
        outcome = self.call("record_events", {"p_events": list(events)})
        return list(outcome.get("rejected") or [])

    def save_result(
        self,
        claim: Claim,
        result: Any,
        *,
        final: bool = True,
        events: Sequence[Mapping[str, Any]] = (),
    ) -> WriteOutcome:
        """Write pending events, then the draft (``final=False``) or the final result."""
        params = {
            "p_todo_id": claim.todo_id,
            "p_token": claim.token,
            "p_result": result,
            "p_final": final,
            "p_events": list(events),
        }
        return WriteOutcome.from_json(self.call("save_result", params))

    def fail(
        self, claim: Claim, error: str, *, events: Sequence[Mapping[str, Any]] = ()
    ) -> WriteOutcome:
        """Write pending events, then mark the todo FAILED with ``error``."""
        params = {
            "p_todo_id": claim.todo_id,
            "p_token": claim.token,
            "p_error": error,
            "p_events": list(events),
        }
        return WriteOutcome.from_json(self.call("fail", params))

    def suspend(
        self, claim: Claim, *, events: Sequence[Mapping[str, Any]] = ()
    ) -> WriteOutcome:
        """Write pending events, then HUMAN_ASKED with the lease released."""
        params = {"p_todo_id": claim.todo_id, "p_token": claim.token, "p_events": list(events)}
        return WriteOutcome.from_json(self.call("suspend", params))

    def finish(self, items: Sequence[Mapping[str, Any]]) -> list[WriteOutcome]:
        """Record many todos' outcomes in one transaction; one WriteOutcome per item."""
        if not items:
            return []
        outcomes = self.call("finish", {"p_items": list(items)})
        return [WriteOutcome.from_json(o) for o in outcomes]

    def ask(self, claim: Claim, job_id: str, question: Mapping[str, Any], *,
            events: Sequence[Mapping[str, Any]] = ()) -> WriteOutcome:
        """Write pending events and the question; or return an earlier identical one's answer."""
        params = {"p_todo_id": claim.todo_id, "p_token": claim.token, "p_job_id": job_id,
                  "p_question": dict(question), "p_events": list(events)}
        return WriteOutcome.from_json(self.call("ask", params))

    def answer(self, claim: Claim, job_id: str) -> WriteOutcome:
        """The answer to question ``job_id`` if there is one yet (reason 'answered')."""
        params = {"p_todo_id": claim.todo_id, "p_token": claim.token, "p_job_id": job_id}
        return WriteOutcome.from_json(self.call("answer", params))

    def resume_asking(self, claim: Claim) -> None:
        """Stop waiting for an answer; the todo runs on."""
        self.call("resume_asking", {"p_todo_id": claim.todo_id, "p_token": claim.token})

    def respond(self, job_id: str, answer: Any, *, user_id: str | None = None,
                todo_id: str | None = None) -> str | None:
        """Answer question ``job_id`` (of ``todo_id``, needed when executors reused the job id
        across todos) as the UI does; the todo id, or None if no such question."""
        params = {"p_job_id": job_id, "p_answer": answer, "p_user_id": user_id,
                  "p_todo_id": todo_id}
        todo_id = self.call("respond", params)
        return None if todo_id is None else str(todo_id)

    def open_questions(self, agent_orch: str | None = None) -> list[Mapping[str, Any]]:
        """Questions still waiting for an answer."""
        return list(self.call("open_questions", {"p_agent_orch": agent_orch}) or [])

    def release(self, claims: Iterable[Claim]) -> Released:
        """Give claims back in one call; return how many todos became claimable again, with
        ``held_back`` naming those left claimed because another transaction holds their
        process instance (give them back again later)."""
        claims = list(claims)
        if not claims:
            return Released(0)
        params = {"p_todo_ids": [c.todo_id for c in claims], "p_tokens": [c.token for c in claims]}
        answer = self.call("release", params)  # {"released": n, "held_back": [todo ids]}
        return Released(int(answer["released"]),
                        held_back=[str(todo) for todo in answer.get("held_back") or ()])

    def renew(self, consumer: str, claims: Iterable[Claim], lease_seconds: int) -> LeaseReport:
        """Renew every lease in one call."""
        return LeaseReport.from_json(self.call("renew", _lease_params(consumer, claims,
                                                                      lease_seconds)))

    def heartbeat(self, consumer: str, claims: Iterable[Claim], lease_seconds: int,
                  server: Mapping[str, Any]) -> LeaseReport:
        """Renew every lease and refresh this server's registry row, in one call."""
        params = {**_lease_params(consumer, claims, lease_seconds), "p_server": dict(server)}
        return LeaseReport.from_json(self.call("heartbeat", params))

    def server_stopped(self, consumer: str, instance: str | None = None,
                       unanswered: Sequence[str] = ()) -> bool:
        """Remove a stopped server's registry row (only its run's ``instance``) and remember
        the run, so that its heartbeats still on the way do nothing; give back the claims of
        the ``unanswered`` claim calls (their answers were lost; no heartbeat named them)."""
        return bool(self.call("server_stopped", {"p_consumer": consumer,
                                                 "p_instance": instance,
                                                 "p_unanswered": list(unanswered)}))

    def servers(self, agent_orch: str | None = None,
                consumer: str | None = None) -> list[Mapping[str, Any]]:
        """Registry rows (with ``alive`` and ``seen_seconds_ago``) of matching servers."""
        params = {"p_agent_orch": agent_orch, "p_consumer": consumer}
        return list(self.call("servers", params) or [])

    def enqueue(
        self,
        agent_orch: str,
        text: str,
        *,
        agent_mode: str = "COMPLETE",
        tenant_id: str | None = None,
        activity_name: str | None = None,
        proc_inst_id: str | None = None,
        user_id: str | None = None,
    ) -> str:
        """Insert a claimable todo; return its id."""
        if not isinstance(text, str):
            raise PayloadError(
                f"a todo's input (todolist.query) is text, not {type(text).__name__}: pass a "
                "str, e.g. json.dumps(data) for structured input")
        params = {
            "p_agent_orch": agent_orch,
            "p_input": text,
            "p_agent_mode": agent_mode,
            "p_tenant_id": tenant_id,
            "p_activity_name": activity_name,
            "p_proc_inst_id": proc_inst_id,
            "p_user_id": user_id,
        }
        return str(self.call("enqueue", params))

    def event_types(self) -> frozenset[str]:
        """The labels of the database's event_type_enum: the event types it accepts."""
        return frozenset(map(str, self.call("event_types", {}) or []))

    def status(self, agent_orch: str | None = None) -> list[Mapping[str, Any]]:
        """Todo counts by agent_orch and draft_status."""
        return list(self.call("status", {"p_agent_orch": agent_orch}) or [])

    def tenant_load(self, agent_orch: str | None = None) -> list[Mapping[str, Any]]:
        """Queued and running todos per agent_orch and tenant."""
        return list(self.call("tenant_load", {"p_agent_orch": agent_orch}) or [])


def claims_from_answer(answer: Any) -> Claims:
    """The todos a claim call answered: claim_v4's ``{"claims": [...], "held_back": n}`` or the
    bare list of earlier versions. A todo whose values are nested deeper than Python's JSON
    handling allows is kept as unrunnable, so it is failed rather than run."""
    held_back = 0
    deep = isinstance(answer, (NestedDeeply, NestedDeeplyObject))
    if isinstance(answer, Mapping):
        held_back = int(answer.get("held_back") or 0)
        answer = answer.get("claims")
    if deep:
        return Claims((Claim.from_json(item) if (where := too_deep(item)) is None
                       else Claim.unrunnable(item, *where) for item in answer or []),
                      held_back=held_back)
    return Claims((Claim.from_json(item) for item in answer or []), held_back=held_back)


def _lease_params(consumer: str, claims: Iterable[Claim], lease_seconds: int) -> dict[str, Any]:
    """The arguments renew and heartbeat share: the consumer and its claims' ids and tokens."""
    claims = list(claims)
    return {
        "p_consumer": consumer,
        "p_todo_ids": [c.todo_id for c in claims],
        "p_tokens": [c.token for c in claims],
        "p_lease_seconds": int(lease_seconds),
    }
