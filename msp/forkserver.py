"""A fork-server executor: each job is a fork of a warm interpreter.

:class:`ForkExecutor` starts, once, a server process in the configured
interpreter (``msp/_forkserver.py``, standard library only), which imports
the ``preload`` modules and then waits on a Unix socket. For each job it
opens the attempt's stdout and stderr files and scratch folder, forks, and
the child becomes the job: a new session (so a process group of its own),
standard input from /dev/null, the files on descriptors 1 and 2, every other
descriptor closed, the scratch folder as working directory, the same
scrubbed environment :class:`~msp.executor.SubprocessExecutor` builds,
``sys.argv`` and ``sys.path[0]`` as ``python script.py`` sets them, the
attempt's limits (the launcher's ``set_limits``) and, for a root worker,
the configured unprivileged user (``run_as``), then
``runpy.run_path(script, run_name="__main__")``. Its exit status follows
python's: 0, the ``SystemExit`` code, or 1 with the traceback on stderr for
an uncaught exception. The server reaps each child with ``wait4`` and sends
back its status and resource usage. A job thus starts in about a
millisecond instead of the tens an interpreter takes to start.

The promises are SubprocessExecutor's: the same syntax check before
anything starts, the same outcomes, cancellation by SIGTERM to the whole
group (and every descendant found), SIGKILL after the grace period, and a
script that does not outlive its worker: the server kills its jobs' groups
and exits when the worker's end of the socket closes (the worker ended,
even by kill -9), and each job gets SIGKILL if the server itself dies
(PR_SET_PDEATHSIG).

Caveats, all from the fork:

- Modules the server imported (``preload``, and what the interpreter
  imports at start-up) are already imported in the job, in the state the
  server left them: a module that keeps state, caches or connections at
  import time shares them, as they were at the fork, with every job.
  Preload only modules that are safe to fork (no threads, no open
  connections).
- A job that changes interpreter-global state (``sys.modules``,
  ``sys.path``, environment, signal handlers, monkey-patching) changes it
  in its own fork only; the next job starts from the server's state again.
- Every job inherits the server's hash seed, so the iteration order of
  sets of strings is the same from job to job (a fresh interpreter draws a
  new seed). ``random`` re-seeds itself after a fork; other generators
  (numpy's, if preloaded) do not.
- Settings read only at interpreter start-up (``PYTHON*`` variables,
  ``-X`` options) come from the server's start, with the environment that
  has no job's variables in it. ``sys.orig_argv`` and ``os.getppid()``
  are the server's.
- The reported peak memory (``max_rss_kb``) counts the server's pages that
  the child mapped, as a fresh interpreter's counts its own start-up;
  likewise the memory limit (RLIMIT_AS) counts the server's address space
  the child starts with.
- Usage is the script's own and that of the children it waited for; the
  subprocess executor's launcher also reaps and counts detached ones.
- With ``run_as``, the server runs as the worker's user (root) and each
  child drops to the configured user right after the fork: the job starts
  from a memory image a root process made (nothing secret is in it unless
  a preloaded module put it there).
- If the server dies, the jobs it ran are reported lost (so the broker
  retries them) and the next job starts a new server.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Callable

from . import outputs
from .executor import (
    DEFAULT_ENV_ALLOW, Assignment, Limits, Outcome, Running, Stoppable,
    SubprocessExecutor, _descendants, _kill_group, _signal,
)

log = logging.getLogger(__name__)

SERVER = Path(__file__).with_name("_forkserver.py")
HEADER = struct.Struct("!I")
# How long a request for a fork may take before the server is deemed hung.
FORK_TIMEOUT = 30.0


class ForkError(OSError):
    """The fork server could not start a job."""


class ForkAttempt(Stoppable):
    """A job forked by the server: ``stop()`` ends it early with a given
    outcome; the server's reader thread reports its end with
    :meth:`finish` (or :meth:`abandon`), exactly once."""

    def __init__(self, assignment: Assignment, pid: int, grace: float,
                 done: Callable[[Outcome], None], started: float,
                 limits: Limits):
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

    def finish(self, status: int, rusage) -> None:
        """The server reaped the script: report its outcome."""
        if not self._claim():
            return
        wall = time.monotonic() - self.started
        # Whatever the script left behind in its group goes with it.
        _kill_group(self.pid, signal.SIGKILL)
        usage = {
            "wall": wall, "user": rusage.ru_utime,
            "system": rusage.ru_stime, "max_rss_kb": rusage.ru_maxrss,
        }
        code = os.waitstatus_to_exitcode(status)
        self._done(self._outcome(code, usage))

    def _outcome(self, code: int, usage: dict) -> Outcome:
        # The subprocess executor's rules, limits included.
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
        limit = Running._limit_hit(self, code, usage, tail)
        if limit is not None:
            error = f"{limit}\n{tail}".strip()
        elif code < 0:
            error = f"killed by signal {-code}\n{tail}".strip()
        else:
            error = tail
        return Outcome("failed", code, error, usage)

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
            # The script is gone; its children may not be.
            tree = [p for p in tree if p.is_running()]
        else:
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
        self.attempt: ForkAttempt | None = None
        self.error: str | None = None


class _Server:
    """One fork-server process and the thread that reads its replies."""

    def __init__(self, python: str, env: dict, preload: tuple[str, ...]):
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            self.proc = subprocess.Popen(
                [python, str(SERVER), str(theirs.fileno()), *preload],
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
        self._running: dict[int, ForkAttempt] = {}
        self._hello = threading.Event()
        self._reader = threading.Thread(
            target=self._read, name="msp-forkserver", daemon=True
        )
        self._reader.start()

    def wait_ready(self, timeout: float) -> bool:
        return self._hello.wait(timeout)

    def run(self, request: dict, slot: _Slot, timeout: float) -> ForkAttempt:
        with self._lock:
            if not self.alive:
                raise ForkError("the fork server is not running")
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
            raise ForkError(f"the fork server is gone: {exc}") from None
        if not slot.event.wait(timeout):
            with self._lock:
                self._slots.pop(ident, None)
            # A reply may still come; without its slot it starts nothing
            # we know of, so the server is not to be trusted any more.
            self.close()
            raise ForkError(f"the fork server did not answer in {timeout} s")
        if slot.error is not None:
            raise ForkError(slot.error)
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
            log.error("fork server: bad reply: %s", exc)
        finally:
            self._died()

    def _on_message(self, message: dict) -> None:
        if "hello" in message:
            for name, error in message["failed"].items():
                log.warning("fork server could not preload %s: %s",
                            name, error)
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
                    ))
                except Exception:
                    # This thread serves every job: one bad report must
                    # not stop it.
                    log.exception("job %d: reporting its end failed",
                                  attempt.assignment.job)
            return
        with self._lock:
            slot = self._slots.pop(ident, None)
            if slot is not None and "pid" in message:
                slot.attempt = ForkAttempt(
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
            log.error("fork server %d ended (status %s) with %d job(s)",
                      self.proc.pid, code, len(running))
        for slot in slots.values():
            slot.error = "the fork server ended"
            slot.event.set()
        for attempt in running.values():
            attempt.abandon("the fork server ended while the job ran")


class ForkExecutor(SubprocessExecutor):
    """Runs each job in a fork of a warm interpreter; see the module."""

    def __init__(self, python: str, *, kill_grace: float = 5.0,
                 env_allow=DEFAULT_ENV_ALLOW, environ=None,
                 limits: Limits = Limits(), run_as: str = "",
                 preload: tuple[str, ...] | list[str] = (),
                 start_timeout: float = 30.0):
        super().__init__(python, kill_grace=kill_grace, env_allow=env_allow,
                         environ=environ, limits=limits, run_as=run_as)
        self.preload = tuple(preload)
        self.start_timeout = start_timeout
        self._server: _Server | None = None
        self._server_lock = threading.Lock()
        # Started now, so that the first job finds it warm; if it cannot
        # start, each job tries again and reports why it could not.
        try:
            self._ensure_server()
        except OSError as exc:
            log.error("fork server: %s", exc)

    def _ensure_server(self) -> _Server:
        with self._server_lock:
            server = self._server
            if server is not None and server.alive:
                return server
            if server is not None:
                log.warning("fork server %d is gone; starting another",
                            server.proc.pid)
                server.close()
            # The server's environment is the jobs' without a job in it,
            # so that what python reads at start-up is the same.
            env = dict(self.base_env, PYTHONUNBUFFERED="1")
            server = _Server(self.python, env, self.preload)
            if not server.wait_ready(self.start_timeout) or not server.alive:
                server.close()
                raise ForkError(
                    f"the fork server ({self.python}) did not start"
                )
            self._server = server
            log.info("fork server %d ready (%s)", server.proc.pid,
                     self.python)
            return server

    @property
    def server_pid(self) -> int | None:
        server = self._server
        return None if server is None else server.proc.pid

    def start(self, a: Assignment, done: Callable[[Outcome], None]):
        """Start the attempt; ``done`` is called once, from another thread.

        Returns the :class:`ForkAttempt`, or None when the script could not
        start (``done`` has then been called already).
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
            "limits": limits.for_launcher(), "user": user,
        }
        try:
            if user is not None:
                # The script writes its output here, as its own user.
                os.chown(scratch, *user)
            server = self._ensure_server()
            slot = _Slot(a, done, self.kill_grace, started, limits)
            return server.run(request, slot, FORK_TIMEOUT)
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
