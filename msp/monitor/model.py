"""What the monitor knows: a STATS snapshot brought forward by events.

A STATS reply includes every change up to event ``seq`` of the broker's
``run`` and none after; the events after it are applied in order. The model
cannot trust what it holds, and marks itself ``stale`` so that the feed
fetches a new snapshot, when an event is missing (a ``seq`` jump), when the
broker restarted (a new ``run``), and when events stop coming. Events that
arrive while a snapshot is on its way are kept and replayed on top of it.

:meth:`Model.view` freezes the model at a moment into the plain dict that
:mod:`msp.monitor.view` renders and ``--json`` prints.
"""

from __future__ import annotations

import collections
import logging
import time

from ..store import FINAL_STATES, JOB_STATES

log = logging.getLogger(__name__)

# Seconds between snapshots while events flow: for what no event carries.
# XXX: so the oldest wait, once the oldest job left the queue, and usage
# today can be up to this late; events carrying them would cost every
# subscriber for two figures.
RESYNC = 15.0
# Events kept to replay on top of a snapshot that was on its way; more
# than that, and the snapshot's figures are already behind again.
REPLAY = 10_000
# The stream is silent when no event came for this many ticks.
SILENT_TICKS = 3
SILENT_MIN = 2.0


class Model:
    def __init__(self, broker: str = "", events: str = "",
                 recent: int = 20):
        self.broker, self.events = broker, events
        self.recent_limit = recent
        self.run: str | None = None
        self.seq = 0
        self.user: str | None = None
        self.admin = False
        self.interval = 1.0
        self.liveness = 3
        self.tick = 1.0
        # Broker wall clock minus ours, for durations of the broker's times.
        self.offset = 0.0
        self.workers: dict[str, dict] = {}
        self.counts = dict.fromkeys(JOB_STATES, 0)
        self.by_priority: dict[str, int] = {}
        self.oldest_at: float | None = None
        self.recent: list[dict] = []
        # Clock minute (epoch seconds // 60) -> jobs that finished in it.
        self.finished: dict[int, int] = {}
        self.minutes = 15
        self.usage: list[dict] | None = None
        # Why a snapshot is wanted, or None; and when we last had one.
        self.stale: str | None = "starting"
        self.synced_at: float | None = None
        self.heard_at: float | None = None
        # What the feed says is wrong (a banner), and since when.
        self.problem: str | None = None
        self.problem_since: float | None = None
        self.connected = False
        # Snapshots loaded so far: one, if events alone kept the model.
        self.snapshots = 0
        # Events received since a snapshot was asked for (or since the
        # start), to replay on top of it; None when no snapshot is coming.
        self._replay: collections.deque | None = collections.deque(
            maxlen=REPLAY
        )
        self._old_runs: set[str] = set()

    # Snapshots.

    def load(self, snap: dict, mono: float, wall: float) -> None:
        """Replace everything with a STATS reply received at ``mono``."""
        if self.run is not None and snap["run"] != self.run:
            self._old_runs.add(self.run)
            log.info("broker restarted (run %s, was %s)", snap["run"],
                     self.run)
        self.run, self.seq = snap["run"], snap["seq"]
        self.offset = snap["time"] - wall
        self.user, self.admin = snap.get("user"), bool(snap.get("admin"))
        self.interval = snap.get("heartbeat_interval", self.interval)
        self.liveness = snap.get("liveness", self.liveness)
        self.tick = snap.get("tick", self.tick)
        self.workers = {w["name"]: _anchor(w, mono) for w in snap["workers"]}
        self.counts = dict.fromkeys(JOB_STATES, 0)
        self.counts.update(snap["counts"])
        queue = snap["queue"]
        self.by_priority = {str(k): v for k, v in queue["by_priority"].items()}
        wait = queue["oldest_wait"]
        self.oldest_at = None if wait is None else snap["time"] - wait
        self.recent = [dict(job) for job in snap["recent"]]
        per_minute = snap["finished_per_minute"]
        self.minutes = len(per_minute)
        first = int(snap["time"] // 60) - len(per_minute) + 1
        self.finished = {first + i: n for i, n in enumerate(per_minute)}
        self.usage = snap.get("usage_today")
        self.stale = None
        self.snapshots += 1
        self.synced_at = mono
        self.connected = True
        if self.heard_at is None:
            # The first events may take a moment: count silence from here.
            self.heard_at = mono
        # What came in while the snapshot was on its way goes on top.
        pending, self._replay = self._replay or (), None
        for topic, body, at in pending:
            if body.get("run") == self.run:
                self._advance(topic, body, at)

    def snapshot_asked(self) -> None:
        """A snapshot is on its way: keep the events until it comes."""
        self._replay = collections.deque(maxlen=REPLAY)

    def snapshot_lost(self) -> None:
        """The snapshot asked for will not come."""
        self._replay = None

    def wants_snapshot(self, mono: float) -> str | None:
        """Why a snapshot should be fetched now, or None."""
        if self.stale:
            return self.stale
        if mono - self.synced_at >= RESYNC:
            return "resync"
        if mono - max(self.heard_at or 0.0, self.synced_at) >= self.silence:
            return "no events"
        return None

    @property
    def silence(self) -> float:
        """Seconds without an event after which the stream is silent."""
        return max(SILENT_TICKS * self.tick, SILENT_MIN)

    def events_silent(self, mono: float) -> bool:
        heard = self.heard_at
        return heard is None or mono - heard >= self.silence

    # Events.

    def apply(self, topic: str, body: dict, mono: float) -> None:
        """Apply one event received at ``mono``, or mark the model stale."""
        run = body.get("run")
        if run in self._old_runs:
            return
        self.heard_at = mono
        if self._replay is not None:
            self._replay.append((topic, body, mono))
        if self.run is None:
            return
        if run != self.run:
            self.stale = "the broker restarted"
            return
        self._advance(topic, body, mono)

    def _advance(self, topic: str, body: dict, mono: float) -> None:
        seq = body["seq"]
        if seq <= self.seq:
            return
        if seq != self.seq + 1:
            if not self.stale:
                log.debug("missed events %d to %d", self.seq + 1, seq - 1)
                self.stale = f"missed events {self.seq + 1} to {seq - 1}"
            return
        self.seq = seq
        try:
            if topic == "job":
                self._job(body, mono)
            elif topic == "worker":
                self._worker(body, mono)
            elif topic == "broker" and body.get("event") == "tick":
                self.workers = {w["name"]: _anchor(w, mono)
                                for w in body["workers"]}
        except (KeyError, TypeError, ValueError) as exc:
            # An event of a shape this monitor does not know: start over
            # from a snapshot rather than show figures it may have broken.
            log.debug("event %d not understood: %r", seq, exc)
            self.stale = "an event it did not understand"

    def _job(self, body: dict, mono: float) -> None:
        job, state, was = body["job"], body["state"], body.get("was")
        at = body["at"]
        if was != state:
            self._count(was, state, str(body.get("priority", 0)), at)
        row = next((r for r in self.recent if r["id"] == job), None)
        if row is None and body["event"] == "queued" and was is None and (
            self.admin or body.get("user") == self.user
        ):
            row = {
                "id": job, "name": body.get("name"),
                "user": body.get("user"), "script": body.get("script", ""),
                "args": [], "priority": body.get("priority", 0),
                "state": state, "attempts": 0,
                "max_attempts": body.get("max_attempts"),
                "submitted_at": at, "started_at": None,
                "finished_at": None, "worker": None, "progress": None,
                "error": None, "cancel_requested": False,
            }
            self.recent.insert(0, row)
            del self.recent[self.recent_limit:]
        if row is not None:
            _update_job(row, body, at)
        self._job_worker(body, mono)

    def _count(self, was: str | None, state: str, priority: str, at: float):
        if was is not None:
            self.counts[was] = max(0, self.counts.get(was, 0) - 1)
        self.counts[state] = self.counts.get(state, 0) + 1
        if was == "queued":
            left = self.by_priority.get(priority, 0) - 1
            if left > 0:
                self.by_priority[priority] = left
            else:
                self.by_priority.pop(priority, None)
            if not self.by_priority:
                self.oldest_at = None
        if state == "queued":
            self.by_priority[priority] = self.by_priority.get(priority, 0) + 1
            if self.oldest_at is None:
                self.oldest_at = at
        if state in FINAL_STATES:
            minute = int(at // 60)
            self.finished[minute] = self.finished.get(minute, 0) + 1
            for old in [m for m in self.finished
                        if m <= minute - self.minutes]:
                del self.finished[old]

    def _job_worker(self, body: dict, mono: float) -> None:
        """What a job event says about the worker that runs the job."""
        event, job = body["event"], body["job"]
        name = body.get("worker")
        w = self.workers.get(name) if name else None
        if w is not None and event != "assigned":
            # The broker heard from the worker (STARTED, PROGRESS, RESULT).
            w["silent_seconds"], w["liveness"] = 0.0, float(self.liveness)
        if event == "assigned" and w is not None:
            w.update(state="busy" if w["state"] == "idle" else w["state"],
                     job=job, attempt=body.get("attempt"), job_from=mono,
                     progress=None)
            return
        for w in self.workers.values():
            if w["job"] != job:
                continue
            if event == "progress":
                w["progress"] = body.get("progress")
            elif body.get("was") == "running" and body["state"] != "running":
                w.update(state="idle" if w["state"] == "busy" else w["state"],
                         job=None, attempt=None, job_from=None, progress=None)
                if name:
                    w["jobs_done"] += 1

    def _worker(self, body: dict, mono: float) -> None:
        event, name = body["event"], body["worker"]
        if event == "joined":
            self.workers[name] = _anchor({
                "name": name, "host": body.get("host", ""), "pid": None,
                "state": "idle" if body.get("job") is None else "busy",
                "job": body.get("job"), "attempt": None, "job_seconds": 0.0,
                "silent_seconds": 0.0, "liveness": float(self.liveness),
                "jobs_done": 0, "progress": None, "joined": body["at"],
            }, mono)
        elif event == "left":
            self.workers.pop(name, None)
        elif event == "draining" and name in self.workers:
            self.workers[name]["state"] = "draining"

    # The view.

    def view(self, mono: float, wall: float) -> dict:
        """Everything the monitor shows, as it stands at this moment."""
        now = wall + self.offset
        workers = []
        for w in sorted(self.workers.values(), key=lambda w: w["name"]):
            row = {k: v for k, v in w.items() if k != "job_from"}
            row["job_seconds"] = (None if w["job_from"] is None
                                  else max(0.0, mono - w["job_from"]))
            workers.append(row)
        minute = int(now // 60)
        per_minute = [self.finished.get(m, 0)
                      for m in range(minute - self.minutes + 1, minute + 1)]
        return {
            "broker": self.broker, "events": self.events,
            "run": self.run, "seq": self.seq, "time": now,
            "user": self.user, "admin": self.admin,
            "connected": self.connected, "problem": self.problem,
            "problem_seconds": (None if self.problem_since is None
                                else mono - self.problem_since),
            "heartbeat_interval": self.interval, "liveness": self.liveness,
            "workers": workers,
            "counts": dict(self.counts),
            "queue": {
                "depth": sum(self.by_priority.values()),
                "by_priority": dict(sorted(
                    self.by_priority.items(), key=lambda kv: -int(kv[0])
                )),
                "oldest_wait": (None if self.oldest_at is None
                                else max(0.0, now - self.oldest_at)),
            },
            "recent": [dict(job) for job in self.recent],
            "finished_per_minute": per_minute,
            "usage_today": self.usage,
        }


def view_of(snap: dict, broker: str = "", events: str = "") -> dict:
    """The view of a STATS reply on its own, as it stands now."""
    model = Model(broker, events)
    mono, wall = time.monotonic(), time.time()
    model.load(snap, mono, wall)
    return model.view(mono, wall)


def _anchor(row: dict, mono: float) -> dict:
    """A worker row of the broker's, its time on the job made a moment.

    Silence and liveness are shown as the broker last told them, not aged
    here: the worker may well have been heard since, and a healthy worker
    must not look late. Ticks come twice an interval, so they are fresh.
    """
    w = dict(row)
    seconds = row.get("job_seconds")
    w["job_from"] = None if seconds is None else mono - seconds
    return w


def _update_job(row: dict, body: dict, at: float) -> None:
    event, state = body["event"], body["state"]
    row["state"] = state
    if body.get("attempt") is not None:
        row["attempts"] = body["attempt"]
    if event == "assigned":
        row["worker"], row["progress"] = body.get("worker"), None
        if row.get("started_at") is None:
            row["started_at"] = at
    elif event == "progress":
        row["progress"] = body.get("progress")
        row["message"] = body.get("message") or None
    elif event == "cancel_requested":
        row["cancel_requested"] = True
    if "error" in body:
        row["error"] = body["error"]
    if state == "queued":
        row["worker"], row["progress"] = None, None
    if state in FINAL_STATES:
        row["finished_at"] = at
        row["worker"] = None
