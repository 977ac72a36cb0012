"""What a real worker does with a CANCEL for another attempt, an ASSIGN
while it leaves, an ERROR refusing its result (against a raw ROUTER
playing the broker), and how it says goodbye (against a real broker)."""

from __future__ import annotations

import json
import logging
import threading

import pytest
import zmq

from msp import protocol
from msp.config import WorkerConfig
from msp.worker import Worker

from ..conftest import wait_for

WAIT_FOR_GO = """\
import os, pathlib, time
data = pathlib.Path(os.environ["MSP_DATA_DIR"])
deadline = time.monotonic() + 30
while not (data / "go").exists() and time.monotonic() < deadline:
    time.sleep(0.02)
"""


class FakeBroker:
    def __init__(self, context, tmp_path):
        self.sock = context.socket(zmq.ROUTER)
        self.sock.linger = 0
        port = self.sock.bind_to_random_port("tcp://127.0.0.1")
        self.endpoint = f"tcp://127.0.0.1:{port}"
        self.identity = None
        self.tmp = tmp_path

    def recv(self, skip=(protocol.HEARTBEAT,), timeout=10.0):
        """The next message that is not a heartbeat (answered, so the
        worker never takes us for dead): (command, body)."""
        while True:
            assert self.sock.poll(timeout * 1000), "the worker said nothing"
            identity, _, command, body = self.sock.recv_multipart()
            self.identity = identity
            if command == protocol.HEARTBEAT:
                self.send(protocol.HEARTBEAT)
            if command not in skip:
                return command, json.loads(body)

    def send(self, command, body=None):
        self.sock.send_multipart([self.identity,
                                  *protocol.encode(command, body)])

    def assign(self, job, token, script):
        data = self.tmp / f"data{job}"
        data.mkdir(exist_ok=True)
        self.send(protocol.ASSIGN, {
            "job": job, "token": token, "attempt": 1, "script": str(script),
            "args": [], "data": str(data),
            "output": str(self.tmp / f"out{job}"), "timeout": None,
        })
        return data


@pytest.fixture
def fake(zmq_context, tmp_path):
    broker = FakeBroker(zmq_context, tmp_path)
    script = tmp_path / "wait.py"
    script.write_text(WAIT_FOR_GO)
    broker.script = script
    cfg = WorkerConfig(broker=broker.endpoint, name="w", heartbeat_interval=0.1,
                       liveness=3, reconnect_min=0.1, reconnect_max=0.2,
                       kill_grace=1.0, drain_timeout=30.0)
    worker = Worker(cfg, context=zmq_context)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    command, body = broker.recv()
    assert command == protocol.READY and body["name"] == "w"
    broker.send(protocol.HEARTBEAT)
    broker.worker, broker.thread = worker, thread
    yield broker
    worker.stop(drain=False)
    thread.join(10)
    broker.sock.close(linger=0)


def test_cancel_for_another_attempt_of_the_job_is_ignored(fake):
    data = fake.assign(7, "current", fake.script)
    assert fake.recv() == (protocol.STARTED, {"job": 7, "token": "current"})

    fake.send(protocol.CANCEL, {"job": 7, "token": "older",
                                "reason": "stale"})
    # Still running: the job ends when told to go, as a success.
    (data / "go").write_text("")
    command, body = fake.recv()
    assert command == protocol.RESULT
    assert (body["job"], body["token"], body["outcome"]) == (
        7, "current", "succeeded")


def test_cancel_with_the_attempts_token_stops_it(fake):
    fake.assign(8, "current", fake.script)
    fake.recv()  # STARTED

    fake.send(protocol.CANCEL, {"job": 8, "token": "current",
                                "reason": "cancelled"})

    command, body = fake.recv()
    assert command == protocol.RESULT
    assert (body["job"], body["outcome"]) == (8, "cancelled")


