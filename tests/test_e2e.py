"""A real broker and real workers run real scripts over tcp, ipc, inproc."""

from __future__ import annotations

import json

import pytest

from msp.errors import (
    AuthError, ConflictError, NotFoundError, PathError, ProtocolError,
)

from .conftest import wait_for

WRITE = """\
import os, sys
print("hello from", os.environ["MSP_JOB_ID"], *sys.argv[1:])
data = os.environ["MSP_DATA_DIR"]
with open(os.path.join(os.environ["MSP_OUTPUT_DIR"], "result.txt"), "w") as f:
    f.write(open(os.path.join(data, "in.txt")).read().upper())
print("oops", file=sys.stderr)
"""

FAIL = """\
import sys
print("broken on purpose", file=sys.stderr)
sys.exit(1)
"""

SLEEP = """\
import time
time.sleep(60)
"""


def test_job_runs_and_writes_its_output(make_cluster, transport):
    cluster = make_cluster(transport)
    (cluster.data / "in.txt").write_text("some words")
    script = cluster.script("write.py", WRITE)
    out = cluster.output()
    c = cluster.admin()

    job = c.submit(script, cluster.data, out, ["a", "b c"])
    view = c.wait(job, timeout=30)

    assert view["state"] == "succeeded"
    assert view["attempts"] == 1 and view["exit_code"] == 0
    assert (out / "result.txt").read_text() == "SOME WORDS"
    assert (out / "stdout.log").read_text() == f"hello from {job} a b c\n"
    assert (out / "stderr.log").read_text() == "oops\n"
    status = json.loads((out / "msp-status.json").read_text())
    assert status["state"] == "succeeded" and status["job"] == job
    assert c.logs(job)["data"] == f"hello from {job} a b c\n"
    assert c.logs(job, "stderr")["data"] == "oops\n"


def test_failing_script_is_attempted_three_times_then_failed(
    make_cluster, transport
):
    cluster = make_cluster(transport)
    c = cluster.admin()
    out = cluster.output()

    job = c.submit(cluster.script("fail.py", FAIL), cluster.data, out)
    view = c.wait(job, timeout=30)

    assert view["state"] == "failed"
    assert view["attempts"] == 3 and view["failures"] == 3
    assert view["exit_code"] == 1
    assert "broken on purpose" in view["error"]
    attempts = c.status(job)["attempts"]
    assert [a["outcome"] for a in attempts] == ["failed"] * 3
    assert [a["number"] for a in attempts] == [1, 2, 3]
    assert "broken on purpose" in (out / "FAILED").read_text()
    # The logs of the first two attempts are kept beside the output.
    kept = sorted(p.name for p in (out / ".msp").iterdir())
    assert len(kept) == 2 and kept[0].startswith("attempt-1-")


def test_invalid_path_is_refused_and_nothing_stored(make_cluster, transport):
    cluster = make_cluster(transport, workers=0)
    c = cluster.admin()
    script = cluster.script("ok.py", "print('hi')\n")

    with pytest.raises(PathError) as caught:
        c.submit(cluster.root / "missing.py", cluster.data, cluster.output())
    assert "missing.py" in str(caught.value)
    assert "not an existing file" in str(caught.value)
    with pytest.raises(PathError, match="outside the allowed roots"):
        c.submit("/etc/hostname", cluster.data, cluster.output())
    with pytest.raises(PathError, match="inside the data folder"):
        c.submit(script, cluster.data, cluster.data / "out")

    assert c.jobs() == []
    assert c.stats()["counts"]["queued"] == 0


def test_queued_job_is_cancelled_and_never_runs(make_cluster, transport):
    cluster = make_cluster(transport, workers=0)
    c = cluster.admin()
    out = cluster.output()
    job = c.submit(cluster.script("ok.py", "print('hi')\n"), cluster.data, out)

    assert c.cancel(job) == {"job": job, "state": "cancelled"}
    cluster.add_worker()

    view = c.wait(job, timeout=5)
    assert view["state"] == "cancelled" and view["attempts"] == 0
    assert c.status(job)["attempts"] == []
    with pytest.raises(ConflictError, match="already cancelled"):
        c.cancel(job)
    # The worker is idle: it was never given the job.
    wait_for(lambda: c.workers() and c.workers()[0]["state"] == "idle")
    assert not (out / "stdout.log").exists()


def test_running_job_is_cancelled(make_cluster):
    cluster = make_cluster()
    c = cluster.admin()
    job = c.submit(cluster.script("sleep.py", SLEEP), cluster.data,
                   cluster.output())
    wait_for(lambda: c.status(job)["job"]["state"] == "running")

    reply = c.cancel(job)
    view = c.wait(job, timeout=20)

    assert reply["cancel_requested"] is True
    assert view["state"] == "cancelled" and view["attempts"] == 1
    assert [a["outcome"] for a in c.status(job)["attempts"]] == ["cancelled"]


def test_priority_then_submission_order(make_cluster):
    cluster = make_cluster(workers=0)
    c = cluster.admin()
    script = cluster.script("ok.py", "print('hi')\n")
    low = c.submit(script, cluster.data, cluster.output("a"))
    high = c.submit(script, cluster.data, cluster.output("b"), priority=5)
    low2 = c.submit(script, cluster.data, cluster.output("c"))
    cluster.add_worker()

    for job in (low, high, low2):
        assert c.wait(job, timeout=30)["state"] == "succeeded"
    started = {j: c.status(j)["attempts"][0]["started_at"]
               for j in (low, high, low2)}
    assert sorted(started, key=started.get) == [high, low, low2]


