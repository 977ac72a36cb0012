"""Fail-over: how fast a job comes back after its worker is killed.

A broker (its own process, SQLite durable, default heartbeat interval and
liveness) and two worker processes; K times: submit a long-running job,
wait until its script runs, wait a random 0-1.5 s (a random point of the
heartbeat cycle), kill -9 the worker process running it, and watch the
broker's events socket for the job's attempt being recorded lost and the
job re-queued, then for it running again (STARTED from the other worker).
Times are from the kill to the receipt of each event by this process. The
job is then cancelled and a fresh worker process replaces the dead one.
"""

from __future__ import annotations

import os
import random
import signal
import sys
import time

import _common as C

DESCRIPTION = __doc__.split("\n\n")[1].replace("\n", " ")
# Runs until its worker is gone (its parent changes) or two minutes pass,
# so that a killed worker leaves no script behind.
SCRIPT = """\
import os, time
parent = os.getppid()
open("running", "w").close()
end = time.monotonic() + 120
while os.getppid() == parent != 1 and time.monotonic() < end:
    time.sleep(0.05)
"""


def main() -> None:
    parser = C.base_parser(__doc__.splitlines()[0], repeats=1)
    parser.add_argument("--kills", type=int, default=20,
                        help="workers killed (one job each)")
    parser.add_argument("--workers", type=int, default=2,
                        help="worker processes alive at any time")
    parser.add_argument("--executor", default="subprocess")
    parser.add_argument("--seed", type=int, default=1,
                        help="seed of the random delay before each kill")
    args = parser.parse_args()
    with C.Workspace(args.workdir, args.keep) as ws:
        report = C.Report("failover", DESCRIPTION, args, ws.path)
        script = ws.script("long.py", SCRIPT)
        requeued, running_again, checked = [], [], 0
        for r in range(args.repeats):
            got = one_run(ws, script, args)
            requeued += got["requeued"]
            running_again += got["running_again"]
            checked += got["checked"]
        from msp.config import BrokerConfig

        cfg = BrokerConfig()
        bound = cfg.heartbeat_interval * (cfg.liveness + 1)
        a = report.add("kill_to_requeued_s", C.summary(
            requeued, "s",
            "kill -9 of the worker -> event 'lost' with state queued "
            "received", p90=C.percentile(requeued, 90),
        ))
        b = report.add("kill_to_running_again_s", C.summary(
            running_again, "s",
            "kill -9 of the worker -> event 'started' of the job's next "
            "attempt received", p90=C.percentile(running_again, 90),
        ))
        C.print_table(
            f"Fail-over after kill -9 of a busy worker ({len(requeued)} "
            f"kills; heartbeat {cfg.heartbeat_interval:g} s, liveness "
            f"{cfg.liveness})",
            ["from the kill to", "median s", "p90 s", "min s", "max s"],
            [["job re-queued (attempt lost)", a["median"], a["p90"],
              a["min"], a["max"]],
             ["job running again", b["median"], b["p90"], b["min"],
              b["max"]]],
        )
        report.target(
            f"every re-queue within liveness x interval + one interval "
            f"({bound:g} s)", f"max {a['max']:.2f} s", a["max"] <= bound,
        )
        report.note(f"{checked} jobs checked with STATUS: first attempt "
                    "'lost', second started on another worker.")
        report.finish()


def one_run(ws: C.Workspace, script, args) -> dict:
    run = ws.run_dir("failover")
    broker = C.BrokerProcess(run)
    workers: dict[str, C.WorkerProcess] = {}
    count = 0

    def spawn():
        nonlocal count
        count += 1
        w = C.WorkerProcess(broker, [f"fw{count}"], args.executor, run)
        workers[w.names[0]] = w

    requeued, running_again, checked = [], [], 0
    rng = random.Random(args.seed)
    sub = None
    try:
        sub = C.subscribe(broker.endpoints["events"], b"")
        for _ in range(args.workers):
            spawn()
        with broker.client() as c:
            for k in range(args.kills):
                job = c.submit(str(script), str(ws.data),
                               str(run / "out" / f"j{k}"), attempts=3)
                deadline = time.monotonic() + 60
                started = _wait_event(sub, deadline, job, "started")
                marker = run / "out" / f"j{k}" / ".msp"
                C.wait_for(lambda: any(marker.glob("attempt-1-*/running")),
                           deadline, f"job {job}'s script to run")
                # At a random moment of the worker's heartbeat cycle.
                time.sleep(rng.uniform(0, 1.5))
                victim = workers.pop(started["worker"])
                killed = time.monotonic()
                os.kill(victim.pid, signal.SIGKILL)
                victim.proc.wait(30)
                victim.kill()
                deadline = time.monotonic() + 60
                lost, at_lost = _wait_event(sub, deadline, job, "lost",
                                            with_time=True)
                if lost["state"] != "queued":
                    raise RuntimeError(f"job {job} not re-queued: {lost}")
                again, at_again = _wait_event(sub, deadline, job, "started",
                                              with_time=True)
                requeued.append(at_lost - killed)
                running_again.append(at_again - killed)
                status = c.status(job)
                outcomes = [a["outcome"] for a in status["attempts"]]
                if outcomes[0] != "lost" or again["worker"] == \
                        started["worker"]:
                    raise RuntimeError(f"job {job}: unexpected {status}")
                checked += 1
                c.cancel(job)
                view = c.wait(job, timeout=60)
                if view["state"] != "cancelled":
                    raise RuntimeError(f"job {job} not cancelled: {view}")
                spawn()
                print(f"kill {k + 1}: re-queued after "
                      f"{requeued[-1]:.2f} s, running again after "
                      f"{running_again[-1]:.2f} s", flush=True)
    finally:
        if sub is not None:
            sub.close(0)
        C.stop_all(list(workers.values()))
        broker.stop()
        C.clean(run)
    return {"requeued": requeued, "running_again": running_again,
            "checked": checked}


def _wait_event(sub, deadline: float, job: int, event: str,
                with_time: bool = False):
    while True:
        got = C.next_event(sub, deadline)
        if got is None:
            raise RuntimeError(f"no '{event}' event for job {job} in time")
        at, body = got
        if body.get("job") == job and body.get("event") == event:
            return (body, at) if with_time else body


if __name__ == "__main__":
    sys.exit(main())
