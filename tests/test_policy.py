"""decide: what the outcome of an attempt does to its job."""

from __future__ import annotations

import pytest

from msp.broker.workers import Decision, decide
from msp.config import BrokerConfig

WALL = 1000.0


@pytest.fixture
def config() -> BrokerConfig:
    return BrokerConfig(
        retry_backoff=1.0, retry_backoff_factor=2.0, retry_backoff_max=60.0,
        max_lost=3,
    )


def job(**changes) -> dict:
    """A running job as the store returns it, on its first attempt."""
    row = {
        "id": 7, "state": "running", "max_attempts": 3, "attempts": 1,
        "failures": 0, "lost": 0, "cancel_requested": False,
    }
    row.update(changes)
    return row


def test_succeeded(config):
    assert decide(job(), "succeeded", config, WALL) == Decision("succeeded")


def test_succeeded_after_earlier_failures(config):
    d = decide(job(failures=2, lost=2, attempts=5), "succeeded", config, WALL)
    assert d == Decision("succeeded", failed=0, lost=0, not_before=0.0)


@pytest.mark.parametrize("outcome", ["failed", "timed_out"])
def test_failure_with_attempts_left_is_requeued_after_backoff(config, outcome):
    d = decide(job(), outcome, config, WALL)
    assert d == Decision("queued", failed=1, not_before=WALL + 1.0)


@pytest.mark.parametrize("outcome", ["failed", "timed_out"])
def test_backoff_is_exponential(config, outcome):
    delays = []
    for failures in range(6):
        d = decide(
            job(max_attempts=10, failures=failures), outcome, config, WALL
        )
        assert d.state == "queued" and d.failed == 1 and d.lost == 0
        delays.append(d.not_before - WALL)
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0]


def test_backoff_is_capped(config):
    delays = [
        decide(job(max_attempts=20, failures=f), "failed", config, WALL)
        .not_before - WALL
        for f in range(5, 12)
    ]
    assert delays == [32.0, 60.0, 60.0, 60.0, 60.0, 60.0, 60.0]


def test_backoff_uses_the_configured_values():
    config = BrokerConfig(
        retry_backoff=0.5, retry_backoff_factor=3.0, retry_backoff_max=10.0,
    )
    delays = [
        decide(job(max_attempts=9, failures=f), "failed", config, 50.0)
        .not_before - 50.0
        for f in range(4)
    ]
    assert delays == [0.5, 1.5, 4.5, 10.0]


def test_backoff_factor_one_gives_a_constant_delay():
    config = BrokerConfig(retry_backoff=5.0, retry_backoff_factor=1.0)
    for f in range(3):
        d = decide(job(max_attempts=9, failures=f), "failed", config, WALL)
        assert d.not_before == WALL + 5.0


@pytest.mark.parametrize("outcome", ["failed", "timed_out"])
def test_failure_on_the_last_attempt_fails_the_job(config, outcome):
    d = decide(job(max_attempts=3, failures=2), outcome, config, WALL)
    assert d == Decision("failed", failed=1, not_before=0.0)


def test_failure_with_a_single_attempt_fails_at_once(config):
    d = decide(job(max_attempts=1), "failed", config, WALL)
    assert d == Decision("failed", failed=1)


def test_lost_attempts_do_not_spend_max_attempts(config):
    # Two losses and one failure so far: the second failure still retries.
    d = decide(
        job(max_attempts=3, failures=1, lost=2, attempts=4), "failed",
        config, WALL,
    )
    assert d == Decision("queued", failed=1, not_before=WALL + 2.0)


def test_error_fails_at_once_without_retry(config):
    d = decide(job(max_attempts=5), "error", config, WALL)
    assert d == Decision("failed", failed=1, lost=0, not_before=0.0)


def test_cancelled(config):
    d = decide(job(cancel_requested=True), "cancelled", config, WALL)
    assert d == Decision("cancelled", failed=0, lost=0, not_before=0.0)
    # Also when the worker stopped it without a request on record.
    assert decide(job(), "cancelled", config, WALL) == Decision("cancelled")


@pytest.mark.parametrize(
    "outcome", ["failed", "timed_out", "error", "succeeded"]
)
def test_cancel_requested_wins_over_any_outcome(config, outcome):
    d = decide(job(cancel_requested=True), outcome, config, WALL)
    assert d == Decision("cancelled")


def test_lost_is_requeued_without_spending_an_attempt(config):
    d = decide(job(), "lost", config, WALL)
    assert d == Decision("queued", failed=0, lost=1, not_before=0.0)


def test_lost_ignores_failures_and_max_attempts(config):
    # Even on what would be the last attempt, a loss is not a failure.
    d = decide(job(max_attempts=1, failures=0), "lost", config, WALL)
    assert d == Decision("queued", lost=1)
    d = decide(job(max_attempts=3, failures=2), "lost", config, WALL)
    assert d == Decision("queued", lost=1)


def test_lost_up_to_max_lost_times_is_requeued(config):
    # docs/protocol.md 6.2: failed when lost + 1 > max_lost, so a job may be
    # lost max_lost times and still be re-queued.
    for lost in range(config.max_lost):
        d = decide(job(lost=lost), "lost", config, WALL)
        assert d == Decision("queued", lost=1), lost


def test_lost_more_than_max_lost_times_fails_the_job(config):
    d = decide(job(lost=config.max_lost), "lost", config, WALL)
    assert d == Decision("failed", lost=1, failed=0, not_before=0.0)
    d = decide(job(lost=config.max_lost + 5), "lost", config, WALL)
    assert d == Decision("failed", lost=1)


def test_max_lost_is_read_from_the_config():
    config = BrokerConfig(max_lost=0)
    assert decide(job(lost=0), "lost", config, WALL) == Decision(
        "failed", lost=1
    )


def test_lost_with_cancel_requested_is_cancelled(config):
    d = decide(job(cancel_requested=True), "lost", config, WALL)
    assert d == Decision("cancelled", lost=1)
    # Even past the loss limit: the user asked for a cancel.
    d = decide(job(cancel_requested=True, lost=9), "lost", config, WALL)
    assert d == Decision("cancelled", lost=1)


def test_decision_defaults():
    assert Decision("queued") == Decision("queued", 0, 0, 0.0)
