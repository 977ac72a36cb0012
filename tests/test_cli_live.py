"""mspctl while jobs run: progress, following logs, completion, usage errors."""

from __future__ import annotations

import json
import os
import re
import select
import subprocess
import sys
import time

import pexpect

from msp.worker import PROGRESS

from .conftest import BLOCK, MSP_ROOT, cli_env, run_cli

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")

# Prints a line, then another each time a file it waits for appears.
TALK = """\
import os, sys, time
def wait(name):
    path = os.path.join(os.environ["MSP_DATA_DIR"], name)
    deadline = time.monotonic() + 60
    while not os.path.exists(path) and time.monotonic() < deadline:
        time.sleep(0.02)
print("line one", flush=True)
wait("go1")
print("line two", flush=True)
wait("go2")
print("line three", flush=True)
"""


def read_line(stream, timeout=20.0) -> str:
    """One line of a child's output, or fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    line = b""
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        assert left > 0, f"no whole line in {timeout} s (got {line!r})"
        if select.select([stream], [], [], left)[0]:
            chunk = os.read(stream.fileno(), 1)
            assert chunk, f"end of output (got {line!r})"
            line += chunk
    return line.decode()


def test_logs_follow_streams_a_running_job(make_cluster, tmp_path):
    cluster = make_cluster()
    c = cluster.admin()
    job = c.submit(cluster.script("talk.py", TALK), cluster.data,
                   cluster.output())
    env = cli_env(cluster, tmp_path)
    follow = subprocess.Popen(
        [sys.executable, "-m", "msp", "logs", str(job), "--follow"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        # Each line shows while the job still runs, as it is printed.
        assert read_line(follow.stdout) == "line one\n"
        assert c.status(job)["job"]["state"] == "running"
        (cluster.data / "go1").write_text("")
        assert read_line(follow.stdout) == "line two\n"
        assert c.status(job)["job"]["state"] == "running"
        (cluster.data / "go2").write_text("")
        assert read_line(follow.stdout) == "line three\n"
        assert follow.wait(20) == 0
        assert follow.stdout.read() == b""
    finally:
        follow.kill()
        follow.wait()
        follow.stdout.close()
        follow.stderr.close()
    assert c.status(job)["job"]["state"] == "succeeded"


def test_submit_wait_and_status_show_progress_as_a_bar(make_cluster,
                                                       tmp_path):
    cluster = make_cluster()
    env = cli_env(cluster, tmp_path)
    script = cluster.script("block.py", BLOCK)
    submit = pexpect.spawn(
        sys.executable,
        ["-m", "msp", "submit", str(script), "-d", str(cluster.data),
         "-o", str(cluster.output()), "--wait", "--", "go"],
        env=env, dimensions=(24, 100), encoding="utf-8", timeout=30,
    )
    try:
        # Colours come between the words.
        submit.expect(r"running\S* \(attempt 1 of 3\)[^\r\n]*━[^\r\n]*50%")
        status = run_cli("status", "1", env=dict(env, COLUMNS="100"))
        assert status.returncode == 0, status.stderr
        [row] = [line for line in status.stdout.splitlines()
                 if line.startswith("progress")]
        assert "━" in row and row.rstrip().endswith("50%")
        (cluster.data / "go").write_text("")
        submit.expect(pexpect.EOF)
    finally:
        submit.close(force=True)
    assert submit.exitstatus == 0
    assert "job 1 succeeded after 1 attempt" in ANSI.sub("", submit.before)


def test_progress_helper_prints_the_line_the_worker_reads():
    code = (
        "import sys, msp\n"
        "msp.progress(0.4, 'half\\nway')\n"
        "msp.progress(7)\n"
        "print(sorted(m for m in sys.modules if 'zmq' in m))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True,
                          env=dict(os.environ, PYTHONPATH=MSP_ROOT),
                          timeout=30)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.splitlines()[-1] == b"[]"
    found = [(float(n), p, m) for n, p, m in PROGRESS.findall(out)]
    assert found == [(0.4, b"", b"half way"), (1.0, b"", b"")]


def test_usage_errors_are_one_red_line():
    missing = run_cli("status")
    wrong = run_cli("status", "abc")
    unknown = run_cli("bogus")

    for done in (missing, wrong, unknown):
        assert done.returncode == 2
        assert done.stderr.startswith("error: ")
        assert done.stderr.count("\n") == 1
        assert "Traceback" not in done.stderr
    assert "Missing argument 'job'" in missing.stderr
    assert "mspctl status --help" in missing.stderr
    assert "'abc'" in wrong.stderr or "integer" in wrong.stderr
    assert "No such command 'bogus'" in unknown.stderr


def test_shell_completion_script_and_completions():
    # The script is for the shell the command runs under (typer looks at
    # the parent processes): run it from bash, whatever runs the tests.
    script = subprocess.run(
        ["bash", "-c", '"$0" -m msp --show-completion; exit $?',
         sys.executable],
        capture_output=True, text=True, timeout=60,
    )
    assert script.returncode == 0, script.stderr
    assert "complete -o default -F _mspctl_completion mspctl" in script.stdout
    assert "_MSPCTL_COMPLETE=complete_bash" in script.stdout

    env = dict(os.environ, _MSPCTL_COMPLETE="complete_bash",
               COMP_WORDS="mspctl sta", COMP_CWORD="1")
    commands = run_cli(env=env)
    assert commands.returncode == 0, commands.stderr
    assert commands.stdout.split() == ["status", "stats"]
    env.update(COMP_WORDS="mspctl monitor --o", COMP_CWORD="2")
    options = run_cli(env=env)
    assert options.stdout.split() == ["--once"]


def test_every_monitor_option_has_help():
    shown = run_cli("monitor", "--help", env=dict(os.environ, COLUMNS="200"))
    assert shown.returncode == 0
    assert "Example: mspctl monitor" in shown.stdout
    for option in ("--once", "--json", "--events", "--refresh"):
        assert option in shown.stdout


def test_monitor_without_a_broker_says_so_in_one_line(tmp_path):
    token = tmp_path / "token"
    token.write_text("made-up\n")
    env = dict(os.environ, MSP_CLIENT_BROKER="tcp://127.0.0.1:9",
               MSP_CLIENT_EVENTS="tcp://127.0.0.1:9",
               MSP_CLIENT_TOKEN_FILE=str(token), MSP_CLIENT_TIMEOUT="0.2",
               MSP_CLIENT_RETRIES="1")
    env.pop("MSP_CONFIG", None)
    done = run_cli("monitor", "--once", env=env)
    assert done.returncode == 3
    assert done.stderr.count("\n") == 1
    assert "no reply from the broker" in done.stderr


HOSTILE = """\
import sys
print("[/oops] \\x1b[2J\\x1b]0;owned\\x07 [bold]loud", file=sys.stderr)
sys.exit(1)
"""


def test_a_jobs_own_text_cannot_break_or_drive_the_terminal(make_cluster,
                                                           tmp_path):
    cluster = make_cluster()
    env = dict(cli_env(cluster, tmp_path), COLUMNS="200")
    script = cluster.script("hostile.py", HOSTILE)

    done = run_cli("submit", str(script), "-d", str(cluster.data), "-o",
                   str(cluster.output()), "--attempts", "1", "--wait",
                   "--name", "[red]x\x1b[31m", env=env)
    shown = [run_cli(*args, env=env) for args in (
        ("status", "1"), ("list",), ("stats",), ("monitor", "--once"),
    )]

    assert done.returncode == 5, done.stderr
    assert "[/oops]" in done.stdout and "[bold]loud" in done.stdout
    for result in [done, *shown]:
        assert result.returncode in (0, 5), result.stderr
        assert "Traceback" not in result.stderr
        assert "\x1b" not in result.stdout and "\x07" not in result.stdout
    assert "[red]x" in shown[0].stdout and "[red]x" in shown[1].stdout
    assert "exit status 1: [/oops]" in shown[3].stdout


def _jobs_file(cluster, tmp_path, lines):
    path = tmp_path / "jobs.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" if isinstance(x, dict)
                            else x for x in lines))
    return path


def test_submit_many_queues_and_waits_for_every_job(make_cluster, tmp_path):
    cluster = make_cluster()
    env = cli_env(cluster, tmp_path)
    hello = cluster.script("hello.py", "import sys\nprint(*sys.argv[1:])\n")
    fail = cluster.script("fail.py", "raise SystemExit(3)\n")
    jobs = [{"script": str(hello), "data": str(cluster.data),
             "output": str(cluster.output(f"o{i}")), "args": [str(i)]}
            for i in range(3)]
    jobs.append({"script": str(fail), "data": str(cluster.data),
                 "output": str(cluster.output("bad")), "attempts": 1})
    path = _jobs_file(cluster, tmp_path, [jobs[0], "\n", *jobs[1:]])

    done = run_cli("submit-many", str(path), "--wait", env=env)

    assert done.returncode == 5, done.stderr
    assert "3 succeeded" in done.stdout and "1 failed" in done.stdout
    assert (cluster.output("o2") / "stdout.log").read_text() == "2\n"
    queued = run_cli("submit-many", "-", "--json", env=env,
                     input=json.dumps(jobs[0]) + "\n")
    assert queued.returncode == 0, queued.stderr
    assert json.loads(queued.stdout) == {"jobs": [5]}


def test_submit_many_names_the_bad_line(make_cluster, tmp_path):
    cluster = make_cluster(workers=0)
    env = cli_env(cluster, tmp_path)
    hello = cluster.script("hello.py", "print('hi')\n")
    good = {"script": str(hello), "data": str(cluster.data),
            "output": str(cluster.output())}
    cases = [
        (["{not json\n"], 2, "line 1: not JSON"),
        ([good, "[1, 2]\n"], 2, "line 2: not a JSON object"),
        ([dict(good, colour="red")], 2, "line 1: unknown colour"),
        ([{"script": str(hello)}], 2, "line 1: missing data, output"),
        ([dict(good, args="a b")], 2, "line 1: args must be a list"),
        ([], 2, "no jobs in it"),
        # Refused by the broker: the line, not the index, is named.
        ([good, good, dict(good, data="/nowhere")], 1,
         "lines 1 to 3: line 3: data folder /nowhere"),
    ]
    for lines, status, message in cases:
        path = _jobs_file(cluster, tmp_path, lines)
        done = run_cli("submit-many", str(path), env=env)
        assert done.returncode == status, (lines, done.stderr)
        assert message in done.stderr, (message, done.stderr)
        assert "Traceback" not in done.stderr
    assert cluster.admin().jobs() == []
