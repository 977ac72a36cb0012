"""How a worker runs a job's script.

:class:`SubprocessExecutor` starts the configured interpreter on the script
in a new session (so the job has a process group of its own), with a
scrubbed environment, no standard input, and stdout and stderr written to
files in the attempt's scratch folder. A thread per job waits for the
script with ``wait4`` and so gets the kernel's accounting of its CPU time and
peak memory. :class:`NoopExecutor` runs nothing; benchmarks use it to measure
msp alone.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

from . import outputs

log = logging.getLogger(__name__)

DEFAULT_ENV_ALLOW = (
    "PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "USER",
    "LOGNAME",
)


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


class Running:
    """A started attempt. ``stop()`` ends it early with a given outcome."""

    def __init__(self, assignment: Assignment, proc: subprocess.Popen,
                 grace: float, done: Callable[[Outcome], None]):
        self.assignment = assignment
        self.proc = proc
        self.grace = grace
        self.started = time.monotonic()
        self.deadline = (
            None if assignment.timeout is None
            else self.started + assignment.timeout
        )
        self._done = done
        self._reason: str | None = None
        self._exited = threading.Event()
        self._waiter = threading.Thread(
            target=self._wait, name=f"msp-job-{assignment.job}", daemon=True
        )
        self._waiter.start()

    def _wait(self) -> None:
        pid = self.proc.pid
        _, status, rusage = os.wait4(pid, 0)
        wall = time.monotonic() - self.started
        # wait4 reaped it; tell Popen so that it does not try again.
        self.proc.returncode = os.waitstatus_to_exitcode(status)
        self._exited.set()
        # Whatever the script left behind in its group goes with it.
        _kill_group(pid, signal.SIGKILL)
        code = self.proc.returncode
        usage = {
            "wall": wall, "user": rusage.ru_utime,
            "system": rusage.ru_stime, "max_rss_kb": rusage.ru_maxrss,
        }
        reason = self._reason
        if reason is not None:
            if reason == "timed_out":
                error = f"timed out after {self.assignment.timeout:g} s"
            elif reason == "lost":
                error = "the worker gave the attempt up"
            else:
                error = reason
            outcome = Outcome(reason, code, error, usage)
        elif code == 0:
            outcome = Outcome("succeeded", 0, None, usage)
        else:
            error = outputs.tail(self.assignment.scratch / outputs.STDERR)
            if code < 0:
                error = f"killed by signal {-code}\n{error}".strip()
            outcome = Outcome("failed", code, error, usage)
        self._done(outcome)

    def stop(self, reason: str) -> None:
        """End the attempt: SIGTERM to the whole process tree, SIGKILL after
        the grace period. ``reason`` becomes the attempt's outcome."""
        if self._exited.is_set() or self._reason is not None:
            return
        self._reason = reason
        threading.Thread(
            target=self._terminate, name="msp-kill", daemon=True
        ).start()

    def _terminate(self) -> None:
        pid = self.proc.pid
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


class SubprocessExecutor:
    def __init__(self, python: str, *, kill_grace: float = 5.0,
                 env_allow=DEFAULT_ENV_ALLOW, environ=None):
        self.python = python
        self.kill_grace = kill_grace
        environ = os.environ if environ is None else environ
        self.base_env = {k: environ[k] for k in env_allow if k in environ}

    def start(self, a: Assignment, done: Callable[[Outcome], None]):
        """Start the attempt; ``done`` is called once, from another thread.

        Returns the :class:`Running` attempt, or None when the script could
        not start (``done`` has then been called already).
        """
        scratch = a.scratch
        scratch.mkdir(parents=True, exist_ok=True)
        problem = self._check_script(a.script)
        if problem is not None:
            # Where `mspctl logs --stderr` looks, as if Python had said it.
            (scratch / outputs.STDOUT).write_bytes(b"")
            (scratch / outputs.STDERR).write_text(problem + "\n")
            done(Outcome("error", None, problem, {}))
            return None
        env = dict(self.base_env)
        env.update(
            MSP_JOB_ID=str(a.job), MSP_ATTEMPT=str(a.attempt),
            MSP_DATA_DIR=a.data, MSP_OUTPUT_DIR=str(scratch),
            PYTHONUNBUFFERED="1",
        )
        with open(scratch / outputs.STDOUT, "wb") as out, \
                open(scratch / outputs.STDERR, "wb") as err:
            try:
                proc = subprocess.Popen(
                    [self.python, a.script, *a.args], cwd=scratch, env=env,
                    stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                    start_new_session=True, close_fds=True,
                    preexec_fn=functools.partial(_die_with, os.getpid()),
                )
            except OSError as exc:
                done(Outcome("error", None,
                             f"cannot start {self.python}: {exc}", {}))
                return None
        return Running(a, proc, self.kill_grace, done)

    @staticmethod
    def _check_script(script: str) -> str | None:
        """Why the script cannot start at all, or None."""
        try:
            source = Path(script).read_bytes()
        except OSError as exc:
            return f"cannot read the script: {exc}"
        try:
            compile(source, script, "exec", dont_inherit=True)
        except SyntaxError as exc:
            return f"{type(exc).__name__}: {exc.msg} ({script}, line " \
                   f"{exc.lineno})"
        except ValueError as exc:
            return f"cannot compile the script: {exc}"
        return None


class NoopExecutor:
    """Reports success at once, starting nothing: for benchmarks."""

    def start(self, a: Assignment, done: Callable[[Outcome], None]):
        done(Outcome("succeeded", 0, None, {"wall": 0.0}, output=False))
        return None


# prctl(2), looked up here so that the child only has to call it.
_PR_SET_PDEATHSIG = 1
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: no such safeguard
    _prctl = None


def _die_with(worker_pid: int) -> None:
    """In the script's process, before exec: be killed when the worker's
    thread that started it ends, as when the worker is killed -9. Nobody
    would watch its timeout or stop it any more, and the job runs again
    elsewhere.

    XXX: only the script itself gets this; the processes it starts outlive
    a dead worker (its group is killed only while the worker lives), and
    run on unwatched until they end.
    """
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != worker_pid:
        os._exit(1)  # the worker died before the safeguard took hold


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
