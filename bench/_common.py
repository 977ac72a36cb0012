"""What the benchmarks share: processes, clients, machine facts, results.

Run as a script, this file is also the launcher of the processes a
benchmark starts, so that none of them shares a core (or the GIL) with the
measuring process::

    python bench/_common.py broker  JSON   # a broker; prints its endpoints
    python bench/_common.py workers JSON   # one or more msp workers
    python bench/_common.py peers   JSON   # heartbeat-only worker peers
    python bench/_common.py client  JSON   # a client submitting jobs

Each prints one JSON line when ready and stops on SIGTERM or when its
standard input closes, so nothing outlives the benchmark that started it.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import logging
import os
import platform
import secrets
import selectors
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable

REPO = Path(__file__).resolve().parents[1]
# This tree's msp, whatever else is installed.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RESULTS = REPO / "bench" / "results"
PYTHON = sys.executable
ADMIN_PASSWORD = "bench-admin-password"
PG_URL = "postgresql://postgres@127.0.0.1:5432/test"
FINAL = ("succeeded", "failed", "cancelled")
# The longest any single step of a benchmark may take before it gives up.
STEP_TIMEOUT = 120.0

log = logging.getLogger(__name__)


# Statistics.


def percentile(values: Iterable[float], p: float) -> float:
    """The p-th percentile (0-100), linear between closest ranks."""
    data = sorted(values)
    if not data:
        return float("nan")
    k = (len(data) - 1) * p / 100.0
    lo = int(k)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (k - lo)


def summary(values: list[float], unit: str, what: str, **extra) -> dict:
    """A figure over repeated runs: median, min and max, and every run."""
    values = [float(v) for v in values]
    return {
        "what": what, "unit": unit,
        "median": statistics.median(values) if values else None,
        "min": min(values) if values else None,
        "max": max(values) if values else None,
        "runs": values, **extra,
    }


def distribution(values: list[float], unit: str, what: str, **extra) -> dict:
    """Samples of one quantity: p50, p90, p99, min and max."""
    values = [float(v) for v in values]
    return {
        "what": what, "unit": unit, "samples": len(values),
        "p50": percentile(values, 50), "p90": percentile(values, 90),
        "p99": percentile(values, 99),
        "min": min(values) if values else None,
        "max": max(values) if values else None, **extra,
    }


def fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value != value:
            return "nan"
        if abs(value) < 1e-9:
            return "0"  # the rounding error of a difference of sums
        if abs(value) >= 100:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def span(figure: dict) -> str:
    """'median (min-max)' of a summary."""
    return (f"{fmt(figure['median'])} ({fmt(figure['min'])}"
            f"–{fmt(figure['max'])})")


# The machine and the code measured.


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(REPO), *args], capture_output=True, text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _filesystem(path: Path) -> str:
    """The type of the file system holding ``path`` (fsync cost differs)."""
    best, kind = "", "unknown"
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            fields = line.split()
            mount, fstype = fields[1], fields[2]
            inside = str(path) == mount or str(path).startswith(
                mount.rstrip("/") + "/"
            )
            if inside and len(mount) > len(best):
                best, kind = mount, fstype
    except OSError:
        pass
    return kind


def machine_info(workdir: Path | None = None) -> dict:
    import sqlite3

    import zmq

    import msp

    memory = None
    with contextlib.suppress(Exception):
        import psutil

        memory = round(psutil.virtual_memory().total / 2**30, 1)
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return {
        "cpu_model": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": memory,
        "load_average": os.getloadavg(),
        "python": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(dirty) if dirty is not None else None,
        "git_branch": _git("rev-parse", "--abbrev-ref", "HEAD"),
        "msp_version": msp.__version__,
        "libzmq": zmq.zmq_version(),
        "pyzmq": zmq.__version__,
        "sqlite": sqlite3.sqlite_version,
        "workdir_filesystem": _filesystem(workdir) if workdir else None,
    }


# Results.


class Report:
    """Collects a benchmark's figures and writes bench/results/NAME.json."""

    def __init__(self, name: str, description: str, args: argparse.Namespace,
                 workdir: Path | None = None):
        self.name = name
        self.description = description
        self.parameters = {
            k: v for k, v in vars(args).items() if k not in ("out",)
        }
        self.out = Path(getattr(args, "out", None) or RESULTS)
        self.started = time.time()
        self.machine = machine_info(workdir)
        self.figures: dict[str, Any] = {}
        self.targets: list[dict] = []
        self.notes: list[str] = []

    def add(self, key: str, figure: dict) -> dict:
        self.figures[key] = figure
        return figure

    def target(self, text: str, measured: str, met: bool | None) -> None:
        self.targets.append({"target": text, "measured": measured,
                             "met": met})

    def note(self, text: str) -> None:
        self.notes.append(text)

    def write(self) -> Path:
        self.out.mkdir(parents=True, exist_ok=True)
        self.machine["load_average_end"] = os.getloadavg()
        payload = {
            "benchmark": self.name,
            "description": self.description,
            "command": " ".join(["python", *sys.argv]),
            "started_at": _dt.datetime.fromtimestamp(
                self.started, _dt.timezone.utc
            ).isoformat(timespec="seconds"),
            "duration_s": round(time.time() - self.started, 1),
            "machine": self.machine,
            "parameters": self.parameters,
            "figures": self.figures,
            "targets": self.targets,
            "notes": self.notes,
        }
        path = self.out / f"{self.name}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        os.replace(tmp, path)
        return path

    def print_targets(self) -> None:
        if not self.targets:
            return
        rows = [
            [t["target"], t["measured"],
             {True: "met", False: "MISSED", None: "n/a"}[t["met"]]]
            for t in self.targets
        ]
        print_table("Targets", ["target", "measured", ""], rows)

    def finish(self) -> None:
        self.print_targets()
        for text in self.notes:
            print(f"note: {text}")
        path = self.write()
        print(f"machine: {self.machine['cpu_model']}, "
              f"{self.machine['cores']} cores, python "
              f"{self.machine['python']}, commit "
              f"{(self.machine['git_commit'] or '?')[:10]}"
              f"{' (dirty)' if self.machine['git_dirty'] else ''}, load "
              f"{self.machine['load_average'][0]:.2f}")
        print(f"wrote {path}")


