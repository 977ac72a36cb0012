"""The broker's side of the worker protocol: liveness, dispatch, results.

Paranoid Pirate: a worker announces itself with READY, then each side sends
a HEARTBEAT every interval when it has nothing else to say. A worker the
broker has not heard from for ``liveness`` intervals is dead: its attempt is
recorded as lost and the job goes back to the queue.

Every assignment carries a fresh token. A worker's reports about a job count
only with the token of the job's current attempt, so a late report from an
earlier attempt can never overwrite a newer state.
"""

from __future__ import annotations

import hmac
import logging
import secrets
from dataclasses import dataclass
from pathlib import Path

from .. import billing, outputs, protocol
from ..errors import ProtocolError

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Peer:
    """A worker as the broker sees it."""

    identity: bytes
    name: str
    host: str
    pid: int | None
    joined: float
    expires: float
    next_heartbeat: float
    last_seen: float = 0.0
    job: int | None = None
    token: str | None = None
    attempt: int = 0
    job_since: float | None = None
    # A job the worker holds but must stop (its token is stale).
    stale: bool = False
    draining: bool = False
    jobs_done: int = 0
    progress: float | None = None
    # Given a fresh period after a stall of the broker's, and not heard
    # from since: the next stall gives it nothing more.
    graced: bool = False


@dataclass(frozen=True, slots=True)
class Decision:
    """What an attempt's outcome does to its job."""

    state: str
    failed: int = 0
    lost: int = 0
    not_before: float = 0.0


def decide(job: dict, outcome: str, config, wall: float) -> Decision:
    """The job's next state after an attempt ended with ``outcome``."""
    if outcome == "lost":
        if job["cancel_requested"]:
            return Decision("cancelled", lost=1)
        if job["lost"] + 1 > config.max_lost:
            return Decision("failed", lost=1)
        return Decision("queued", lost=1)
    if job["cancel_requested"] or outcome == "cancelled":
        return Decision("cancelled")
    if outcome == "succeeded":
        return Decision("succeeded")
    if outcome == "error":
        # The script could not even start: retrying cannot help.
        return Decision("failed", failed=1)
    failures = job["failures"] + 1
    if failures >= job["max_attempts"]:
        return Decision("failed", failed=1)
    delay = min(
        config.retry_backoff * config.retry_backoff_factor ** (failures - 1),
        config.retry_backoff_max,
    )
    return Decision("queued", failed=1, not_before=wall + delay)


# Messages whose handlers write nothing to the store: no savepoint.
_READ_ONLY = frozenset((protocol.HEARTBEAT, protocol.STARTED))


