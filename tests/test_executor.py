"""The subprocess executor and its job server, with real processes.

Each test waits on conditions with a deadline, never a fixed sleep.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import pytest

from msp.executor import SubprocessExecutor

from .test_forkserver import Result, _alive, assignment, read, run


@pytest.fixture
def executor():
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": "/root",
           "LANG": "C.UTF-8", "MSP_TEST_SECRET": "do-not-leak"}
    ex = SubprocessExecutor(sys.executable, kill_grace=2.0, environ=env)
    yield ex
    ex.close()


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
