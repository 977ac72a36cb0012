"""Script-job throughput: msp against starting the script directly.

N trivial script jobs (the script writes one line) are submitted from
client processes (SUBMIT_MANY of --batch jobs, or a SUBMIT per job with
--batch 1), then waited on (a WAIT per --batch jobs), through
a broker (its own process, SQLite durable) and W worker processes, W = 1
and 2; jobs/s from the first submit to the last result. In the same run,
the raw limit: the same script started directly with subprocess, W at a
time, as the subprocess executor starts it, no msp. The same again with
the fork-server executor (executor="fork"). The ratio msp / raw says what
msp costs on top of starting Python.
"""

from __future__ import annotations

import sys

import _common as C

DESCRIPTION = __doc__.split("\n\n")[1].replace("\n", " ")
SCRIPT = 'import sys\nsys.stdout.write("ok\\n")\n'


def main() -> None:
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000,
                        help="jobs per run with the fork executor")
    parser.add_argument("--n-script", type=int, default=200,
                        help="jobs per run with the subprocess executor and "
                             "per direct run (each starts an interpreter)")
    parser.add_argument("--workers", default="1,2",
                        help="worker counts W, comma-separated")
    parser.add_argument("--clients", type=int, default=2,
                        help="client processes submitting at once")
    parser.add_argument("--cases", default="raw,subprocess,fork",
                        help="comma-separated: raw, subprocess, fork")
    parser.add_argument("--batch", type=int, default=100,
                        help="jobs per SUBMIT_MANY and per WAIT (1: a "
                             "SUBMIT and a WAIT per job)")
    args = parser.parse_args()
    widths = [int(w) for w in args.workers.split(",")]
    cases = [c for c in args.cases.split(",") if c]
    with C.Workspace(args.workdir, args.keep) as ws:
        report = C.Report("throughput", DESCRIPTION, args, ws.path)
        script = ws.script("job.py", SCRIPT)
        runs: dict[tuple[str, int], list[dict]] = {}
        for r in range(args.repeats):
            # Interleaved, so that a change in the machine's load hits
            # every case alike.
            for w in widths:
                for case in cases:
                    if case == "raw":
                        res = C.run_raw(ws, script, w, args.n_script)
                    else:
                        n = args.n if case == "fork" else args.n_script
                        res = C.run_msp(ws, script, case, w, n, args.clients,
                                        batch=args.batch)
                    runs.setdefault((case, w), []).append(res)
                    print(f"repeat {r + 1}: {case:10} W={w} "
                          f"{res['jobs']:5} jobs {res['jobs_per_s']:7.1f} "
                          "jobs/s", flush=True)
        rows = []
        names = {"raw": "direct subprocess (no msp)",
                 "subprocess": "msp, executor subprocess",
                 "fork": "msp, executor fork"}
        for w in widths:
            raw = None
            for case in cases:
                results = runs[(case, w)]
                fig = report.add(f"{case}_w{w}_jobs_per_s", C.summary(
                    [x["jobs_per_s"] for x in results], "jobs/s",
                    f"{names[case]}, W={w}: {results[0]['jobs']} jobs / "
                    "(last result - first submit)"
                    if case != "raw" else
                    f"{names[case]}, {w} at a time: {results[0]['jobs']} "
                    "runs / wall time",
                    jobs=results[0]["jobs"],
                ))
                ratio = None
                if case == "raw":
                    raw = fig
                elif raw is not None:
                    ratio = fig["median"] / raw["median"]
                    paired = [m["jobs_per_s"] / d["jobs_per_s"] for m, d in
                              zip(results, runs[("raw", w)])]
                    report.add(f"{case}_w{w}_ratio_to_raw", C.summary(
                        paired, "ratio",
                        f"{names[case]} / direct, W={w}, per repeat "
                        "(runs side by side)",
                        ratio_of_medians=ratio,
                    ))
                rows.append([names[case], str(w), str(results[0]["jobs"]),
                             C.span(fig),
                             "-" if ratio is None else f"{ratio:.2f}"])
        C.print_table(
            f"Script jobs/s, median (min–max) of {args.repeats}; ratio = "
            "median / median of the direct runs",
            ["case", "W", "jobs", "jobs/s", "ratio to direct"], rows,
        )
        if ("subprocess", 2) in runs and ("raw", 2) in runs:
            ratio = report.figures["subprocess_w2_ratio_to_raw"]
            report.target(
                "msp (subprocess executor) ≥ 90% of direct, W=2",
                f"{ratio['ratio_of_medians']:.0%}",
                ratio["ratio_of_medians"] >= 0.9,
            )
        if ("fork", 2) in runs:
            fork = report.figures["fork_w2_jobs_per_s"]
            report.target("fork executor ≥ 600 script jobs/s, W=2",
                          f"{fork['median']:.0f} jobs/s",
                          fork["median"] >= 600)
        report.note("Direct runs start the next script when one ends (W "
                    "threads); msp clients submit everything first (in "
                    f"requests of {args.batch} jobs), then wait (on "
                    f"{args.batch} jobs per WAIT). Everything shares the "
                    "machine's "
                    f"{report.machine['cores']} cores.")
        report.finish()


if __name__ == "__main__":
    sys.exit(main())
