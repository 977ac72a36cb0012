"""Dispatch cost and broker memory with a deep queue.

For each depth (1k, 100k, 1M queued jobs by default) a fresh store is
filled in one transaction with one bulk INSERT of valid queued jobs (one
user). Then, on the store directly: the time of store.claim(now, 1) +
store.start_attempt() for one job, a few hundred times, each in its own
transaction (figures without and with the commit). Then a broker (its own
process) is started on that store: its resident memory (RSS, psutil) once
up, and again after one noop worker has taken D jobs from the deep queue,
with the rate at which it took them.
"""

from __future__ import annotations

import secrets
import sys
import time

import _common as C

DESCRIPTION = __doc__.split("\n\n")[1].replace("\n", " ")

JOB_FILL = (
    "user_id, request_id, name, script, args, data_dir, output_dir, "
    "priority, state, max_attempts, attempts, failures, lost, timeout, "
    "submitted_at, not_before, cancel_requested"
)
SQLITE_FILL = (
    f"INSERT INTO msp_job ({JOB_FILL}) "
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c "
    "WHERE x < ?) SELECT ?, 'fill-' || x, NULL, ?, '[]', ?, ? || '/j' || x, "
    "0, 'queued', 3, 0, 0, 0, NULL, ? + x * 1e-6, 0.0, 0 FROM c"
)
POSTGRES_FILL = (
    f"INSERT INTO msp_job ({JOB_FILL}) "
    "SELECT %s, 'fill-' || x, NULL, %s, '[]', %s, %s || '/j' || x, 0, "
    "'queued', 3, 0, 0, 0, NULL, %s + x * 1e-6, 0.0, false "
    "FROM generate_series(1, %s) AS x"
)


def main() -> None:
    parser = C.base_parser(__doc__.splitlines()[0], repeats=1)
    parser.add_argument("--depths", default="1000,100000,1000000",
                        help="queue depths, comma-separated")
    parser.add_argument("--dispatches", type=int, default=300,
                        help="claim + start_attempt measured per depth")
    parser.add_argument("--drain", type=int, default=500,
                        help="jobs the broker hands to a noop worker")
    parser.add_argument("--store", default="sqlite",
                        choices=["sqlite", "postgres"],
                        help="postgres writes queue_depth_postgres.json")
    args = parser.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    with C.Workspace(args.workdir, args.keep) as ws:
        name = "queue_depth" + ("" if args.store == "sqlite" else "_postgres")
        report = C.Report(name, DESCRIPTION, args, ws.path)
        script = ws.script("job.py", "pass\n")
        per_depth: dict[int, list[dict]] = {}
        for r in range(args.repeats):
            for depth in depths:
                got = one_depth(ws, script, depth, args)
                per_depth.setdefault(depth, []).append(got)
                print(f"repeat {r + 1}: depth {depth:>9,}: filled in "
                      f"{got['fill_s']:.1f} s, dispatch p50 "
                      f"{got['dispatch_us']['p50']:.0f} µs, broker RSS "
                      f"{got['rss_up_mib']:.1f} -> "
                      f"{got['rss_after_mib']:.1f} MiB, drained "
                      f"{got['drain_jobs_per_s']:.0f} jobs/s", flush=True)
        rows = []
        for depth, runs in per_depth.items():
            disp = [x["dispatch_us"]["p50"] for x in runs]
            disp_c = [x["dispatch_commit_us"]["p50"] for x in runs]
            report.add(f"depth_{depth}", {
                "depth": depth,
                "dispatch_us": C.summary(
                    disp, "µs", "p50 of claim(now, 1) + start_attempt, in "
                    "a transaction, without the commit",
                    p99=[x["dispatch_us"]["p99"] for x in runs]),
                "dispatch_with_commit_us": C.summary(
                    disp_c, "µs", "p50 of the same with its commit"),
                "broker_rss_up_mib": C.summary(
                    [x["rss_up_mib"] for x in runs], "MiB",
                    "broker RSS once up on this store"),
                "broker_rss_after_drain_mib": C.summary(
                    [x["rss_after_mib"] for x in runs], "MiB",
                    f"broker RSS after handing out {args.drain} jobs"),
                "drain_jobs_per_s": C.summary(
                    [x["drain_jobs_per_s"] for x in runs], "jobs/s",
                    "rate at which one noop worker got jobs from this "
                    "queue through the broker"),
                "fill_s": C.summary([x["fill_s"] for x in runs], "s",
                                    "time to fill the store"),
                "store_mib": C.summary([x["store_mib"] for x in runs],
                                       "MiB", "database size"),
            })
            f = report.figures[f"depth_{depth}"]
            rows.append([f"{depth:,}", f["dispatch_us"]["median"],
                         f["dispatch_with_commit_us"]["median"],
                         f["broker_rss_up_mib"]["median"],
                         f["broker_rss_after_drain_mib"]["median"],
                         f["drain_jobs_per_s"]["median"],
                         f["fill_s"]["median"]])
        C.print_table(
            f"Queue depth ({args.store}), medians of {args.repeats}",
            ["queued jobs", "dispatch p50 µs", "with commit µs",
             "broker RSS up MiB", "after drain MiB", "drain jobs/s",
             "fill s"], rows,
        )
        lo, hi = min(depths), max(depths)
        if lo != hi:
            a = report.figures[f"depth_{lo}"]
            b = report.figures[f"depth_{hi}"]
            ratio = b["dispatch_us"]["median"] / a["dispatch_us"]["median"]
            report.target(
                f"dispatch at {hi:,} within 1.5x of {lo:,}",
                f"{ratio:.2f}x", ratio <= 1.5,
            )
            grow = (b["broker_rss_after_drain_mib"]["median"]
                    - a["broker_rss_after_drain_mib"]["median"])
            report.target(
                "broker memory flat with depth (within 10 MiB)",
                f"{grow:+.1f} MiB from {lo:,} to {hi:,}", abs(grow) <= 10,
            )
        report.finish()


