"""Latency of one job at a time: submit, start, result.

One client (this process) submits a job, waits for it (WAIT), and only then
submits the next, N times, through a broker (its own process, SQLite
durable) and one worker process. For each job it records, with the same
wall clock: submit -> acknowledged (the SUBMIT reply), submit -> script
start (the script's first act is to take time.time()), end of script ->
result visible to the client (the script's last act takes time.time(); the
client notes when WAIT returns), submit -> result visible, and submit ->
the broker handling the worker's STARTED (the time on its event; the
worker sends it just before it starts the script). With the noop
executor (nothing runs) all but the script's times. For reference, the interpreter's own
start: Popen -> the same script's first act, with no msp.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import _common as C

DESCRIPTION = __doc__.split("\n\n")[1].replace("\n", " ")
# The first and last acts of the script take the time.
SCRIPT = """\
import time
_start = time.time()
import os
with open("times.txt", "w") as f:
    f.write(repr(_start) + " " + repr(time.time()))
"""


def main() -> None:
    parser = C.base_parser(__doc__.splitlines()[0], repeats=1)
    parser.add_argument("--n", type=int, default=200,
                        help="jobs per executor, one at a time")
    parser.add_argument("--executors", default="noop,subprocess,fork",
                        help="comma-separated: noop, subprocess, fork")
    args = parser.parse_args()
    executors = [e for e in args.executors.split(",") if e]
    with C.Workspace(args.workdir, args.keep) as ws:
        report = C.Report("latency", DESCRIPTION, args, ws.path)
        script = ws.script("job.py", SCRIPT)
        samples: dict[str, dict[str, list[float]]] = {}
        for r in range(args.repeats):
            for executor in executors:
                got = one_executor(ws, script, executor, args.n)
                for key, values in got.items():
                    samples.setdefault(executor, {}).setdefault(
                        key, []).extend(values)
                print(f"repeat {r + 1}: {executor} done", flush=True)
            interp = interpreter_start(ws, script, args.n // 2)
            samples.setdefault("direct", {}).setdefault(
                "start", []).extend(interp)
        what = {
            "ack": "submit -> SUBMIT acknowledged (client)",
            "started_event": "submit -> broker handles STARTED (event time)",
            "start": "submit -> script's first time.time()",
            "end_to_visible": "script's last time.time() -> WAIT returns",
            "visible": "submit -> WAIT returns with the result",
        }
        rows = []
        for executor, by_key in samples.items():
            for key, values in by_key.items():
                ms = [v * 1000 for v in values]
                label = (
                    "Popen -> script's first time.time() (no msp)"
                    if executor == "direct" else what[key]
                )
                fig = report.add(f"{executor}_{key}_ms", C.distribution(
                    ms, "ms", f"{executor}: {label}",
                ))
                rows.append([executor, label, C.fmt(fig["p50"]),
                             C.fmt(fig["p90"]), C.fmt(fig["p99"]),
                             C.fmt(fig["max"]), str(fig["samples"])])
        C.print_table(
            f"Latency, one job at a time ({args.n} per executor per repeat)",
            ["executor", "interval", "p50 ms", "p90 ms", "p99 ms", "max ms",
             "n"], rows,
        )
        f = report.figures
        if "noop_visible_ms" in f:
            p50 = f["noop_visible_ms"]["p50"]
            report.target("noop p50 submit -> result visible < 1.5 ms",
                          f"{p50:.2f} ms", p50 < 1.5)
        if "subprocess_start_ms" in f and "direct_start_ms" in f:
            p50 = f["subprocess_start_ms"]["p50"]
            base = f["direct_start_ms"]["p50"]
            report.target(
                "scripts p50 submit -> start < 1 ms + interpreter start",
                f"{p50:.1f} ms = interpreter {base:.1f} ms + "
                f"{p50 - base:.1f} ms", p50 - base < 1.0,
            )
        if "fork_start_ms" in f:
            report.note("fork executor: the interpreter is already "
                        "started, so submit -> start is msp plus a fork: "
                        f"p50 {f['fork_start_ms']['p50']:.2f} ms.")
        report.note("Submit and WAIT are two requests: the WAIT is sent "
                    "when the SUBMIT reply has arrived.")
        report.finish()


def one_executor(ws: C.Workspace, script, executor: str,
                 n: int) -> dict[str, list[float]]:
    run = ws.run_dir(f"latency-{executor}")
    procs: list[C.Child] = []
    out: dict[str, list[float]] = {}
    try:
        broker = C.BrokerProcess(run)
        procs.append(broker)
        procs.extend(C.start_workers(broker, 1, executor, run))
        sub = C.subscribe(broker.endpoints["events"])
        with broker.client() as c:
            for i in range(n):
                output = run / "out" / f"j{i}"
                t0 = time.time()
                job = c.submit(str(script), str(ws.data), str(output))
                t1 = time.time()
                view = c.wait(job, timeout=C.STEP_TIMEOUT)
                t2 = time.time()
                if view["state"] != "succeeded":
                    raise RuntimeError(f"job {job}: {view}")
                out.setdefault("ack", []).append(t1 - t0)
                out.setdefault("visible", []).append(t2 - t0)
                started = _started_at(sub, job)
                if started is not None:
                    out.setdefault("started_event", []).append(started - t0)
                if executor != "noop":
                    start, end = map(float, (output / "times.txt")
                                     .read_text().split())
                    out.setdefault("start", []).append(start - t0)
                    out.setdefault("end_to_visible", []).append(t2 - end)
        sub.close(0)
    finally:
        C.stop_all(reversed(procs))
        C.clean(run)
    return out


def _started_at(sub, job: int) -> float | None:
    """When the broker handled the job's STARTED message: the time the
    broker stamped on the event (the same machine's wall clock)."""
    import zmq

    found = None
    # Everything about the job was published before WAIT returned; read
    # up to its end, so that the next job starts with an empty queue.
    while sub.poll(200, zmq.POLLIN):
        _, data = sub.recv_multipart()
        event = json.loads(data)
        if event["job"] == job and event["event"] == "started":
            found = event["at"]
        if event["job"] == job and event["state"] in C.FINAL:
            break
    return found


def interpreter_start(ws: C.Workspace, script, n: int) -> list[float]:
    """Popen -> the script's first act, for the same interpreter, script
    and kind of start as the subprocess executor's."""
    from msp.executor import Assignment, SubprocessExecutor

    run = ws.run_dir("latency-direct")
    env_of = SubprocessExecutor(C.PYTHON)
    values = []
    try:
        for i in range(n):
            a = Assignment(job=i, token=f"{i:016d}", attempt=1,
                           script=str(script), args=[], data=str(ws.data),
                           output=str(run / f"j{i}"))
            scratch = a.scratch
            scratch.mkdir(parents=True)
            t0 = time.time()
            code = C.run_bounded([C.PYTHON, str(script)], cwd=scratch,
                                 env=env_of.environment(a, scratch),
                                 stdin=subprocess.DEVNULL,
                                 stdout=subprocess.DEVNULL,
                                 stderr=subprocess.DEVNULL,
                                 start_new_session=True)
            if code != 0:
                raise RuntimeError(f"direct run exited with {code}")
            start, _ = map(float, (scratch / "times.txt").read_text().split())
            values.append(start - t0)
    finally:
        C.clean(run)
    return values


if __name__ == "__main__":
    sys.exit(main())
