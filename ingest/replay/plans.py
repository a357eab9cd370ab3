"""Replay plans: the record an operator creates, approves and runs, and where it is kept.

A plan is one JSON document (plus the columns `list` filters on) so progress can grow new
fields without a migration. The state machine lives here as plain functions on `Plan`, so the
CLI, the runner and the unit tests all go through the same rules:

    pending_approval --approve--> approved --start--> running --finish--> completed
                                     |                  |  \\--fail--> failed --start--> running
                                     |                  \\--interrupt--> interrupted --start--> ...
                                     \\--block--> blocked_legal_hold --start--> running

Plans are stored next to the state the service writes (embedded: `replay_plans` in
`state.db`; production: `replay_plans` in the Postgres DLQ database), each table created by
the state store's versioned migrations (SQLite `MIGRATIONS` 11, Postgres `0005_replay_plans`),
like every other table.
"""

from __future__ import annotations

import math
import re
import secrets
import sqlite3
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import orjson

from ingest.errors import StoreUnavailable
from ingest.state.sqlite import autocommit

PENDING = "pending_approval"
APPROVED = "approved"
RUNNING = "running"
INTERRUPTED = "interrupted"
BLOCKED = "blocked_legal_hold"
FAILED = "failed"
COMPLETED = "completed"
STATES = (PENDING, APPROVED, RUNNING, INTERRUPTED, BLOCKED, FAILED, COMPLETED)
RUNNABLE = (APPROVED, RUNNING, INTERRUPTED, BLOCKED, FAILED)  # RUNNING = resume after a kill

DEFAULT_RFA_THRESHOLD = 100_000
NO_PROGRESS_GRACE = 300.0  # seconds a running plan may show no progress before ETA is inf
RFA_PATTERN = re.compile(r"^RFA-\d+$")
PLAN_ID = re.compile(r"^rp-[0-9a-f]{8}$")


class PlanError(Exception):
    """A transition the rules refuse; the message is the reason shown to the operator."""


@dataclass(slots=True)
class PlanSource:
    """One thing to replay: a configured source (`s3`, `sftp`, `kafka`) or the drop store."""

    name: str  # configured source name, or "inbox-dropped"
    kind: str  # s3 | sftp | kafka | inbox-dropped
    estimate_records: int | None = None  # None = unknown
    estimate_objects: int | None = None
    estimate_bytes: int | None = None
    note: str = ""


@dataclass(slots=True)
class Progress:
    """Per source; saved after every delivered batch so a rerun resumes there."""

    items_done: list[str] = field(default_factory=list)  # objects/files fully delivered
    current_item: str | None = None  # object/file being read ...
    current_offset: int = 0  # ... and the byte offset just after its last delivered record
    offsets: dict[str, int] = field(default_factory=dict)  # kafka "topic:partition" -> next
    positioned: bool = False  # kafka: the replay group was moved to the window start
    read: int = 0
    delivered: int = 0
    duplicate: int = 0
    dlq: int = 0
    skipped: int = 0  # outside the window or another tenant (kafka)
    done: bool = False


@dataclass(slots=True)
class Plan:
    id: str
    tenant: str
    start: float  # window [start, end), epoch seconds
    end: float
    sources: list[PlanSource]
    throttle: float  # records per second
    created_at: float
    created_by: str
    state: str = PENDING
    approved_by: str | None = None
    approved_at: float | None = None
    rfa: str | None = None
    started_at: float | None = None
    finished_at: float | None = None
    last_error: str | None = None
    legal_hold: str | None = None  # what the last hold check said
    progress: dict[str, Progress] = field(default_factory=dict)
    rto_seconds: float | None = None  # recovery time objective: started_at -> finished_at

    @property
    def estimate_records(self) -> int | None:
        """Sum over sources; None when any source's size is unknown."""
        total = 0
        for s in self.sources:
            if s.estimate_records is None:
                return None
            total += s.estimate_records
        return total

    def records_done(self) -> int:
        return sum(p.delivered + p.duplicate + p.dlq for p in self.progress.values())

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["estimate_records"] = self.estimate_records
        out["records_done"] = self.records_done()
        return out

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Plan:
        data = {k: v for k, v in d.items() if k not in ("estimate_records", "records_done")}
        data["sources"] = [PlanSource(**s) for s in d["sources"]]
        data["progress"] = {k: Progress(**v) for k, v in d.get("progress", {}).items()}
        return cls(**data)