def one_depth(ws: C.Workspace, script, depth: int, args) -> dict:
    run = ws.run_dir(f"depth{depth}")
    schema = None
    try:
        if args.store == "postgres":
            with C.postgres_schema() as schema:
                return _measure(ws, script, run, depth, args, C.PG_URL,
                                schema)
        return _measure(ws, script, run, depth, args, "", None)
    finally:
        C.clean(run)


def _measure(ws, script, run, depth, args, url, schema) -> dict:
    from msp.auth import Passwords
    from msp.store import Store

    var = run / "var"
    var.mkdir()
    store_url = url or f"sqlite:///{var / 'msp.db'}"
    store = Store(store_url, schema)
    try:
        now = time.time()
        with store.atomic():
            user = store.add_user(
                "admin", Passwords(1).hash(C.ADMIN_PASSWORD), "admin", now,
            )
        t0 = time.monotonic()
        _fill(store, user, depth, script, ws, run, now)
        fill_s = time.monotonic() - t0
        plain, committed = [], []
        for _ in range(args.dispatches):
            wall = time.time()
            a = time.perf_counter()
            with store.atomic():
                job = store.claim(wall, 1)[0]
                store.start_attempt(job, secrets.token_hex(16), "bench", wall)
                b = time.perf_counter()
            c = time.perf_counter()
            plain.append((b - a) * 1e6)
            committed.append((c - a) * 1e6)
        # Back to queued, so that the broker finds no orphans.
        with store.atomic():
            store.db.execute_sql(
                "UPDATE msp_job SET state = 'queued', attempts = 0, "
                "token = NULL, worker = NULL, started_at = NULL "
                "WHERE state = 'running'"
            )
            store.db.execute_sql("DELETE FROM msp_attempt")
        size = _size(store, var)
    finally:
        store.close()
    broker = C.BrokerProcess(run, store=url, schema=schema)
    worker = None
    try:
        time.sleep(1.0)  # let it settle before its memory is read
        rss_up = broker.rss_bytes()
        sub = C.subscribe(broker.endpoints["events"])
        try:
            worker = C.WorkerProcess(broker, ["dw1"], "noop", run)
            first, last, done = None, None, 0
            deadline = time.monotonic() + C.STEP_TIMEOUT
            while done < args.drain:
                got = C.next_event(sub, deadline)
                if got is None:
                    raise RuntimeError(f"only {done} jobs drained in time")
                at, event = got
                if event.get("state") == "succeeded":
                    done += 1
                    first = at if first is None else first
                    last = at
        finally:
            sub.close(0)
        rss_after = broker.rss_bytes()
    finally:
        if worker is not None:
            worker.stop()
        broker.stop()
    return {
        "fill_s": fill_s, "store_mib": size / 2**20,
        "dispatch_us": C.distribution(plain, "µs", "claim+start"),
        "dispatch_commit_us": C.distribution(committed, "µs", "with commit"),
        "rss_up_mib": rss_up / 2**20, "rss_after_mib": rss_after / 2**20,
        "drain_jobs_per_s": (done - 1) / (last - first) if last > first
        else float("nan"),
    }


def _fill(store, user, depth, script, ws, run, now) -> None:
    out = str(run / "out")
    if store.returning:  # PostgreSQL
        with store.atomic():
            store.db.execute_sql(POSTGRES_FILL, (
                user, str(script), str(ws.data), out, now, depth,
            ))
        store.db.execute_sql("ANALYZE msp_job")
        return
    # The fill itself need not be durable: only what is measured after.
    store.db.execute_sql("PRAGMA synchronous = OFF")
    with store.atomic():
        store.db.execute_sql(SQLITE_FILL, (
            depth, user, str(script), str(ws.data), out, now,
        ))
    store.db.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)")
    store.db.execute_sql("PRAGMA synchronous = FULL")


def _size(store, var) -> int:
    if store.returning:
        cur = store.db.execute_sql(
            "SELECT pg_total_relation_size('msp_job')"
        )
        return cur.fetchone()[0]
    return sum(p.stat().st_size for p in var.glob("msp.db*"))


if __name__ == "__main__":
    sys.exit(main())
