"""Liveness when the broker itself stalls, on a clock the test moves.

A tick that comes more than a heartbeat interval after the last means the
broker was not listening: a worker's silence over that time proves
nothing, so each worker gets a fresh period, but only once until it is
heard from, so a broker late at every tick still gives up a dead worker.
"""

from __future__ import annotations

from msp import protocol
from msp.broker import Broker

from .conftest import ADMIN_PASSWORD
from .core import NOW, Core

PERIOD = 0.3  # Core's 0.1 s interval times a liveness of 3


def test_a_stall_is_not_taken_for_the_workers_silence(tmp_path):
    core = Core(tmp_path)
    peers = core.broker.workers.peers
    core.step(NOW + 0.05)

    # Two seconds with no tick, the worker's deadline long past.
    core.step(NOW + 2.05)

    assert core.fake in peers
    # What it said meanwhile arrives; it stays as long as it speaks.
    core.feed("worker", [core.fake, *protocol.encode(protocol.HEARTBEAT)],
              now=NOW + 2.06)
    core.step(NOW + 2.1)
    core.step(NOW + 2.15)
    assert core.fake in peers
    # Silent from then on, it is given up one period after it last spoke.
    t = NOW + 2.15
    while core.fake in peers:
        t += 0.05
        core.step(t)
    assert NOW + 2.06 + PERIOD <= t < NOW + 2.06 + PERIOD + 0.05 + 1e-9


def test_a_dead_worker_is_given_up_though_every_tick_is_late(tmp_path):
    core = Core(tmp_path)
    job, _ = core.assign()
    peers = core.broker.workers.peers
    t = NOW

    # Every tick comes 0.25 s after the last: more than an interval.
    while core.fake in peers and t < NOW + 10:
        t += 0.25
        core.step(t)

    assert core.fake not in peers
    # Its deadline (NOW + 0.3), one fresh period, and a tick's lateness.
    assert t <= NOW + 2 * PERIOD + 0.5
    attempts = core.store.attempts(job)
    assert [a["outcome"] for a in attempts] == ["lost"]
    assert core.store.job(job)["state"] == "queued"


def test_an_orphaned_job_is_lost_though_every_tick_is_late(tmp_path):
    """After a restart, a job whose worker never comes back is lost, even
    if the new broker is late at every tick."""
    core = Core(tmp_path)
    job, _ = core.assign()
    core.broker.close()
    restarted = Broker(core.broker.config, admin_password=ADMIN_PASSWORD,
                       clock=lambda: NOW)
    restarted.open_store()
    try:
        assert list(restarted.workers.orphans) == [job]
        t = NOW
        while restarted.workers.orphans and t < NOW + 10:
            t += 0.25
            with restarted.store.atomic():
                restarted.step(t, NOW)
            restarted._outbox.clear()

        assert restarted.workers.orphans == {}
        state = restarted.store.job(job)
        assert (state["state"], state["lost"]) == ("queued", 1)
    finally:
        restarted.close()
