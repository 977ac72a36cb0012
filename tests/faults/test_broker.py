"""The broker killed -9 and restarted; clients whose replies are lost."""

from __future__ import annotations

import signal
import threading
import time

import pytest
import zmq

from msp import protocol
from msp.client import Client

from ..conftest import ADMIN_PASSWORD, wait_for
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


def test_broker_killed_with_jobs_queued_and_running(processes, strays):
    """kill -9 the broker with two jobs running and two queued, and one
    worker killed while it is down. After a restart on the same data and
    ports every acknowledged job ends once: the running job whose worker
    came back is kept (its result, made while the broker was down, is
    recorded once); the one whose worker never came back is lost and
    re-run; the queued ones run."""
    p = start(processes, workers=("w1", "w2"))
    c = p.client()
    kept, kept_data, kept_out = gated_job(p, c, "kept")
    orphan, orphan_data, orphan_out = gated_job(p, c, "orphan")
    started(kept_data, "kept", 1)
    strays.append(started(orphan_data, "orphan", 1))
    queued = [gated_job(p, c, f"q{i}", gated="none")[0] for i in range(2)]
    keeper, doomed = holder(c, kept), holder(c, orphan)
    spare = "w3"

    p.broker.kill()
    p.broker.wait(10)
    # While it is down: the kept job ends (its worker holds the result),
    # and the orphan's worker dies for good.
    go(kept_data, "kept")
    wait_for(lambda: f"job {kept} succeeded" in p.log(keeper),
             message="the kept job to end while the broker is down")
    p.workers[doomed].kill()
    p.workers[doomed].wait(10)

    p.start_broker()
    p.start_worker(spare)
    c.close()  # its REQ socket may hold a request the old broker never saw
    c = p.client()

    _, attempts = settled(c, kept, "succeeded", ["succeeded"])
    assert attempts[0]["worker"] == keeper
    assert promoted(kept_out)["from"] == [1]
    _, attempts = settled(c, orphan, "succeeded", ["lost", "succeeded"])
    assert attempts[0]["worker"] == doomed
    assert "never came back" in attempts[0]["error"]
    assert promoted(orphan_out)["from"] == [2]
    for job in queued:
        settled(c, job, "succeeded", ["succeeded"])
    assert c.stats()["counts"] == {
        "queued": 0, "running": 0, "succeeded": 4, "failed": 0,
        "cancelled": 0,
    }
    assert f"worker {keeper} still runs job {kept}; kept" in p.log("broker")


def test_worker_back_too_late_after_a_restart_is_told_to_stop(processes):
    """The broker restarts while a worker is frozen; the worker is not back
    within the grace the broker gives it, so its job is lost and run again.
    When it does come back, its hold is stale: it is told to stop, and its
    script is stopped."""
    p = start(processes, workers=("w1", "w2"))
    c = p.client()
    job, data, out = gated_job(p, c, "late")
    pid = started(data, "late", 1)
    late = holder(c, job)
    other = ({"w1", "w2"} - {late}).pop()

    p.broker.kill()
    p.broker.wait(10)
    signal_worker(p, late, signal.SIGSTOP)
    p.start_broker()
    c.close()
    c = p.client()
    _, attempts = settled(c, job, "succeeded", ["lost", "succeeded"])
    assert [a["worker"] for a in attempts] == [late, other]
    assert "never came back" in attempts[0]["error"]
    before = c.status(job)

    signal_worker(p, late, signal.SIGCONT)

    wait_for(lambda: f"worker {late} holds job {job} under a stale token"
             in p.log("broker"), timeout=30,
             message="the late worker to be told to stop")
    wait_for(lambda: gone(pid), timeout=10,
             message="the stale attempt's script to be stopped")
    wait_for(lambda: {w["name"]: w["state"] for w in c.workers()}.get(late)
             == "idle", timeout=30, message=f"{late} to be idle again")
    assert c.status(job) == before
    assert promoted(out)["from"] == [2]