def print_table(title: str, columns: list[str], rows: list[list]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, title_justify="left")
    for i, column in enumerate(columns):
        table.add_column(column, justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*[fmt(cell) if not isinstance(cell, str) else cell
                        for cell in row])
    Console(width=max(100, shutil.get_terminal_size().columns)).print(table)


def base_parser(description: str, repeats: int = 3) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--repeats", type=int, default=repeats,
                        help=f"repeated runs of each case (default {repeats})")
    parser.add_argument("--workdir", default=None,
                        help="where stores and job folders go (default: a "
                             "temporary folder; fsync cost depends on it)")
    parser.add_argument("--out", default=None,
                        help=f"results folder (default {RESULTS})")
    parser.add_argument("--keep", action="store_true",
                        help="keep the work folder")
    return parser


# The work folder, scripts and job folders.


class Workspace:
    def __init__(self, root: str | None = None, keep: bool = False):
        self.path = Path(tempfile.mkdtemp(prefix="msp-bench-", dir=root))
        self.path = self.path.resolve()
        self.keep = keep
        self.data = self.path / "data"
        self.data.mkdir()
        self._runs = 0

    def script(self, name: str, source: str) -> Path:
        path = self.path / name
        path.write_text(source)
        return path

    def run_dir(self, label: str) -> Path:
        """A fresh folder for one run (its store and job outputs)."""
        self._runs += 1
        path = self.path / f"run{self._runs:03d}-{label}"
        path.mkdir()
        return path

    def close(self) -> None:
        if not self.keep:
            shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def clean(path: Path) -> None:
    """Remove a run's folder now, so that the disk does not fill up."""
    shutil.rmtree(path, ignore_errors=True)


def wait_for(condition, deadline: float, what: str) -> None:
    """Poll ``condition`` until true; fail at ``deadline`` (monotonic)."""
    while not condition():
        if time.monotonic() >= deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.01)


def subprocess_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), env.get("PYTHONPATH", "")) if p
    )
    return env


# Child processes.


