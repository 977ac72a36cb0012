"""Hostile and broken input against a real broker over real sockets.

Raw REQ and DEALER sockets send what no well-behaved peer would. Each case
checks the reply (or, where none is possible, that the broker dropped the
peer), that nothing stored changed, and that the broker still serves a
normal request afterwards.
"""

from __future__ import annotations

import json
import os
import sqlite3

import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from msp import protocol
from msp.broker import Broker

from .conftest import ADMIN_PASSWORD, Cluster, broker_config, wait_for

MAX = 16384  # the broker's max_message_size in these tests

TABLES = ("msp_job", "msp_attempt", "msp_user", "msp_session")


def state(cluster) -> dict:
    """Every row of the tables a request could change, read from the
    database file by a connection of our own."""
    db = sqlite3.connect(
        f"file:{cluster.root / 'var' / 'msp.db'}?mode=ro", uri=True
    )
    try:
        return {t: db.execute(f"SELECT * FROM {t} ORDER BY id").fetchall()
                for t in TABLES}
    finally:
        db.close()


def recv(sock, timeout=5.0):
    assert sock.poll(timeout * 1000), "no reply in time"
    return sock.recv_multipart()


def reply_of(frames) -> tuple[bytes, dict]:
    assert frames[0] == protocol.VERSION
    return frames[1], json.loads(frames[2])


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One broker for every case that must change nothing, with a logged-in
    admin and one queued job (no worker, so it stays queued)."""
    root = tmp_path_factory.mktemp("hostile")
    context = zmq.Context()
    broker = Broker(broker_config(root, max_message_size=MAX),
                    context=context, admin_password=ADMIN_PASSWORD).start()
    cluster = Cluster(root=root, broker=broker)
    cluster.admin_client = cluster.admin()
    cluster.script_path = cluster.script("ok.py", "print('hi')\n")
    cluster.job = cluster.admin_client.submit(
        cluster.script_path, cluster.data, cluster.output())
    os.symlink("/etc", root / "escape")
    os.symlink("loop", root / "loop")
    os.symlink("/tmp", root / "elsewhere")
    cluster.context = context
    yield cluster
    cluster.close()
    context.destroy(linger=0)


@pytest.fixture
def hostile(shared):
    """The shared broker, and raw sockets on it closed after the test."""
    opened = []

    def sock(kind, endpoint):
        s = shared.context.socket(kind)
        s.linger = 0
        s.connect(shared.broker.endpoints[endpoint])
        opened.append(s)
        return s

    shared.sock = sock
    yield shared
    for s in opened:
        s.close(linger=0)


def still_serving(cluster, before) -> None:
    """Nothing stored changed, and a normal request still works."""
    assert state(cluster) == before
    c = cluster.admin_client
    assert c.ping()["version"] == "MSP1"
    assert c.stats()["counts"]["queued"] == 1
    assert c.status(cluster.job)["job"]["state"] == "queued"


def body(**fields) -> bytes:
    return json.dumps(fields).encode()


# Client socket: each case is the frames after the REQ delimiter, and the
# error code the broker must answer with.
BAD_CLIENT_MESSAGES = {
    "no frames": ([], "bad_request"),
    "one frame": ([protocol.VERSION], "bad_request"),
    "two frames": ([protocol.VERSION, b"PING"], "bad_request"),
    "too many frames": ([protocol.VERSION, b"PING", b"{}", b"x"],
                        "bad_request"),
    "empty frames": ([b"", b"", b""], "version"),
    "wrong version": ([b"MSP0", b"PING", b"{}"], "version"),
    "unknown command": ([protocol.VERSION, b"DESTROY", b"{}"],
                        "unknown_command"),
    "lower-case command": ([protocol.VERSION, b"ping", b"{}"],
                           "unknown_command"),
    "not JSON": ([protocol.VERSION, b"PING", b"{nope"], "bad_request"),
    "not UTF-8": ([protocol.VERSION, b"PING", b"\xff\xfe{}"],
                  "bad_request"),
    "JSON not an object": ([protocol.VERSION, b"PING", b"[1, 2]"],
                           "bad_request"),
    "unknown field": ([protocol.VERSION, b"PING", body(x=1)], "bad_request"),
    "missing token": ([protocol.VERSION, b"STATUS", body(job=1)],
                      "bad_request"),
    "job as a string": ([protocol.VERSION, b"STATUS",
                         body(token="t", job="1")], "bad_request"),
    "job as a boolean": ([protocol.VERSION, b"STATUS",
                          body(token="t", job=True)], "bad_request"),
    "job beyond 64 bits": ([protocol.VERSION, b"STATUS",
                            b'{"token":"t","job":' + b"9" * 30 + b"}"],
                           "bad_request"),
    "NaN timeout": ([protocol.VERSION, b"WAIT",
                     b'{"token":"t","job":1,"timeout":NaN}'], "bad_request"),
    "infinite timeout": ([protocol.VERSION, b"WAIT",
                          b'{"token":"t","job":1,"timeout":1e999}'],
                         "bad_request"),
    "lone surrogate": ([protocol.VERSION, b"LOGIN",
                        b'{"user":"\\ud800","password":"xxxxxxxx"}'],
                       "bad_request"),
    "nested too deep": ([protocol.VERSION, b"PING",
                         b'{"a":' + b"[" * 1000 + b"]" * 1000 + b"}"],
                        "bad_request"),
    "body over the limit": ([protocol.VERSION, b"PING",
                             body(pad="x" * (MAX + 100))], "too_large"),
    "made-up token": ([protocol.VERSION, b"LIST", body(token="made-up")],
                      "unauthenticated"),
    "submit without login": ([protocol.VERSION, b"SUBMIT", body(
        token="", request_id="r", script="/x", data="/", output="/o",
    )], "unauthenticated"),
}


@pytest.mark.parametrize("case", sorted(BAD_CLIENT_MESSAGES))
def test_bad_client_message_gets_a_clear_error(hostile, case):
    frames, code = BAD_CLIENT_MESSAGES[case]
    before = state(hostile)
    req = hostile.sock(zmq.REQ, "client")

    req.send_multipart(frames or [b""])  # REQ cannot send zero frames
    command, reply = reply_of(recv(req))

    if not frames:
        # One empty frame after the delimiter: a version that is wrong.
        code = "bad_request"
    assert command == protocol.ERR
    assert reply["code"] == code, reply
    assert reply["message"]
    still_serving(hostile, before)


def test_message_without_req_envelope_is_answered_in_kind(hostile):
    before = state(hostile)
    dealer = hostile.sock(zmq.DEALER, "client")

    dealer.send_multipart(protocol.encode(b"PING"))
    delimiter, *frames = recv(dealer)

    assert delimiter == b""
    command, reply = reply_of(frames)
    assert command == protocol.ERR and reply["code"] == "bad_request"
    assert "delimiter" in reply["message"]
    still_serving(hostile, before)


def _disconnected(monitor) -> bool:
    while monitor.poll(0):
        if recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED:
            return True
    return False


@pytest.mark.parametrize("endpoint", ["client", "worker"])
def test_peer_sending_past_the_socket_limit_is_dropped(hostile, endpoint):
    before = state(hostile)
    dealer = hostile.sock(zmq.DEALER, endpoint)
    monitor = dealer.get_monitor_socket(zmq.EVENT_DISCONNECTED)
    try:
        frames = protocol.encode(b"PING", {"pad": "x" * (MAX * 4)})
        if endpoint == "client":
            frames = [b"", *frames]
        dealer.send_multipart(frames)

        # libzmq refuses the frame and closes the connection: the peer sees
        # its connection dropped, and no reply ever comes on it.
        wait_for(lambda: _disconnected(monitor), timeout=10,
                 message="the broker to drop the peer")
        assert not dealer.poll(0)
    finally:
        dealer.disable_monitor()
        monitor.close(linger=0)
    still_serving(hostile, before)


# Paths: each case names the script, data and output relative to the root
# (or absolute), and a phrase the error must hold.
def _paths_cases(root):
    long_name = "n" * 300
    return {
        "dot-dot out of the root": (
            f"{root}/data/../../../etc/passwd", "outside the allowed roots"),
        "symlink out of the root": (
            f"{root}/escape/passwd", "outside the allowed roots"),
        "symlink loop": (f"{root}/loop/x.py", "cannot be resolved"),
        "relative path": ("scripts/ok.py", "must be an absolute path"),
        "component too long": (
            f"{root}/{long_name}.py", "File name too long"),
        "path too long": (f"{root}/" + "a/" * 2100, "longer than"),
        "NUL byte": (f"{root}/ok\0.py", "NUL"),
        "empty": ("", "empty path"),
    }


@pytest.mark.parametrize("case", sorted(_paths_cases("R")))
def test_paths_escaping_or_unusable_are_refused(hostile, case):
    root = hostile.root
    script, phrase = _paths_cases(root)[case]
    before = state(hostile)
    req = hostile.sock(zmq.REQ, "client")

    req.send_multipart(protocol.encode(b"SUBMIT", {
        "token": hostile.admin_client.token, "request_id": case[:60],
        "script": script, "data": str(hostile.data),
        "output": str(hostile.output(case.replace(" ", "-"))),
    }))
    command, reply = reply_of(recv(req))

    assert command == protocol.ERR
    assert reply["code"] == "invalid_path", reply
    assert phrase in reply["message"], reply["message"]
    still_serving(hostile, before)


def test_output_folder_escaping_by_symlink_is_refused(hostile):
    before = state(hostile)
    req = hostile.sock(zmq.REQ, "client")

    req.send_multipart(protocol.encode(b"SUBMIT", {
        "token": hostile.admin_client.token, "request_id": "r-out",
        "script": str(hostile.script_path), "data": str(hostile.data),
        "output": str(hostile.root / "elsewhere" / "out"),
    }))
    command, reply = reply_of(recv(req))

    assert command == protocol.ERR and reply["code"] == "invalid_path"
    assert "outside the allowed roots" in reply["message"]
    still_serving(hostile, before)


def test_over_long_fields_are_refused(hostile):
    before = state(hostile)
    req = hostile.sock(zmq.REQ, "client")
    token = hostile.admin_client.token
    base = {"token": token, "request_id": "r", "script":
            str(hostile.script_path), "data": str(hostile.data),
            "output": str(hostile.output("long"))}
    cases = [
        ({**base, "request_id": "r" * 65}, "request_id"),
        ({**base, "name": "n" * 257}, "name"),
        ({**base, "args": ["a"] * 257}, "arguments"),
        ({**base, "args": ["a\0b"]}, "NUL"),
        ({**base, "priority": 10**6}, "priority"),
        ({**base, "attempts": 0}, "attempts"),
        ({**base, "timeout": -1}, "timeout"),
    ]
    for fields, phrase in cases:
        req.send_multipart(protocol.encode(b"SUBMIT", fields))
        command, reply = reply_of(recv(req))
        assert command == protocol.ERR, fields
        assert reply["code"] == "bad_request" and phrase in reply["message"]
    # Logged in, these reached the store and failed there with an internal
    # error; they are bad requests.
    for raw in (
        b'{"token":"%s","job":1%s}' % (token.encode(), b"0" * 30),
        b'{"token":"%s","job":1,"timeout":NaN}' % token.encode(),
        b'{"token":"%s","job":1,"stream":"\\udcff"}' % token.encode(),
    ):
        command = b"LOGS" if b"stream" in raw else (
            b"WAIT" if b"timeout" in raw else b"STATUS")
        req.send_multipart([protocol.VERSION, command, raw])
        reply_command, reply = reply_of(recv(req))
        assert reply_command == protocol.ERR, raw
        assert reply["code"] == "bad_request", reply
    # A user name far past the column's size logs nobody in.
    req.send_multipart(protocol.encode(
        b"LOGIN", {"user": "u" * 3000, "password": "p" * 10}))
    command, reply = reply_of(recv(req))
    assert command == protocol.ERR and reply["code"] == "unauthenticated"
    still_serving(hostile, before)


# The worker socket. Replies come as ERROR messages on the same DEALER.

BAD_WORKER_MESSAGES = {
    "one frame": ([protocol.VERSION], "bad_request"),
    "too many frames": ([protocol.VERSION, b"READY", body(name="w"), b""],
                        "bad_request"),
    "empty frames": ([b"", b"", b""], "version"),
    "wrong version": ([b"MSP9", b"READY", body(name="w")], "version"),
    "unknown command": ([protocol.VERSION, b"SHUTDOWN", b"{}"],
                        "unknown_command"),
    "client command": ([protocol.VERSION, b"PING", b"{}"],
                       "unknown_command"),
    "not JSON": ([protocol.VERSION, b"READY", b"name=w"], "bad_request"),
    "name missing": ([protocol.VERSION, b"READY", b"{}"], "bad_request"),
    "name a number": ([protocol.VERSION, b"READY", body(name=5)],
                      "bad_request"),
    "lone surrogate name": ([protocol.VERSION, b"READY",
                             b'{"name":"\\udc80"}'], "bad_request"),
    "job beyond 64 bits": ([protocol.VERSION, b"READY",
                            b'{"name":"w","job":1' + b"0" * 25 +
                            b',"token":"t"}'], "bad_request"),
    "heartbeat before READY": ([*protocol.encode(protocol.HEARTBEAT)],
                               "not_ready"),
    "result before READY": ([*protocol.encode(protocol.RESULT, {
        "job": 1, "token": "t", "outcome": "succeeded"})], "not_ready"),
}


@pytest.mark.parametrize("case", sorted(BAD_WORKER_MESSAGES))
def test_bad_worker_message_gets_an_error(hostile, case):
    frames, code = BAD_WORKER_MESSAGES[case]
    before = state(hostile)
    dealer = hostile.sock(zmq.DEALER, "worker")

    dealer.send_multipart(frames)
    command, reply = reply_of(recv(dealer))

    assert command == protocol.ERROR
    assert reply["code"] == code, reply
    # The broker did not take it for a worker, nor gave it the queued job.
    assert hostile.admin_client.workers() == []
    still_serving(hostile, before)


def test_worker_reports_out_of_turn_change_nothing(make_cluster,
                                                  zmq_context):
    """A worker that holds a job sends reports with wrong tokens, for jobs
    it does not hold, and with a made-up outcome: each is refused and the
    job stays as it was, until the right RESULT ends it once."""
    hostile = make_cluster(workers=0)
    c = hostile.admin()
    hostile.job = c.submit(hostile.script("ok.py", ""), hostile.data,
                           hostile.output())
    dealer = zmq_context.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.connect(hostile.worker_endpoint)
    dealer.send_multipart(protocol.encode(protocol.READY, {"name": "fake"}))
    while True:
        command, assign = reply_of(recv(dealer))
        if command == protocol.ASSIGN:
            break
    job, token = assign["job"], assign["token"]
    assert job == hostile.job
    wait_for(lambda: c.status(job)["job"]["state"] == "running")
    before = state(hostile)

    def refused(command, fields, code):
        dealer.send_multipart(protocol.encode(command, fields))
        while True:
            reply_command, reply = reply_of(recv(dealer))
            if reply_command != protocol.HEARTBEAT:
                break
        assert reply_command == protocol.ERROR, (command, fields)
        assert reply["code"] == code, reply
        return reply

    refused(protocol.STARTED, {"job": job, "token": "wrong"}, "stale")
    refused(protocol.PROGRESS, {"job": job, "token": "wrong", "value": 0.5},
            "stale")
    refused(protocol.STARTED, {"job": job + 1000, "token": token}, "stale")
    reply = refused(protocol.RESULT, {"job": job, "token": "wrong",
                                      "outcome": "succeeded"}, "stale")
    assert (reply["job"], reply["token"]) == (job, "wrong")
    refused(protocol.RESULT, {"job": job + 1000, "token": token,
                              "outcome": "succeeded"}, "stale")
    refused(protocol.RESULT, {"job": job, "token": token,
                              "outcome": "exploded"}, "bad_request")
    refused(protocol.RESULT, {"job": job, "token": token,
                              "outcome": "succeeded", "exit_code": "0"},
            "bad_request")
    assert state(hostile) == before
    assert c.status(job)["job"]["state"] == "running"

    # The right RESULT, twice: recorded once, acknowledged both times.
    result = {"job": job, "token": token, "outcome": "succeeded",
              "exit_code": 0, "output": False}
    for _ in range(2):
        dealer.send_multipart(protocol.encode(protocol.RESULT, result))
        while True:
            reply_command, reply = reply_of(recv(dealer))
            if reply_command != protocol.HEARTBEAT:
                break
        assert reply_command == protocol.ACK
        assert reply == {"job": job, "token": token}
    status = c.status(job)
    assert status["job"]["state"] == "succeeded"
    assert [a["outcome"] for a in status["attempts"]] == ["succeeded"]


def test_wrong_worker_secret_is_refused(make_cluster, zmq_context):
    cluster = make_cluster(workers=0, worker_secret="s3cret-s3cret")
    admin = cluster.admin()
    dealer = zmq_context.socket(zmq.DEALER)
    dealer.linger = 0
    dealer.connect(cluster.worker_endpoint)

    dealer.send_multipart(protocol.encode(
        protocol.READY, {"name": "intruder", "secret": "guess"}))
    command, reply = reply_of(recv(dealer))

    assert command == protocol.ERROR and reply["code"] == "unauthenticated"
    assert admin.workers() == []


def test_same_name_claiming_a_job_under_another_token(make_cluster,
                                                      zmq_context):
    """A second socket with a worker's name claims that worker's job under
    a token the job does not have: the claim is refused (told to stop) and
    the job, whose holder is now gone, is lost and queued again rather
    than left running with nobody on it."""
    cluster = make_cluster(workers=0)
    c = cluster.admin()
    job = c.submit(cluster.script("ok.py", ""), cluster.data,
                   cluster.output())
    first = zmq_context.socket(zmq.DEALER)
    first.linger = 0
    first.connect(cluster.worker_endpoint)
    first.send_multipart(protocol.encode(protocol.READY, {"name": "twin"}))
    while reply_of(recv(first))[0] != protocol.ASSIGN:
        pass
    second = zmq_context.socket(zmq.DEALER)
    second.linger = 0
    second.connect(cluster.worker_endpoint)

    second.send_multipart(protocol.encode(protocol.READY, {
        "name": "twin", "job": job, "token": "not-the-token"}))
    while True:
        command, body = reply_of(recv(second))
        if command != protocol.HEARTBEAT:
            break

    assert command == protocol.CANCEL
    assert body == {"job": job, "token": "not-the-token", "reason": "stale"}
    status = c.status(job)
    assert status["job"]["state"] == "queued"
    assert [a["outcome"] for a in status["attempts"]] == ["lost"]
