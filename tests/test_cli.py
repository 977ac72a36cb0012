"""mspctl in real processes against a real broker and worker."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from msp.cli import app

from .conftest import ADMIN_PASSWORD, run_cli

HELLO = "import sys\nprint('hello', *sys.argv[1:])\n"


def test_help_lists_the_commands():
    result = run_cli("--help")
    assert result.returncode == 0
    for command in ("broker", "worker", "user", "login", "submit", "status",
                    "list", "cancel", "logs", "workers", "stats"):
        assert command in result.stdout


def test_every_command_has_an_example():
    runner = CliRunner()
    commands = ("login", "logout", "submit", "submit-many", "status",
                "list", "cancel",
                "logs", "wait", "workers", "stats", "monitor", "broker",
                "worker", "audit", "billing")
    for command in commands:
        result = runner.invoke(app, [command, "--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, result.output
        assert "Example: mspctl" in result.output, command
    for command in ("add", "list", "disable", "passwd", "limit"):
        result = runner.invoke(app, ["user", command, "--help"],
                               env={"COLUMNS": "200"})
        assert "Example: mspctl user" in result.output, command
    result = runner.invoke(app, ["keys", "generate", "--help"],
                           env={"COLUMNS": "200"})
    assert "Example: mspctl keys generate" in result.output


def test_a_user_session_from_login_to_logs(processes):
    p = processes()
    p.start_broker()
    p.start_worker("w1")
    script = p.root / "hello.py"
    script.write_text(HELLO)
    (p.root / "data").mkdir()

    assert p.ctl("login", "admin", "--password", ADMIN_PASSWORD).returncode == 0
    added = p.ctl("user", "add", "alice", "--password", "alice-password")
    assert added.returncode == 0, added.stderr
    assert p.ctl("login", "alice", "--password",
                 "alice-password").returncode == 0
    token_file = p.root / "token"
    assert token_file.stat().st_mode & 0o777 == 0o600

    done = p.ctl("submit", str(script), "--data", str(p.root / "data"),
                 "--output", str(p.root / "out"), "--wait", "--json",
                 "--", "x", "--y")
    assert done.returncode == 0, done.stderr
    view = json.loads(done.stdout)
    assert view["state"] == "succeeded"
    job = str(view["id"])

    logs = p.ctl("logs", job)
    assert logs.returncode == 0 and logs.stdout == "hello x --y\n"
    listed = json.loads(p.ctl("list", "--json").stdout)
    assert [j["id"] for j in listed] == [view["id"]]
    status = json.loads(p.ctl("status", job, "--json").stdout)
    assert status["attempts"][0]["outcome"] == "succeeded"
    shown = p.ctl("status", job)
    assert shown.returncode == 0 and "succeeded" in shown.stdout
    again = p.ctl("cancel", job)
    assert again.returncode == 1
    assert "already succeeded" in again.stderr


def test_errors_are_one_line_and_a_status(processes):
    p = processes()
    p.start_broker()

    not_logged_in = p.ctl("list")
    assert not_logged_in.returncode == 4
    assert not_logged_in.stderr.strip().count("\n") == 0
    assert "not logged in" in not_logged_in.stderr

    bad = p.ctl("login", "admin", "--password", "nope-nope")
    assert bad.returncode == 4
    assert "wrong user name or password" in bad.stderr

    p.ctl("login", "admin", "--password", ADMIN_PASSWORD)
    refused = p.ctl("submit", "/nonexistent.py", "--data", str(p.root),
                    "--output", str(p.root / "o"))
    assert refused.returncode == 1
    assert "/nonexistent.py" in refused.stderr

    p.broker.terminate()
    p.broker.wait(10)
    p.env["MSP_CLIENT_TIMEOUT"] = "0.3"
    gone = p.ctl("list")
    assert gone.returncode == 3
    assert "no reply from the broker" in gone.stderr


def test_exit_statuses_say_what_happened(processes):
    p = processes()
    p.start_broker()
    p.start_worker("w1")
    fail = p.root / "fail.py"
    fail.write_text("raise SystemExit(3)\n")
    (p.root / "data").mkdir()
    p.ctl("login", "admin", "--password", ADMIN_PASSWORD)

    failed = p.ctl("submit", str(fail), "-d", str(p.root / "data"),
                   "-o", str(p.root / "out"), "--attempts", "1", "--wait")
    assert failed.returncode == 5, failed.stdout + failed.stderr
    assert "failed" in failed.stdout
    job = p.client().jobs()[0]["id"]
    assert p.ctl("wait", str(job)).returncode == 5

    assert p.ctl("bogus").returncode == 2
    assert p.ctl("list", "--state", "FAILED").returncode == 2
    assert p.ctl("list", "--since", "-5").returncode == 2
    bad = p.ctl("--broker", "localhost:5555", "list")
    assert bad.returncode == 2 and "tcp://127.0.0.1:5555" in bad.stderr


def test_a_worker_refused_by_the_broker_exits_4(processes):
    p = processes(MSP_BROKER_WORKER_SECRET="right")
    p.start_broker()
    p.env["MSP_WORKER_SECRET"] = "wrong"
    worker = p.start_worker("rogue")
    assert worker.wait(30) == 4
    assert "wrong worker secret" in p.log("rogue")


def test_a_broker_whose_port_is_taken_says_so_and_leaves_nothing(processes):
    first = processes()
    first.start_broker()
    second = processes()
    second.env["MSP_BROKER_CLIENT_ENDPOINT"] = first.client_endpoint
    result = run_cli("broker", env=second.env, timeout=30)
    assert result.returncode != 0
    assert "cannot bind the client endpoint" in result.stderr
    assert "[broker] client_endpoint" in result.stderr
    assert "MSP_BROKER_CLIENT_ENDPOINT" in result.stderr
    assert not (second.root / "var").exists()
