"""The broker's event stream, read with a real SUB socket."""

from __future__ import annotations

import pytest
import zmq

from msp import protocol
from msp.client import Events
from msp.errors import PathError

from .conftest import BLOCK, wait_for

OK = "print('ok')\n"
# Fails its first attempt, succeeds on the next.
FLAKY = "import os, sys\nsys.exit(1 if os.environ['MSP_ATTEMPT'] == '1' else 0)\n"


class Collector:
    """Every event received so far, in order."""

    def __init__(self, events: Events):
        self.events = events
        self.received: list[tuple[str, dict]] = []

    def drain(self) -> list[tuple[str, dict]]:
        while (event := self.events.receive(0)) is not None:
            self.received.append(event)
        return self.received

    def of_job(self, job: int) -> list[dict]:
        return [b for t, b in self.drain() if t == "job" and b["job"] == job]

    def ended(self, job: int, state: str) -> bool:
        return any(b["state"] == state for b in self.of_job(job))


def subscribe(cluster, context) -> Collector:
    events = Events(cluster.broker.endpoints["events"], context=context)
    collector = Collector(events)
    # The subscription is live once the first tick gets through.
    wait_for(lambda: collector.drain(), message="the first event")
    return collector


def test_every_state_change_is_published_in_order(make_cluster, zmq_context):
    cluster = make_cluster(workers=0)
    c = cluster.admin()
    seen = subscribe(cluster, zmq_context)
    ok = cluster.script("ok.py", OK)
    data = cluster.data

    # Cancelled while queued.
    cancelled = c.submit(ok, data, cluster.output("cancelled"))
    c.cancel(cancelled)

    # Lost: a worker takes the job and falls silent; a real one ends it.
    lost = c.submit(ok, data, cluster.output("lost"))
    fake = zmq_context.socket(zmq.DEALER)
    fake.linger = 0
    fake.connect(cluster.worker_endpoint)
    fake.send_multipart(protocol.encode(protocol.READY, {"name": "fake"}))
    wait_for(lambda: c.status(lost)["job"]["lost"] == 1,
             message="the silent worker's job to be lost")
    fake.close()
    cluster.add_worker()
    assert c.wait(lost, timeout=30)["state"] == "succeeded"

    # Failed once, then retried and succeeded.
    flaky = c.submit(cluster.script("flaky.py", FLAKY), data,
                     cluster.output("flaky"))
    assert c.wait(flaky, timeout=30)["state"] == "succeeded"

    # Cancelled while running, after reporting progress.
    running = c.submit(cluster.script("block.py", BLOCK), data,
                       cluster.output("running"), ["never"])
    wait_for(lambda: c.status(running)["job"]["progress"] == 0.5)
    c.cancel(running)
    assert c.wait(running, timeout=30)["state"] == "cancelled"
    wait_for(lambda: seen.ended(running, "cancelled"))

    def steps(job):
        return [(b["event"], b["state"], b["was"]) for b in seen.of_job(job)]

    assert steps(cancelled) == [
        ("queued", "queued", None), ("cancelled", "cancelled", "queued"),
    ]
    assert steps(lost) == [
        ("queued", "queued", None), ("assigned", "running", "queued"),
        ("lost", "queued", "running"), ("assigned", "running", "queued"),
        ("started", "running", "running"),
        ("succeeded", "succeeded", "running"),
    ]
    assert steps(flaky) == [
        ("queued", "queued", None), ("assigned", "running", "queued"),
        ("started", "running", "running"), ("failed", "queued", "running"),
        ("assigned", "running", "queued"), ("started", "running", "running"),
        ("succeeded", "succeeded", "running"),
    ]
    assert steps(running) == [
        ("queued", "queued", None), ("assigned", "running", "queued"),
        ("started", "running", "running"), ("progress", "running", "running"),
        ("cancel_requested", "running", "running"),
        ("cancelled", "cancelled", "running"),
    ]

    # One numbering for every topic, without a gap, in one run; times
    # never go back.
    bodies = [b for _, b in seen.received]
    seqs = [b["seq"] for b in bodies]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    assert {b["run"] for b in bodies} == {cluster.broker.run_id}
    ats = [b["at"] for b in bodies]
    assert ats == sorted(ats)
    # Each job event starts from the state the one before left.
    for job in (cancelled, lost, flaky, running):
        states = [None] + [b["state"] for b in seen.of_job(job)]
        assert [b["was"] for b in seen.of_job(job)] == states[:-1]
    # The attempts the store holds are the ones the events announced.
    assigned = [b for b in seen.of_job(flaky) if b["event"] == "assigned"]
    attempts = c.status(flaky)["attempts"]
    assert [b["attempt"] for b in assigned] == [a["number"] for a in attempts]
    assert [b["worker"] for b in assigned] == [a["worker"] for a in attempts]


