"""Broker throughput: jobs/s of the broker, protocol and store alone.

N jobs go through a broker (its own process) to workers that run nothing
(executor "noop", several worker processes), from several client processes
submitting at once, so that the broker is the bottleneck. Measured from the
first submit to the last result, on SQLite (durable: synchronous FULL, WAL)
and on PostgreSQL (a schema of its own per run, dropped afterwards).

Besides jobs/s it reports the broker process's CPU time per job: on a small
machine the clients and workers share the cores with the broker, and the
CPU per job says what the broker alone would do with a whole core.
"""

from __future__ import annotations

import itertools
import os
import sys

import _common as C

DESCRIPTION = __doc__.split("\n\n")[1].replace("\n", " ")


def main() -> None:
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="jobs per run")
    parser.add_argument("--clients", type=int, default=4,
                        help="client processes submitting at once")
    parser.add_argument("--workers", type=int, default=4,
                        help="noop workers, one process each")
    parser.add_argument("--stores", default="sqlite,postgres",
                        help="comma-separated: sqlite, postgres")
    parser.add_argument("--wait", default="wait,events",
                        help="how the end is seen, comma-separated: 'wait' "
                             "(clients WAIT on every job) and/or 'events' "
                             "(the events socket reports every job's end)")
    parser.add_argument("--batch", default="1,100",
                        help="jobs per request, comma-separated: 1 (a "
                             "SUBMIT and a WAIT per job) and/or more "
                             "(SUBMIT_MANY and WAIT on that many jobs)")
    args = parser.parse_args()
    stores = [s for s in args.stores.split(",") if s]
    waits = [w for w in args.wait.split(",") if w]
    batches = [int(b) for b in args.batch.split(",") if b]
    with C.Workspace(args.workdir, args.keep) as ws:
        report = C.Report("broker", DESCRIPTION, args, ws.path)
        if "postgres" in stores:
            why = C.postgres_available()
            if why:
                report.note(f"PostgreSQL skipped: {why}")
                stores.remove("postgres")
        script = ws.script("job.py", "pass\n")
        runs: dict[tuple, list[dict]] = {}
        for r in range(args.repeats):
            for store, wait, batch in itertools.product(stores, waits,
                                                        batches):
                    result = one_run(ws, script, store, wait, batch, args)
                    runs.setdefault((store, wait, batch), []).append(result)
                    print(f"repeat {r + 1}: {store:8} {wait:6} batch "
                          f"{batch:4} "
                          f"{result['jobs_per_s']:7.0f} jobs/s, broker "
                          f"{result['cpu_us_per_job']:6.0f} µs CPU/job, "
                          f"machine {result['machine_cpu_share']:3.0f}% "
                          f"busy, {result['states']}", flush=True)
        rows = []
        for (store, wait, batch), results in runs.items():
            key = f"{store}_{wait}_batch{batch}"
            label = {"sqlite": "SQLite, WAL, synchronous FULL",
                     "postgres": "PostgreSQL"}[store]
            how = {"wait": "clients WAIT on each job",
                   "events": "end seen on the events socket"}[wait]
            if batch > 1:
                how = how.replace("on each job", f"on {batch} jobs at once")
                how += f", SUBMIT_MANY of {batch} jobs"
            else:
                how += ", a SUBMIT per job"
            rate = report.add(f"{key}_jobs_per_s", C.summary(
                [x["jobs_per_s"] for x in results], "jobs/s",
                f"{args.n} noop jobs, {args.clients} client processes, "
                f"{args.workers} worker processes, {label}, {how}: "
                "jobs / (last result - first submit)",
            ))
            cpu = {}
            for who in ("broker", "workers", "clients"):
                cpu[who] = report.add(f"{key}_{who}_cpu_us_per_job",
                                      C.summary(
                    [x[f"{who}_cpu_s"] / args.n * 1e6 for x in results],
                    "µs/job",
                    f"CPU time (user+system) of the {who} process(es) "
                    "over the window / jobs",
                ))
            busy = report.add(f"{key}_broker_cpu_share", C.summary(
                [x["broker_cpu_share"] for x in results], "% of one core",
                "broker CPU time / wall time of the window",
            ))
            machine = report.add(f"{key}_machine_cpu_share", C.summary(
                [x["machine_cpu_share"] for x in results], "% of all cores",
                "CPU time of broker + workers + clients / (window x cores)",
            ))
            rows.append([
                {"sqlite": "SQLite FULL", "postgres": "PostgreSQL"}[store],
                wait, str(batch), C.span(rate), C.fmt(cpu["broker"]["median"]),
                C.fmt(cpu["workers"]["median"]),
                C.fmt(cpu["clients"]["median"]),
                C.fmt(busy["median"]), C.fmt(machine["median"]),
                C.fmt(1e6 / cpu["broker"]["median"]),
            ])
            if store == "sqlite":
                report.target(
                    f"≥ 5000 jobs/s on SQLite durable ({how})",
                    f"{rate['median']:.0f} jobs/s", rate["median"] >= 5000,
                )
        C.print_table(
            f"Broker throughput, noop executor, {args.n} jobs, {args.clients}"
            f" clients, {args.workers} workers; median (min–max) of "
            f"{args.repeats}",
            ["store", "end seen", "jobs per request", "jobs/s",
             "broker µs CPU/job",
             "workers µs/job", "clients µs/job", "broker % core",
             "machine % busy", "1 core / broker CPU"],
            rows,
        )
        report.note("Clients, workers and broker share the machine's "
                    f"{report.machine['cores']} cores; the last column is "
                    "the rate the broker's CPU per job would allow on a "
                    "whole core of its own, not a measured rate.")
        report.finish()


def one_run(ws: C.Workspace, script, store: str, wait: str, batch: int,
            args) -> dict:
    run = ws.run_dir(f"{store}-{wait}-b{batch}")
    procs = []
    try:
        if store == "postgres":
            with C.postgres_schema() as schema:
                broker = C.BrokerProcess(run, store=C.PG_URL, schema=schema)
                procs.append(broker)
                result = _measure(broker, ws, script, run, wait, batch, args, procs)
                C.stop_all(reversed(procs))
                procs.clear()
        else:
            broker = C.BrokerProcess(run, sqlite_synchronous="FULL")
            procs.append(broker)
            result = _measure(broker, ws, script, run, wait, batch, args, procs)
    finally:
        C.stop_all(reversed(procs))
        C.clean(run)
    return result


def _measure(broker, ws, script, run, wait, batch, args, procs) -> dict:
    procs.extend(C.start_workers(broker, args.workers, "noop", run))
    workers = procs[1:]
    result = C.run_batch(broker, script, ws.data, run / "out", args.n,
                         args.clients, wait=wait, workers=workers,
                         batch=batch)
    if result["states"].get("succeeded") != args.n:
        raise RuntimeError(f"not every job succeeded: {result['states']}")
    result["cpu_us_per_job"] = result["broker_cpu_s"] / args.n * 1e6
    result["broker_cpu_share"] = (
        100 * result["broker_cpu_s"] / result["seconds"]
    )
    # How busy the whole machine was with this benchmark's processes.
    result["machine_cpu_share"] = 100 * (
        result["broker_cpu_s"] + result["workers_cpu_s"]
        + result["clients_cpu_s"]
    ) / (result["seconds"] * (os.cpu_count() or 1))
    return result


if __name__ == "__main__":
    sys.exit(main())