def test_requests_need_a_login(make_cluster):
    cluster = make_cluster(workers=0)
    stranger = cluster.client()
    with pytest.raises(AuthError):
        stranger.login("admin", "wrong-password")
    with pytest.raises(AuthError):
        stranger.login("nobody", "wrong-password")
    stranger.token = "made-up"
    with pytest.raises(AuthError, match="not logged in"):
        stranger.submit(cluster.script("ok.py", ""), cluster.data,
                        cluster.output())
    with pytest.raises(AuthError):
        stranger.jobs()


def test_users_see_only_their_own_jobs(make_cluster):
    cluster = make_cluster(workers=0)
    alice, bob = cluster.user("alice"), cluster.user("bob")
    job = alice.submit(cluster.script("ok.py", ""), cluster.data,
                       cluster.output())

    assert [j["id"] for j in alice.jobs()] == [job]
    assert bob.jobs() == []
    with pytest.raises(NotFoundError):
        bob.status(job)
    with pytest.raises(NotFoundError):
        bob.cancel(job)
    assert [j["id"] for j in cluster.admin().jobs()] == [job]


def test_two_workers_share_the_queue(make_cluster):
    cluster = make_cluster(workers=2)
    c = cluster.admin()
    script = cluster.script("ok.py", "import time; time.sleep(0.2)\n")
    jobs = [c.submit(script, cluster.data, cluster.output(f"o{i}"))
            for i in range(6)]

    views = [c.wait(j, timeout=30) for j in jobs]

    assert {v["state"] for v in views} == {"succeeded"}
    ran_on = {c.status(j)["attempts"][0]["worker"] for j in jobs}
    assert ran_on == {"w1", "w2"}


def test_a_password_that_is_not_utf8_is_refused_not_fatal(make_cluster):
    # A lone surrogate survives JSON decoding but not UTF-8 encoding; it
    # once crashed the broker from inside the password hashing thread.
    cluster = make_cluster(workers=0)
    c = cluster.admin()
    with pytest.raises(ProtocolError, match="UTF-8"):
        cluster.client().login("admin", "\ud800\ud800\ud800\ud800")
    with pytest.raises(ProtocolError, match="UTF-8"):
        c.user_add("eve", "\ud800" * 10)
    assert c.ping()["version"] == "MSP1"


def test_a_worker_with_the_wrong_secret_is_refused_and_stops(make_cluster):
    from msp.errors import MspError

    cluster = make_cluster(workers=0, worker_secret="right-secret")
    with pytest.raises(MspError, match="wrong worker secret"):
        cluster.add_worker(secret="wrong-secret")
    assert cluster.admin().workers() == []
    good = cluster.add_worker(name="good", secret="right-secret")
    assert good.refused is None
    assert [w["name"] for w in cluster.admin().workers()] == ["good"]


def test_a_script_cannot_clobber_msps_own_files(make_cluster):
    cluster = make_cluster()
    c = cluster.admin()
    out = cluster.output()
    script = cluster.script("sneaky.py", """\
import os
os.makedirs(".msp/x", exist_ok=True)
open("msp-status.json", "w").write("forged")
open("kept.txt", "w").write("mine")
""")
    job = c.submit(script, cluster.data, out)
    assert c.wait(job, timeout=30)["state"] == "succeeded"
    assert (out / "kept.txt").read_text() == "mine"
    assert json.loads((out / "msp-status.json").read_text())["job"] == job


def test_a_retried_submit_makes_one_job(make_cluster):
    cluster = make_cluster(workers=0)
    c = cluster.admin()
    script = cluster.script("ok.py", "")
    body = {"token": c.token, "request_id": "same-request",
            "script": str(script), "data": str(cluster.data),
            "output": str(cluster.output())}
    first = c.request("SUBMIT", body)
    again = c.request("SUBMIT", body)
    assert first == {"job": first["job"], "created": True}
    assert again == {"job": first["job"], "created": False}
    assert len(c.jobs()) == 1


def test_status_does_not_show_attempt_tokens(make_cluster):
    cluster = make_cluster()
    c = cluster.admin()
    job = c.submit(cluster.script("ok.py", ""), cluster.data,
                   cluster.output())
    c.wait(job, timeout=30)
    attempts = c.status(job)["attempts"]
    assert len(attempts) == 1 and "token" not in attempts[0]


def test_progress_lines_reach_the_job(make_cluster):
    cluster = make_cluster()
    c = cluster.admin()
    flag = cluster.root / "go"
    script = cluster.script("progress.py", f"""\
import os, time
print("msp:progress 0.25")
print("not progress")
print("msp:progress 60% halfway\\r")
deadline = time.time() + 30
while not os.path.exists({str(flag)!r}) and time.time() < deadline:
    time.sleep(0.02)
""")
    job = c.submit(script, cluster.data, cluster.output())
    view = wait_for(lambda: (v := c.status(job)["job"])["progress"] == 0.6
                    and v, timeout=20, message="progress 0.6")
    assert view["state"] == "running"
    flag.touch()
    assert c.wait(job, timeout=30)["state"] == "succeeded"
