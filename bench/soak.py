"""Soak: thousands of short jobs while workers and the broker are killed.

Starts a broker and workers as processes (``python -m msp``), submits short
jobs from one client while a chaos thread kills workers with SIGKILL and
restarts them (under the same name or a new one), and kills the broker with
SIGKILL and restarts it on the same data and ports a few times. Then it
lets the cluster settle and checks every acknowledged job in the database
and in its output folder.

It prints, and writes to bench/results/soak.json:

- submitted, acknowledged: jobs asked for, and those the broker answered;
- succeeded, failed (split into failing on purpose and lost too often),
  cancelled;
- lost: acknowledged but never reaching a final state (must be 0);
- duplicated: a job with more than one success record, or an output folder
  holding more than one attempt's files or another attempt's than the one
  recorded (must be 0);
- attempts by outcome, the kills done, and how long it all took.

Not run in CI. Bounded in time: it stops submitting, then stops the chaos,
then waits for the cluster to settle, each within --duration.

    python bench/soak.py                      # 2000 jobs, about 5 minutes
    python bench/soak.py --jobs 300 --duration 90
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import _common as C  # noqa: E402
from msp.client import Client  # noqa: E402
from msp.errors import BrokerUnavailable, MspError  # noqa: E402

ADMIN_PASSWORD = "soak-admin-password"
FINAL = ("succeeded", "failed", "cancelled")

# Each job writes a file naming its attempt, so the output folder tells
# which attempt's files were promoted. A job asked to fail always fails.
SCRIPT = """\
import os, pathlib, sys, time
attempt = os.environ["MSP_ATTEMPT"]
out = pathlib.Path(os.environ["MSP_OUTPUT_DIR"])
(out / f"from-attempt-{attempt}.txt").write_text(attempt)
time.sleep(float(sys.argv[1]))
if sys.argv[2] == "fail":
    sys.exit("failing on purpose")
