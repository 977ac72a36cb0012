"""The subprocess executor and its job server, with real processes.

Each test waits on conditions with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import textwrap

import psutil
import pytest

from msp.executor import SubprocessExecutor

from .test_forkserver import DEADLINE, Result, assignment, read, run, wait_for


@pytest.fixture
def executor():
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/root",
           "LANG": "C.UTF-8", "MSP_TEST_SECRET": "do-not-leak"}
    ex = SubprocessExecutor(sys.executable, kill_grace=2.0, environ=env)
    yield ex
    ex.close()


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_the_server_starts_with_the_first_job(executor, tmp_path):
    assert executor.server_pid is None
    _, outcome, _ = run(executor, assignment(tmp_path, "pass"))
    assert outcome.outcome == "succeeded"
    server = executor.server_pid
    assert _alive(server)
    # One server for every job of the worker.
    _, outcome, _ = run(executor, assignment(tmp_path, "pass"))
    assert outcome.outcome == "succeeded"
    assert executor.server_pid == server
    executor.close()
    assert not _alive(server)


def test_the_script_is_a_fresh_interpreter_as_python_starts_it(executor,
                                                               tmp_path):
    a = assignment(tmp_path, """
        import json, os, sys
        json.dump({
            "name": __name__, "argv": sys.argv, "path0": sys.path[0],
            "orig": sys.orig_argv, "stdin": sys.stdin.read(),
            "sid": os.getsid(0), "pgrp": os.getpgrp(), "pid": os.getpid(),
            "fds": sorted(int(f) for f in os.listdir("/proc/self/fd")),
            "cwd": os.getcwd(), "env": dict(os.environ),
        }, open("facts.json", "w"))
        print("out"); print("err", file=sys.stderr)
    """, args=["one", "two words"])
    running, outcome, result = run(executor, a)
    assert outcome.outcome == "succeeded", outcome
    assert outcome.exit_code == 0 and outcome.error is None
    assert set(outcome.usage) == {"wall", "user", "system", "max_rss_kb"}
    facts = json.loads(read(a, "facts.json"))
    assert facts["name"] == "__main__"
    assert facts["argv"] == [a.script, "one", "two words"]
    assert facts["orig"] == [sys.executable, a.script, "one", "two words"]
    assert facts["path0"] == os.path.dirname(a.script)
    assert facts["stdin"] == ""
    assert facts["sid"] == facts["pid"] == facts["pgrp"] == running.pid
    # 0-2, and the one listdir itself opened: nothing of the server's.
    assert len(facts["fds"]) == 4 and facts["fds"][:3] == [0, 1, 2]
    assert facts["cwd"] == str(a.scratch)
    env = {k: v for k, v in facts["env"].items() if k != "LC_CTYPE"}
    assert env == executor.environment(a, a.scratch)
    assert read(a, "stdout.log") == "out\n"
    assert read(a, "stderr.log") == "err\n"
    assert len(result.outcomes) == 1


def test_an_exception_fails_the_attempt_with_its_traceback(executor,
                                                           tmp_path):
    a = assignment(tmp_path, "raise ValueError('boom')")
    _, outcome, _ = run(executor, a)
    assert outcome.outcome == "failed"
    assert outcome.exit_code == 1
    assert outcome.error.strip().endswith("ValueError: boom")


def test_a_detached_grandchild_is_counted_and_killed(executor, tmp_path):
    # The script starts a child that starts a grandchild in a session of its
    # own and leaves at once: the grandchild, which burns 0.5 s of CPU and
    # sleeps, is then nobody's but the server's.
    grandchild = "; ".join([
        "import os, time",
        "t = time.process_time()",
        "exec('while time.process_time() - t < 0.5: pass')",
        "open('burnt', 'w').write(str(os.getpid()))",
        "time.sleep(600)",
    ])
    child = "; ".join([
        "import subprocess, sys",
        f"subprocess.Popen([sys.executable, '-c', {grandchild!r}], "
        "start_new_session=True)",
    ])
    a = assignment(tmp_path, f"""
        import os, subprocess, sys, time
        subprocess.run([sys.executable, "-c", {child!r}], check=True)
        while not os.path.exists("burnt"):
            time.sleep(0.01)
    """)
    _, outcome, _ = run(executor, a)
    assert outcome.outcome == "succeeded", outcome.error
    pid = int(read(a, "burnt"))
    # Reported once the grandchild is dead and reaped, its CPU included.
    assert not _alive(pid)
    assert outcome.usage["user"] + outcome.usage["system"] >= 0.5
    # The largest peak of any process, not a sum: an interpreter's.
    assert outcome.usage["max_rss_kb"] < 40_000


def test_a_missing_interpreter_is_the_attempts_error(tmp_path):
    missing = str(tmp_path / "no-python")
    ex = SubprocessExecutor(missing)
    try:
        _, outcome, _ = run(ex, assignment(tmp_path, "pass"))
        assert outcome.outcome == "error"
        assert outcome.error.startswith(f"cannot start {missing}: ")
        assert "No such file or directory" in outcome.error
        # The server stays: the next job gets the same answer from it.
        server = ex.server_pid
        _, outcome, _ = run(ex, assignment(tmp_path, "pass"))
        assert outcome.outcome == "error"
        assert ex.server_pid == server
    finally:
        ex.close()


def test_an_interpreter_named_without_a_folder_is_found_on_path(tmp_path):
    env = {"PATH": os.path.dirname(sys.executable)}
    ex = SubprocessExecutor(os.path.basename(sys.executable), environ=env)
    try:
        _, outcome, _ = run(ex, assignment(tmp_path, "pass"))
        assert outcome.outcome == "succeeded", outcome.error
    finally:
        ex.close()


def test_cancel_kills_the_script_and_its_descendants(executor, tmp_path):
    a = assignment(tmp_path, """
        import json, os, subprocess, sys, time
        sleep = [sys.executable, "-c", "import time; time.sleep(60)"]
        child = subprocess.Popen(sleep)
        escaped = subprocess.Popen(sleep, start_new_session=True)
        with open("pids.tmp", "w") as f:
            json.dump([os.getpid(), child.pid, escaped.pid], f)
        os.rename("pids.tmp", "pids.json")
        time.sleep(60)
    """)
    result = Result()
    running = executor.start(a, result)
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


def test_a_script_ignoring_sigterm_is_killed_after_the_grace(tmp_path):
    ex = SubprocessExecutor(sys.executable, kill_grace=0.3)
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


def test_a_killed_server_loses_its_job_and_is_replaced(executor, tmp_path):
    a = assignment(tmp_path, """
        open("ready", "w").close()
        import time; time.sleep(60)
    """)
    result = Result()
    running = executor.start(a, result)
    wait_for((a.scratch / "ready").exists, what="the script to start")
    old = executor.server_pid
    os.kill(old, signal.SIGKILL)
    outcome = result.wait()
    assert outcome.outcome == "lost"
    assert "the job server ended" in outcome.error
    wait_for(lambda: not _alive(running.pid), what="the orphan to be killed")
    _, outcome, _ = run(executor, assignment(tmp_path, "pass"))
    assert outcome.outcome == "succeeded"
    assert executor.server_pid not in (None, old)


def test_a_killed_worker_takes_the_scripts_tree_with_it(tmp_path):
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
    owner = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import sys, threading
        from msp.executor import Assignment, SubprocessExecutor
        ex = SubprocessExecutor(sys.executable)
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



def test_a_script_changed_since_it_compiled_is_checked_again(executor,
                                                            tmp_path):
    good = assignment(tmp_path, "print('fine')\n")
    _, outcome, _ = run(executor, good)
    assert outcome.outcome == "succeeded"
    # The same file, now broken: the check must not trust what it saw.
    with open(good.script, "w") as f:
        f.write("def broken(:\n")
    again = dataclasses.replace(good, job=good.job + 10_000,
                                token="again0123456789")
    result = Result()
    assert executor.start(again, result) is None
    assert result.outcomes[0].outcome == "error"
    assert "SyntaxError" in result.outcomes[0].error
