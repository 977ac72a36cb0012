"""How a worker runs a job's script.

:class:`SubprocessExecutor` runs ``PYTHON SCRIPT ARGS...`` for each job:
the configured interpreter on the script, in a new session (so the job has
a process group of its own), with a scrubbed environment, no standard
input, stdout and stderr written to files in the attempt's scratch folder,
the scratch folder as working directory, the limits of the config and the
job (CPU seconds, address space, open files, file size), and, when the
worker is root, as the configured unprivileged user.

It does not start the script itself: each worker has a small job server
(msp/_forkserver.py, standard library only, started with the first job
under the worker's own interpreter as ``python -I -S``) that forks a child
per job; the child sets all of the above up and execs the interpreter on
the script. A job thus costs one fork of a small process and the exec,
as starting ``python script.py`` directly would. The server is the
subreaper of the jobs' trees: when the script ends, it kills what the
script left (its group, and whatever detached from it and so came back to
the server), reaps it all with ``wait4``, and reports the exit status with
the CPU time of the whole tree and the largest peak memory of any process
of it. If the worker dies, the server kills the jobs' trees and exits; if
the server dies, its job is killed (parent-death signal) and reported
lost, and the next job starts a new server.

:class:`NoopExecutor` runs nothing; benchmarks use it to measure msp alone.
"""

from __future__ import annotations

import grp
import json
import logging
import os
import pwd
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

import psutil

from . import outputs
from .config import ENV_ALLOW
from .errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_ENV_ALLOW = ENV_ALLOW
SERVER = Path(__file__).with_name("_forkserver.py")
HEADER = struct.Struct("!I")
MIB = 1 << 20
# Scripts remembered as compiling, per executor, before the memory is reset.
GOOD_SCRIPTS = 1024
# How long a request for a job may take before the server is deemed hung.
REQUEST_TIMEOUT = 30.0


@dataclass(frozen=True)
class Assignment:
    job: int
    token: str
    attempt: int
    script: str
    args: list[str]
    data: str
    output: str
    timeout: float | None = None
    # Limits the job asked for: CPU seconds, memory in MiB.
    cpu: float | None = None
    memory: int | None = None

    @property
    def scratch(self) -> Path:
        return outputs.scratch_dir(self.output, self.attempt, self.token)


@dataclass
class Outcome:
    outcome: str
    exit_code: int | None = None
    error: str | None = None
    usage: dict = field(default_factory=dict)
    # False when the attempt wrote no files (the no-op executor).
    output: bool = True


@dataclass(frozen=True)
class Limits:
    """What one attempt may use; None: no limit."""

    cpu: float | None = None
    memory_mb: int | None = None
    files: int | None = None
    output_mb: int | None = None

    def for_server(self) -> dict:
        """As the job server sets them (bytes, not MiB)."""
        return {
            "cpu": self.cpu,
            "memory": self.memory_mb and self.memory_mb * MIB,
            "files": self.files,
            "fsize": self.output_mb and self.output_mb * MIB,
        }


class ServerError(OSError):
    """The job server could not start a job."""


