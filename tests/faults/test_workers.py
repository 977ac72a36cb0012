"""Workers that die, freeze, leave or vanish, as real processes."""

from __future__ import annotations

import signal

import pytest
import zmq

from msp import protocol

from ..conftest import wait_for
from .conftest import (
    gated_job,
    go,
    gone,
    holder,
    promoted,
    settled,
    signal_worker,
    start,
    started,
)

pytestmark = pytest.mark.slow


def test_worker_killed_mid_job_is_rerun_on_another(processes, strays):
    p = start(processes, workers=("w1", "w2"))
    c = p.client()
    job, data, out = gated_job(p, c, "k")
    script = started(data, "k", 1)
    strays.append(script)
    victim = holder(c, job)
    survivor = ({"w1", "w2"} - {victim}).pop()

    p.workers[victim].kill()  # SIGKILL: no goodbye, no result
    p.workers[victim].wait(10)
    # Its script goes with it, rather than run on unwatched beside the
    # attempt that replaces it.
    wait_for(lambda: gone(script), timeout=10,
             message="the dead worker's script to end")

    _, attempts = settled(c, job, "succeeded", ["lost", "succeeded"])
    assert [a["worker"] for a in attempts] == [victim, survivor]
    view = c.status(job)["job"]
    assert (view["lost"], view["failures"]) == (1, 0)
    # The output is attempt 2's alone; attempt 1's files stay aside.
    shown = promoted(out)
    assert shown["from"] == [2]
    assert shown["status"]["attempt"] == 2
    assert shown["status"]["state"] == "succeeded"
    kept = list((out / ".msp").iterdir())
    assert len(kept) == 1 and kept[0].name.startswith("attempt-1-")
    assert (kept[0] / "from-attempt-1.txt").read_text() == "1"
    assert "lost" in p.log("broker") and "re-queued" in p.log("broker")


@pytest.mark.parametrize("late", ["still running", "finished"])
def test_frozen_worker_comes_back_to_find_its_job_gone(processes, late):
    """SIGSTOP a worker past its liveness: its job is re-run elsewhere.
    SIGCONT: it is told its attempt is stale. Either it still runs it and
    is told to stop, or the attempt ended meanwhile and its late result is
    acknowledged and dropped."""
    p = start(processes, workers=("w1", "w2"))
    c = p.client()
    job, data, out = gated_job(p, c, "f")
    pid = started(data, "f", 1)
    frozen = holder(c, job)
    other = ({"w1", "w2"} - {frozen}).pop()

    signal_worker(p, frozen, signal.SIGSTOP)
    # Its silence costs it the job, which runs (ungated) on the other.
    _, attempts = settled(c, job, "succeeded", ["lost", "succeeded"])
    assert [a["worker"] for a in attempts] == [frozen, other]
    assert promoted(out)["from"] == [2]
    if late == "finished":
        go(data, "f")  # attempt 1 ends while its worker is frozen
        wait_for(lambda: gone(pid), message="attempt 1 to end")
    before = c.status(job)

    signal_worker(p, frozen, signal.SIGCONT)

    # It comes back, is told to stop, reports, and is idle again.
    wait_for(lambda: "under a stale token; told to stop" in p.log("broker"),
             timeout=30, message="the broker to tell the worker to stop")
    wait_for(lambda: {w["name"]: w["state"] for w in c.workers()}.get(frozen)
             == "idle", timeout=30, message=f"{frozen} to be idle")
    if late == "still running":
        wait_for(lambda: gone(pid), timeout=10,
                 message="the stale attempt to be stopped")
        assert "job %d cancelled" % job in p.log(frozen) or \
            f"job {job} stale" in p.log(frozen)
    assert c.status(job) == before
    assert promoted(out)["from"] == [2]
    assert promoted(out)["status"]["attempt"] == 2


def test_worker_drains_its_job_on_sigterm(processes):
    p = start(processes, workers=("w1",))
    c = p.client()
    job, data, out = gated_job(p, c, "d")
    started(data, "d", 1)
    queued, _, _ = gated_job(p, c, "q", gated="none")

    signal_worker(p, "w1", signal.SIGTERM)
    wait_for(lambda: [w["state"] for w in c.workers()] == ["draining"],
             message="w1 to be draining")
    # It gets nothing new while draining: the second job stays queued.
    assert c.status(queued)["job"]["state"] == "queued"
    go(data, "d")

    settled(c, job, "succeeded", ["succeeded"])
    assert p.workers["w1"].wait(30) == 0
    assert "w1 is draining" in p.log("broker")
    assert c.workers() == []
    view = c.status(queued)
    assert view["job"]["state"] == "queued" and view["attempts"] == []
    assert promoted(out)["from"] == [1]

    p.start_worker("w2")
    _, attempts = settled(c, queued, "succeeded", ["succeeded"])
    assert attempts[0]["worker"] == "w2"


def test_worker_past_its_drain_timeout_gives_the_job_back(processes):
    p = start(processes, workers=("w1", "w2"), MSP_WORKER_DRAIN_TIMEOUT="0.5")
    c = p.client()
    job, data, out = gated_job(p, c, "t")
    started(data, "t", 1)
    leaving = holder(c, job)
    staying = ({"w1", "w2"} - {leaving}).pop()

    signal_worker(p, leaving, signal.SIGTERM)

    _, attempts = settled(c, job, "succeeded", ["lost", "succeeded"])
    assert [a["worker"] for a in attempts] == [leaving, staying]
    assert "gave the attempt up" in attempts[0]["error"]
    assert p.workers[leaving].wait(30) == 0
    assert promoted(out)["from"] == [2]


def test_job_lost_too_often_fails(processes, zmq_context):
    """Workers that take the job and die (here: raw sockets that fall
    silent) lose it; past max_lost the job fails, no attempt spent."""
    p = start(processes, workers=(), MSP_BROKER_MAX_LOST="2")
    c = p.client()
    script = p.root / "ok.py"
    script.write_text("print('never runs')\n")
    (p.root / "data").mkdir()
    out = p.root / "out"
    job = c.submit(script, p.root / "data", out)

    for n in range(3):
        dead = zmq_context.socket(zmq.DEALER)
        dead.linger = 0
        dead.connect(p.worker_endpoint)
        dead.send_multipart(protocol.encode(protocol.READY,
                                            {"name": f"doomed-{n}"}))
        while True:
            assert dead.poll(10_000), "no ASSIGN"
            frames = dead.recv_multipart()
            if frames[1] == protocol.ASSIGN:
                break
        dead.close(linger=0)  # and never a word again
        wait_for(lambda n=n: c.status(job)["job"]["lost"] == n + 1,
                 timeout=20, message=f"loss {n + 1}")

    view, attempts = settled(c, job, "failed", ["lost"] * 3)
    assert (view["lost"], view["failures"]) == (3, 0)
    assert "lost 3 times" in view["error"]
    assert [a["worker"] for a in attempts] == [
        "doomed-0", "doomed-1", "doomed-2"]
    assert "lost 3 times" in (out / "FAILED").read_text()
    assert promoted(out)["status"]["state"] == "failed"
