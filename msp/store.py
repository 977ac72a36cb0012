"""The job store: users, sessions, jobs, attempts, workers and the audit log.

One contract over peewee, the same code for SQLite (the embedded default, in
WAL mode) and PostgreSQL. The broker is the only writer. Times are wall-clock
seconds since the epoch, since people read them and they must survive a
restart.

The hot path (claiming jobs, recording attempts) runs SQL built once in
:class:`_Sql`; peewee builds the rest, where speed does not matter.
"""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace
from typing import Any, Iterable
from urllib.parse import parse_qs, urlparse

import peewee as pw
from playhouse.db_url import connect

from .errors import ConfigError

log = logging.getLogger(__name__)

JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
FINAL_STATES = frozenset(("succeeded", "failed", "cancelled"))

def define_models(db: pw.Database) -> SimpleNamespace:
    """The tables, as peewee models bound to ``db``.

    Defined per database rather than once per process, so that two
    stores (two brokers in one test, a benchmark) never share a binding.
    """

    class _Model(pw.Model):
        class Meta:
            database = db
            legacy_table_names = False


    class User(_Model):
        name = pw.CharField(max_length=64, unique=True)
        password_hash = pw.CharField(max_length=256)
        role = pw.CharField(max_length=16, default="user")
        disabled = pw.BooleanField(default=False)
        created_at = pw.DoubleField()
        credit_limit = pw.DoubleField(null=True)

        class Meta:
            table_name = "msp_user"


    class Session(_Model):
        token_hash = pw.CharField(max_length=64, unique=True)
        user = pw.ForeignKeyField(User, backref="sessions", on_delete="CASCADE")
        created_at = pw.DoubleField()
        expires_at = pw.DoubleField()
        revoked = pw.BooleanField(default=False)

        class Meta:
            table_name = "msp_session"


    class Job(_Model):
        user = pw.ForeignKeyField(User, backref="jobs")
        request_id = pw.CharField(max_length=64)
        name = pw.CharField(max_length=256, null=True)
        script = pw.TextField()
        args = pw.TextField(default="[]")
        data_dir = pw.TextField()
        output_dir = pw.TextField()
        priority = pw.IntegerField(default=0)
        state = pw.CharField(max_length=16, default="queued")
        max_attempts = pw.IntegerField(default=3)
        # Attempts started, failed attempts (they spend max_attempts), and
        # attempts lost to a worker fault (they have a limit of their own).
        attempts = pw.IntegerField(default=0)
        failures = pw.IntegerField(default=0)
        lost = pw.IntegerField(default=0)
        timeout = pw.DoubleField(null=True)
        # Limits the job asked for: CPU seconds, memory in MiB.
        cpu_limit = pw.DoubleField(null=True)
        memory_limit_mb = pw.IntegerField(null=True)
        submitted_at = pw.DoubleField()
        started_at = pw.DoubleField(null=True)
        finished_at = pw.DoubleField(null=True)
        # A queued job is not dispatched before this time (retry back-off).
        not_before = pw.DoubleField(default=0.0)
        # The current attempt's token and worker, while running.
        token = pw.CharField(max_length=64, null=True)
        worker = pw.CharField(max_length=256, null=True)
        cancel_requested = pw.BooleanField(default=False)
        progress = pw.DoubleField(null=True)
        exit_code = pw.IntegerField(null=True)
        error = pw.TextField(null=True)

        class Meta:
            table_name = "msp_job"
            indexes = ((("user", "request_id"), True),)


    class Attempt(_Model):
        job = pw.ForeignKeyField(Job, backref="attempt_rows", on_delete="CASCADE")
        number = pw.IntegerField()
        token = pw.CharField(max_length=64, unique=True)
        worker = pw.CharField(max_length=256)
        started_at = pw.DoubleField()
        ended_at = pw.DoubleField(null=True)
        outcome = pw.CharField(max_length=16, null=True)
        exit_code = pw.IntegerField(null=True)
        error = pw.TextField(null=True)
        wall_seconds = pw.DoubleField(null=True)
        cpu_user = pw.DoubleField(null=True)
        cpu_system = pw.DoubleField(null=True)
        max_rss_kb = pw.IntegerField(null=True)
        cost = pw.DoubleField(null=True)

        class Meta:
            table_name = "msp_attempt"


    class Worker(_Model):
        name = pw.CharField(max_length=256, unique=True)
        host = pw.CharField(max_length=256, default="")
        first_seen = pw.DoubleField()
        last_seen = pw.DoubleField()
        state = pw.CharField(max_length=16, default="idle")
        jobs_done = pw.IntegerField(default=0)

        class Meta:
            table_name = "msp_worker"


    class Audit(_Model):
        at = pw.DoubleField()
        event = pw.CharField(max_length=32)
        actor = pw.CharField(max_length=64, null=True)
        detail = pw.TextField(default="")

        class Meta:
            table_name = "msp_audit"

    return SimpleNamespace(
        User=User, Session=Session, Job=Job, Attempt=Attempt,
        Worker=Worker, Audit=Audit,
        all=(User, Session, Job, Attempt, Worker, Audit),
    )