class Running:
    """A started attempt: ``stop()`` ends it early with a given outcome;
    the server's reader thread reports its end with :meth:`finish` (or
    :meth:`abandon`), exactly once."""

    def __init__(self, assignment: Assignment, pid: int, grace: float,
                 done: Callable[[Outcome], None], started: float,
                 limits: Limits = Limits()):
        self.assignment = assignment
        self.pid = pid
        self.grace = grace
        self.limits = limits
        self.started = started
        self.deadline = (
            None if assignment.timeout is None
            else started + assignment.timeout
        )
        self._done = done
        self._reason: str | None = None
        self._exited = threading.Event()
        self._once = threading.Lock()

    def _claim(self) -> bool:
        """True for the one caller that reports the end."""
        with self._once:
            if self._exited.is_set():
                return False
            self._exited.set()
            return True

    def stop(self, reason: str) -> None:
        """End the attempt: SIGTERM to the whole process tree, SIGKILL after
        the grace period. ``reason`` becomes the attempt's outcome."""
        if self._exited.is_set() or self._reason is not None:
            return
        self._reason = reason
        threading.Thread(
            target=self._terminate, name="msp-kill", daemon=True
        ).start()

    def finish(self, status: int, rusage, exec_error: str | None = None
               ) -> None:
        """The server reaped the script and what it left: report its
        outcome."""
        if not self._claim():
            return
        wall = time.monotonic() - self.started
        if exec_error is not None:
            self._done(Outcome("error", None, exec_error, {"wall": wall}))
            return
        usage = {
            "wall": wall, "user": rusage.ru_utime,
            "system": rusage.ru_stime, "max_rss_kb": rusage.ru_maxrss,
        }
        code = os.waitstatus_to_exitcode(status)
        self._done(self._outcome(code, usage))

    def _outcome(self, code: int, usage: dict) -> Outcome:
        reason = self._reason
        if reason is not None:
            if reason == "timed_out" and self.assignment.timeout:
                error = f"timed out after {self.assignment.timeout:g} s"
            elif reason == "lost":
                error = "the worker gave the attempt up"
            else:
                error = reason
            return Outcome(reason, code, error, usage)
        if code == 0:
            return Outcome("succeeded", 0, None, usage)
        tail = outputs.tail(self.assignment.scratch / outputs.STDERR)
        limit = self._limit_hit(code, usage, tail)
        if limit is not None:
            error = f"{limit}\n{tail}".strip()
        elif code < 0:
            error = f"killed by signal {-code}\n{tail}".strip()
        else:
            error = tail
        return Outcome("failed", code, error, usage)

    def _limit_hit(self, code: int, usage: dict, tail: str) -> str | None:
        """Which limit ended the script, if one did."""
        lim = self.limits
        cpu = (usage.get("user") or 0.0) + (usage.get("system") or 0.0)
        if code == -signal.SIGXCPU or (
            code == -signal.SIGKILL and lim.cpu and cpu >= lim.cpu
        ):
            name = "SIGXCPU" if code == -signal.SIGXCPU else "SIGKILL"
            return f"CPU time limit exceeded ({name}): {lim.cpu:g} s"
        if lim.output_mb and (
            code == -signal.SIGXFSZ
            or _largest_file(self.assignment.scratch) >= lim.output_mb * MIB
        ):
            return f"file size limit exceeded (SIGXFSZ): {lim.output_mb} MiB"
        last = tail.strip().splitlines()[-1:] or [""]
        if lim.memory_mb and (last[0].startswith("MemoryError")
                              or "Cannot allocate memory" in tail):
            return f"memory limit exceeded: {lim.memory_mb} MiB"
        if lim.files and "Too many open files" in tail:
            return f"open files limit reached: {lim.files}"
        return None

    def abandon(self, error: str) -> None:
        """The server died: its job's status is lost with it."""
        if not self._claim():
            return
        _kill_group(self.pid, signal.SIGKILL)
        wall = time.monotonic() - self.started
        self._done(Outcome("lost", None, error, {"wall": wall}))

    def _terminate(self) -> None:
        pid = self.pid
        tree = _descendants(pid)
        _kill_group(pid, signal.SIGTERM)
        for proc in tree:
            _signal(proc, signal.SIGTERM)
        if self._exited.wait(self.grace):
            # The script is gone; the server killed what it left.
            return
        tree += _descendants(pid)
        _kill_group(pid, signal.SIGKILL)
        for proc in tree:
            _signal(proc, signal.SIGKILL)


class _Slot:
    """A request in flight: the start() waiting for the server's reply."""

    __slots__ = ("assignment", "done", "grace", "started", "limits",
                 "event", "attempt", "error")

    def __init__(self, assignment, done, grace, started, limits):
        self.assignment = assignment
        self.done = done
        self.grace = grace
        self.started = started
        self.limits = limits
        self.event = threading.Event()
        self.attempt: Running | None = None
        self.error: str | None = None