class WorkerHandler:
    def __init__(self, broker):
        self.broker = broker
        self.config = broker.config
        self.peers: dict[bytes, Peer] = {}
        # Idle workers, least recently used first.
        self.idle: dict[bytes, None] = {}
        self.by_job: dict[int, bytes] = {}
        # Jobs found running at start-up whose worker has not come back yet:
        # job id -> (token, deadline).
        self.orphans: dict[int, tuple[str, float]] = {}
        self._last_tick: float | None = None
        # Orphans given a fresh wait after a stall (once each).
        self._graced_orphans: set[int] = set()
        self._handlers = {
            protocol.READY: self._ready,
            protocol.HEARTBEAT: self._heartbeat,
            protocol.STARTED: self._started,
            protocol.PROGRESS: self._progress,
            protocol.RESULT: self._result,
            protocol.BYE: self._bye,
        }

    @property
    def period(self) -> float:
        return self.config.heartbeat_interval * self.config.liveness

    def recover(self, now: float) -> None:
        """Remember the jobs a previous broker left running."""
        # A worker holding a job tries to reconnect at least once per
        # liveness period while the broker is away (msp/worker.py), so with
        # the same settings on both sides it is back well within this.
        grace = self.period * 3
        for job in self.broker.store.running():
            self.orphans[job["id"]] = (job["token"], now + grace)
        if self.orphans:
            log.info(
                "%d job(s) were running; waiting %.0f s for their workers",
                len(self.orphans), grace,
            )

    # Messages.

    def handle(self, frames: list[bytes], now: float, wall: float,
               address: str = "") -> None:
        if len(frames) < 2:
            log.warning("dropped a worker message of %d frame(s)", len(frames))
            return
        identity, frames = frames[0], frames[1:]
        try:
            msg = protocol.parse(
                frames, protocol.WORKER_COMMANDS, self.config.max_message_size
            )
        except ProtocolError as exc:
            log.warning("bad message from worker %r: %s", identity, exc)
            self._error(identity, exc.code, exc.message)
            return
        peer = self.peers.get(identity)
        if msg.command != protocol.READY and peer is None:
            # A worker the broker does not know (it never said READY, or a
            # broker restart forgot it): ask it to announce itself.
            self._error(identity, "not_ready", "send READY first")
            return
        if peer is not None:
            peer.expires = now + self.period
            peer.last_seen = wall
            peer.graced = False
        elif not self._admit(identity, msg.body, wall, address):
            return
        handler = self._handlers[msg.command]
        if msg.command in _READ_ONLY:
            handler(identity, peer, msg.body, now, wall)
            return
        # A savepoint, so that a failure halfway leaves no writes behind.
        with self.broker.store.atomic():
            handler(identity, peer, msg.body, now, wall)

    def internal_error(self, frames: list[bytes]) -> None:
        if frames:
            self._error(frames[0], "internal", "the broker failed; see its log")

    def _send(self, identity: bytes, command: bytes, body=None) -> None:
        self.broker.send("worker", [identity, *protocol.encode(command, body)])
        peer = self.peers.get(identity)
        if peer is not None:
            peer.next_heartbeat = self.broker.clock() + (
                self.config.heartbeat_interval
            )

    def _error(self, identity: bytes, code: str, message: str,
               **about) -> None:
        body = protocol.error_body(code, message)
        body.update(about)
        self._send(identity, protocol.ERROR, body)

    def _admit(self, identity: bytes, body: dict, wall: float,
               address: str) -> bool:
        """Whether a READY from a new peer proves it is one of ours."""
        secret = self.config.worker_secret
        if not secret or hmac.compare_digest(
            (body.get("secret") or "").encode(), secret.encode()
        ):
            return True
        # XXX: each refused READY is an audit row: a rogue peer that keeps
        # reconnecting writes one per try.
        log.warning(
            "refused worker %r (%s) from %s: wrong or missing secret",
            body["name"][:64], identity.hex(), address or "a local peer",
        )
        self.broker.audit(
            wall, "worker_refused", None, name=body["name"][:64],
            address=address, why="wrong or missing secret",
        )
        self._error(identity, "unauthenticated", "wrong worker secret")
        return False

    def _ready(self, identity, peer, body, now, wall) -> None:
        name = body["name"][:256]
        # The same worker on a new socket: forget the old one, but let the
        # new one claim the job the old one held.
        held = (body.get("job"), body.get("token"))
        for other in [p for p in self.peers.values() if p.name == name]:
            if other.identity != identity:
                self._forget(other, now, wall, keep=held)
        if peer is not None:
            self._forget(peer, now, wall, keep=held)
        peer = Peer(
            identity=identity, name=name, host=body.get("host", "")[:256],
            pid=body.get("pid"), joined=wall, expires=now + self.period,
            next_heartbeat=now, last_seen=wall,
        )
        self.broker.store.worker_seen(peer.name, peer.host, wall, "idle")
        self.peers[identity] = peer
        job, token = body.get("job"), body.get("token")
        if job is not None:
            self._reattach(peer, job, token or "", now)
        else:
            self.idle[identity] = None
        log.info("worker %s joined from %s", peer.name, peer.host or "?")
        self.broker.publish(
            "worker", event="joined", worker=peer.name, host=peer.host,
            job=peer.job,
        )

    def _reattach(self, peer: Peer, job: int, token: str, now: float) -> None:
        """A worker comes back holding ``job``: keep it if still valid."""
        row = self.broker.store.job(job)
        valid = (
            row is not None and row["state"] == "running"
            and row["token"] == token and token
            and self.by_job.get(job) in (None, peer.identity)
        )
        peer.job, peer.token = job, token
        peer.job_since = now
        if valid:
            self.orphans.pop(job, None)
            self._graced_orphans.discard(job)
            self.by_job[job] = peer.identity
            peer.attempt = row["attempts"]
            log.info("worker %s still runs job %d; kept", peer.name, job)
            if row["cancel_requested"]:
                self._send(peer.identity, protocol.CANCEL,
                           {"job": job, "token": token, "reason": "cancelled"})
        else:
            peer.stale = True
            log.warning(
                "worker %s holds job %d under a stale token; told to stop",
                peer.name, job,
            )
            self._send(peer.identity, protocol.CANCEL,
                       {"job": job, "token": token, "reason": "stale"})

    def _heartbeat(self, identity, peer, body, now, wall) -> None:
        log.debug("heartbeat from %s", peer.name)

    def _holds(self, peer: Peer, body: dict) -> bool:
        if peer.job == body["job"] and peer.token == body["token"]:
            return not peer.stale
        self._error(
            peer.identity, "stale",
            f"job {body['job']} is not held under that token",
        )
        return False

    def _started(self, identity, peer, body, now, wall) -> None:
        if self._holds(peer, body):
            self.broker.publish(
                "job", event="started", job=peer.job, state="running",
                was="running", attempt=peer.attempt, worker=peer.name,
            )

    def _progress(self, identity, peer, body, now, wall) -> None:
        if not self._holds(peer, body):
            return
        value = min(max(float(body["value"]), 0.0), 1.0)
        peer.progress = value
        self.broker.store.set_progress(peer.job, peer.token, value)
        self.broker.publish(
            "job", event="progress", job=peer.job, state="running",
            was="running", worker=peer.name, progress=value,
            message=body.get("message", "")[:200],
        )

    def _result(self, identity, peer, body, now, wall) -> None:
        job_id, token = body["job"], body["token"]
        outcome = body["outcome"]
        ack = {"job": job_id, "token": token}
        if outcome not in protocol.OUTCOMES:
            self._error(identity, "bad_request",
                        f"RESULT: unknown outcome {outcome[:32]!r}")
            return
        if peer.job != job_id or peer.token != token:
            # Not the job this worker holds. A repeat of a result already
            # recorded, or a report from an attempt long replaced, is
            # acknowledged so that the worker stops sending it; a token no
            # attempt of that job ever had is refused.
            if self.broker.store.attempt_exists(job_id, token):
                self._send(identity, protocol.ACK, ack)
            else:
                log.warning("worker %s: RESULT for job %d under a token it "
                            "was never given", peer.name, job_id)
                self._error(identity, "stale",
                            f"job {job_id} was never assigned with that "
                            "token", job=job_id, token=token)
            return
        if not peer.stale:
            self._record(peer, body, wall)
        self._release(peer)
        self._send(identity, protocol.ACK, ack)
        if peer.draining:
            self._forget(peer, now, wall)
        else:
            self.idle[identity] = None

    def _record(self, peer: Peer, body: dict, wall: float) -> None:
        store = self.broker.store
        job = store.job(body["job"])
        if job is None or job["token"] != body["token"]:
            return
        outcome = body["outcome"]
        decision = decide(job, outcome, self.config, wall)
        error = _error_text(job, outcome, body)
        final = decision.state != "queued"
        if final and body.get("output", True):
            self._finish_output(job, decision.state, outcome, body, error)
        usage = _usage(body.get("usage"))
        store.end_attempt(
            job["id"], body["token"], wall, outcome,
            job_state=decision.state, failed=decision.failed,
            lost=decision.lost, not_before=decision.not_before,
            exit_code=body.get("exit_code"), error=error, usage=usage,
            cost=billing.cost(self.broker.billing, outcome, usage, final),
        )
        store.worker_done(peer.name)
        peer.jobs_done += 1
        self._announce(job, decision, outcome, peer.name, error)

    def _finish_output(self, job, state, outcome, body, error) -> None:
        """Promote the attempt that ends the job; ``body`` None writes the
        status alone."""
        output = Path(job["output_dir"])
        scratch = None
        if body is not None and outcome != "lost":
            # A lost attempt's process may still be writing its files:
            # they stay under .msp/, and the status says how the job ended.
            scratch = outputs.scratch_dir(output, job["attempts"],
                                          body["token"])
        status = {
            "job": job["id"], "state": state, "attempt": job["attempts"],
            "outcome": outcome,
            "exit_code": None if body is None else body.get("exit_code"),
            "error": error,
        }
        try:
            outputs.promote(output, scratch, status)
        except OSError as exc:
            log.error("job %d: could not move its output: %s", job["id"], exc)

    def _announce(self, job, decision, outcome, worker, error) -> None:
        job_id = job["id"]
        if decision.state == "queued":
            log.warning(
                "job %d attempt %d %s; re-queued", job_id, job["attempts"],
                outcome,
            )
        elif decision.state == "failed":
            log.info("job %d failed: %s", job_id, error)
        else:
            log.info("job %d %s", job_id, decision.state)
        self.broker.publish(
            "job", event=outcome, job=job_id, state=decision.state,
            was=job["state"], priority=job["priority"],
            attempt=job["attempts"], worker=worker, error=error,
        )
        if decision.state != "queued":
            self.broker.job_ended(job_id)

    def _bye(self, identity, peer, body, now, wall) -> None:
        if peer.job is None:
            log.info("worker %s left", peer.name)
            self._forget(peer, now, wall)
        else:
            log.info("worker %s is draining (job %d)", peer.name, peer.job)
            peer.draining = True
            self.idle.pop(identity, None)
            self.broker.publish("worker", event="draining", worker=peer.name,
                                job=peer.job)

    # Time.

    def tick(self, now: float, wall: float) -> None:
        last, self._last_tick = self._last_tick, now
        if last is not None and now - last > self.config.heartbeat_interval:
            # The broker itself was not running (stopped, swapped out, a
            # long commit): what the workers said meanwhile is still
            # unread, so their silence proves nothing yet. Give each a
            # fresh period to be heard before judging it; once only until
            # it is heard, or a broker late at every tick would never give
            # up a dead worker.
            log.warning("broker stalled for %.1f s; workers get a fresh "
                        "%.1f s to be heard", now - last, self.period)
            for peer in self.peers.values():
                if not peer.graced:
                    peer.graced = True
                    peer.expires = max(peer.expires, now + self.period)
            for job_id, (token, deadline) in self.orphans.items():
                if job_id not in self._graced_orphans:
                    self._graced_orphans.add(job_id)
                    self.orphans[job_id] = (
                        token, max(deadline, now + self.period)
                    )
        for peer in list(self.peers.values()):
            if peer.expires <= now:
                log.warning(
                    "worker %s expired after %.1f s of silence",
                    peer.name, self.period,
                )
                self._forget(peer, now, wall)
            elif peer.next_heartbeat <= now:
                self._send(peer.identity, protocol.HEARTBEAT)
        for job_id, (token, deadline) in list(self.orphans.items()):
            if deadline <= now:
                del self.orphans[job_id]
                self._graced_orphans.discard(job_id)
                self._lose(job_id, token, wall, "its worker never came back")

    def dispatch(self, now: float, wall: float) -> None:
        """Assign queued jobs to idle workers, best job to the worker idle
        longest."""
        if not self.idle:
            return
        store = self.broker.store
        jobs = store.claim(wall, len(self.idle))
        for job in jobs:
            identity = next(iter(self.idle))
            del self.idle[identity]
            peer = self.peers[identity]
            token = secrets.token_hex(16)
            number = store.start_attempt(job, token, peer.name, wall)
            peer.job, peer.token, peer.attempt = job["id"], token, number
            peer.job_since, peer.progress = now, None
            self.by_job[job["id"]] = identity
            self._send(identity, protocol.ASSIGN, {
                "job": job["id"], "token": token, "attempt": number,
                "script": job["script"], "args": job["args"],
                "data": job["data_dir"], "output": job["output_dir"],
                "timeout": job["timeout"], "cpu": job["cpu_limit"],
                "memory": job["memory_limit_mb"],
            })
            log.debug("job %d attempt %d -> %s", job["id"], number, peer.name)
            self.broker.publish(
                "job", event="assigned", job=job["id"], state="running",
                was="queued", priority=job["priority"], attempt=number,
                worker=peer.name,
            )

    # Cancellation, asked for by a client.

    def cancel(self, job_id: int) -> bool:
        """Tell the worker running ``job_id`` to stop it; False if none."""
        identity = self.by_job.get(job_id)
        if identity is None:
            return False
        peer = self.peers[identity]
        self._send(identity, protocol.CANCEL,
                   {"job": job_id, "token": peer.token, "reason": "cancelled"})
        return True

    # Bookkeeping.

    def _release(self, peer: Peer) -> None:
        if peer.job is not None and self.by_job.get(peer.job) == peer.identity:
            del self.by_job[peer.job]
        peer.job = peer.token = peer.job_since = peer.progress = None
        peer.stale = False

    def _forget(self, peer: Peer, now, wall, keep=None) -> None:
        """Drop a worker; a job it held is lost unless ``keep`` (job,
        token) says that its new socket still holds that very attempt."""
        self.peers.pop(peer.identity, None)
        self.idle.pop(peer.identity, None)
        if peer.job is not None and not peer.stale:
            if keep == (peer.job, peer.token):
                self.by_job.pop(peer.job, None)
            else:
                self._lose(peer.job, peer.token, wall,
                           f"worker {peer.name} stopped answering")
        self._release(peer)
        self.broker.store.worker_seen(peer.name, peer.host, wall, "gone")
        self.broker.publish("worker", event="left", worker=peer.name)

    def _lose(self, job_id: int, token: str, wall: float, why: str) -> None:
        store = self.broker.store
        with store.atomic():
            job = store.job(job_id)
            if job is None or job["token"] != token:
                return
            decision = decide(job, "lost", self.config, wall)
            error = f"attempt {job['attempts']} lost: {why}"
            if decision.state == "failed":
                error = f"lost {job['lost'] + 1} times; last: {why}"
            if decision.state != "queued":
                # The lost attempt's files stay in its scratch folder: its
                # worker may still be writing them.
                self._finish_output(job, decision.state, "lost", None, error)
            store.end_attempt(
                job_id, token, wall, "lost", job_state=decision.state,
                lost=1, error=error, cost=0.0,
            )
            self._announce(job, decision, "lost", None, error)

    def snapshot(self, now: float) -> list[dict]:
        rows = []
        for peer in self.peers.values():
            rows.append({
                "name": peer.name, "host": peer.host, "pid": peer.pid,
                "state": (
                    "draining" if peer.draining
                    else "busy" if peer.job is not None else "idle"
                ),
                "job": peer.job, "attempt": peer.attempt if peer.job else None,
                "job_seconds": (
                    None if peer.job_since is None else now - peer.job_since
                ),
                "silent_seconds": max(
                    0.0, now - (peer.expires - self.period)
                ),
                "liveness": max(0.0, peer.expires - now)
                / self.config.heartbeat_interval,
                "jobs_done": peer.jobs_done, "progress": peer.progress,
                "joined": peer.joined,
            })
        return rows


def _usage(raw) -> dict:
    if not isinstance(raw, dict):
        return {}
    usage = {}
    for key in ("wall", "user", "system"):
        value = raw.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            usage[key] = max(0.0, float(value))
    rss = raw.get("max_rss_kb")
    if isinstance(rss, int) and not isinstance(rss, bool):
        usage["max_rss_kb"] = max(0, rss)
    return usage


def _error_text(job: dict, outcome: str, body: dict) -> str | None:
    if outcome == "succeeded":
        return None
    detail = (body.get("error") or "").strip()[-1000:]
    what = {
        "timed_out": "timed out", "error": "could not start",
        "lost": "was given up",
    }.get(outcome, outcome)
    head = f"attempt {job['attempts']} of {job['max_attempts']} {what}"
    if outcome == "failed" and body.get("exit_code") is not None:
        head += f" with exit status {body['exit_code']}"
    if outcome == "timed_out" and detail.startswith("timed out"):
        return f"attempt {job['attempts']} of {job['max_attempts']} {detail}"
    if outcome == "cancelled":
        detail = ""  # the head says it all
    return f"{head}: {detail}" if detail else head