print("done", attempt)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """The broker and workers, as processes, and their logs."""

    def __init__(self, root: Path, heartbeat: float, synchronous: str):
        self.root = root
        ports = [free_port() for _ in range(3)]
        self.client_endpoint = f"tcp://127.0.0.1:{ports[0]}"
        worker_endpoint = f"tcp://127.0.0.1:{ports[1]}"
        self.env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join(
                [str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
            MSP_BROKER_CLIENT_ENDPOINT=self.client_endpoint,
            MSP_BROKER_WORKER_ENDPOINT=worker_endpoint,
            MSP_BROKER_EVENTS_ENDPOINT=f"tcp://127.0.0.1:{ports[2]}",
            MSP_BROKER_DATA_DIR=str(root / "var"),
            MSP_BROKER_ALLOWED_ROOTS=str(root),
            MSP_BROKER_HASH_TIME_COST="1",
            MSP_BROKER_RETRY_BACKOFF="0.1",
            MSP_BROKER_HEARTBEAT_INTERVAL=str(heartbeat),
            MSP_BROKER_SQLITE_SYNCHRONOUS=synchronous,
            MSP_WORKER_HEARTBEAT_INTERVAL=str(heartbeat),
            MSP_WORKER_RECONNECT_MIN=str(heartbeat),
            MSP_WORKER_RECONNECT_MAX=str(heartbeat * 4),
            MSP_WORKER_KILL_GRACE="1",
            MSP_WORKER_BROKER=worker_endpoint,
            MSP_ADMIN_PASSWORD=ADMIN_PASSWORD,
        )
        self.env.pop("MSP_CONFIG", None)
        self.broker: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}
        self._logs = []
        self._lock = threading.Lock()

    def _spawn(self, name: str, *args) -> subprocess.Popen:
        log = open(self.root / "logs" / f"{name}.log", "ab")
        self._logs.append(log)
        return subprocess.Popen(
            [sys.executable, "-m", "msp", *args, "--log-level", "info"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )

    def start_broker(self, timeout: float = 60.0) -> None:
        with self._lock:
            self.broker = self._spawn("broker", "broker")
        deadline = time.monotonic() + timeout
        with Client(self.client_endpoint, timeout=0.5, retries=1) as c:
            while True:
                if self.broker.poll() is not None:
                    raise SystemExit("the broker exited; see "
                                     f"{self.root / 'logs' / 'broker.log'}")
                try:
                    c.ping()
                    return
                except MspError:
                    if time.monotonic() > deadline:
                        raise SystemExit("the broker never answered") \
                            from None

    def kill_broker(self) -> None:
        with self._lock:
            self.broker.kill()
            self.broker.wait(30)

    def start_worker(self, name: str) -> None:
        with self._lock:
            self.workers[name] = self._spawn(name, "worker", "--name", name)

    def kill_worker(self, name: str) -> None:
        with self._lock:
            proc = self.workers.pop(name)
        proc.kill()
        proc.wait(30)

    def stop(self) -> None:
        with self._lock:
            procs = [*self.workers.values(), self.broker]
        for proc in procs:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            if proc is None:
                continue
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        for log in self._logs:
            log.close()


class Chaos(threading.Thread):
    """Kills a random worker every so often and starts another in its
    place (same name half the time), until ``calm_at`` of the jobs have
    ended; kills and restarts the broker when the share of jobs ended
    passes each of ``broker_at``."""

    def __init__(self, cluster: Cluster, rng: random.Random, every: float,
                 total: int, broker_at: list[float], calm_at: float = 0.9):
        super().__init__(name="chaos", daemon=True)
        self.cluster, self.rng, self.every = cluster, rng, every
        self.total = max(total, 1)
        self.broker_at = sorted(broker_at)
        self.calm_at = calm_at
        self.stopping = threading.Event()
        self.worker_kills = 0
        self.broker_kills = 0
        self.broker_down = 0.0
        self.failure: BaseException | None = None
        self._serial = 0
        self._done = 0.0
        self._client: Client | None = None

    def _progress(self) -> float:
        """The share of jobs ended, as last seen (the broker may be down)."""
        try:
            if self._client is None:
                self._client = Client(self.cluster.client_endpoint,
                                      timeout=1.0, retries=1)
                self._client.login("admin", ADMIN_PASSWORD)
            counts = self._client.stats()["counts"]
            self._done = sum(counts[s] for s in FINAL) / self.total
        except MspError:
            if self._client is not None:
                self._client.close()
            self._client = None
        return self._done

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # reported by the main thread
            self.failure = exc
        finally:
            if self._client is not None:
                self._client.close()

    def _run(self) -> None:
        while not self.stopping.wait(self.rng.uniform(0.3, 1.7) * self.every):
            done = self._progress()
            if self.broker_at and done >= self.broker_at[0]:
                self.broker_at.pop(0)
                began = time.monotonic()
                self.cluster.kill_broker()
                self.broker_kills += 1
                self.cluster.start_broker()
                self.broker_down += time.monotonic() - began
                continue
            names = sorted(self.cluster.workers)
            if done >= self.calm_at or not names:
                continue
            victim = self.rng.choice(names)
            self.cluster.kill_worker(victim)
            self.worker_kills += 1
            if self.rng.random() < 0.5:
                name = victim
            else:
                self._serial += 1
                name = f"{victim.split('.')[0]}.{self._serial}"
            self.cluster.start_worker(name)

    def stop(self) -> None:
        self.stopping.set()
        self.join(60)


def submit_all(cluster: Cluster, root: Path, args, rng: random.Random,
               deadline: float) -> tuple[dict, dict]:
    """Submit the jobs, each until acknowledged (same request id on every
    try); the acknowledged ones by id, and what each was meant to do."""
    script = root / "job.py"
    acked: dict[int, dict] = {}
    plan: dict[str, dict] = {}
    client = Client(cluster.client_endpoint, timeout=2.0, retries=2)
    login_deadline = time.monotonic() + 60
    while True:
        try:
            client.login("admin", ADMIN_PASSWORD)
            break
        except BrokerUnavailable:
            if time.monotonic() > login_deadline:
                raise
    for i in range(args.jobs):
        if time.monotonic() > deadline:
            break
        kind = "fail" if rng.random() < args.fail_rate else "ok"
        request_id = uuid.uuid4().hex
        job = {"index": i, "kind": kind, "request_id": request_id,
               "output": root / "out" / str(i)}
        plan[request_id] = job
        while time.monotonic() < deadline:
            try:
                job_id = client.submit(
                    script, root / "data", job["output"],
                    [f"{rng.uniform(0, args.job_seconds):.3f}", kind],
                    attempts=2, request_id=request_id,
                )
            except BrokerUnavailable:
                continue  # the broker is down: the same request again
            except MspError as exc:
                if exc.code != "unauthenticated":
                    raise
                client.login("admin", ADMIN_PASSWORD)
                continue
            acked[job_id] = job
            break
        if (i + 1) % 250 == 0:
            print(f"  {i + 1} submitted", flush=True)
    client.close()
    return acked, plan


def settle(cluster: Cluster, acked: dict, deadline: float) -> None:
    """Wait for every acknowledged job to end, or the deadline."""
    client = Client(cluster.client_endpoint, timeout=2.0, retries=2)
    try:
        client.login("admin", ADMIN_PASSWORD)
        while time.monotonic() < deadline:
            try:
                counts = client.stats()["counts"]
            except BrokerUnavailable:
                continue
            ended = sum(counts[s] for s in FINAL)
            if ended >= len(acked) and counts["queued"] + \
                    counts["running"] == 0:
                return
            time.sleep(0.5)
    finally:
        client.close()


def audit(root: Path, acked: dict) -> dict:
    """Check every acknowledged job in the database and on disk."""
    db = sqlite3.connect(f"file:{root / 'var' / 'msp.db'}?mode=ro",
                         uri=True)
    try:
        jobs = {row[0]: row for row in db.execute(
            "SELECT id, state, attempts, failures, lost, request_id "
            "FROM msp_job")}
        attempts: dict[int, list] = {}
        for job_id, number, outcome in db.execute(
                "SELECT job_id, number, outcome FROM msp_attempt "
                "ORDER BY job_id, number"):
            attempts.setdefault(job_id, []).append((number, outcome))
    finally:
        db.close()
    states = Counter()
    outcomes = Counter()
    lost, duplicated, wrong_state, failed_lost = [], [], [], 0
    for job_id, job in acked.items():
        row = jobs.get(job_id)
        if row is None or row[1] not in FINAL:
            lost.append(job_id)
            continue
        state = row[1]
        states[state] += 1
        tried = attempts.get(job_id, [])
        outcomes.update(o for _, o in tried)
        wins = [n for n, o in tried if o == "succeeded"]
        if len(wins) > 1:
            duplicated.append((job_id, "success records", wins))
        if job["kind"] == "ok" and state == "failed":
            if row[4] > 0 and tried and tried[-1][1] == "lost":
                failed_lost += 1
            else:
                wrong_state.append((job_id, state))
        if job["kind"] == "fail" and state == "succeeded":
            wrong_state.append((job_id, state))
        if state == "succeeded":
            out = job["output"]
            files = sorted(out.glob("from-attempt-*.txt"))
            status = json.loads((out / "msp-status.json").read_text())
            if len(files) != 1 or files[0].read_text() != str(wins[0]) \
                    or status["attempt"] != wins[0]:
                duplicated.append((job_id, "output",
                                   [f.name for f in files]))
    return {
        "states": dict(states), "attempt_outcomes": dict(outcomes),
        "lost": lost, "duplicated": duplicated,
        "wrong_state": wrong_state, "failed_lost_too_often": failed_lost,
        "jobs_in_store": len(jobs),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--duration", type=float, default=300.0,
                        help="longest the whole run may take, in seconds")
    parser.add_argument("--kill-every", type=float, default=1.5,
                        help="mean seconds between worker kills")
    parser.add_argument("--broker-kills", type=int, default=3)
    parser.add_argument("--job-seconds", type=float, default=0.05,
                        help="longest a job sleeps")
    parser.add_argument("--fail-rate", type=float, default=0.02)
    parser.add_argument("--heartbeat", type=float, default=0.2)
    parser.add_argument("--synchronous", default="NORMAL",
                        help="the broker's sqlite_synchronous")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--keep", action="store_true",
                        help="keep the run's folder (logs, database)")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" /
                                             "soak.json"))
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(1 << 30)
    rng = random.Random(seed)

    root = Path(tempfile.mkdtemp(prefix="msp-soak-"))
    (root / "logs").mkdir()
    (root / "data").mkdir()
    (root / "out").mkdir()
    (root / "job.py").write_text(SCRIPT)
    cluster = Cluster(root, args.heartbeat, args.synchronous)
    began = time.monotonic()
    hard_deadline = began + args.duration
    # Submitting gets most of the time; the rest is for settling.
    submit_deadline = began + args.duration * 0.6
    print(f"soak: {args.jobs} jobs, {args.workers} workers, seed {seed}, "
          f"folder {root}", flush=True)
    chaos = None
    try:
        cluster.start_broker()
        for n in range(args.workers):
            cluster.start_worker(f"w{n + 1}")
        # Broker kills spread over the run, by the share of jobs ended.
        broker_at = [0.8 * (k + 1) / (args.broker_kills + 1)
                     for k in range(args.broker_kills)]
        chaos = Chaos(cluster, rng, args.kill_every, args.jobs, broker_at)
        chaos.start()
        acked, plan = submit_all(cluster, root, args, rng, submit_deadline)
        print(f"  submitted {len(plan)} in {time.monotonic() - began:.1f} s",
              flush=True)
        settle(cluster, acked, hard_deadline)
        chaos.stop()
        if chaos.failure is not None:
            raise chaos.failure
    finally:
        if chaos is not None:
            chaos.stop()
        cluster.stop()
    elapsed = time.monotonic() - began
    found = audit(root, acked)
    states = found["states"]
    result = {
        "seed": seed, "jobs_asked": args.jobs, "workers": args.workers,
        "submitted": len(plan), "acknowledged": len(acked),
        "meant_to_fail": sum(j["kind"] == "fail" for j in acked.values()),
        "succeeded": states.get("succeeded", 0),
        "failed": states.get("failed", 0),
        "failed_lost_too_often": found["failed_lost_too_often"],
        "cancelled": states.get("cancelled", 0),
        "lost": len(found["lost"]),
        "duplicated": len(found["duplicated"]),
        "wrong_state": len(found["wrong_state"]),
        "attempt_outcomes": found["attempt_outcomes"],
        "worker_kills": chaos.worker_kills if chaos else 0,
        "broker_kills": chaos.broker_kills if chaos else 0,
        "broker_down_seconds": round(chaos.broker_down, 2) if chaos else 0,
        "seconds": round(elapsed, 1),
        "details": {k: found[k][:20] for k in
                    ("lost", "duplicated", "wrong_state")},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": C.machine_info(),
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    for key in ("submitted", "acknowledged", "succeeded", "failed",
                "meant_to_fail", "failed_lost_too_often", "cancelled",
                "lost", "duplicated", "wrong_state", "worker_kills",
                "broker_kills", "seconds"):
        print(f"{key:>22}: {result[key]}")
    print(f"{'attempt outcomes':>22}: {result['attempt_outcomes']}")
    print(f"written to {out}")
    if args.keep:
        print(f"run folder kept: {root}")
    else:
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    bad = result["lost"] or result["duplicated"] or result["wrong_state"] \
        or result["acknowledged"] < result["submitted"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