@dataclass(frozen=True, slots=True)
class ProgressView:
    """How far a plan is, how long it has taken and whether it will make its RTO.

    `ratio` (0..1) weighs each source by its record estimate when every source has one;
    otherwise each source counts equally, an object source by its finished objects. Kafka
    sources of unknown size make it None. `eta_seconds` projects the ratio linearly over the
    wall time since the first start (interruptions included, as the RTO counts them); it is
    infinite for a plan that is not running (nothing moves it) or has not moved yet.
    """

    ratio: float | None
    records_done: int
    estimate_records: int | None
    duration_seconds: float | None  # first start -> finish (or now)
    eta_seconds: float | None
    rto_seconds: float | None
    needs_seconds: float | None  # estimate / throttle: the least time the plan can take
    at_risk: bool | None  # None: cannot tell (no RTO, not started, or size unknown)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _source_fraction(src: PlanSource, prog: Progress | None) -> float | None:
    if prog is not None and prog.done:
        return 1.0
    done = 0 if prog is None else prog.delivered + prog.duplicate + prog.dlq
    if src.estimate_records is not None:
        return 1.0 if src.estimate_records == 0 else min(1.0, done / src.estimate_records)
    if src.estimate_objects:
        return min(1.0, len(prog.items_done) / src.estimate_objects) if prog else 0.0
    return None


def progress_ratio(plan: Plan) -> float | None:
    if plan.state == COMPLETED:
        return 1.0
    fractions = [_source_fraction(s, plan.progress.get(s.name)) for s in plan.sources]
    if not fractions or any(f is None for f in fractions):
        return None
    known = [f for f in fractions if f is not None]
    est = plan.estimate_records
    if est:
        weights = [s.estimate_records or 0 for s in plan.sources]
        return sum(f * w for f, w in zip(known, weights, strict=True)) / est
    return sum(known) / len(known)


def progress_view(plan: Plan, now: float) -> ProgressView:
    ratio = progress_ratio(plan)
    est = plan.estimate_records
    duration = eta = None
    if plan.started_at is not None:
        duration = max(0.0, (plan.finished_at or now) - plan.started_at)
        if plan.state == COMPLETED:
            eta = 0.0
        elif plan.state != RUNNING:
            eta = math.inf  # interrupted, failed or blocked: nothing moves it
        elif ratio is None:
            eta = None
        elif ratio == 0:  # no record yet: too early to tell, then as bad as it gets
            eta = None if duration < NO_PROGRESS_GRACE else math.inf
        else:
            eta = duration * (1 - ratio) / ratio
    rto = plan.rto_seconds
    at_risk: bool | None = None
    if rto is not None and duration is not None:
        if duration > rto:
            at_risk = True
        elif eta is not None:
            at_risk = duration + eta > rto
    needs = est / plan.throttle if est is not None and plan.throttle > 0 else None
    return ProgressView(ratio, plan.records_done(), est, duration, eta, rto, needs, at_risk)


def new_id() -> str:
    return f"rp-{secrets.token_hex(4)}"


def needs_rfa(plan: Plan, threshold: int) -> bool:
    est = plan.estimate_records
    return est is None or est > threshold


def approve(plan: Plan, *, user: str, rfa: str | None, threshold: int, now: float) -> None:
    """Approve once, by a named user other than the plan's author (four eyes); large or
    unknown-size replays need an RFA."""
    if plan.state != PENDING:
        if plan.approved_by is not None:
            raise PlanError(
                f"plan {plan.id} is already {plan.state} (approved by {plan.approved_by}"
                + (f" under {plan.rfa}" if plan.rfa else "")
                + "); nothing to approve"
            )
        raise PlanError(f"plan {plan.id} is {plan.state}; only pending_approval plans are approved")
    if user == plan.created_by:
        raise PlanError(
            f"plan {plan.id} was written by {user}; four eyes: someone else approves it "
            "(replayctl approve --as NAME, or INGEST_ACTOR)"
        )
    if rfa is not None and not RFA_PATTERN.match(rfa):
        raise PlanError(f"--rfa '{rfa}' is not an RFA id like RFA-1234")
    if rfa is None and needs_rfa(plan, threshold):
        est = plan.estimate_records
        size = "of unknown size" if est is None else f"of {est} records"
        raise PlanError(
            f"plan {plan.id} is a large replay ({size}, threshold {threshold}): "
            "approve it with --rfa RFA-<number>"
        )
    plan.state, plan.approved_by, plan.approved_at, plan.rfa = APPROVED, user, now, rfa


def start(plan: Plan, now: float) -> bool:
    """Enter `running`; True when resuming earlier progress."""
    if plan.state == PENDING:
        raise PlanError(f"plan {plan.id} is not approved yet: `replayctl approve {plan.id}`")
    if plan.state == COMPLETED:
        raise PlanError(f"plan {plan.id} already completed; create a new plan to replay again")
    if plan.state not in RUNNABLE:
        raise PlanError(f"plan {plan.id} is {plan.state} and cannot run")
    resuming = plan.started_at is not None
    plan.state, plan.last_error = RUNNING, None
    if plan.started_at is None:
        plan.started_at = now
    return resuming


