"""The broker's CPU with many idle workers heartbeating.

A broker (its own process, SQLite durable, default 1 s heartbeat) and P
peer processes, each with many light DEALER sockets that speak the worker
protocol: READY, then a HEARTBEAT every second (spread over the second),
answering nothing else. Once every peer has been heard by the broker, the
broker's CPU time (psutil, user + system) is read over consecutive windows
of S seconds and reported as a share of one core. The idle broker (no
worker at all) is measured first, for reference.
"""

from __future__ import annotations

import sys
import time

import _common as C

DESCRIPTION = __doc__.split("\n\n")[1].replace("\n", " ")


def main() -> None:
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=500,
                        help="heartbeat-only workers in all")
    parser.add_argument("--processes", type=int, default=4,
                        help="processes the workers are spread over")
    parser.add_argument("--seconds", type=float, default=20.0,
                        help="length of one measured window")
    parser.add_argument("--idle-seconds", type=float, default=5.0,
                        help="window for the broker with no worker")
    args = parser.parse_args()
    with C.Workspace(args.workdir, args.keep) as ws:
        report = C.Report("many_workers", DESCRIPTION, args, ws.path)
        run = ws.run_dir("many")
        broker = C.BrokerProcess(run)
        peers: list[C.Child] = []
        try:
            time.sleep(1.0)
            idle = _window(broker, args.idle_seconds)
            per = [args.workers // args.processes
                   + (1 if i < args.workers % args.processes else 0)
                   for i in range(args.processes)]
            t0 = time.monotonic()
            for i, count in enumerate(per):
                peers.append(C.Child("peers", {
                    "broker": broker.endpoints["worker"], "count": count,
                    "prefix": f"p{i}-", "interval": 1.0,
                    "duration": 120 + args.repeats * args.seconds * 2,
                }, run / f"peers{i}.log", timeout=120))
            joined = time.monotonic() - t0
            with broker.client() as c:
                known = len(c.workers())
            if known != args.workers:
                raise RuntimeError(f"broker knows {known} workers, not "
                                   f"{args.workers}")
            time.sleep(2.0)  # past the joining burst
            shares, peer_shares = [], []
            for r in range(args.repeats):
                p0 = C.cpu_seconds(p.pid for p in peers)
                share = _window(broker, args.seconds)
                p1 = C.cpu_seconds(p.pid for p in peers)
                shares.append(share)
                peer_shares.append(100 * (p1 - p0) / args.seconds)
                print(f"window {r + 1}: broker {share:.1f}% of a core",
                      flush=True)
            with broker.client() as c:
                still = len(c.workers())
        finally:
            C.stop_all(peers)
            broker.stop()
        fig = report.add("broker_cpu_share", C.summary(
            shares, "% of one core",
            f"broker CPU time / wall time, {args.workers} idle workers "
            f"heartbeating every 1 s, windows of {args.seconds:g} s",
        ))
        report.add("idle_broker_cpu_share", C.summary(
            [idle], "% of one core",
            f"broker with no worker, one window of {args.idle_seconds:g} s",
        ))
        report.add("peer_processes_cpu_share", C.summary(
            peer_shares, "% of one core",
            f"the {args.processes} peer processes together",
        ))
        report.add("workers_joined_s", C.summary(
            [joined], "s", "start of the peer processes -> every peer "
            "heard from the broker"))
        C.print_table(
            f"Broker CPU, % of one core, median (min–max) of "
            f"{args.repeats} windows of {args.seconds:g} s",
            ["case", "broker CPU %"],
            [["no worker", C.fmt(idle)],
             [f"{args.workers} idle workers, 1 s heartbeat", C.span(fig)],
             ["(the peer processes themselves)",
              C.span(report.figures["peer_processes_cpu_share"])]],
        )
        report.target(f"< 20% of a core with {args.workers} workers",
                      f"{fig['median']:.1f}%", fig["median"] < 20)
        report.note(f"all {still} workers still known to the broker after "
                    "the windows (none expired)")
        report.finish()


def _window(broker: C.BrokerProcess, seconds: float) -> float:
    a, t = broker.cpu_seconds(), time.monotonic()
    time.sleep(seconds)
    return 100 * (broker.cpu_seconds() - a) / (time.monotonic() - t)


if __name__ == "__main__":
    sys.exit(main())