class _Server:
    """One job-server process (msp/_forkserver.py) and the thread that
    reads its replies."""

    def __init__(self, command: list[str], env: dict,
                 preload: tuple[str, ...] = (), name: str = "job server"):
        self.name = name
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = subprocess.Popen(
                [*command, str(SERVER), str(theirs.fileno()), *preload],
                pass_fds=(theirs.fileno(),), env=env, cwd="/",
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                # Not in the worker's group: a ^C meant for the worker must
                # not kill the server; the worker closes it when it leaves.
                start_new_session=True,
            )
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        self.sock = ours
        self.alive = True
        # The tables below; never held while writing to the socket, so
        # that the reader can always take it and keep the server unblocked.
        self._lock = threading.Lock()
        # Whole messages on the socket, one at a time.
        self._send_lock = threading.Lock()
        self._next = 0
        self._slots: dict[int, _Slot] = {}
        self._running: dict[int, Running] = {}
        self._hello = threading.Event()
        self._reader = threading.Thread(
            target=self._read, name="msp-jobserver", daemon=True
        )
        self._reader.start()

    def wait_ready(self, timeout: float) -> bool:
        return self._hello.wait(timeout)

    def run(self, request: dict, slot: _Slot, timeout: float) -> Running:
        with self._lock:
            if not self.alive:
                raise ServerError(f"the {self.name} is not running")
            self._next += 1
            ident = self._next
            self._slots[ident] = slot
        data = json.dumps({"id": ident, **request}).encode()
        try:
            with self._send_lock:
                self.sock.sendall(HEADER.pack(len(data)) + data)
        except OSError as exc:
            with self._lock:
                self._slots.pop(ident, None)
            raise ServerError(f"the {self.name} is gone: {exc}") from None
        if not slot.event.wait(timeout):
            with self._lock:
                self._slots.pop(ident, None)
            # A reply may still come; without its slot it starts nothing
            # we know of, so the server is not to be trusted any more.
            self.close()
            raise ServerError(
                f"the {self.name} did not answer in {timeout} s")
        if slot.error is not None:
            raise ServerError(slot.error)
        return slot.attempt

    def close(self, timeout: float = 5.0) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._reader.join(timeout)
        self.sock.close()

    # The reader thread.

    def _read(self) -> None:
        buf = bytearray()
        try:
            while True:
                data = self.sock.recv(1 << 16)
                if not data:
                    break
                buf += data
                while len(buf) >= HEADER.size:
                    (size,) = HEADER.unpack_from(buf)
                    if len(buf) < HEADER.size + size:
                        break
                    message = json.loads(buf[HEADER.size:HEADER.size + size])
                    del buf[:HEADER.size + size]
                    self._on_message(message)
        except (OSError, ValueError) as exc:
            log.error("%s: bad reply: %s", self.name, exc)
        finally:
            self._died()

    def _on_message(self, message: dict) -> None:
        if "hello" in message:
            for name, error in message["failed"].items():
                log.warning("%s could not preload %s: %s",
                            self.name, name, error)
            self._hello.set()
            return
        ident = message["id"]
        if "exit" in message:
            with self._lock:
                attempt = self._running.pop(ident, None)
            if attempt is not None:
                utime, stime, maxrss = message["rusage"]
                try:
                    attempt.finish(message["exit"], SimpleNamespace(
                        ru_utime=utime, ru_stime=stime, ru_maxrss=maxrss,
                    ), message.get("exec_error"))
                except Exception:
                    # This thread serves every job: one bad report must
                    # not stop it.
                    log.exception("job %d: reporting its end failed",
                                  attempt.assignment.job)
            return
        with self._lock:
            slot = self._slots.pop(ident, None)
            if slot is not None and "pid" in message:
                slot.attempt = Running(
                    slot.assignment, message["pid"], slot.grace, slot.done,
                    slot.started, slot.limits,
                )
                # Registered before the exit report, which comes next.
                self._running[ident] = slot.attempt
        if slot is not None:
            slot.error = message.get("error")
            slot.event.set()

    def _died(self) -> None:
        with self._lock:
            self.alive = False
            slots, self._slots = self._slots, {}
            running, self._running = self._running, {}
        self._hello.set()
        code = self.proc.poll()
        if running or slots:
            log.error("%s %d ended (status %s) with %d job(s)",
                      self.name, self.proc.pid, code, len(running))
        for slot in slots.values():
            slot.error = f"the {self.name} ended"
            slot.event.set()
        for attempt in running.values():
            attempt.abandon(f"the {self.name} ended while the job ran")