def test_workers_joining_draining_and_leaving_are_published(
    make_cluster, zmq_context
):
    cluster = make_cluster(workers=0)
    c = cluster.admin()
    seen = subscribe(cluster, zmq_context)

    worker = cluster.add_worker("drainer")
    job = c.submit(cluster.script("block.py", BLOCK), cluster.data,
                   cluster.output(), ["go"])
    wait_for(lambda: c.status(job)["job"]["state"] == "running")
    worker.stop(drain=True, timeout=0)
    wait_for(lambda: any(b.get("event") == "draining"
                         for _, b in seen.drain()))

    def ticked_draining():
        return [w for t, b in seen.drain() if t == "broker"
                for w in b["workers"] if w["state"] == "draining"]

    # The ticks show the worker's state and job as they change.
    [shown, *_] = wait_for(ticked_draining)
    assert (shown["name"], shown["job"]) == ("drainer", job)
    (cluster.data / "go").write_text("")
    assert c.wait(job, timeout=30)["state"] == "succeeded"
    wait_for(lambda: any(b.get("event") == "left" for _, b in seen.drain()))

    lives = [(b["event"], b.get("job")) for t, b in seen.received
             if t == "worker"]
    assert lives == [("joined", None), ("draining", job), ("left", None)]
    assert {b["event"] for t, b in seen.received if t == "broker"} == {"tick"}
    # And the worker is gone from them once it left.
    wait_for(lambda: [b["workers"] for t, b in seen.drain()
                      if t == "broker"][-1] == [])


def test_the_broker_encodes_only_what_someone_subscribed_to(
    make_cluster, zmq_context
):
    cluster = make_cluster(workers=0)
    broker = cluster.broker
    assert broker._topics == set()

    jobs_only = zmq_context.socket(zmq.SUB)
    jobs_only.linger = 0
    jobs_only.setsockopt(zmq.SUBSCRIBE, b"job")
    jobs_only.connect(broker.endpoints["events"])
    wait_for(lambda: broker._topics == {b"job"},
             message="the subscription to reach the broker")
    c = cluster.admin()
    job = c.submit(cluster.script("ok.py", OK), cluster.data,
                   cluster.output())
    assert jobs_only.poll(5000)
    topic, body = jobs_only.recv_multipart()
    assert topic == b"job" and f'"job":{job}'.encode() in body

    jobs_only.close(0)
    wait_for(lambda: broker._topics == set(),
             message="the unsubscription to reach the broker")


def test_a_refused_submit_many_publishes_nothing(make_cluster, zmq_context,
                                                 tmp_path):
    cluster = make_cluster(workers=0)
    c = cluster.admin()
    seen = subscribe(cluster, zmq_context)
    ok = cluster.script("ok.py", OK)
    jobs = [{"script": ok, "data": cluster.data,
             "output": cluster.output(f"o{i}")} for i in range(3)]
    jobs[2]["data"] = tmp_path / "missing"

    with pytest.raises(PathError, match=r"^jobs\[2\]"):
        c.submit_many(jobs)
    job = c.submit(ok, cluster.data, cluster.output("after"))
    wait_for(lambda: seen.of_job(job), message="the queued event")

    queued = [b for t, b in seen.drain() if t == "job"]
    assert [b["job"] for b in queued] == [job]
    # Refused, the request took no event number either.
    seqs = [b["seq"] for t, b in seen.received]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


def test_prefixes_are_counted_as_subscribers_come_and_go(make_cluster,
                                                         zmq_context):
    cluster = make_cluster(workers=0)
    broker = cluster.broker
    endpoint = broker.endpoints["events"]

    def sub(*prefixes):
        s = zmq_context.socket(zmq.SUB)
        s.linger = 0
        for prefix in prefixes:
            s.setsockopt(zmq.SUBSCRIBE, prefix)
        s.connect(endpoint)
        return s

    # Many prefixes that match nothing, and a few that match.
    flood = sub(*(b"x%d" % i for i in range(500)))
    wait_for(lambda: len(broker._topics) == 500, message="the flood")
    jo, w = sub(b"jo"), sub(b"w", b"wor")
    wait_for(lambda: len(broker._topics) == 503, message="the prefixes")
    assert [broker._subscribed(t) for t in (b"job", b"worker", b"broker")] \
        == [True, True, False]
    c = cluster.admin()
    c.submit(cluster.script("ok.py", OK), cluster.data, cluster.output())
    assert jo.poll(5000) and jo.recv_multipart()[0] == b"job"

    jo.close(0)
    w.setsockopt(zmq.UNSUBSCRIBE, b"wor")
    wait_for(lambda: len(broker._topics) == 501, message="the leaving")
    assert [broker._subscribed(t) for t in (b"job", b"worker", b"broker")] \
        == [False, True, False]
    flood.close(0)
    w.close(0)
    wait_for(lambda: broker._topics == set(), message="everyone gone")
    assert not broker._subscribed(b"worker")