JOB_COLUMNS = (
    "id", "user_id", "request_id", "name", "script", "args", "data_dir",
    "output_dir", "priority", "state", "max_attempts", "attempts",
    "failures", "lost", "timeout", "cpu_limit", "memory_limit_mb",
    "submitted_at", "started_at",
    "finished_at", "not_before", "token", "worker", "cancel_requested",
    "progress", "exit_code", "error",
)
ATTEMPT_COLUMNS = (
    "id", "job_id", "number", "token", "worker", "started_at", "ended_at",
    "outcome", "exit_code", "error", "wall_seconds", "cpu_user",
    "cpu_system", "max_rss_kb", "cost",
)


# The columns a new job is inserted with; the others keep their defaults.
SUBMIT_COLUMNS = (
    "user_id", "request_id", "name", "script", "args", "data_dir",
    "output_dir", "priority", "state", "max_attempts", "attempts",
    "failures", "lost", "timeout", "cpu_limit", "memory_limit_mb",
    "submitted_at", "not_before", "cancel_requested",
)


class _Sql:
    """Hot-path statements, built once for the database's parameter style."""

    def __init__(self, param: str, returning: bool = False):
        p = param
        cols = ", ".join(JOB_COLUMNS)
        self.find_request = (
            f"SELECT id FROM msp_job WHERE user_id = {p} AND request_id = {p}"
        )
        self.insert_job = (
            f"INSERT INTO msp_job ({', '.join(SUBMIT_COLUMNS)}) VALUES "
            f"({', '.join([p] * len(SUBMIT_COLUMNS))})"
            # PostgreSQL's cursors have no lastrowid.
            + (" RETURNING id" if returning else "")
        )
        self.worker_done = (
            f"UPDATE msp_worker SET jobs_done = jobs_done + 1 WHERE name = {p}"
        )
        self.credit_limit = f"SELECT credit_limit FROM msp_user WHERE id = {p}"
        self.claim = (
            f"SELECT {cols} FROM msp_job WHERE state = 'queued' "
            f"AND not_before <= {p} ORDER BY priority DESC, id LIMIT {p}"
        )
        self.mark_running = (
            f"UPDATE msp_job SET state = 'running', attempts = attempts + 1, "
            f"token = {p}, worker = {p}, started_at = COALESCE(started_at, "
            f"{p}) WHERE id = {p} AND state = 'queued'"
        )
        self.insert_attempt = (
            "INSERT INTO msp_attempt (job_id, number, token, worker, "
            f"started_at) VALUES ({p}, {p}, {p}, {p}, {p})"
        )
        self.job = f"SELECT {cols} FROM msp_job WHERE id = {p}"
        self.end_attempt = (
            f"UPDATE msp_attempt SET ended_at = {p}, outcome = {p}, "
            f"exit_code = {p}, error = {p}, wall_seconds = {p}, "
            f"cpu_user = {p}, cpu_system = {p}, max_rss_kb = {p}, cost = {p} "
            f"WHERE token = {p} AND ended_at IS NULL"
        )
        # Ends or re-queues a job whose current attempt carries the token.
        self.end_job = (
            f"UPDATE msp_job SET state = {p}, failures = failures + {p}, "
            f"lost = lost + {p}, finished_at = {p}, not_before = {p}, "
            f"exit_code = {p}, error = {p}, token = NULL, worker = NULL "
            f"WHERE id = {p} AND token = {p}"
        )


