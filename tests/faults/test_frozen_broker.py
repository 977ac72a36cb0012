"""The broker frozen (SIGSTOP) longer than the workers' liveness."""

from __future__ import annotations

import signal

import pytest

from ..conftest import wait_for
from .conftest import gated_job, go, holder, promoted, settled, start, started

pytestmark = pytest.mark.slow


def test_frozen_broker_keeps_the_jobs_of_workers_still_there(processes):
    """A broker that was stopped past every worker's liveness must hear
    what they said meanwhile before it judges them: the running job stays
    with its worker, one attempt, nothing lost."""
    p = start(processes, workers=("w1", "w2"))
    c = p.client()
    job, data, out = gated_job(p, c, "b")
    started(data, "b", 1)
    runner = holder(c, job)

    p.broker.send_signal(signal.SIGSTOP)
    # The workers give up on the silent broker and knock again.
    wait_for(lambda: all("silent; reconnecting" in p.log(w) for w in ("w1", "w2")),
             timeout=30, message="both workers to notice the silence")
    p.broker.send_signal(signal.SIGCONT)
    wait_for(lambda: holder(c, job) == runner and len(c.workers()) == 2,
             timeout=30, message="the workers to be back")
    go(data, "b")

    _, attempts = settled(c, job, "succeeded", ["succeeded"])
    assert attempts[0]["worker"] == runner
    assert promoted(out)["from"] == [1]
    log = p.log("broker")
    assert "broker stalled" in log
    assert "expired" not in log and "re-queued" not in log
