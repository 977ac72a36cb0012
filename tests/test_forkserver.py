"""The fork-server executor, with real processes; and what it shares with
the subprocess executor (the same job server), run with both.

Each test waits on conditions with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import psutil
import pytest

from msp.executor import Assignment, SubprocessExecutor
from msp.forkserver import ForkExecutor

DEADLINE = 20.0


def wait_for(condition, timeout=DEADLINE, what="condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


class Result:
    """Collects what ``done`` is called with, and how often."""

    def __init__(self):
        self.outcomes = []
        self.event = threading.Event()

    def __call__(self, outcome):
        self.outcomes.append(outcome)
        self.event.set()

    def wait(self):
        assert self.event.wait(DEADLINE), "done was never called"
        return self.outcomes[0]


@pytest.fixture
def executor():
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/root",
           "LANG": "C.UTF-8", "MSP_TEST_SECRET": "do-not-leak"}
    ex = ForkExecutor(sys.executable, kill_grace=2.0, environ=env)
    yield ex
    ex.close()


_jobs = iter(range(1, 1_000_000))


def assignment(tmp_path: Path, source: str, args=(), timeout=None):
    job = next(_jobs)
    script = tmp_path / f"job{job}.py"
    script.write_text(textwrap.dedent(source))
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    return Assignment(
        job=job, token=f"{job:08d}abcdef", attempt=1, script=str(script),
        args=list(args), data=str(data), output=str(tmp_path / f"out{job}"),
        timeout=timeout,
    )


def run(executor, a):
    result = Result()
    running = executor.start(a, result)
    outcome = result.wait()
    return running, outcome, result


def read(a, name):
    return (a.scratch / name).read_text()


def test_success_writes_output_files_in_the_scratch_folder(executor,
                                                            tmp_path):
    a = assignment(tmp_path, """
        import os, sys
        print("to stdout")
        print("to stderr", file=sys.stderr)
        open("result.txt", "w").write("made in " + os.getcwd())
    """)
    running, outcome, result = run(executor, a)
    assert outcome.outcome == "succeeded"
    assert outcome.exit_code == 0
    assert outcome.error is None
    assert set(outcome.usage) == {"wall", "user", "system", "max_rss_kb"}
    assert outcome.usage["max_rss_kb"] > 0
    assert read(a, "stdout.log") == "to stdout\n"
    assert read(a, "stderr.log") == "to stderr\n"
    assert read(a, "result.txt") == f"made in {a.scratch}"
    assert running is not None and running.deadline is None
    assert len(result.outcomes) == 1


def test_the_script_runs_as_python_would_run_it(executor, tmp_path):
    a = assignment(tmp_path, """
        import json, os, sys
        json.dump({
            "name": __name__, "argv": sys.argv, "path0": sys.path[0],
            "stdin": sys.stdin.read(), "sid": os.getsid(0),
            "pgrp": os.getpgrp(), "pid": os.getpid(),
            "fds": sorted(int(f) for f in os.listdir("/proc/self/fd")),
        }, open("facts.json", "w"))
    """, args=["one", "two words"])
    _, outcome, _ = run(executor, a)
    assert outcome.outcome == "succeeded", outcome
    facts = json.loads(read(a, "facts.json"))
    assert facts["name"] == "__main__"
    assert facts["argv"] == [a.script, "one", "two words"]
    assert facts["path0"] == str(Path(a.script).parent)
    assert facts["stdin"] == ""
    # A session and a process group of its own.
    assert facts["sid"] == facts["pid"] == facts["pgrp"]
    # 0-2, and the one listdir itself opened: nothing of the server's.
    assert len(facts["fds"]) == 4 and facts["fds"][:3] == [0, 1, 2]


def test_environment_is_scrubbed(executor, tmp_path):
    a = assignment(tmp_path, """
        import json, os
        json.dump(dict(os.environ), open("env.json", "w"))
    """)
    _, outcome, _ = run(executor, a)
    assert outcome.outcome == "succeeded", outcome
    env = json.loads(read(a, "env.json"))
    assert "MSP_TEST_SECRET" not in env
    assert env["MSP_JOB_ID"] == str(a.job)
    assert env["MSP_ATTEMPT"] == "1"
    assert env["MSP_DATA_DIR"] == a.data
    assert env["MSP_OUTPUT_DIR"] == str(a.scratch)
    assert env["LANG"] == "C.UTF-8"
    # Exactly what the subprocess executor would have given the script.
    assert env == executor.environment(a, a.scratch)


@pytest.mark.parametrize("source, code, stderr", [
    ("raise SystemExit(3)", 3, ""),
    ("import sys; sys.exit('bad input')", 1, "bad input\n"),
    ("import sys; sys.exit(None)", 0, ""),
    ("import os; os._exit(7)", 7, ""),
])
def test_exit_status_follows_python(executor, tmp_path, source, code,
                                    stderr):
    a = assignment(tmp_path, source)
    _, outcome, _ = run(executor, a)
    assert outcome.exit_code == code
    assert outcome.outcome == ("succeeded" if code == 0 else "failed")
    assert read(a, "stderr.log") == stderr


def test_a_syntax_error_is_reported_before_anything_starts(executor,
                                                           tmp_path):
    a = assignment(tmp_path, "def broken(:\n    pass\n")
    result = Result()
    assert executor.start(a, result) is None
    assert result.event.is_set()
    outcome = result.outcomes[0]
    assert outcome.outcome == "error"
    assert "SyntaxError" in outcome.error
    # Where the logs are looked for, as the subprocess executor leaves it.
    assert read(a, "stdout.log") == ""
    assert read(a, "stderr.log") == outcome.error + "\n"


def test_atexit_functions_and_threads_finish_before_the_exit(executor,
                                                             tmp_path):
    a = assignment(tmp_path, """
        import atexit, threading, time
        atexit.register(lambda: open("atexit.txt", "w").write("ran"))
        def late():
            time.sleep(0.2)
            open("thread.txt", "w").write("ran")
        threading.Thread(target=late).start()
    """)
    _, outcome, _ = run(executor, a)
    assert outcome.outcome == "succeeded", outcome
    assert read(a, "atexit.txt") == "ran"
    assert read(a, "thread.txt") == "ran"


def test_global_state_changes_stay_in_their_fork(executor, tmp_path):
    first = assignment(tmp_path, """
        import json, os, sys
        json.MARK = "first"
        sys.path.append("/nowhere")
        os.environ["LEFT_BEHIND"] = "1"
    """)
    second = assignment(tmp_path, """
        import json, os, sys
        assert not hasattr(json, "MARK")
        assert "/nowhere" not in sys.path
        assert "LEFT_BEHIND" not in os.environ
    """)
    assert run(executor, first)[1].outcome == "succeeded"
    _, outcome, _ = run(executor, second)
    assert outcome.outcome == "succeeded", outcome.error


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_timeout_gives_the_attempt_a_deadline(executor, tmp_path):
    a = assignment(tmp_path, "pass", timeout=30)
    running, outcome, _ = run(executor, a)
    assert outcome.outcome == "succeeded"
    assert running.deadline == pytest.approx(running.started + 30)


def test_close_stops_the_server(tmp_path):
    ex = ForkExecutor(sys.executable)
    pid = ex.server_pid
    assert _alive(pid)
    ex.close()
    assert not _alive(pid)


def test_preloaded_modules_are_already_imported(tmp_path):
    ex = ForkExecutor(sys.executable, preload=["decimal", "no_such_module"])
    try:
        a = assignment(tmp_path, """
            import sys
            assert "decimal" in sys.modules
        """)
        _, outcome, _ = run(ex, a)
        assert outcome.outcome == "succeeded", outcome.error
    finally:
        ex.close()


@pytest.mark.slow
def test_a_worker_runs_jobs_with_the_fork_executor(tmp_path):
    from msp.broker import Broker
    from msp.client import Client
    from msp.config import BrokerConfig, WorkerConfig
    from msp.worker import Worker

    script = tmp_path / "job.py"
    script.write_text("import sys\nprint('forked', sys.argv[1:])\n")
    (tmp_path / "data").mkdir()
    broker = Broker(BrokerConfig(
        client_endpoint="tcp://127.0.0.1:*",
        worker_endpoint="tcp://127.0.0.1:*", events_endpoint="",
        data_dir=str(tmp_path / "var"), allowed_roots=[str(tmp_path)],
        hash_time_cost=1, retry_backoff=0,
    ), admin_password="adminpass").start()
    worker = None
    try:
        worker = Worker(WorkerConfig(
            broker=broker.endpoints["worker"], name="fw", executor="fork",
        )).start()
        server = worker.executor.server_pid
        with Client(broker.endpoints["client"]) as client:
            client.login("admin", "adminpass")
            job = client.submit(str(script), str(tmp_path / "data"),
                                str(tmp_path / "out"), args=["x"])
            view = client.wait(job, timeout=DEADLINE)
        assert view["state"] == "succeeded", view
        assert (tmp_path / "out" / "stdout.log").read_text() == \
            "forked ['x']\n"
    finally:
        if worker is not None:
            worker.stop(timeout=DEADLINE)
        broker.stop()
    if worker is not None:
        wait_for(lambda: not _alive(server), what="the server to stop")


def test_a_missing_interpreter_fails_each_job_with_why(tmp_path):
    ex = ForkExecutor(str(tmp_path / "no-python"))
    try:
        assert ex.server_pid is None
        _, outcome, _ = run(ex, assignment(tmp_path, "pass"))
        assert outcome.outcome == "error"
        assert "cannot start the script" in outcome.error
    finally:
        ex.close()



def test_the_attempt_limits_apply_to_the_job(tmp_path):
    from msp.executor import Limits

    ex = ForkExecutor(sys.executable, limits=Limits(files=64))
    try:
        a = assignment(tmp_path, """
            import resource
            print(resource.getrlimit(resource.RLIMIT_NOFILE))
        """)
        _, outcome, _ = run(ex, a)
        assert outcome.outcome == "succeeded", outcome.error
        assert read(a, "stdout.log") == "(64, 64)\n"
    finally:
        ex.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="run_as needs a root worker")
def test_run_as_drops_to_the_configured_user(tmp_path):
    import pwd

    try:
        nobody = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no user 'nobody'")
    # Every folder up to the script must be open to that user.
    import shutil
    import tempfile

    shared = Path(tempfile.mkdtemp(prefix="msp-fork-run-as-", dir="/tmp"))
    shared.chmod(0o755)
    ex = ForkExecutor(sys.executable, run_as="nobody")
    try:
        a = assignment(shared, """
            import os
            open("ids.txt", "w").write(f"{os.getuid()} {os.getgid()}")
            print(os.environ["USER"], os.environ["HOME"])
        """)
        _, outcome, _ = run(ex, a)
        assert outcome.outcome == "succeeded", outcome.error
        assert read(a, "ids.txt") == f"{nobody.pw_uid} {nobody.pw_gid}"
        assert read(a, "stdout.log") == f"nobody {nobody.pw_dir}\n"
        assert (a.scratch / "stdout.log").stat().st_uid == nobody.pw_uid
    finally:
        ex.close()
        shutil.rmtree(shared, ignore_errors=True)


@pytest.mark.parametrize("source", [
    b"def broken(:\n    pass\n",
    b"\xef\xbb\xbf# -*- coding: latin-1 -*-\nprint(1)\n",
])
def test_a_script_broken_after_the_check_fails_as_python_would(
    executor, tmp_path, monkeypatch, source
):
    """The worker checked the script; it changed before the server
    compiled it. The job fails with what python itself prints."""
    a = assignment(tmp_path, "")
    Path(a.script).write_bytes(source)
    monkeypatch.setattr(executor, "_check_script", lambda script: None)
    python = subprocess.run([sys.executable, a.script], capture_output=True,
                            text=True, timeout=DEADLINE)

    _, outcome, _ = run(executor, a)

    assert outcome.outcome == "failed"
    assert outcome.exit_code == python.returncode == 1
    stderr = read(a, "stderr.log")
    # (python names no line for a bad encoding; compile() names line 0.)
    assert stderr.endswith(python.stderr)
    assert "Traceback" not in stderr and "_forkserver" not in stderr


# What both executors promise alike.

EXECUTORS = {"fork": ForkExecutor, "subprocess": SubprocessExecutor}


@pytest.fixture(params=sorted(EXECUTORS))
def kind(request) -> str:
    return request.param


@pytest.fixture
def both(kind):
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/root",
           "LANG": "C.UTF-8"}
    ex = EXECUTORS[kind](sys.executable, kill_grace=2.0, environ=env)
    yield ex
    ex.close()


def test_an_exception_fails_with_its_traceback_on_stderr(both, tmp_path):
    a = assignment(tmp_path, """
        def inner():
            raise ValueError("boom")
        inner()
    """)
    _, outcome, _ = run(both, a)
    assert outcome.outcome == "failed"
    assert outcome.exit_code == 1
    stderr = read(a, "stderr.log")
    assert stderr.startswith("Traceback (most recent call last):")
    assert 'in inner' in stderr and "ValueError: boom" in stderr
    # No frame of the server's: the script's own, as python shows them.
    assert "runpy" not in stderr and "_forkserver" not in stderr
    assert outcome.error.strip().endswith("ValueError: boom")


def test_cancel_kills_the_script_and_its_descendants(both, tmp_path):
    a = assignment(tmp_path, """
        import json, os, subprocess, sys, time
        sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
        child = subprocess.Popen(sleep)
        # One that leaves the group: only the tree walk finds it.
        escaped = subprocess.Popen(sleep, start_new_session=True)
        with open("pids.tmp", "w") as f:
            json.dump([os.getpid(), child.pid, escaped.pid], f)
        os.rename("pids.tmp", "pids.json")
        time.sleep(60)
    """)
    result = Result()
    running = both.start(a, result)
    pids_file = a.scratch / "pids.json"
    wait_for(pids_file.exists, what="the script's pids")
    pids = json.loads(pids_file.read_text())
    assert running.pid == pids[0]
    running.stop("cancelled")
    outcome = result.wait()
    assert outcome.outcome == "cancelled"
    assert outcome.exit_code == -signal.SIGTERM
    # All gone before the end is reported.
    assert not any(_alive(pid) for pid in pids)
    assert len(result.outcomes) == 1


def test_a_script_ignoring_sigterm_is_killed_after_the_grace(kind,
                                                             tmp_path):
    ex = EXECUTORS[kind](sys.executable, kill_grace=0.3)
    try:
        a = assignment(tmp_path, """
            import signal, time
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            open("ready", "w").close()
            while True:
                pass
        """, timeout=1)
        result = Result()
        running = ex.start(a, result)
        wait_for((a.scratch / "ready").exists, what="the script to start")
        running.stop("timed_out")
        outcome = result.wait()
        assert outcome.outcome == "timed_out"
        assert outcome.error == "timed out after 1 s"
        assert outcome.exit_code == -signal.SIGKILL
        assert outcome.usage["user"] + outcome.usage["system"] > 0
    finally:
        ex.close()


def test_a_killed_server_loses_its_job_and_is_replaced(both, tmp_path):
    a = assignment(tmp_path, """
        open("ready", "w").close()
        import time; time.sleep(60)
    """)
    result = Result()
    running = both.start(a, result)
    wait_for((a.scratch / "ready").exists, what="the script to start")
    old = both.server_pid
    os.kill(old, signal.SIGKILL)
    outcome = result.wait()
    assert outcome.outcome == "lost"
    assert "server ended while the job ran" in outcome.error
    wait_for(lambda: not _alive(running.pid), what="the orphan to be killed")
    _, outcome, _ = run(both, assignment(tmp_path, "pass"))
    assert outcome.outcome == "succeeded"
    assert both.server_pid not in (None, old)


def test_a_killed_worker_takes_the_scripts_tree_with_it(kind, tmp_path):
    """kill -9 of the process that owns the executor: the server sees its
    socket close, kills the job's tree, detached parts included, and
    exits."""
    pid_file = tmp_path / "pids"
    a = assignment(tmp_path, f"""
        import os, subprocess, sys, time
        child = subprocess.Popen(
            [sys.executable, "-c", "import time; time.sleep(600)"],
            start_new_session=True)
        open({str(pid_file)!r} + ".tmp", "w").write(
            f"{{os.getpid()}} {{child.pid}} {{os.getppid()}}")
        os.rename({str(pid_file)!r} + ".tmp", {str(pid_file)!r})
        time.sleep(600)
    """)
    cls = EXECUTORS[kind]
    owner = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, threading
        from msp.executor import Assignment
        from {cls.__module__} import {cls.__name__} as Executor
        ex = Executor(sys.executable)
        ex.start(Assignment(**{a.__dict__!r}), lambda outcome: None)
        threading.Event().wait(60)
    """)], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    pids = []
    try:
        wait_for(pid_file.exists, what="the script to start")
        pids = [int(p) for p in pid_file.read_text().split()]
        assert all(_alive(pid) for pid in pids)
        owner.kill()
        owner.wait(DEADLINE)
        for pid in pids:
            wait_for(lambda pid=pid: not _alive(pid), what=f"{pid} to end")
    finally:
        owner.kill()
        owner.wait(DEADLINE)
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