def test_cancel_asked_while_the_worker_is_away_reaches_it(processes):
    """After a restart, a job is cancelled before its worker is back (the
    broker waits 6 s for it here); the worker comes back, keeps the job,
    is told to cancel it, and the job ends cancelled after one attempt."""
    p = start(processes, workers=("w1",), MSP_BROKER_LIVENESS="10")
    c = p.client()
    job, data, out = gated_job(p, c, "away")
    pid = started(data, "away", 1)

    p.broker.kill()
    p.broker.wait(10)
    signal_worker(p, "w1", signal.SIGSTOP)
    p.start_broker()
    c.close()
    c = p.client()
    reply = c.cancel(job)
    assert reply == {"job": job, "state": "running",
                     "cancel_requested": True}
    signal_worker(p, "w1", signal.SIGCONT)

    settled(c, job, "cancelled", ["cancelled"])
    assert gone(pid)
    assert f"worker w1 still runs job {job}; kept" in p.log("broker")
    assert (out / "CANCELLED").exists()


def test_broker_restarted_twice_while_a_job_runs(processes):
    """A worker rides out two broker restarts with its job: one attempt,
    one success."""
    p = start(processes, workers=("w1",))
    c = p.client()
    job, data, out = gated_job(p, c, "r")
    started(data, "r", 1)

    for _ in range(2):
        p.broker.kill()
        p.broker.wait(10)
        p.start_broker()
        c.close()
        c = p.client()
        wait_for(lambda c=c: holder(c, job) == "w1", timeout=30,
                 message="w1 to come back with its job")
    go(data, "r")

    settled(c, job, "succeeded", ["succeeded"])
    assert promoted(out)["from"] == [1]


class DroppingProxy:
    """Stands between a client and the broker and loses the broker's first
    reply to a SUBMIT, as a network might."""

    def __init__(self, context, broker_endpoint: str):
        self.front = context.socket(zmq.ROUTER)
        self.front.linger = 0
        port = self.front.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.back = context.socket(zmq.REQ)
        self.back.linger = 0
        self.back.connect(broker_endpoint)
        self.submits: list[dict] = []
        self.dropped = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        deadline = time.monotonic() + 60
        while not self._stop.is_set() and time.monotonic() < deadline:
            if not self.front.poll(50):
                continue
            identity, empty, *request = self.front.recv_multipart()
            self.back.send_multipart(request)
            if not self.back.poll(10_000):
                return
            reply = self.back.recv_multipart()
            if request[1] == b"SUBMIT":
                self.submits.append(protocol.parse(
                    reply, {protocol.OK: {"job": ((int,), True),
                                          "created": ((bool,), True)}},
                    1 << 20).body)
                if self.dropped == 0:
                    self.dropped = 1
                    continue
            self.front.send_multipart([identity, empty, *reply])

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.front.close(linger=0)
        self.back.close(linger=0)


def test_submit_retried_after_a_lost_reply_makes_one_job(processes,
                                                        zmq_context):
    p = start(processes, workers=("w1",))
    proxy = DroppingProxy(zmq_context, p.client_endpoint)
    try:
        c = Client(proxy.endpoint, timeout=1.0, retries=3,
                   context=zmq_context)
        c.login("admin", ADMIN_PASSWORD)
        script = p.root / "ok.py"
        script.write_text("print('once')\n")
        (p.root / "data").mkdir()

        job = c.submit(script, p.root / "data", p.root / "out")
        c.close()
    finally:
        proxy.close()

    # The broker saw the submit twice and made one job of it.
    assert proxy.dropped == 1
    assert proxy.submits == [{"job": job, "created": True},
                             {"job": job, "created": False}]
    direct = p.client()
    assert [j["id"] for j in direct.jobs()] == [job]
    settled(direct, job, "succeeded", ["succeeded"])
    assert (p.root / "out" / "stdout.log").read_text() == "once\n"