class Child:
    """A process started from this file in one of its roles."""

    def __init__(self, role: str, spec: dict, log_path: Path | None = None,
                 timeout: float = 60.0):
        self.role = role
        self._log = open(log_path, "ab") if log_path else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [PYTHON, str(Path(__file__).resolve()), role, json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._log,
            # Unbuffered, so that select() sees every line not yet read.
            bufsize=0,
            env=subprocess_env(), cwd=str(REPO),
        )
        self.pid = self.proc.pid
        self.info = self.read_line(timeout)

    def read_line(self, timeout: float = 60.0) -> dict:
        """The next JSON line the child prints."""
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            if not sel.select(timeout):
                self.kill()
                raise RuntimeError(f"{self.role} {self.pid}: no answer in "
                                   f"{timeout:g} s")
        finally:
            sel.close()
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait(10)
            raise RuntimeError(f"{self.role} {self.pid} ended ({code}) "
                               "before it was ready; see its log")
        return json.loads(line)

    def say(self, text: str = "go") -> None:
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def stop(self, timeout: float = 15.0) -> int | None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_files()
        return self.proc.returncode

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.proc.kill()
        self.proc.wait(30)
        self._close_files()

    def _close_files(self) -> None:
        for f in (self.proc.stdin, self.proc.stdout):
            with contextlib.suppress(OSError, ValueError):
                f.close()
        if self._log is not subprocess.DEVNULL:
            self._log.close()


class BrokerProcess(Child):
    """A broker in a process of its own: ``.endpoints``, ``.pid``."""

    def __init__(self, run_dir: Path, *, store: str = "",
                 schema: str | None = None, events: bool = True,
                 **config):
        spec = {
            "config": {
                "client_endpoint": "tcp://127.0.0.1:*",
                "worker_endpoint": "tcp://127.0.0.1:*",
                "events_endpoint": "tcp://127.0.0.1:*" if events else "",
                "data_dir": str(run_dir / "var"),
                "allowed_roots": [str(run_dir.parent)],
                "hash_time_cost": 1,
                "retry_backoff": 0.0,
                "store": store,
                **config,
            },
            "schema": schema,
        }
        super().__init__("broker", spec, run_dir / "broker.log")
        self.endpoints = self.info
        self._token: str | None = None

    def token(self) -> str:
        """A session token of the admin, made once."""
        if self._token is None:
            from msp.client import Client

            with Client(self.endpoints["client"], timeout=30) as c:
                self._token = c.login("admin", ADMIN_PASSWORD)["token"]
        return self._token

    def client(self, timeout: float = 30.0):
        from msp.client import Client

        return Client(self.endpoints["client"], token=self.token(),
                      timeout=timeout)

    def cpu_seconds(self) -> float:
        import psutil

        t = psutil.Process(self.pid).cpu_times()
        return t.user + t.system

    def rss_bytes(self) -> int:
        import psutil

        return psutil.Process(self.pid).memory_info().rss


class WorkerProcess(Child):
    """One process running ``len(names)`` msp workers."""

    def __init__(self, broker: BrokerProcess, names: list[str],
                 executor: str, log_dir: Path, **config):
        spec = {"broker": broker.endpoints["worker"], "names": names,
                "executor": executor, "config": config}
        super().__init__("workers", spec, log_dir / f"{names[0]}.log")
        self.names = names


def start_workers(broker: BrokerProcess, count: int, executor: str,
                  log_dir: Path, per_process: int = 1,
                  prefix: str = "w") -> list[WorkerProcess]:
    """``count`` workers, ``per_process`` to a process; each connected."""
    procs, names = [], [f"{prefix}{i + 1}" for i in range(count)]
    try:
        for i in range(0, count, per_process):
            procs.append(WorkerProcess(broker, names[i:i + per_process],
                                       executor, log_dir))
    except BaseException:
        stop_all(procs)
        raise
    return procs


def stop_all(children: Iterable[Child]) -> None:
    for child in children:
        with contextlib.suppress(Exception):
            child.stop()


@contextlib.contextmanager
def postgres_schema(url: str = PG_URL):
    """A unique schema name, dropped with everything in it afterwards."""
    import psycopg2

    schema = f"bench_{os.getpid()}_{secrets.token_hex(4)}"
    try:
        yield schema
    finally:
        conn = psycopg2.connect(url)
        try:
            conn.autocommit = True
            with conn.cursor() as cur:
                cur.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            conn.close()


def postgres_available(url: str = PG_URL) -> str | None:
    """Why PostgreSQL cannot be used, or None."""
    try:
        import psycopg2

        psycopg2.connect(url, connect_timeout=3).close()
    except Exception as exc:
        return f"{type(exc).__name__}: {str(exc).strip()}"
    return None


# Submitting and waiting, from client processes.


