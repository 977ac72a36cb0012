"""Paranoid Pirate liveness, both ways, with real sockets.

A raw DEALER plays a worker against a real broker, and a raw ROUTER plays a
broker against a real worker, so each side's timing is observed directly.
"""

from __future__ import annotations

import logging
import threading
import time

import zmq

from msp import protocol
from msp.config import WorkerConfig
from msp.worker import Worker

from .conftest import wait_for


def recv(sock, timeout=5.0):
    assert sock.poll(timeout * 1000), "nothing received in time"
    return sock.recv_multipart()


def test_broker_heartbeats_a_worker_and_forgets_a_silent_one(
    make_cluster, zmq_context
):
    cluster = make_cluster(workers=0)
    admin = cluster.admin()
    peer = zmq_context.socket(zmq.DEALER)
    peer.linger = 0
    peer.connect(cluster.worker_endpoint)
    peer.send_multipart(protocol.encode(protocol.READY, {"name": "fake"}))

    # The broker heartbeats the worker it now knows.
    frames = recv(peer)
    assert frames[:2] == [protocol.VERSION, protocol.HEARTBEAT]
    assert [w["name"] for w in admin.workers()] == ["fake"]

    # Silent for liveness x interval (0.3 s): the broker drops it.
    wait_for(lambda: admin.workers() == [], timeout=5,
             message="the broker to forget a silent worker")


def test_a_heartbeat_before_ready_is_refused(make_cluster, zmq_context):
    cluster = make_cluster(workers=0)
    peer = zmq_context.socket(zmq.DEALER)
    peer.linger = 0
    peer.connect(cluster.worker_endpoint)
    peer.send_multipart(protocol.encode(protocol.HEARTBEAT))

    version, command, body = recv(peer)
    assert command == protocol.ERROR
    assert b'"not_ready"' in body
    assert cluster.admin().workers() == []


def test_worker_heartbeats_and_reconnects_with_growing_backoff(
    zmq_context, caplog
):
    caplog.set_level(logging.WARNING, logger="msp.worker")
    fake = zmq_context.socket(zmq.ROUTER)
    fake.linger = 0
    port = fake.bind_to_random_port("tcp://127.0.0.1")
    cfg = WorkerConfig(broker=f"tcp://127.0.0.1:{port}", name="w",
                       heartbeat_interval=0.2, liveness=3,
                       reconnect_min=0.2, reconnect_max=0.8)
    worker = Worker(cfg)
    thread = threading.Thread(target=worker.run, daemon=True)
    thread.start()
    try:
        identity, version, command, body = recv(fake)
        assert command == protocol.READY and b'"name":"w"' in body

        # Answered, the worker heartbeats every interval and keeps its
        # socket (a new socket would announce itself with READY).
        beats = []
        for _ in range(5):
            fake.send_multipart(
                [identity, *protocol.encode(protocol.HEARTBEAT)]
            )
            frames = recv(fake)
            beats.append((frames[0], frames[2]))
        assert beats == [(identity, protocol.HEARTBEAT)] * 5

        # Unanswered, it gives up on the socket and announces itself again
        # on a new one, after a back-off that doubles up to the ceiling.
        readies = 0
        deadline = time.monotonic() + 15
        while readies < 4 and time.monotonic() < deadline:
            if recv(fake)[2] == protocol.READY:
                readies += 1
        assert readies == 4
        delays = [r.getMessage().split("reconnecting in ")[1]
                  for r in caplog.records if "reconnecting in" in r.getMessage()]
        assert delays[:4] == ["0.2 s", "0.4 s", "0.8 s", "0.8 s"]
    finally:
        worker.stop(drain=False)
        thread.join(5)
