"""How a worker runs a job's script.

:class:`SubprocessExecutor` starts the configured interpreter on the script
through the launcher (msp/launch.py) in a new session (so the job has a
process group of its own), with a scrubbed environment, no standard input,
stdout and stderr written to files in the attempt's scratch folder, the
limits of the config and the job (CPU seconds, address space, open files,
file size), and, when the worker is root, as the configured unprivileged
user. The launcher reaps the script's whole tree and reports its CPU time
and peak memory; a thread per job waits for the launcher with ``wait4``.
:class:`NoopExecutor` runs nothing; benchmarks use it to measure msp alone.
"""

from __future__ import annotations

import grp
import json
import logging
import os
import pwd
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import psutil

from . import outputs
from .config import ENV_ALLOW
from .errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_ENV_ALLOW = ENV_ALLOW
LAUNCHER = Path(__file__).with_name("launch.py")
MIB = 1 << 20
# After the grace period, how long the launcher gets to report once the
# script's tree is killed, before it is killed too.
REPORT_PATIENCE = 2.0


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

    def for_launcher(self) -> dict:
        return {
            "cpu": self.cpu,
            "memory": self.memory_mb and self.memory_mb * MIB,
            "files": self.files,
            "fsize": self.output_mb and self.output_mb * MIB,
        }


class Stoppable:
    """An attempt that can be ended early: subclasses set ``_exited`` (an
    Event), ``_reason`` (None) and define ``_terminate``."""

    def stop(self, reason: str) -> None:
        """End the attempt: SIGTERM to the whole process tree, SIGKILL after
        the grace period. ``reason`` becomes the attempt's outcome."""
        if self._exited.is_set() or self._reason is not None:
            return
        self._reason = reason
        threading.Thread(
            target=self._terminate, name="msp-kill", daemon=True
        ).start()


class Running(Stoppable):
    """A started attempt. ``stop()`` ends it early with a given outcome."""

    def __init__(self, assignment: Assignment, proc: subprocess.Popen,
                 grace: float, done: Callable[[Outcome], None],
                 limits: Limits = Limits(), report: int | None = None):
        self.assignment = assignment
        self.proc = proc
        self.grace = grace
        self.limits = limits
        self._report = report
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
        report = _read_report(self._report)
        if "exec_error" in report:
            self._done(Outcome("error", None, report["exec_error"],
                               {"wall": wall}))
            return
        if "status" in report:
            code = os.waitstatus_to_exitcode(report["status"])
            usage = {
                "wall": wall, "user": report["user"],
                "system": report["system"],
                "max_rss_kb": report["max_rss_kb"],
            }
        else:
            # XXX: the launcher was killed before it could report (the
            # script killed it, or it outlived the grace); the usage is then
            # the launcher's as wait4 saw it: its peak memory counts the
            # worker's, and a script it had not reaped is not counted.
            log.warning("job %d: the launcher left no report",
                        self.assignment.job)
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
            tail = outputs.tail(self.assignment.scratch / outputs.STDERR)
            limit = self._limit_hit(code, usage, tail)
            if limit is not None:
                error = f"{limit}\n{tail}".strip()
            elif code < 0:
                error = f"killed by signal {-code}\n{tail}".strip()
            else:
                error = tail
            outcome = Outcome("failed", code, error, usage)
        self._done(outcome)

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
            # Kill the script's tree but not the launcher (pid), so that it
            # reaps the tree and reports what it used.
            deadline = time.monotonic() + REPORT_PATIENCE
            while time.monotonic() < deadline:
                for proc in _descendants(pid):
                    _signal(proc, signal.SIGKILL)
                if self._exited.wait(0.2):
                    break
            tree += _descendants(pid)
        _kill_group(pid, signal.SIGKILL)
        for proc in tree:
            _signal(proc, signal.SIGKILL)


class SubprocessExecutor:
    def __init__(self, python: str, *, kill_grace: float = 5.0,
                 env_allow=DEFAULT_ENV_ALLOW, environ=None,
                 limits: Limits = Limits(), run_as: str = ""):
        self.python = python
        self.kill_grace = kill_grace
        self.limits = limits
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

    def start(self, a: Assignment, done: Callable[[Outcome], None]):
        """Start the attempt; ``done`` is called once, from another thread.

        Returns the :class:`Running` attempt, or None when the script could
        not start (``done`` has then been called already).
        """
        scratch = self._prepare(a, done)
        if scratch is None:
            return None
        env = self.environment(a, scratch)
        limits = self.limits_for(a)
        read_end, write_end = os.pipe()
        # The launcher ends the script's whole tree if the worker dies
        # under it (kill -9): nobody would watch its timeout any more, and
        # the broker runs the job again elsewhere.
        spec = json.dumps({"report": write_end, "parent": os.getpid(),
                           "limits": limits.for_launcher()})
        # The launcher runs on the script's interpreter: the one program
        # the script's user is sure to be able to run.
        command = [self.python, "-I", "-S", str(LAUNCHER), spec,
                   self.python, a.script, *a.args]
        as_user = {}
        if self.user is not None:
            _, uid, gid, _ = self.user
            as_user = dict(user=uid, group=gid, extra_groups=[])
        try:
            with open(scratch / outputs.STDOUT, "wb") as out, \
                    open(scratch / outputs.STDERR, "wb") as err:
                if self.user is not None:
                    # The script writes its output here, as its own user.
                    for path in (scratch, scratch / outputs.STDOUT,
                                 scratch / outputs.STDERR):
                        os.chown(path, uid, gid)
                proc = subprocess.Popen(
                    command, cwd=scratch, env=env, stdin=subprocess.DEVNULL,
                    stdout=out, stderr=err, start_new_session=True,
                    close_fds=True, pass_fds=(write_end,), **as_user,
                )
        except OSError as exc:
            os.close(read_end)
            done(Outcome("error", None,
                         f"cannot start {self.python}: {exc}", {}))
            return None
        finally:
            os.close(write_end)
        return Running(a, proc, self.kill_grace, done, limits, read_end)

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


def _read_report(fd: int | None) -> dict:
    """The launcher's report from the read end of its pipe; {} if none."""
    if fd is None:
        return {}
    os.set_blocking(fd, False)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(fd, 65536)
            except BlockingIOError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    report = {}
    for line in b"".join(chunks).splitlines():
        try:
            item = json.loads(line)
        except ValueError:
            continue
        if isinstance(item, dict):
            report.update(item)
    return report


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