def subscribe(endpoint: str, topic: bytes = b"job", timeout: float = 30.0):
    """A SUB socket on the events endpoint, connected and subscribed.

    PUB drops what it publishes before a subscriber's subscription has
    arrived, so wait for the connection (socket monitor), then give the
    subscription a moment to travel."""
    import zmq
    from zmq.utils.monitor import recv_monitor_message

    sub = zmq.Context.instance().socket(zmq.SUB)
    sub.linger = 0
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    monitor = sub.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    try:
        sub.connect(endpoint)
        end = time.monotonic() + timeout
        while True:
            left = end - time.monotonic()
            if left <= 0 or not monitor.poll(left * 1000):
                sub.close(0)
                raise RuntimeError(f"could not subscribe to {endpoint}")
            event = recv_monitor_message(monitor)
            if event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                break
    finally:
        sub.disable_monitor()
        monitor.close(0)
    time.sleep(0.1)
    return sub


def next_event(sub, deadline: float) -> tuple[float, dict] | None:
    """(receipt time, event) of the next event, or None at the deadline."""
    import zmq

    left = deadline - time.monotonic()
    if left <= 0 or not sub.poll(left * 1000, zmq.POLLIN):
        return None
    _, data = sub.recv_multipart()
    return time.monotonic(), json.loads(data)


def cpu_seconds(pids: Iterable[int]) -> float:
    """User+system CPU time of these processes and their reaped children
    (a worker's scripts, a fork server's jobs) so far."""
    import psutil

    total = 0.0
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            p = psutil.Process(pid)
            t = p.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
            # A fork server is a child of the worker, its jobs its own.
            for child in p.children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    c = child.cpu_times()
                    total += c.user + c.system + c.children_user + \
                        c.children_system
    return total


def run_batch(broker: BrokerProcess, script: Path, data: Path,
              out_root: Path, n: int, clients: int, wait: str = "wait",
              args: list[str] | None = None,
              timeout: float = STEP_TIMEOUT,
              workers: Iterable[Child] = (), batch: int = 1) -> dict:
    """Submit ``n`` jobs from ``clients`` processes at once, each in a
    tight loop, then wait for all of them; the timings.

    ``batch`` 1: a SUBMIT per job; more: SUBMIT_MANY with up to ``batch``
    jobs each, and WAITs on as many jobs at once.
    ``wait="wait"``: each client then calls WAIT on each of its jobs, in
    order, and the batch ends when the last one returns. ``wait="events"``:
    the clients only submit; the batch ends when the events socket has
    published the end of the n-th job (published after its commit).
    """
    token = broker.token()
    shares = [n // clients + (1 if i < n % clients else 0)
              for i in range(clients)]
    procs: list[Child] = []
    sub = None
    try:
        for i, share in enumerate(shares):
            procs.append(Child("client", {
                "endpoint": broker.endpoints["client"], "token": token,
                "script": str(script), "data": str(data),
                "out": str(out_root / f"c{i}"), "count": share,
                "wait": wait == "wait", "args": args or [],
                "timeout": timeout, "batch": batch,
            }))
        if wait == "events":
            sub = subscribe(broker.endpoints["events"])
        worker_pids = [w.pid for w in workers]
        cpu0 = broker.cpu_seconds()
        wcpu0 = cpu_seconds(worker_pids)
        for p in procs:
            p.say("go")
        ended = states = None
        if sub is not None:
            ended, states = _count_final(sub, n, timeout)
        results = [p.read_line(timeout + 30) for p in procs]
        cpu1 = broker.cpu_seconds()
        wcpu1 = cpu_seconds(worker_pids)
    finally:
        if sub is not None:
            sub.close(0)
        stop_all(procs)
    first = min(r["first_submit"] for r in results)
    last_submit = max(r["last_submit"] for r in results)
    if wait == "wait":
        ended = max(r["last_result"] for r in results)
        states = {}
        for r in results:
            for state, count in r["states"].items():
                states[state] = states.get(state, 0) + count
    seconds = ended - first
    return {
        "jobs": n, "seconds": seconds, "jobs_per_s": n / seconds,
        "submit_seconds": last_submit - first, "states": states,
        "broker_cpu_s": cpu1 - cpu0,
        "workers_cpu_s": wcpu1 - wcpu0,
        "clients_cpu_s": sum(r["cpu"] for r in results),
        "submit_errors": sum(r["errors"] for r in results),
    }