def block(plan: Plan, reason: str) -> None:
    if plan.state not in RUNNABLE:
        raise PlanError(f"plan {plan.id} is {plan.state}")
    plan.state, plan.legal_hold, plan.last_error = BLOCKED, reason, reason


def finish(plan: Plan, now: float) -> None:
    if plan.state != RUNNING:
        raise PlanError(f"plan {plan.id} is {plan.state}, not running")
    plan.state, plan.finished_at = COMPLETED, now


def fail(plan: Plan, error: str) -> None:
    plan.state, plan.last_error = FAILED, error


def interrupt(plan: Plan) -> None:
    if plan.state == RUNNING:
        plan.state = INTERRUPTED


# ---------------------------------------------------------------------------- stores


class PlanStore(Protocol):
    async def save(self, plan: Plan) -> None:
        """Insert or replace the whole plan."""
        ...

    async def get(self, plan_id: str) -> Plan | None: ...

    async def list(self, tenant: str | None) -> list[Plan]:
        """Newest first."""
        ...


def _doc(plan: Plan) -> str:
    return orjson.dumps(plan.to_dict()).decode()


class SQLitePlanStore:
    """`replay_plans` in the embedded state.db (shares the service's SQLiteDB connection)."""

    def __init__(self, db: Any) -> None:  # ingest.state.sqlite.SQLiteDB
        self._db = db

    async def _run(self, fn: Any) -> Any:
        try:
            return await self._db.run(fn)
        except sqlite3.Error as exc:
            raise StoreUnavailable("sqlite", str(self._db.path), str(exc)) from exc

    async def save(self, plan: Plan) -> None:
        row = (plan.id, plan.tenant, plan.state, plan.created_at, _doc(plan))
        await self._run(
            lambda c: autocommit(
                c,
                "INSERT INTO replay_plans VALUES (?, ?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET"
                " state = excluded.state, doc = excluded.doc",
                row,
            )
        )

    async def get(self, plan_id: str) -> Plan | None:
        row = await self._run(
            lambda c: c.execute("SELECT doc FROM replay_plans WHERE id = ?", (plan_id,)).fetchone()
        )
        return None if row is None else Plan.from_dict(orjson.loads(row[0]))

    async def list(self, tenant: str | None) -> list[Plan]:
        rows = await self._run(
            lambda c: c.execute(
                "SELECT doc FROM replay_plans WHERE ? IS NULL OR tenant = ?"
                " ORDER BY created_at DESC, id",
                (tenant, tenant),
            ).fetchall()
        )
        return [Plan.from_dict(orjson.loads(r[0])) for r in rows]


class PostgresPlanStore:
    """`replay_plans` in the production Postgres (the DLQ database), jsonb document."""

    def __init__(self, pool: Any) -> None:  # asyncpg.Pool from ingest.state.postgres
        self._pool = pool

    async def _run(self, fn: Any) -> Any:
        from ingest.state.postgres import on_conn

        return await on_conn(self._pool, fn)

    async def save(self, plan: Plan) -> None:
        sql = (
            "INSERT INTO replay_plans VALUES ($1, $2, $3, $4, $5::jsonb) ON CONFLICT (id)"
            " DO UPDATE SET state = excluded.state, doc = excluded.doc"
        )
        args = (plan.id, plan.tenant, plan.state, plan.created_at, _doc(plan))
        await self._run(lambda c: c.execute(sql, *args))

    async def get(self, plan_id: str) -> Plan | None:
        doc = await self._run(
            lambda c: c.fetchval("SELECT doc::text FROM replay_plans WHERE id = $1", plan_id)
        )
        return None if doc is None else Plan.from_dict(orjson.loads(doc))

    async def list(self, tenant: str | None) -> list[Plan]:
        rows = await self._run(
            lambda c: c.fetch(
                "SELECT doc::text FROM replay_plans WHERE $1::text IS NULL OR tenant = $1"
                " ORDER BY created_at DESC, id",
                tenant,
            )
        )
        return [Plan.from_dict(orjson.loads(r[0])) for r in rows]


def plan_store(stores: Any) -> PlanStore:
    """The plan store on the same database as the other state stores (`Stores`)."""
    if stores.sqlite_db is not None:
        return SQLitePlanStore(stores.sqlite_db)
    return PostgresPlanStore(stores.pg_pool)