class SubprocessExecutor:
    """Runs each job as ``python script args...``, exec'd from a fork of
    the job server; see the module."""

    server_name = "job server"

    def __init__(self, python: str, *, kill_grace: float = 5.0,
                 env_allow=DEFAULT_ENV_ALLOW, environ=None,
                 limits: Limits = Limits(), run_as: str = "",
                 start_timeout: float = 30.0):
        self.python = python
        self.kill_grace = kill_grace
        self.limits = limits
        self.start_timeout = start_timeout
        environ = os.environ if environ is None else environ
        self.base_env = {k: environ[k] for k in env_allow if k in environ}
        self.user = _user(run_as)
        if self.user is not None:
            name, uid, gid, home = self.user
            self.base_env.update(HOME=home, USER=name, LOGNAME=name)
            log.info("scripts run as %s (uid %d, gid %d)", name, uid, gid)
        elif os.geteuid() == 0:
            log.warning("the worker runs as root and [worker] run_as is "
                        "empty: scripts run as root")
        self._server: _Server | None = None
        self._server_lock = threading.Lock()
        # Scripts that compiled: (path, and what identifies its content).
        self._good_scripts: dict[tuple, None] = {}

    @classmethod
    def from_config(cls, config) -> "SubprocessExecutor":
        """The executor a [worker] section describes."""
        return cls(
            config.python, kill_grace=config.kill_grace,
            env_allow=config.env_allow, run_as=config.run_as,
            limits=Limits(
                cpu=config.cpu_limit or None,
                memory_mb=config.memory_limit_mb or None,
                files=config.files_limit or None,
                output_mb=config.output_limit_mb or None,
            ),
        )

    def limits_for(self, a: Assignment) -> Limits:
        """The worker's limits, with the job's own CPU and memory."""
        lim = self.limits
        return Limits(
            cpu=a.cpu if a.cpu is not None else lim.cpu,
            memory_mb=a.memory if a.memory is not None else lim.memory_mb,
            files=lim.files, output_mb=lim.output_mb,
        )

    # What differs between this executor and the fork executor.

    def _server_process(self) -> tuple[list[str], dict, tuple[str, ...]]:
        """The server's interpreter and flags, environment and preloads."""
        # The worker's own interpreter, isolated and without site: small,
        # quick to start, and there whatever python the jobs are given.
        return [sys.executable or self.python, "-I", "-S"], {}, ()

    def _request(self, a: Assignment) -> dict:
        """What the server needs beyond the files, limits and user."""
        return {"exec": self.python}

    def _ensure_server(self) -> _Server:
        with self._server_lock:
            server = self._server
            if server is not None and server.alive:
                return server
            if server is not None:
                log.warning("%s %d is gone; starting another",
                            self.server_name, server.proc.pid)
                server.close()
            command, env, preload = self._server_process()
            server = _Server(command, env, preload, self.server_name)
            if not server.wait_ready(self.start_timeout) or not server.alive:
                server.close()
                raise ServerError(
                    f"the {self.server_name} ({command[0]}) did not start"
                )
            self._server = server
            log.info("%s %d ready (%s)", self.server_name, server.proc.pid,
                     command[0])
            return server

    @property
    def server_pid(self) -> int | None:
        server = self._server
        return None if server is None else server.proc.pid

    def start(self, a: Assignment, done: Callable[[Outcome], None]):
        """Start the attempt; ``done`` is called once, from another thread.

        Returns the :class:`Running` attempt, or None when the script could
        not start (``done`` has then been called already).
        """
        started = time.monotonic()
        try:
            scratch = self._prepare(a, done)
        except OSError as exc:
            done(Outcome("error", None, f"cannot start the script: {exc}",
                         {}))
            return None
        if scratch is None:
            return None
        limits = self.limits_for(a)
        user = None
        if self.user is not None:
            _, uid, gid, _ = self.user
            user = [uid, gid]
        request = {
            "script": a.script, "args": list(a.args), "cwd": str(scratch),
            "env": self.environment(a, scratch),
            "stdout": str(scratch / outputs.STDOUT),
            "stderr": str(scratch / outputs.STDERR),
            "limits": limits.for_server(), "user": user,
            **self._request(a),
        }
        try:
            if user is not None:
                # The script writes its output here, as its own user.
                os.chown(scratch, *user)
            server = self._ensure_server()
            slot = _Slot(a, done, self.kill_grace, started, limits)
            return server.run(request, slot, REQUEST_TIMEOUT)
        except OSError as exc:
            done(Outcome("error", None, f"cannot start the script: {exc}",
                         {}))
            return None

    def close(self) -> None:
        """Stop the server; jobs still running are reported lost."""
        with self._server_lock:
            server, self._server = self._server, None
        if server is not None:
            server.close()

    def _prepare(self, a: Assignment, done) -> Path | None:
        """The attempt's scratch folder, made; or None, ``done`` called,
        when the script cannot start at all."""
        scratch = a.scratch
        scratch.mkdir(parents=True, exist_ok=True)
        problem = self._check_script(a.script)
        if problem is not None:
            # Where `mspctl logs --stderr` looks, as if Python had said it.
            (scratch / outputs.STDOUT).write_bytes(b"")
            (scratch / outputs.STDERR).write_text(problem + "\n")
            done(Outcome("error", None, problem, {}))
            return None
        return scratch

    def environment(self, a: Assignment, scratch: Path) -> dict[str, str]:
        """The script's whole environment: the allowed variables of the
        worker's, and the job's own (msp.forkserver's jobs get the same)."""
        env = dict(self.base_env)
        env.update(
            MSP_JOB_ID=str(a.job), MSP_ATTEMPT=str(a.attempt),
            MSP_DATA_DIR=a.data, MSP_OUTPUT_DIR=str(scratch),
            PYTHONUNBUFFERED="1",
        )
        return env

    def _check_script(self, script: str) -> str | None:
        """Why the script cannot start at all, or None. A script found good
        is not compiled again while its file stays the same (a job run
        many times over pays for one compile)."""
        try:
            with open(script, "rb") as f:
                st = os.fstat(f.fileno())
                key = (script, st.st_dev, st.st_ino, st.st_size,
                       st.st_mtime_ns, st.st_ctime_ns)
                if key in self._good_scripts:
                    return None
                source = f.read()
        except OSError as exc:
            return f"cannot read the script: {exc}"
        try:
            compile(source, script, "exec", dont_inherit=True)
        except SyntaxError as exc:
            return f"{type(exc).__name__}: {exc.msg} ({script}, line " \
                   f"{exc.lineno})"
        except ValueError as exc:
            return f"cannot compile the script: {exc}"
        if len(self._good_scripts) >= GOOD_SCRIPTS:
            self._good_scripts.clear()
        self._good_scripts[key] = None
        return None