def _count_final(sub, n: int, timeout: float):
    end = time.monotonic() + timeout
    states: dict[str, int] = {}
    seen: set[int] = set()
    at = time.monotonic()
    while len(seen) < n:
        got = next_event(sub, end)
        if got is None:
            raise RuntimeError(f"only {len(seen)} of {n} jobs ended within "
                               f"{timeout:g} s")
        at, event = got
        if event.get("state") in FINAL and event["job"] not in seen:
            seen.add(event["job"])
            states[event["state"]] = states.get(event["state"], 0) + 1
    return at, states


def run_msp(ws: Workspace, script: Path, executor: str, workers: int,
            n: int, clients: int, wait: str = "wait", store: str = "",
            schema: str | None = None, label: str = "msp",
            batch: int = 1) -> dict:
    """A fresh broker (SQLite, durable) and ``workers`` worker processes;
    ``n`` jobs of ``script`` through them (see :func:`run_batch`)."""
    run = ws.run_dir(f"{label}-{executor}-w{workers}")
    procs: list[Child] = []
    try:
        broker = BrokerProcess(run, store=store, schema=schema)
        procs.append(broker)
        procs.extend(start_workers(broker, workers, executor, run))
        result = run_batch(broker, script, ws.data, run / "out", n, clients,
                           wait=wait, workers=procs[1:], batch=batch)
    finally:
        stop_all(reversed(procs))
        clean(run)
    if result["states"].get("succeeded") != n:
        raise RuntimeError(f"not every job succeeded: {result['states']}")
    return result


def run_bounded(cmd: list[str], timeout: float = STEP_TIMEOUT,
                **popen) -> int:
    """subprocess.run without its timeout: Popen.wait(timeout) polls with
    sleeps of up to 50 ms, which would add tens of milliseconds to every
    run measured. A timer kills the process instead, if it ever hangs."""
    proc = subprocess.Popen(cmd, **popen)
    timer = threading.Timer(timeout, proc.kill)
    timer.start()
    try:
        return proc.wait()
    finally:
        timer.cancel()


def run_raw(ws: Workspace, script: Path, parallel: int, n: int) -> dict:
    """The same script started directly, ``parallel`` at a time, no msp:
    as the subprocess executor starts it (same interpreter, environment,
    new session, /dev/null stdin, stdout and stderr to files in a folder
    of the job's own)."""
    from msp.executor import Assignment, SubprocessExecutor

    run = ws.run_dir(f"raw-p{parallel}")
    builder = SubprocessExecutor(PYTHON)
    lock = threading.Lock()
    todo = iter(range(n))
    failures: list[int] = []

    def one_at_a_time():
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            a = Assignment(job=i, token=f"{i:016d}", attempt=1,
                           script=str(script), args=[], data=str(ws.data),
                           output=str(run / f"j{i}"))
            scratch = a.scratch
            scratch.mkdir(parents=True)
            with open(scratch / "stdout.log", "wb") as out, \
                    open(scratch / "stderr.log", "wb") as err:
                code = run_bounded(
                    [PYTHON, str(script)], cwd=scratch,
                    env=builder.environment(a, scratch),
                    stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                    start_new_session=True, close_fds=True,
                )
            if code != 0:
                failures.append(i)

    threads = [threading.Thread(target=one_at_a_time)
               for _ in range(parallel)]
    start = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.monotonic() - start
    clean(run)
    if failures:
        raise RuntimeError(f"{len(failures)} direct runs failed")
    return {"jobs": n, "seconds": seconds, "jobs_per_s": n / seconds}


# Roles, when this file runs as a script.


def _setup_logging() -> None:
    logging.basicConfig(
        level=logging.WARNING, stream=sys.stderr,
        format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s",
    )