def _row(columns: Iterable[str], values: Iterable[Any]) -> dict[str, Any]:
    row = dict(zip(columns, values, strict=True))
    if "args" in row and isinstance(row["args"], str):
        row["args"] = json.loads(row["args"])
    if "cancel_requested" in row:
        row["cancel_requested"] = bool(row["cancel_requested"])
    return row


class _Savepoint:
    """A savepoint named by its depth, so that its statements are the same
    few every time: SQLite's statement cache keeps them compiled. (peewee's
    own have a fresh random name each, parsed anew each time; the broker
    opens one per message.)"""

    __slots__ = ("store", "name")

    def __init__(self, store: "Store"):
        self.store = store
        self.name = ""

    def __enter__(self):
        store = self.store
        store._savepoints += 1
        self.name = f"msp_sp{store._savepoints}"
        store.db.execute_sql(f"SAVEPOINT {self.name}")
        return self

    def __exit__(self, exc_type, exc, tb):
        db = self.store.db
        try:
            if exc_type is None:
                try:
                    db.execute_sql(f"RELEASE SAVEPOINT {self.name}")
                    return
                except Exception:
                    self._undo(db)
                    raise
            self._undo(db)
        finally:
            self.store._savepoints -= 1

    def _undo(self, db) -> None:
        db.execute_sql(f"ROLLBACK TO SAVEPOINT {self.name}")
        db.execute_sql(f"RELEASE SAVEPOINT {self.name}")


