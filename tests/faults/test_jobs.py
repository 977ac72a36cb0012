"""Jobs that run long, too long, not at all, spawn process trees, or have
names far from ASCII, on one broker and two workers as real processes."""

from __future__ import annotations

import json
import signal

import pytest

from msp.errors import ConflictError

from ..conftest import ADMIN_PASSWORD, Processes, wait_for
from .conftest import gone, promoted, settled

pytestmark = pytest.mark.slow

# Three processes (the script, its child, the child's child) that note the
# SIGTERM they get, ignore it, and write their pids; only SIGKILL ends them.
TREE = """\
import os, pathlib, signal, subprocess, sys, time
data = pathlib.Path(os.environ["MSP_DATA_DIR"])
def noted(*_):
    (data / f"term-{os.getpid()}").write_text("")
signal.signal(signal.SIGTERM, noted)
depth = int(sys.argv[1]) if len(sys.argv) > 1 else 0
if depth < 2:
    subprocess.Popen([sys.executable, __file__, str(depth + 1)])
(data / f"pid-{depth}").write_text(str(os.getpid()))
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    time.sleep(0.05)
"""


@pytest.fixture(scope="module")
def steady(tmp_path_factory):
    """A broker and two workers that every test here shares; each test
    uses folders of its own and checks its own jobs only."""
    p = Processes(tmp_path_factory.mktemp("steady"))
    p.start_broker()
    for name in ("s1", "s2"):
        p.start_worker(name)
    c = p.client()
    wait_for(lambda: len(c.workers()) == 2, timeout=30,
             message="two workers")
    p.admin = c
    login = p.ctl("login", "admin", "--password", ADMIN_PASSWORD)
    assert login.returncode == 0, login.stderr
    yield p
    c.close()
    p.stop()


def folders(p, name, script_text, script_name="job.py"):
    base = p.root / name
    (base / "data").mkdir(parents=True)
    script = base / script_name
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(script_text)
    return script, base / "data", base / "out"


def attempt_rows(p, job) -> list[tuple[str, str, str]]:
    """(number, worker, outcome) of each row of the attempts table that
    `mspctl status` prints."""
    shown = p.ctl("status", str(job))
    assert shown.returncode == 0, shown.stderr
    rows = []
    for line in shown.stdout.splitlines():
        cells = [c.strip() for c in line.strip("│ ").split("│")]
        if len(cells) == 8 and cells[0].isdigit():
            rows.append((cells[0], cells[1], cells[4]))
    return rows


def test_cancel_stops_the_whole_process_tree(steady):
    c = steady.admin
    script, data, out = folders(steady, "tree", TREE)
    job = c.submit(script, data, out)
    pids = [int(wait_for(lambda d=d: (data / f"pid-{d}").exists()
                         and (data / f"pid-{d}").read_text(),
                         message=f"process {d} to start"))
            for d in range(3)]

    reply = c.cancel(job)

    assert reply == {"job": job, "state": "running",
                     "cancel_requested": True}
    view, attempts = settled(c, job, "cancelled", ["cancelled"])
    # Each of the three got SIGTERM first, and SIGKILL ended them all.
    wait_for(lambda: all(gone(pid) for pid in pids), timeout=10,
             message="the script, its child and grandchild to end")
    assert sorted(int(f.name[5:]) for f in data.glob("term-*")) == \
        sorted(pids)
    assert attempts[0]["exit_code"] == -signal.SIGKILL
    # Not retried; a second cancel changes nothing.
    with pytest.raises(ConflictError, match="already cancelled"):
        c.cancel(job)
    assert c.status(job)["attempts"] == attempts
    assert (out / "CANCELLED").exists()
    assert promoted(out)["status"]["state"] == "cancelled"


def test_long_job_keeps_its_worker_and_runs_once(steady):
    """Ten heartbeat intervals of work: the worker heartbeats throughout,
    so it is never taken for dead and the job never given to another."""
    c = steady.admin
    script, data, out = folders(
        steady, "long", "import time\ntime.sleep(2.0)\nprint('slept')\n")
    job = c.submit(script, data, out)

    _, attempts = settled(c, job, "succeeded", ["succeeded"])

    assert attempts[0]["wall_seconds"] >= 2.0
    assert "expired" not in steady.log("broker")
    assert sorted(w["name"] for w in c.workers()) == ["s1", "s2"]
    assert (out / "stdout.log").read_text() == "slept\n"


def test_timeout_ends_an_attempt_and_counts_as_failed(steady):
    c = steady.admin
    script, data, out = folders(
        steady, "slow", "import time\ntime.sleep(60)\n")
    job = c.submit(script, data, out, timeout=0.5, attempts=2)

    view, attempts = settled(c, job, "failed", ["timed_out", "timed_out"])

    assert (view["failures"], view["lost"]) == (2, 0)
    assert "timed out after 0.5 s" in view["error"]
    assert all(a["wall_seconds"] < 30 for a in attempts)
    assert "timed out" in (out / "FAILED").read_text()
    status = json.loads((out / "msp-status.json").read_text())
    assert (status["outcome"], status["attempt"]) == ("timed_out", 2)
    assert [row[2] for row in attempt_rows(steady, job)] == [
        "timed_out", "timed_out"]


def test_script_that_cannot_start_fails_at_once(steady):
    c = steady.admin
    script, data, out = folders(steady, "syntax", "def broken(:\n")
    job = c.submit(script, data, out, attempts=3)

    view, attempts = settled(c, job, "failed", ["error"])

    assert view["failures"] == 1 and view["max_attempts"] == 3
    assert "SyntaxError" in view["error"] and "line 1" in view["error"]
    assert "SyntaxError" in (out / "FAILED").read_text()
    assert attempt_rows(steady, job) == [("1", attempts[0]["worker"],
                                          "error")]


def test_unicode_names_work_end_to_end(steady):
    """A script, data and output folders and arguments named in several
    scripts, through mspctl and back."""
    base = steady.root / "données ü"
    script, data, out = folders(
        steady, "données ü", (
            "import os, pathlib, sys\n"
            "data = pathlib.Path(os.environ['MSP_DATA_DIR'])\n"
            "text = (data / 'entrée €.txt').read_text(encoding='utf-8')\n"
            "out = pathlib.Path(os.environ['MSP_OUTPUT_DIR'])\n"
            "(out / 'résultat ✓.txt').write_text(text.upper() + sys.argv[1],"
            " encoding='utf-8')\n"
            "print('ok', sys.argv[1])\n"
        ), script_name="ñandú/ñandú.py")
    (data / "entrée €.txt").write_text("déjà vu ", encoding="utf-8")
    out = base / "sortie 出力"

    done = steady.ctl("submit", str(script), "--data", str(data),
                      "--output", str(out), "--wait", "--json", "--",
                      "Ωmega")

    assert done.returncode == 0, done.stderr
    view = json.loads(done.stdout)
    assert view["state"] == "succeeded"
    assert view["script"] == str(script) and view["output"] == str(out)
    assert (out / "résultat ✓.txt").read_text(encoding="utf-8") == \
        "DÉJÀ VU Ωmega"
    assert (out / "stdout.log").read_text(encoding="utf-8") == "ok Ωmega\n"
    logs = steady.ctl("logs", str(view["id"]))
    assert logs.returncode == 0 and "ok Ωmega" in logs.stdout
