"""msp against huey on the same script-job workload.

The workload of throughput.py: N trivial script jobs, submitted in tight
loops, then waited on; jobs/s from the first submit to the last result.
msp: a broker (its own process, SQLite durable) and W=2 worker processes
with the subprocess executor, 2 client processes, a SUBMIT and a WAIT per
job unless --batch says otherwise. huey: SqliteHuey (its
SQLite storage, WAL, SQLite's default synchronous FULL), a consumer
process with W=2 workers (processes by default), each task running the
same script in a subprocess the way msp's executor does (own session,
the same scrubbed environment, output files); this process enqueues all
tasks, then gets every result. Both run in the same invocation,
interleaved, and the ratio msp / huey is of their medians.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import _common as C

DESCRIPTION = __doc__.split("\n\n")[1].replace("\n", " ")
SCRIPT = 'import sys\nsys.stdout.write("ok\\n")\n'
BENCH = Path(__file__).resolve().parent


def main() -> None:
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=300, help="jobs per run")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1,
                        help="msp jobs per SUBMIT_MANY and WAIT (1, the "
                             "default: a request per job, as huey enqueues "
                             "a task at a time)")
    parser.add_argument("--clients", type=int, default=2,
                        help="msp client processes")
    parser.add_argument("--huey-worker-type", default="process",
                        choices=["process", "thread"])
    parser.add_argument("--executor", default="subprocess",
                        help="msp's executor (subprocess or fork)")
    args = parser.parse_args()
    try:
        import huey
    except ImportError:
        sys.exit("huey is not installed: pip install -e .[bench]")
    with C.Workspace(args.workdir, args.keep) as ws:
        report = C.Report("peers", DESCRIPTION, args, ws.path)
        report.machine["huey"] = huey.__version__
        script = ws.script("job.py", SCRIPT)
        msp_runs, huey_runs = [], []
        for r in range(args.repeats):
            m = C.run_msp(ws, script, args.executor, args.workers, args.n,
                          args.clients, batch=args.batch)
            h = run_huey(ws, script, args)
            msp_runs.append(m["jobs_per_s"])
            huey_runs.append(h["jobs_per_s"])
            print(f"repeat {r + 1}: msp {m['jobs_per_s']:.1f} jobs/s, huey "
                  f"{h['jobs_per_s']:.1f} jobs/s", flush=True)
        m = report.add("msp_jobs_per_s", C.summary(
            msp_runs, "jobs/s",
            f"msp, executor {args.executor}, W={args.workers}: {args.n} "
            "jobs / (last result - first submit)",
        ))
        h = report.add("huey_jobs_per_s", C.summary(
            huey_runs, "jobs/s",
            f"huey {huey.__version__} SqliteHuey, consumer -w "
            f"{args.workers} -k {args.huey_worker_type}: {args.n} tasks / "
            "(last result - first enqueue)",
        ))
        ratio = m["median"] / h["median"]
        report.add("ratio_msp_to_huey", C.summary(
            [a / b for a, b in zip(msp_runs, huey_runs)], "ratio",
            "msp / huey per repeat (runs side by side)",
            ratio_of_medians=ratio,
        ))
        C.print_table(
            f"{args.n} script jobs, W={args.workers}; median (min–max) of "
            f"{args.repeats}",
            ["system", "jobs/s", "ratio msp / huey"],
            [[f"msp ({args.executor} executor)", C.span(m), f"{ratio:.2f}"],
             [f"huey ({args.huey_worker_type} workers)", C.span(h), "-"]],
        )
        report.target("msp above huey on the same workload",
                      f"msp/huey = {ratio:.2f}", ratio > 1.0)
        report.note("huey consumer polling: -d 0.01 -m 0.1 (its defaults "
                    "are 0.1 and 10 s); results are polled every 10 ms at "
                    "most.")
        report.finish()


def run_huey(ws: C.Workspace, script: Path, args) -> dict:
    from msp.executor import Assignment, SubprocessExecutor

    run = ws.run_dir("huey")
    db = run / "huey.db"
    env = C.subprocess_env()
    env["BENCH_HUEY_DB"] = str(db)
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH), env["PYTHONPATH"]])
    consumer = subprocess.Popen(
        [C.PYTHON, "-m", "huey.bin.huey_consumer", "_huey_app.huey",
         "-w", str(args.workers), "-k", args.huey_worker_type,
         "-d", "0.01", "-m", "0.1", "-q", "-l", str(run / "consumer.log")],
        cwd=str(BENCH), env=env, stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    os.environ["BENCH_HUEY_DB"] = str(db)
    sys.path.insert(0, str(BENCH))
    try:
        import importlib

        import _huey_app

        app = importlib.reload(_huey_app)  # bound to this run's file
        builder = SubprocessExecutor(C.PYTHON)

        def job_env(i: int, folder: Path) -> dict:
            a = Assignment(job=i, token=f"{i:016d}", attempt=1,
                           script=str(script), args=[], data=str(ws.data),
                           output=str(folder))
            return builder.environment(a, folder)

        # The consumer is up once it has run a first task.
        warm = app.run_script(C.PYTHON, str(script), str(run / "warm"),
                              job_env(0, run / "warm"))
        if warm.get(blocking=True, timeout=60) != 0:
            raise RuntimeError("huey's warm-up task failed")
        start = time.monotonic()
        results = []
        for i in range(args.n):
            folder = run / "out" / f"j{i}"
            results.append(app.run_script(C.PYTHON, str(script),
                                          str(folder), job_env(i, folder)))
        deadline = start + C.STEP_TIMEOUT
        codes = [r.get(blocking=True, backoff=1.0, max_delay=0.01,
                       timeout=max(1.0, deadline - time.monotonic()))
                 for r in results]
        seconds = time.monotonic() - start
        app.huey.storage.close()
    finally:
        sys.path.remove(str(BENCH))
        consumer.terminate()
        try:
            consumer.wait(30)
        except subprocess.TimeoutExpired:
            consumer.kill()
            consumer.wait()
        C.clean(run)
    if any(codes):
        raise RuntimeError(f"{sum(1 for c in codes if c)} huey tasks failed")
    return {"jobs": args.n, "seconds": seconds,
            "jobs_per_s": args.n / seconds}


if __name__ == "__main__":
    sys.exit(main())