class Store:
    """The broker's storage. Not thread-safe: one thread owns a Store."""

    def __init__(self, url: str, schema: str | None = None, synchronous="FULL"):
        self.url = url
        self.db = _open(url, schema, synchronous)
        self.m = define_models(self.db)
        self.db.connect(reuse_if_open=True)
        if schema and isinstance(self.db, pw.PostgresqlDatabase):
            self.db.execute_sql(f'CREATE SCHEMA IF NOT EXISTS "{schema}"')
        self.db.create_tables(self.m.all, safe=True)
        self._add_missing_columns()
        self.db.execute_sql(
            "CREATE INDEX IF NOT EXISTS msp_job_queue "
            "ON msp_job (state, priority DESC, id)"
        )
        # The monitor's throughput and usage figures read recent ends only.
        self.db.execute_sql(
            "CREATE INDEX IF NOT EXISTS msp_job_finished "
            "ON msp_job (finished_at)"
        )
        self.db.execute_sql(
            "CREATE INDEX IF NOT EXISTS msp_attempt_ended "
            "ON msp_attempt (ended_at)"
        )
        self.returning = isinstance(self.db, pw.PostgresqlDatabase)
        self.sql = _Sql(self.db.param, self.returning)
        # Savepoints open now, inside the current transaction.
        self._savepoints = 0

    def _add_missing_columns(self) -> None:
        """Add the columns a newer msp defines to tables an older one made
        (nullable columns only, so rows already stored stay valid)."""
        from playhouse.migrate import SchemaMigrator, migrate

        migrator, steps = SchemaMigrator.from_database(self.db), []
        for model in self.m.all:
            table = model._meta.table_name
            have = {c.name for c in self.db.get_columns(table)}
            for fld in model._meta.sorted_fields:
                if fld.column_name not in have and fld.null:
                    steps.append(
                        migrator.add_column(table, fld.column_name, fld)
                    )
        if steps:
            log.info("adding %d column(s) to the store's tables", len(steps))
            migrate(*steps)

    def close(self) -> None:
        if not self.db.is_closed():
            self.db.close()

    def atomic(self):
        """A transaction; nested calls make savepoints."""
        if self.db.in_transaction():
            return _Savepoint(self)
        return self.db.atomic()

    def _exec(self, sql: str, params: tuple = ()):
        return self.db.execute_sql(sql, params)

    # Users and sessions.

    def add_user(self, name, password_hash, role, now, credit_limit=None):
        """Create a user; its id, or None when the name is taken."""
        try:
            with self.db.atomic():
                return self.m.User.create(
                    name=name, password_hash=password_hash, role=role,
                    created_at=now, credit_limit=credit_limit,
                ).id
        except pw.IntegrityError:
            return None

    def user(self, name: str):
        return self.m.User.get_or_none(self.m.User.name == name)

    def user_by_id(self, user_id: int):
        return self.m.User.get_or_none(self.m.User.id == user_id)

    def credit_limit(self, user_id: int) -> float | None:
        """The user's monthly credit limit; None: none (or no such user).
        Asked on every submit, so prepared SQL rather than a peewee query
        (about 1 ms to build on the benchmark machine)."""
        found = self._exec(self.sql.credit_limit, (user_id,)).fetchone()
        return None if found is None else found[0]

    def users(self) -> list:
        return list(self.m.User.select().order_by(self.m.User.name))

    def count_users(self) -> int:
        return self.m.User.select().count()

    def set_password(self, user_id: int, password_hash: str) -> None:
        self.m.User.update(password_hash=password_hash).where(
            self.m.User.id == user_id
        ).execute()

    def set_credit_limit(self, user_id: int, limit: float | None) -> None:
        self.m.User.update(credit_limit=limit).where(
            self.m.User.id == user_id
        ).execute()

    def disable_user(self, user_id: int) -> None:
        self.m.User.update(disabled=True).where(self.m.User.id == user_id).execute()
        self.revoke_sessions(user_id)

    def add_session(self, user_id, token_hash, now, expires_at) -> None:
        self.m.Session.create(
            user=user_id, token_hash=token_hash, created_at=now,
            expires_at=expires_at,
        )

    def session(self, token_hash: str):
        """The session with this token hash, its user joined, or None.
        Revoked and expired sessions are returned too: the caller decides."""
        query = (
            self.m.Session.select(self.m.Session, self.m.User)
            .join(self.m.User)
            .where(self.m.Session.token_hash == token_hash)
        )
        return query.first()

    def revoke_session(self, token_hash: str) -> None:
        self.m.Session.update(revoked=True).where(
            self.m.Session.token_hash == token_hash
        ).execute()

    def revoke_sessions(self, user_id: int) -> None:
        Session = self.m.Session
        Session.update(revoked=True).where(Session.user == user_id).execute()

    def audit(self, now: float, event: str, actor: str | None, **detail):
        self.m.Audit.create(
            at=now, event=event, actor=actor,
            detail=json.dumps(detail, sort_keys=True, default=str),
        )

    def audit_entries(self, limit=100, event=None, actor=None, since=None):
        """The newest audit entries first."""
        A = self.m.Audit
        query = A.select().order_by(A.id.desc()).limit(limit)
        if event is not None:
            query = query.where(A.event == event)
        if actor is not None:
            query = query.where(A.actor == actor)
        if since is not None:
            query = query.where(A.at >= since)
        return [
            {"id": a.id, "at": a.at, "event": a.event, "actor": a.actor,
             "detail": json.loads(a.detail or "{}")}
            for a in query
        ]

    # Jobs.

    def submit(self, user_id: int, request_id: str, spec: dict, now: float):
        """Store a queued job; (job id, created). A repeated request id of
        the same user returns the job it created the first time."""
        # Prepared SQL: building these two with peewee cost about a
        # millisecond per submit, most of the broker's time under load.
        found = self._exec(
            self.sql.find_request, (user_id, request_id)
        ).fetchone()
        if found is not None:
            return found[0], False
        cursor = self._exec(self.sql.insert_job, (
            user_id, request_id, spec.get("name"), spec["script"],
            json.dumps(spec.get("args", [])), spec["data"], spec["output"],
            spec.get("priority", 0), "queued", spec["attempts"], 0, 0, 0,
            spec.get("timeout"), spec.get("cpu"), spec.get("memory"), now,
            0.0, False,
        ))
        if self.returning:
            return cursor.fetchone()[0], True
        return cursor.lastrowid, True

    def job_by_request(self, user_id: int, request_id: str) -> int | None:
        # Every submit asks this first: the prepared lookup, as submit's.
        found = self._exec(
            self.sql.find_request, (user_id, request_id)
        ).fetchone()
        return None if found is None else found[0]

    def job(self, job_id: int) -> dict | None:
        cursor = self._exec(self.sql.job, (job_id,))
        values = cursor.fetchone()
        return _row(JOB_COLUMNS, values) if values else None

    def attempts(self, job_id: int) -> list[dict]:
        query = (
            self.m.Attempt.select()
            .where(self.m.Attempt.job == job_id)
            .order_by(self.m.Attempt.number)
            .tuples()
        )
        return [_row(ATTEMPT_COLUMNS, values) for values in query]

    def attempt_exists(self, job_id: int, token: str) -> bool:
        """Whether ``token`` is the token of an attempt of ``job_id``."""
        return self.m.Attempt.select().where(
            (self.m.Attempt.token == token) & (self.m.Attempt.job == job_id)
        ).exists()

    def jobs(self, user_id=None, state=None, since=None, limit=100):
        query = self.m.Job.select().order_by(self.m.Job.id.desc()).limit(limit)
        if user_id is not None:
            query = query.where(self.m.Job.user == user_id)
        if state is not None:
            query = query.where(self.m.Job.state == state)
        if since is not None:
            query = query.where(self.m.Job.submitted_at >= since)
        names = dict(self.m.User.select(self.m.User.id, self.m.User.name).tuples())
        rows = []
        for values in query.tuples():
            row = _row(JOB_COLUMNS, values)
            row["user"] = names.get(row["user_id"])
            rows.append(row)
        return rows

    def claim(self, now: float, count: int) -> list[dict]:
        """Up to ``count`` queued jobs that may start now, best first."""
        cursor = self._exec(self.sql.claim, (now, count))
        return [_row(JOB_COLUMNS, values) for values in cursor.fetchall()]

    def start_attempt(self, job: dict, token: str, worker: str, now: float):
        """Mark a claimed job running on ``worker`` under a new attempt."""
        self._exec(self.sql.mark_running, (token, worker, now, job["id"]))
        number = job["attempts"] + 1
        self._exec(
            self.sql.insert_attempt, (job["id"], number, token, worker, now)
        )
        return number

    def end_attempt(
        self, job_id: int, token: str, now: float, outcome: str, *,
        job_state: str, failed: int = 0, lost: int = 0, not_before=0.0,
        exit_code=None, error=None, usage=None, cost=None,
    ) -> bool:
        """Close the attempt with ``token`` and move its job to ``job_state``.

        Returns False, changing nothing, when ``token`` is not the job's
        current attempt (a late or repeated report).
        """
        usage = usage or {}
        cursor = self._exec(
            self.sql.end_job,
            (
                job_state, failed, lost,
                now if job_state in FINAL_STATES else None,
                not_before, exit_code, error, job_id, token,
            ),
        )
        if cursor.rowcount != 1:
            return False
        self._exec(
            self.sql.end_attempt,
            (
                now, outcome, exit_code, error, usage.get("wall"),
                usage.get("user"), usage.get("system"),
                usage.get("max_rss_kb"), cost, token,
            ),
        )
        return True

    def cancel_queued(self, job_id: int, now: float) -> bool:
        count = (
            self.m.Job.update(state="cancelled", finished_at=now,
                       error="cancelled while queued")
            .where((self.m.Job.id == job_id) & (self.m.Job.state == "queued"))
            .execute()
        )
        return count == 1

    def request_cancel(self, job_id: int) -> None:
        Job = self.m.Job
        Job.update(cancel_requested=True).where(Job.id == job_id).execute()

    def set_progress(self, job_id: int, token: str, value: float) -> None:
        self.m.Job.update(progress=value).where(
            (self.m.Job.id == job_id) & (self.m.Job.token == token)
        ).execute()

    def running(self) -> list[dict]:
        cursor = self._exec(
            f"SELECT {', '.join(JOB_COLUMNS)} FROM msp_job "
            "WHERE state = 'running'"
        )
        return [_row(JOB_COLUMNS, values) for values in cursor.fetchall()]

    # Workers.

    def worker_seen(self, name: str, host: str, now: float, state: str):
        (
            self.m.Worker.insert(
                name=name, host=host, first_seen=now, last_seen=now,
                state=state,
            )
            .on_conflict(
                conflict_target=[self.m.Worker.name],
                update={
                    self.m.Worker.host: host, self.m.Worker.last_seen: now,
                    self.m.Worker.state: state,
                },
            )
            .execute()
        )

    def worker_done(self, name: str) -> None:
        self._exec(self.sql.worker_done, (name,))

    # Figures for the monitor and billing.

    def counts(self, user_id: int | None = None) -> dict[str, int]:
        Job = self.m.Job
        query = Job.select(Job.state, pw.fn.COUNT(Job.id)).group_by(Job.state)
        if user_id is not None:
            query = query.where(Job.user == user_id)
        counts = dict.fromkeys(JOB_STATES, 0)
        counts.update(dict(query.tuples()))
        return counts

    def queue_depth(self, now: float) -> dict[str, Any]:
        query = (
            self.m.Job.select(self.m.Job.priority, pw.fn.COUNT(self.m.Job.id),
                       pw.fn.MIN(self.m.Job.submitted_at))
            .where(self.m.Job.state == "queued")
            .group_by(self.m.Job.priority)
            .order_by(self.m.Job.priority.desc())
        )
        by_priority, oldest = {}, None
        for priority, count, first in query.tuples():
            by_priority[str(priority)] = count
            oldest = first if oldest is None else min(oldest, first)
        return {
            "by_priority": by_priority,
            "oldest_wait": None if oldest is None else max(0.0, now - oldest),
        }

    def finished_since(self, since: float) -> list[float]:
        Job = self.m.Job
        query = Job.select(Job.finished_at).where(Job.finished_at >= since)
        return [t for (t,) in query.tuples()]

    def usage_by_user(self, since: float) -> list[dict]:
        """Per user, the attempts that ended at ``since`` or later: how
        many, of how many jobs, and their CPU and wall seconds; the
        biggest CPU user first."""
        A, J, U = self.m.Attempt, self.m.Job, self.m.User
        cpu = pw.fn.SUM(pw.fn.COALESCE(A.cpu_user, 0)
                        + pw.fn.COALESCE(A.cpu_system, 0))
        query = (
            A.select(
                U.name, pw.fn.COUNT(A.job.distinct()), pw.fn.COUNT(A.id),
                cpu, pw.fn.SUM(pw.fn.COALESCE(A.wall_seconds, 0)),
            )
            .join(J)
            .join(U)
            .where(A.ended_at >= since)
            .group_by(U.name)
            .order_by(cpu.desc(), U.name)
        )
        return [
            {"user": name, "jobs": jobs, "attempts": attempts,
             "cpu_seconds": float(cpu or 0), "wall_seconds": float(wall or 0)}
            for name, jobs, attempts, cpu, wall in query.tuples()
        ]

    def charges(self, user_id: int, since: float) -> float:
        """What the user's attempts that ended since ``since`` cost."""
        A, J = self.m.Attempt, self.m.Job
        total = (
            A.select(pw.fn.SUM(A.cost)).join(J)
            .where((J.user == user_id) & (A.ended_at >= since))
            .scalar()
        )
        return float(total or 0.0)

    def usage(self, since: float, until: float, user_id=None) -> list[dict]:
        """Attempts that ended in [since, until), with job and user."""
        query = (
            self.m.Attempt.select(
                self.m.Attempt, self.m.Job.id.alias("jid"),
                self.m.Job.name.alias("jname"),
                self.m.Job.script.alias("jscript"), self.m.User.name.alias("uname"),
            )
            .join(self.m.Job)
            .join(self.m.User)
            .where(
                (self.m.Attempt.ended_at >= since) & (self.m.Attempt.ended_at < until)
            )
            .order_by(self.m.Attempt.ended_at)
        )
        if user_id is not None:
            query = query.where(self.m.Job.user == user_id)
        rows = []
        for a in query.objects():
            rows.append({
                "job": a.jid, "user": a.uname, "name": a.jname,
                "script": a.jscript, "number": a.number,
                "outcome": a.outcome, "wall_seconds": a.wall_seconds,
                "cpu_user": a.cpu_user, "cpu_system": a.cpu_system,
                "max_rss_kb": a.max_rss_kb, "cost": a.cost,
                "started_at": a.started_at, "ended_at": a.ended_at,
                "worker": a.worker,
            })
        return rows


def _open(url: str, schema: str | None, synchronous: str) -> pw.Database:
    scheme = urlparse(url).scheme
    if scheme.startswith("sqlite"):
        pragmas = {
            "journal_mode": "wal",
            "synchronous": synchronous.upper(),
            "foreign_keys": 1,
            "busy_timeout": 5000,
        }
        return connect(url, pragmas=pragmas)
    if scheme.startswith("postgres"):
        options = {}
        schema = schema or parse_qs(urlparse(url).query).get(
            "schema", [None]
        )[0]
        if schema:
            options["options"] = f"-c search_path={schema}"
        url = url.split("?")[0]
        return connect(url, **options)
    raise ConfigError(
        f"unsupported store URL {url!r}: use sqlite:///PATH or "
        "postgresql://USER@HOST:PORT/DB"
    )