class NoopExecutor:
    """Reports success at once, starting nothing: for benchmarks."""

    def start(self, a: Assignment, done: Callable[[Outcome], None]):
        done(Outcome("succeeded", 0, None, {"wall": 0.0}, output=False))
        return None


def _user(run_as: str) -> tuple[str, int, int, str] | None:
    """(name, uid, gid, home) of ``run_as`` ("user" or "user:group")."""
    if not run_as:
        return None
    name, _, group = run_as.partition(":")
    try:
        entry = pwd.getpwnam(name)
        gid = grp.getgrnam(group).gr_gid if group else entry.pw_gid
    except KeyError:
        raise ConfigError(f"[worker] run_as {run_as!r}: no such user or "
                          "group") from None
    if os.geteuid() != 0 and entry.pw_uid != os.geteuid():
        raise ConfigError(f"[worker] run_as {run_as!r} needs a worker "
                          "running as root")
    if entry.pw_uid == 0:
        raise ConfigError("[worker] run_as must name an unprivileged user")
    return entry.pw_name, entry.pw_uid, gid, entry.pw_dir


def _largest_file(folder: Path, most: int = 1000) -> int:
    """The size of the largest of the first ``most`` files under
    ``folder``."""
    largest = 0
    for count, path in enumerate(folder.rglob("*")):
        if count >= most:
            break
        try:
            if path.is_file() and not path.is_symlink():
                largest = max(largest, path.stat().st_size)
        except OSError:
            pass
    return largest


def _kill_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _descendants(pid: int) -> list[psutil.Process]:
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _signal(proc: psutil.Process, sig: int) -> None:
    try:
        proc.send_signal(sig)
    except psutil.Error:
        pass