def test_assignment_crossing_the_workers_goodbye_is_handed_back(fake):
    data = fake.assign(1, "t1", fake.script)
    fake.recv()  # STARTED
    fake.worker.stop(drain=True, timeout=0)
    assert fake.recv() == (protocol.BYE, {})

    fake.assign(2, "t2", fake.script)

    command, body = fake.recv()
    assert command == protocol.RESULT
    assert (body["job"], body["token"], body["outcome"]) == (2, "t2", "lost")
    assert "leaving" in body["error"]
    # The job it holds still ends, then the worker leaves.
    (data / "go").write_text("")
    command, body = fake.recv()
    assert (command, body["job"], body["outcome"]) == (
        protocol.RESULT, 1, "succeeded")
    fake.send(protocol.ACK, {"job": 1, "token": "t1"})
    fake.thread.join(10)
    assert not fake.thread.is_alive()


def test_result_the_broker_refuses_is_not_sent_again(fake):
    data = fake.assign(3, "t3", fake.script)
    fake.recv()  # STARTED
    (data / "go").write_text("")
    command, body = fake.recv()
    assert (command, body["job"]) == (protocol.RESULT, 3)

    fake.send(protocol.ERROR, {"code": "stale", "message": "never assigned",
                               "job": 3, "token": "t3"})

    # Unacknowledged results are sent again every two intervals; this one
    # is not: the next twelve messages (over a second) are all heartbeats.
    seen = [fake.recv(skip=())[0] for _ in range(12)]
    assert set(seen) == {protocol.HEARTBEAT}
    wait_for(lambda: fake.worker._result is None)


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_idle_worker_says_goodbye_before_it_goes(make_cluster, caplog,
                                                 transport):
    """An idle worker told to stop leaves at once; its BYE must still
    reach the broker, or the broker would count it idle (and give it a job
    to lose) until its liveness ran out."""
    caplog.set_level(logging.INFO, logger="msp.broker.workers")
    cluster = make_cluster(transport, workers=1)
    admin = cluster.admin()
    worker = cluster.workers[0]

    worker.stop(drain=True, timeout=10)

    wait_for(lambda: admin.workers() == [], message="the worker to go")
    said = [r.getMessage() for r in caplog.records]
    assert "worker w1 left" in said
    assert not [m for m in said if "expired" in m]


def test_worker_holding_a_job_knocks_at_least_once_a_period(
    zmq_context, tmp_path, caplog
):
    """A silent broker makes an idle worker back off up to reconnect_max;
    a worker holding a job must come back within the grace a restarted
    broker gives it (three liveness periods), so it waits one period at
    most between tries."""
    caplog.set_level(logging.WARNING, logger="msp.worker")
    fake = FakeBroker(zmq_context, tmp_path)
    script = tmp_path / "wait.py"
    script.write_text(WAIT_FOR_GO)
    cfg = WorkerConfig(broker=fake.endpoint, name="w", heartbeat_interval=0.1,
                       liveness=3, reconnect_min=0.2, reconnect_max=30.0,
                       kill_grace=1.0)
    worker = Worker(cfg, context=zmq_context)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        assert fake.recv()[0] == protocol.READY
        data = fake.assign(5, "t5", script)
        assert fake.recv()[0] == protocol.STARTED

        # Now silent: count the worker's new sockets, each saying it
        # still holds job 5.
        readies = []
        while len(readies) < 4:
            assert fake.sock.poll(10_000), "the worker stopped knocking"
            _, _, command, body = fake.sock.recv_multipart()
            if command == protocol.READY:
                readies.append(json.loads(body))
        assert {(r["job"], r["token"]) for r in readies} == {(5, "t5")}
        delays = [r.getMessage().split("reconnecting in ")[1]
                  for r in caplog.records
                  if "reconnecting in" in r.getMessage()]
        assert delays[:4] == ["0.2 s", "0.3 s", "0.3 s", "0.3 s"]
        (data / "go").write_text("")
    finally:
        worker.stop(drain=False)
        thread.join(10)
        fake.sock.close(linger=0)
