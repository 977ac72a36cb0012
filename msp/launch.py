"""The launcher: runs one attempt's script and accounts for its whole tree.

The worker starts this file (standard library only, ``python -I -S``) in
the attempt's new session; it forks the script, sets the attempt's limits
in the child before exec, reaps every process of the tree (it is their
subreaper, so even those that detach come back to it), kills what the
script leaves behind, and writes one JSON line to the report descriptor::

    {"status": <wait status of the script>, "user": s, "system": s,
     "max_rss_kb": kB}

Why not let the worker fork the script directly: a forked child's peak
resident size (ru_maxrss) counts the pages of the process it was forked
from, so a trivial script would report the worker's size. Here the script
is forked from this small launcher, and what is measured is the script's
tree alone (plus the launcher's few MB it was forked from, about an
interpreter's baseline). Setting limits here, single-threaded, also spares
the worker a preexec_fn in a multi-threaded process.

If the worker dies under it (kill -9), the kernel tells the launcher
(parent-death signal), which kills the script's whole tree and exits:
nobody would watch its timeout any more, and the broker runs the job again
elsewhere.

Usage: python -I -S launch.py SPEC_JSON COMMAND [ARGS...]
SPEC_JSON: {"report": fd, "parent": worker pid, "limits": {"cpu": s,
"memory": bytes, "files": n, "fsize": bytes}} (a missing or null limit:
none).
"""

import ctypes
import json
import os
import resource
import signal
import sys
import time

PR_SET_PDEATHSIG = 1
PR_SET_DUMPABLE = 4
PR_SET_CHILD_SUBREAPER = 36
# How long the launcher waits for leftovers to die once the script ended.
REAP_PATIENCE = 5.0
# Seconds between the CPU limit's SIGXCPU and the kernel's SIGKILL.
CPU_GRACE = 1


def main(argv):
    spec = json.loads(argv[1])
    command = argv[2:]
    report = spec["report"]
    os.set_inheritable(report, False)
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    # Not dumpable: the script, same user, cannot open our descriptors
    # through /proc and forge the report.
    libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    # The worker signals the whole session; the script hears it and the
    # launcher stays to account for the end.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: None)
    # The worker's death: end the tree (the reaping loop then finishes).
    signal.signal(signal.SIGUSR1, lambda *_: _kill_strays())
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGUSR1, 0, 0, 0)
    if spec.get("parent") and os.getppid() != spec["parent"]:
        return 1  # the worker died before the signal was asked for
    pid = os.fork()
    if pid == 0:
        _child(command, spec.get("limits") or {}, report)
    status = _reap(pid)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    line = json.dumps({
        "status": status, "user": usage.ru_utime, "system": usage.ru_stime,
        "max_rss_kb": usage.ru_maxrss,
    })
    try:
        os.write(report, line.encode() + b"\n")
    except BrokenPipeError:
        pass  # the worker is gone; nobody to tell
    return 0


def _child(command, limits, report):
    try:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP,
                    signal.SIGUSR1, signal.SIGPIPE, signal.SIGXFSZ,
                    signal.SIGXCPU):
            signal.signal(sig, signal.SIG_DFL)
        set_limits(limits)
        os.execv(command[0], command)
    except BaseException as exc:
        try:
            message = f"cannot start {command[0]}: {exc}"
            os.write(report, json.dumps({"exec_error": message}).encode()
                     + b"\n")
        finally:
            os._exit(127)


def set_limits(limits):
    """The attempt's limits on this process (the fork server's jobs get
    theirs here too)."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    cpu = limits.get("cpu")
    if cpu:
        seconds = max(1, int(-(-cpu // 1)))
        resource.setrlimit(resource.RLIMIT_CPU,
                           (seconds, seconds + CPU_GRACE))
    for key, which in (("memory", resource.RLIMIT_AS),
                       ("files", resource.RLIMIT_NOFILE),
                       ("fsize", resource.RLIMIT_FSIZE)):
        value = limits.get(key)
        if value:
            _, hard = resource.getrlimit(which)
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            resource.setrlimit(which, (value, value))


def _reap(main_pid):
    """Wait for the script, then end and reap what it left; its status."""
    status = None
    deadline = None
    while True:
        try:
            pid, st = os.waitpid(-1, 0 if status is None else os.WNOHANG)
        except ChildProcessError:
            return status
        if pid == main_pid:
            status = st
            deadline = time.monotonic() + REAP_PATIENCE
        if status is not None and pid == 0:
            if time.monotonic() > deadline:
                return status
            _kill_strays()
            time.sleep(0.01)


def _kill_strays():
    """SIGKILL every process of our group and every child of ours."""
    me, group = os.getpid(), os.getpgrp()
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == me:
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        ppid, pgrp = int(fields[1]), int(fields[2])
        if ppid == me or pgrp == group:
            try:
                os.kill(int(entry), signal.SIGKILL)
            except OSError:
                pass


if __name__ == "__main__":
    sys.exit(main(sys.argv))