def _until_told_to_stop() -> None:
    """Block until SIGTERM, SIGINT or the end of standard input."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    def watch_stdin():
        with contextlib.suppress(Exception):
            while sys.stdin.readline():
                pass
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    while not stop.wait(0.5):
        pass


def _say(obj) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _role_broker(spec: dict) -> None:
    from msp.broker import Broker
    from msp.config import BrokerConfig

    broker = Broker(BrokerConfig(**spec["config"]),
                    admin_password=ADMIN_PASSWORD, schema=spec["schema"])
    broker.start(timeout=60)
    _say({**broker.endpoints, "pid": os.getpid()})
    try:
        _until_told_to_stop()
    finally:
        broker.stop()


def _role_workers(spec: dict) -> None:
    from msp.config import WorkerConfig
    from msp.worker import Worker

    workers = []
    for name in spec["names"]:
        config = WorkerConfig(broker=spec["broker"], name=name,
                              executor=spec["executor"], **spec["config"])
        workers.append(Worker(config).start(timeout=60))
    _say({"names": spec["names"], "pid": os.getpid()})
    try:
        _until_told_to_stop()
    finally:
        for w in workers:
            w.stop(drain=False, timeout=10)


def _role_peers(spec: dict) -> None:
    """Minimal workers: READY, then a HEARTBEAT every interval; whatever
    the broker sends is read and ignored."""
    import zmq

    from msp import protocol

    ctx = zmq.Context.instance()
    interval = spec.get("interval", 1.0)
    count = spec["count"]
    end = time.monotonic() + spec["duration"]
    socks, heard = [], set()
    poller = zmq.Poller()
    heartbeat = protocol.encode(protocol.HEARTBEAT)
    for i in range(count):
        s = ctx.socket(zmq.DEALER)
        s.linger = 0
        s.connect(spec["broker"])
        s.send_multipart(protocol.encode(protocol.READY, {
            "name": f"{spec['prefix']}{i}", "host": "bench",
            "pid": os.getpid(),
        }))
        poller.register(s, zmq.POLLIN)
        socks.append(s)
    # Spread the heartbeats over the interval, as independent peers would.
    now = time.monotonic()
    due = [now + interval * i / count for i in range(count)]
    ready_said = False
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    index = {s: i for i, s in enumerate(socks)}
    # Every peer has the same interval, so they come due in turn.
    turn = 0
    while not stop.is_set() and time.monotonic() < end:
        now = time.monotonic()
        wait = max(0.0, min(due[turn] - now, 0.1))
        for s, _ in poller.poll(wait * 1000):
            while True:
                try:
                    s.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                heard.add(index[s])
        now = time.monotonic()
        while due[turn] <= now:
            socks[turn].send_multipart(heartbeat)
            due[turn] += interval
            turn = (turn + 1) % count
        if not ready_said and len(heard) == count:
            _say({"peers": count, "pid": os.getpid()})
            ready_said = True
    for s in socks:
        s.close(0)


def _role_client(spec: dict) -> None:
    from msp.client import Client
    from msp.errors import MspError

    c = Client(spec["endpoint"], token=spec["token"], timeout=30)
    c.ping()
    _say({"pid": os.getpid()})
    sys.stdin.readline()
    cpu = os.times()
    out = Path(spec["out"])
    jobs, errors = [], 0
    batch = spec.get("batch", 1)
    first = time.monotonic()
    if batch > 1:
        for start in range(0, spec["count"], batch):
            end = min(start + batch, spec["count"])
            try:
                jobs.extend(c.submit_many([
                    {"script": spec["script"], "data": spec["data"],
                     "output": str(out / f"j{i}"), "args": spec["args"]}
                    for i in range(start, end)
                ]))
            except MspError:
                errors += end - start
    else:
        for i in range(spec["count"]):
            try:
                jobs.append(c.submit(spec["script"], spec["data"],
                                     str(out / f"j{i}"), spec["args"]))
            except MspError:
                errors += 1
    last_submit = time.monotonic()
    states: dict[str, int] = {}
    last_result = None
    if spec["wait"]:
        deadline = time.monotonic() + spec["timeout"]
        if batch > 1:
            views = []
            for start in range(0, len(jobs), batch):
                left = max(0.1, deadline - time.monotonic())
                views.extend(c.wait_all(jobs[start:start + batch],
                                        timeout=left))
        else:
            views = []
            for job in jobs:
                left = max(0.1, deadline - time.monotonic())
                views.append(c.wait(job, timeout=left))
        for view in views:
            states[view["state"]] = states.get(view["state"], 0) + 1
        last_result = time.monotonic()
    c.close()
    end = os.times()
    _say({"first_submit": first, "last_submit": last_submit,
          "last_result": last_result, "states": states, "errors": errors,
          "jobs": len(jobs),
          "cpu": end.user + end.system - cpu.user - cpu.system})


ROLES = {
    "broker": _role_broker,
    "workers": _role_workers,
    "peers": _role_peers,
    "client": _role_client,
}


if __name__ == "__main__":
    _setup_logging()
    ROLES[sys.argv[1]](json.loads(sys.argv[2]))
