"""The broker's side of the client protocol: one method per command.

Every request but PING and LOGIN carries a session token; the handler turns
it into the user before anything else happens. A user sees and acts on their
own jobs only; an admin on everybody's. A job that is not the caller's is
reported as not found, so ids reveal nothing.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from .. import auth, billing, outputs, paths, protocol
from ..errors import (
    AuthError, ConflictError, ForbiddenError, LimitError, MspError,
    NotFoundError, ProtocolError, ThrottledError,
)
from ..store import FINAL_STATES, JOB_STATES
from .throttle import LoginThrottle, seconds

log = logging.getLogger(__name__)

MAX_ARGS = 256
MAX_ARG = 4096
MAX_WAIT = 60.0
# Jobs in one SUBMIT_MANY, and in one WAIT.
MAX_BATCH = 1000
MAX_TIMEOUT = 30 * 86400.0
MAX_LIST = 1000
MAX_LOG_CHUNK = 256 * 1024
MAX_AUDIT = 1000
MAX_CREDIT = 1e12
SESSION_CACHE = 10_000
# Jobs in a STATS snapshot, newest first; and minutes of throughput.
RECENT = 20
THROUGHPUT_MINUTES = 15


class _Wait:
    """A client waiting for the end of one or more jobs."""

    __slots__ = ("identity", "jobs", "pending", "deadline", "many")

    def __init__(self, identity: bytes, jobs: list[int], pending: set[int],
                 deadline: float, many: bool):
        self.identity = identity
        self.jobs = jobs
        self.pending = pending
        self.deadline = deadline
        self.many = many


@dataclass(frozen=True, slots=True)
class Caller:
    user_id: int
    name: str
    role: str
    token_hash: str

    @property
    def admin(self) -> bool:
        return self.role == "admin"


class ClientHandler:
    def __init__(self, broker):
        self.broker = broker
        self.config = broker.config
        # token hash -> (Caller, expires_at); dropped on logout and disable.
        self._sessions: dict[str, tuple[Caller, float]] = {}
        # job id -> the waits that end with it (a wait on several jobs is
        # under each of the jobs it still waits for).
        self._waiters: dict[int, list[_Wait]] = {}
        # Password hashing is slow on purpose; it runs off the loop.
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="msp-hash")
        c = self.config
        self.throttle = LoginThrottle(
            c.login_throttle_after, c.login_throttle_peer_after,
            c.login_throttle_window, c.login_throttle_delay,
            c.login_throttle_max,
        )
        # The address of the peer whose message is being handled.
        self._peer = ""
        self._commands = {
            b"PING": self._ping,
            b"LOGIN": self._login,
            b"LOGOUT": self._logout,
            b"PASSWD": self._passwd,
            b"SUBMIT": self._submit,
            b"SUBMIT_MANY": self._submit_many,
            b"STATUS": self._status,
            b"WAIT": self._wait,
            b"LIST": self._list,
            b"CANCEL": self._cancel,
            b"LOGS": self._logs,
            b"USER_ADD": self._user_add,
            b"USER_LIST": self._user_list,
            b"USER_DISABLE": self._user_disable,
            b"USER_SET": self._user_set,
            b"WORKERS": self._workers,
            b"STATS": self._stats,
            b"BILLING": self._billing,
            b"AUDIT": self._audit,
        }

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # Framing.

    def handle(self, frames: list[bytes], now: float, wall: float,
               peer: str = "") -> None:
        self._peer = peer
        if len(frames) < 2:
            log.warning("dropped a client message of %d frame(s)", len(frames))
            return
        identity = frames[0]
        if frames[1] != b"":
            # Not a REQ envelope; answer in kind so a DEALER hears why.
            self._reply_err(identity, "bad_request",
                            "expected an empty delimiter frame (use REQ)")
            return
        mark = self.broker.mark()
        try:
            msg = protocol.parse(
                frames[2:], protocol.CLIENT_COMMANDS,
                self.config.max_message_size,
            )
            command = self._commands.get(msg.command)
            if command is None:
                # In the protocol, but not served by this broker.
                raise ProtocolError(
                    f"{msg.command.decode()} is not served by this broker",
                    "unknown_command",
                )
            caller = None
            if msg.command not in (b"PING", b"LOGIN"):
                caller = self._authenticate(msg.body["token"], wall)
            with self.broker.store.atomic():
                result = command(identity, caller, msg.body, now, wall)
        except MspError as exc:
            log.debug("client request refused: %s", exc)
            # Its writes were rolled back; so are the events that told of
            # them (a SUBMIT_MANY refused at its last job queued the rest).
            self.broker.drop_since(mark)
            self._reply_err(identity, exc.code, exc.message)
            return
        if result is not None:
            self.reply(identity, result)

    def internal_error(self, frames: list[bytes]) -> None:
        if len(frames) >= 2 and frames[1] == b"":
            self._reply_err(frames[0], "internal",
                            "the broker failed; see its log")

    def reply(self, identity: bytes, body: dict) -> None:
        self.broker.send(
            "client", [identity, b"", *protocol.encode(protocol.OK, body)]
        )

    def _reply_err(self, identity: bytes, code: str, message: str) -> None:
        body = protocol.error_body(code, message)
        self.broker.send(
            "client", [identity, b"", *protocol.encode(protocol.ERR, body)]
        )

    def tick(self, now: float, wall: float) -> None:
        """Answer the waits whose time is up with the jobs as they are."""
        due = {}
        for job_id, waits in list(self._waiters.items()):
            if any(w.deadline <= now for w in waits):
                for w in waits:
                    if w.deadline <= now:
                        due[id(w)] = w
                waits[:] = [w for w in waits if w.deadline > now]
                if not waits:
                    del self._waiters[job_id]
        for w in due.values():
            self._answer(w)

    def jobs_ended(self, job_ids: set[int]) -> None:
        """Answer every client whose wait ends with one of ``job_ids``."""
        for job_id in job_ids:
            for w in self._waiters.pop(job_id, ()):
                w.pending.discard(job_id)
                if not w.pending:
                    self._answer(w)

    def _answer(self, w: _Wait) -> None:
        """Reply to a wait with its jobs as they are now; forget it."""
        for job_id in w.pending:
            waits = self._waiters.get(job_id)
            if waits is not None:
                waits[:] = [x for x in waits if x is not w]
                if not waits:
                    del self._waiters[job_id]
        w.pending = set()
        store = self.broker.store
        views = [self._view(store.job(job_id)) for job_id in w.jobs]
        self.reply(w.identity, {"jobs": views} if w.many else
                   {"job": views[0]})

    # Sessions.

    def _authenticate(self, token: str, wall: float) -> Caller:
        digest = auth.token_hash(token)
        cached = self._sessions.get(digest)
        if cached is None:
            found = self.broker.store.session(digest)
            if found is None or found.revoked or found.user.disabled:
                raise AuthError("not logged in, or the session was revoked; "
                                "log in again")
            user = found.user
            caller = Caller(user.id, user.name, user.role, digest)
            cached = (caller, found.expires_at)
            if len(self._sessions) >= SESSION_CACHE:
                self._sessions.clear()
            self._sessions[digest] = cached
        caller, expires_at = cached
        if expires_at <= wall:
            self._sessions.pop(digest, None)
            raise AuthError("the session has expired; log in again")
        return caller

    def _forget_sessions(self, user_id: int) -> None:
        for digest, (caller, _) in list(self._sessions.items()):
            if caller.user_id == user_id:
                del self._sessions[digest]

    def _offload(self, identity: bytes, slow, then) -> None:
        """Run ``slow()`` off the loop, then ``then(result)`` in a turn of
        its own, replying with what it returns: a body, or an MspError to
        refuse with while keeping its writes (an error it raises rolls
        them back)."""

        def done(future):
            try:
                result = future.result()
                with self.broker.store.atomic():
                    body = then(result, self.broker.wall())
            except MspError as exc:
                self._reply_err(identity, exc.code, exc.message)
                return
            except Exception:
                log.exception("unexpected error finishing a request")
                self._reply_err(identity, "internal",
                                "the broker failed; see its log")
                return
            if isinstance(body, MspError):
                # Refused, but what ``then`` wrote (the audit) stays.
                self._reply_err(identity, body.code, body.message)
            else:
                self.reply(identity, body)

        future = self._pool.submit(slow)
        future.add_done_callback(lambda f: self.broker.later(lambda: done(f)))

    # Commands. Each returns the reply body, or None when it replies later.

    def _ping(self, identity, caller, body, now, wall):
        return {"version": protocol.VERSION.decode(), "time": wall}

    def _login(self, identity, caller, body, now, wall):
        name, password = body["user"], body["password"]
        peer, throttle = self._peer, self.throttle
        left = throttle.retry_after(name, peer, now)
        if left > 0:
            log.debug("login for %r from %s refused: throttled", name[:64],
                      peer or "a local peer")
            raise ThrottledError(
                f"too many failed logins; retry in {seconds(left)} s"
            )
        user = self.broker.store.user(name) if len(name) <= 64 else None
        stored_hash = None if user is None else user.password_hash
        passwords = self.broker.passwords
        throttle.begin(name, peer, now)

        def then(ok, wall):
            # Same answer for an unknown user and a wrong password.
            if not ok or user is None or user.disabled:
                blocked = throttle.failed(name, peer, self.broker.clock())
                self.broker.audit(wall, "login_failed", name[:64],
                                  address=peer)
                for key in blocked:
                    self.broker.audit(wall, "login_throttled", name[:64],
                                      address=peer, **key)
                return AuthError("wrong user name or password")
            throttle.succeeded(name, peer)
            token = auth.new_token()
            expires = wall + self.config.session_ttl
            self.broker.store.add_session(
                user.id, auth.token_hash(token), wall, expires
            )
            self.broker.audit(wall, "login", user.name, address=peer)
            return {"token": token, "expires": expires, "user": user.name,
                    "role": user.role}

        def verify():
            # Runs in the hash thread; whatever happens, the throttle must
            # hear the outcome, or the attempt would stay pending.
            try:
                return passwords.verify(stored_hash, password)
            except Exception:
                log.exception("password check failed")
                return False

        self._offload(identity, verify, then)

    def _logout(self, identity, caller, body, now, wall):
        self.broker.store.revoke_session(caller.token_hash)
        self._sessions.pop(caller.token_hash, None)
        self.broker.audit(wall, "logout", caller.name)
        return {}

    def _passwd(self, identity, caller, body, now, wall):
        name = body.get("user") or caller.name
        if name != caller.name and not caller.admin:
            raise ForbiddenError("only an admin may change another user's "
                                 "password")
        user = self.broker.store.user(name)
        if user is None:
            raise NotFoundError(f"no user {name!r}")
        problem = auth.check_password(body["password"])
        if problem:
            raise ProtocolError(problem)
        passwords, password = self.broker.passwords, body["password"]

        def then(password_hash, wall):
            self.broker.store.set_password(user.id, password_hash)
            self.broker.audit(wall, "passwd", caller.name, user=name)
            return {"user": name}

        self._offload(identity, lambda: passwords.hash(password), then)

    def _submit(self, identity, caller, body, now, wall):
        _check_request_id(body["request_id"], 64)
        spec = _check_spec(body, self.config.attempts)
        store = self.broker.store
        known = store.job_by_request(caller.user_id, body["request_id"])
        if known is not None:
            # A retried submit: the first one was stored.
            return {"job": known, "created": False}
        self._check_credit(caller, wall)
        job_id = self._queue(caller, body["request_id"], spec, wall)
        return {"job": job_id, "created": True}

    def _submit_many(self, identity, caller, body, now, wall):
        """Many jobs, all or none: a refusal names the item at fault.
        Item i is stored under the request id "<request_id>/<i>"."""
        request = body["request_id"]
        _check_request_id(request, 64 - 5)
        items = body["jobs"]
        if not 1 <= len(items) <= MAX_BATCH:
            raise ProtocolError(
                f"SUBMIT_MANY: jobs must hold 1 to {MAX_BATCH} jobs"
            )
        specs = []
        for i, item in enumerate(items):
            try:
                protocol.check_item("SUBMIT_MANY", item, protocol.JOB_FIELDS)
                specs.append(_check_spec(item, self.config.attempts))
            except MspError as exc:
                raise type(exc)(f"jobs[{i}]: {exc.message}", exc.code) \
                    from None
        store = self.broker.store
        if store.job_by_request(caller.user_id, f"{request}/0") is not None:
            # A retried submit: the first one stored them all.
            ids = [store.job_by_request(caller.user_id, f"{request}/{i}")
                   for i in range(len(specs))]
            if None in ids:
                raise ConflictError(
                    f"request_id {request!r} was used for fewer jobs"
                )
            return {"jobs": ids, "created": False}
        self._check_credit(caller, wall)
        ids = []
        memo: dict = {}
        for i, spec in enumerate(specs):
            try:
                ids.append(self._queue(caller, f"{request}/{i}", spec, wall,
                                       memo))
            except MspError as exc:
                raise type(exc)(f"jobs[{i}]: {exc.message}", exc.code) \
                    from None
        return {"jobs": ids, "created": True}

    def _queue(self, caller: Caller, request_id: str, spec: dict,
               wall: float, memo: dict | None = None) -> int:
        """Check a new job's limits and paths, store it, announce it."""
        self._check_limits(spec)
        checked = paths.check(
            spec["script"], spec["data"], spec["output"], self.broker.roots,
            memo,
        )
        spec.update(script=checked.script, data=checked.data,
                    output=checked.output)
        job_id, created = self.broker.store.submit(
            caller.user_id, request_id, spec, wall
        )
        if not created:
            raise ConflictError(f"request_id {request_id!r} is taken")
        log.debug("job %d queued for %s", job_id, caller.name)
        self.broker.publish(
            "job", event="queued", job=job_id, state="queued", was=None,
            priority=spec["priority"], user=caller.name,
            name=spec["name"], script=spec["script"],
            max_attempts=spec["attempts"],
        )
        return job_id

    def _check_limits(self, spec: dict) -> None:
        """The job's own limits must fit under the broker's maxima."""
        cpu, memory = spec["cpu"], spec["memory"]
        top_cpu, top_memory = self.config.max_job_cpu, \
            self.config.max_job_memory_mb
        if cpu is not None and top_cpu and cpu > top_cpu:
            raise LimitError(
                f"cpu {cpu:g} s is over this broker's maximum of "
                f"{top_cpu:g} s"
            )
        if memory is not None and top_memory and memory > top_memory:
            raise LimitError(
                f"memory {memory} MiB is over this broker's maximum of "
                f"{top_memory} MiB"
            )

    def _check_credit(self, caller: Caller, wall: float) -> None:
        limit = self.broker.store.credit_limit(caller.user_id)
        if limit is None:
            return
        spent = self.broker.store.charges(caller.user_id,
                                          billing.month_start(wall))
        if spent >= limit:
            currency = self.broker.billing.currency
            raise LimitError(
                f"credit limit reached: {spent:.2f} of {limit:.2f} "
                f"{currency} charged this month; ask an admin to raise it"
            )

    def _job_for(self, caller: Caller, job_id: int) -> dict:
        job = self.broker.store.job(job_id)
        if job is None or (job["user_id"] != caller.user_id
                           and not caller.admin):
            raise NotFoundError(f"no job {job_id}")
        return job

    def _status(self, identity, caller, body, now, wall):
        job = self._job_for(caller, body["job"])
        attempts = self.broker.store.attempts(job["id"])
        for attempt in attempts:
            del attempt["token"]  # a worker's credential for the attempt
        return {"job": self._view(job), "attempts": attempts}

    def _wait(self, identity, caller, body, now, wall):
        many = "jobs" in body
        if many == ("job" in body):
            raise ProtocolError("WAIT: give one of 'job' and 'jobs'")
        ids = body["jobs"] if many else [body["job"]]
        if not 1 <= len(ids) <= MAX_BATCH or not all(
            type(j) is int for j in ids
        ):
            raise ProtocolError(
                f"WAIT: jobs must be a list of 1 to {MAX_BATCH} job ids"
            )
        ids = list(dict.fromkeys(ids))
        jobs = [self._job_for(caller, j) for j in ids]
        timeout = min(max(float(body.get("timeout", 10.0)), 0.0), MAX_WAIT)
        pending = {j["id"] for j in jobs if j["state"] not in FINAL_STATES}
        if not pending or timeout == 0:
            views = [self._view(j) for j in jobs]
            return {"jobs": views} if many else {"job": views[0]}
        w = _Wait(identity, ids, pending, now + timeout, many)
        for job_id in pending:
            self._waiters.setdefault(job_id, []).append(w)
        return None

    def _list(self, identity, caller, body, now, wall):
        state = body.get("state")
        if state is not None and state not in JOB_STATES:
            raise ProtocolError(
                f"unknown state {state[:32]!r}; one of {', '.join(JOB_STATES)}"
            )
        user_id = caller.user_id
        if caller.admin:
            user_id = None
            if body.get("user"):
                user = self.broker.store.user(body["user"])
                if user is None:
                    return {"jobs": []}
                user_id = user.id
        elif body.get("user") not in (None, caller.name):
            raise ForbiddenError("only an admin may list another user's jobs")
        limit = min(max(body.get("limit", 100), 1), MAX_LIST)
        rows = self.broker.store.jobs(user_id, state, body.get("since"), limit)
        return {"jobs": [self._view(row) for row in rows]}

    def _cancel(self, identity, caller, body, now, wall):
        job = self._job_for(caller, body["job"])
        job_id, store = job["id"], self.broker.store
        if job["state"] in FINAL_STATES:
            raise ConflictError(
                f"job {job_id} already {job['state']}; nothing to cancel"
            )
        if caller.user_id != job["user_id"]:
            owner = store.user_by_id(job["user_id"])
            self.broker.audit(wall, "cancel_by_admin", caller.name,
                              job=job_id, owner=owner.name if owner else None)
        if job["state"] == "queued" and store.cancel_queued(job_id, wall):
            log.info("job %d cancelled while queued", job_id)
            _mark_cancelled(job, caller.name)
            self.broker.publish(
                "job", event="cancelled", job=job_id, state="cancelled",
                was="queued", priority=job["priority"],
            )
            self.broker.job_ended(job_id)
            return {"job": job_id, "state": "cancelled"}
        store.request_cancel(job_id)
        self.broker.workers.cancel(job_id)
        log.info("job %d: cancel requested", job_id)
        self.broker.publish(
            "job", event="cancel_requested", job=job_id, state="running",
            was="running",
        )
        return {"job": job_id, "state": "running", "cancel_requested": True}

    def _logs(self, identity, caller, body, now, wall):
        job = self._job_for(caller, body["job"])
        stream = body.get("stream", "stdout")
        if stream not in ("stdout", "stderr"):
            raise ProtocolError("stream must be stdout or stderr")
        offset = max(body.get("offset", 0), 0)
        limit = min(max(body.get("limit", 65536), 16), MAX_LOG_CHUNK)
        name = outputs.STDOUT if stream == "stdout" else outputs.STDERR
        folder = Path(job["output_dir"])
        if job["state"] == "running" and job["token"]:
            folder = outputs.scratch_dir(folder, job["attempts"], job["token"])
        # A running script may be halfway through writing a character.
        data, size = _read_chunk(folder / name, offset, limit,
                                 whole=job["state"] == "running")
        return {
            "data": data.decode("utf-8", "replace"),
            "offset": offset + len(data),
            "size": size,
            "state": job["state"],
        }

    def _need_admin(self, caller: Caller) -> None:
        if not caller.admin:
            raise ForbiddenError("this command needs the admin role")

    def _user_add(self, identity, caller, body, now, wall):
        self._need_admin(caller)
        name, role = body["user"], body.get("role", "user")
        if role not in auth.ROLES:
            raise ProtocolError(f"role must be one of {', '.join(auth.ROLES)}")
        if not (1 <= len(name) <= 64) or not name.isprintable() or \
                any(c.isspace() for c in name):
            raise ProtocolError(
                "user name must be 1 to 64 printable characters, no spaces"
            )
        problem = auth.check_password(body["password"])
        if problem:
            raise ProtocolError(problem)
        if self.broker.store.user(name) is not None:
            raise ConflictError(f"user {name!r} already exists")
        credit = _check_credit_limit(body.get("credit_limit"))
        passwords, password = self.broker.passwords, body["password"]

        def then(password_hash, wall):
            if self.broker.store.add_user(
                name, password_hash, role, wall, credit
            ) is None:
                raise ConflictError(f"user {name!r} already exists")
            self.broker.audit(wall, "user_add", caller.name, user=name,
                              role=role, credit_limit=credit)
            log.info("user %s added by %s", name, caller.name)
            return {"user": name, "role": role, "credit_limit": credit}

        self._offload(identity, lambda: passwords.hash(password), then)

    def _user_list(self, identity, caller, body, now, wall):
        self._need_admin(caller)
        return {"users": [
            {"user": u.name, "role": u.role, "disabled": u.disabled,
             "created_at": u.created_at, "credit_limit": u.credit_limit}
            for u in self.broker.store.users()
        ]}

    def _user_disable(self, identity, caller, body, now, wall):
        self._need_admin(caller)
        user = self.broker.store.user(body["user"])
        if user is None:
            raise NotFoundError(f"no user {body['user'][:64]!r}")
        if user.id == caller.user_id:
            raise ConflictError("an admin cannot disable their own account")
        self.broker.store.disable_user(user.id)
        self._forget_sessions(user.id)
        self.broker.audit(wall, "user_disable", caller.name, user=user.name)
        log.info("user %s disabled by %s", user.name, caller.name)
        return {"user": user.name, "disabled": True}

    def _user_set(self, identity, caller, body, now, wall):
        self._need_admin(caller)
        user = self.broker.store.user(body["user"])
        if user is None:
            raise NotFoundError(f"no user {body['user'][:64]!r}")
        credit = _check_credit_limit(body["credit_limit"])
        self.broker.store.set_credit_limit(user.id, credit)
        self.broker.audit(wall, "user_set", caller.name, user=user.name,
                          credit_limit=credit)
        return {"user": user.name, "credit_limit": credit}

    def _workers(self, identity, caller, body, now, wall):
        self._need_admin(caller)
        return {"workers": self.broker.workers.snapshot(now)}

    def _stats(self, identity, caller, body, now, wall):
        """The snapshot a monitor starts from. It includes every change up
        to event ``seq`` of this ``run`` and none after."""
        store = self.broker.store
        recent = store.jobs(
            None if caller.admin else caller.user_id, None, None, RECENT
        )
        # Whole clock minutes, so that a subscriber can add the jobs that
        # events report finished to the right one; the last is under way.
        minute = int(wall // 60)
        first = minute - THROUGHPUT_MINUTES + 1
        per_minute = [0] * THROUGHPUT_MINUTES
        for t in store.finished_since(first * 60.0):
            per_minute[min(int(t // 60) - first, THROUGHPUT_MINUTES - 1)] += 1
        snap = {
            "run": self.broker.run_id,
            "seq": self.broker.seq,
            "time": wall,
            "user": caller.name,
            "admin": caller.admin,
            "heartbeat_interval": self.config.heartbeat_interval,
            "liveness": self.config.liveness,
            "tick": self.broker.tick_period,
            "workers": [self._worker_row(caller, row)
                        for row in self.broker.workers.snapshot(now)],
            "counts": store.counts(),
            "queue": store.queue_depth(wall),
            "recent": [self._view(row) for row in recent],
            "finished_per_minute": per_minute,
        }
        if caller.admin:
            snap["usage_today"] = store.usage_by_user(_midnight(wall))
        return snap

    def _worker_row(self, caller: Caller, row: dict) -> dict:
        """A worker as ``caller`` may see it: another user's job on it is
        not named (as STATUS would not find it)."""
        if caller.admin or row["job"] is None:
            return row
        job = self.broker.store.job(row["job"])
        if job is not None and job["user_id"] == caller.user_id:
            return row
        return dict(row, job=None, attempt=None, job_seconds=None,
                    progress=None)

    def _billing(self, identity, caller, body, now, wall):
        """A statement: per-job usage and cost over [since, until)."""
        store, name = self.broker.store, body.get("user")
        if body.get("all"):
            self._need_admin(caller)
            user_id, who = None, None
        elif name in (None, caller.name):
            user_id, who = caller.user_id, caller.name
        else:
            if not caller.admin:
                raise ForbiddenError(
                    "only an admin may see another user's bill"
                )
            user = store.user(name)
            if user is None:
                raise NotFoundError(f"no user {name[:64]!r}")
            user_id, who = user.id, user.name
        since = body.get("since")
        since = billing.month_start(wall) if since is None else since
        until = body.get("until")
        until = wall if until is None else until
        if until < since:
            raise ProtocolError("until must not be before since")
        lines, totals = billing.statement(store.usage(since, until, user_id))
        plan = self.broker.billing
        return {
            "user": who, "since": since, "until": until,
            "currency": plan.currency, "jobs": lines, "totals": totals,
            "plan": {
                "per_cpu_second": plan.per_cpu_second,
                "per_wall_second": plan.per_wall_second,
                "per_job": plan.per_job, "per_gb_hour": plan.per_gb_hour,
                "charge_failed": plan.charge_failed,
            },
        }

    def _audit(self, identity, caller, body, now, wall):
        self._need_admin(caller)
        limit = min(max(body.get("limit", 100), 1), MAX_AUDIT)
        return {"entries": self.broker.store.audit_entries(
            limit, body.get("event"), body.get("actor"), body.get("since"),
        )}

    def _view(self, job: dict | None) -> dict | None:
        """A job as clients see it."""
        if job is None:
            return None
        view = {k: job[k] for k in (
            "id", "name", "state", "script", "args", "priority",
            "attempts", "max_attempts", "failures", "lost", "timeout",
            "submitted_at", "started_at", "finished_at", "exit_code",
            "error", "worker", "progress", "cancel_requested",
        )}
        view["cpu"], view["memory"] = job["cpu_limit"], job["memory_limit_mb"]
        view["data"], view["output"] = job["data_dir"], job["output_dir"]
        if "user" in job:
            view["user"] = job["user"]
        return view


def _mark_cancelled(job: dict, by: str) -> None:
    """Say so in the output folder, if an earlier attempt made it."""
    output = Path(job["output_dir"])
    if not output.is_dir():
        return
    status = {"job": job["id"], "state": "cancelled", "attempt": None,
              "outcome": None, "exit_code": None,
              "error": f"cancelled while queued by {by}"}
    try:
        outputs.promote(output, None, status)
    except OSError as exc:
        log.error("job %d: could not write its status: %s", job["id"], exc)


def _midnight(wall: float) -> float:
    """The start of the broker's local day that holds ``wall``."""
    day = datetime.fromtimestamp(wall).replace(
        hour=0, minute=0, second=0, microsecond=0
    )
    return day.timestamp()


def _check_request_id(request_id: str, most: int) -> None:
    if not 1 <= len(request_id) <= most:
        raise ProtocolError(f"request_id must have 1 to {most} characters")


def _check_spec(body: dict, default_attempts: int) -> dict:
    """The job's settings from a SUBMIT body (or an item of SUBMIT_MANY's
    jobs), checked."""
    args = body.get("args", [])
    if len(args) > MAX_ARGS:
        raise ProtocolError(f"at most {MAX_ARGS} arguments")
    for arg in args:
        if not isinstance(arg, str):
            raise ProtocolError("every argument must be a string")
        if len(arg) > MAX_ARG or "\0" in arg:
            raise ProtocolError(
                f"an argument is longer than {MAX_ARG} or holds a NUL"
            )
        try:
            arg.encode()
        except UnicodeEncodeError:
            raise ProtocolError("an argument is not valid UTF-8") from None
    priority = body.get("priority", 0)
    if not -1000 <= priority <= 1000:
        raise ProtocolError("priority must be between -1000 and 1000")
    attempts = body.get("attempts", default_attempts)
    if not 1 <= attempts <= 100:
        raise ProtocolError("attempts must be between 1 and 100")
    timeout = body.get("timeout")
    if timeout is not None and not 0 < timeout <= MAX_TIMEOUT:
        raise ProtocolError(
            f"timeout must be between 0 and {MAX_TIMEOUT:.0f} seconds"
        )
    name = body.get("name")
    if name is not None and len(name) > 256:
        raise ProtocolError("name must have at most 256 characters")
    cpu = body.get("cpu")
    if cpu is not None and not 0 < cpu <= MAX_TIMEOUT:
        raise ProtocolError(
            f"cpu must be between 0 and {MAX_TIMEOUT:.0f} seconds"
        )
    memory = body.get("memory")
    if memory is not None and not 1 <= memory <= 1 << 30:
        raise ProtocolError("memory must be a positive number of MiB")
    return {
        "script": body["script"], "data": body["data"],
        "output": body["output"], "args": args, "priority": priority,
        "attempts": attempts, "timeout": timeout, "name": name,
        "cpu": cpu, "memory": memory,
    }


def _check_credit_limit(value) -> float | None:
    if value is None:
        return None
    if not 0 <= value <= MAX_CREDIT:
        raise ProtocolError(f"credit_limit must be between 0 and {MAX_CREDIT:g}")
    return float(value)


def _read_chunk(path: Path, offset: int, limit: int,
                whole: bool = False) -> tuple[bytes, int]:
    """Up to ``limit`` bytes of ``path`` from ``offset``, cut at the end of
    the last whole UTF-8 character; and the file's size."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            f.seek(offset)
            data = f.read(limit)
    except FileNotFoundError:
        return b"", 0
    if len(data) == limit or whole:
        cut = len(data)
        # Step back over an incomplete multi-byte character at the end.
        for back in range(1, min(4, len(data)) + 1):
            byte = data[-back]
            if byte & 0xC0 != 0x80:
                need = 2 if byte >= 0xC0 else 1
                need = 3 if byte >= 0xE0 else need
                need = 4 if byte >= 0xF0 else need
                if need > back:
                    cut = len(data) - back
                break
        data = data[:cut]
    return data, size
