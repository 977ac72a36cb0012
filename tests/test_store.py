"""The Store contract, run against SQLite and PostgreSQL alike."""

from __future__ import annotations

import functools
import socket
import sqlite3
import uuid

import pytest

from msp.errors import ConfigError
from msp.store import JOB_STATES, Store

PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


@functools.cache
def _postgres_answers() -> bool:
    try:
        socket.create_connection(("127.0.0.1", 5432), timeout=2).close()
    except OSError:
        return False
    return True


@pytest.fixture(
    params=[
        "sqlite",
        pytest.param("postgresql", marks=pytest.mark.postgres),
    ]
)
def store(request, tmp_path):
    if request.param == "sqlite":
        s = Store(f"sqlite:///{tmp_path / 'msp.db'}")
        yield s
        s.close()
        return
    if not _postgres_answers():
        pytest.skip("no PostgreSQL server at 127.0.0.1:5432")
    schema = f"msp_test_{uuid.uuid4().hex[:16]}"
    s = Store(PG_URL, schema=schema)
    try:
        yield s
    finally:
        if s.db.in_transaction():
            s.db.rollback()
        s.db.execute_sql(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        s.close()


def spec(**changes) -> dict:
    base = {
        "script": "/r/job.py", "data": "/r/data", "output": "/r/out",
        "attempts": 3,
    }
    base.update(changes)
    return base


@pytest.fixture
def alice(store) -> int:
    return store.add_user("alice", "hash-a", "user", 1.0)


@pytest.fixture
def bob(store) -> int:
    return store.add_user("bob", "hash-b", "admin", 2.0, credit_limit=50.0)


def submit(store, user, request_id, now=10.0, **changes) -> int:
    job_id, created = store.submit(user, request_id, spec(**changes), now)
    assert created
    return job_id


def start(store, job_id, token, now, worker="w1") -> int:
    """Claim ``job_id`` (it must be claimable) and start an attempt."""
    job = next(j for j in store.claim(now, 1000) if j["id"] == job_id)
    return store.start_attempt(job, token, worker, now)


# Users and sessions.


def test_add_user(store):
    uid = store.add_user("alice", "hash-a", "user", 1.0)
    assert isinstance(uid, int)
    user = store.user("alice")
    assert user.id == uid
    assert user.name == "alice"
    assert user.password_hash == "hash-a"
    assert user.role == "user"
    assert user.disabled is False
    assert user.created_at == 1.0
    assert user.credit_limit is None
    assert store.user_by_id(uid).name == "alice"


def test_add_user_names_are_unique(store, alice):
    assert store.add_user("alice", "other", "admin", 5.0) is None
    # The first user is untouched and the store still works.
    assert store.user("alice").password_hash == "hash-a"
    assert store.user("alice").role == "user"
    other = store.add_user("Alice", "h", "user", 6.0)
    assert other is not None and other != alice
    assert store.count_users() == 2
    assert [u.name for u in store.users()] == ["Alice", "alice"]


def test_unknown_user(store):
    assert store.user("nobody") is None
    assert store.user_by_id(12345) is None


def test_unicode_user_name(store):
    uid = store.add_user("ñandú-数据", "h", "user", 1.0)
    assert store.user("ñandú-数据").id == uid


def test_set_password_and_disable(store, alice, bob):
    store.set_password(alice, "new-hash")
    store.add_session(alice, "tok-a", 10.0, 100.0)
    store.disable_user(alice)
    user = store.user("alice")
    assert user.password_hash == "new-hash"
    assert user.disabled is True
    assert store.session("tok-a").revoked is True
    assert store.user("bob").disabled is False


def test_sessions(store, alice):
    store.add_session(alice, "tok-1", 10.0, 100.0)
    found = store.session("tok-1")
    assert found.token_hash == "tok-1"
    assert found.user.id == alice
    assert found.user.name == "alice"
    assert found.created_at == 10.0
    assert found.expires_at == 100.0
    assert found.revoked is False
    assert store.session("tok-unknown") is None


def test_revoke_session(store, alice):
    store.add_session(alice, "tok-1", 10.0, 100.0)
    store.add_session(alice, "tok-2", 11.0, 100.0)
    store.revoke_session("tok-1")
    assert store.session("tok-1").revoked is True
    assert store.session("tok-2").revoked is False
    # Revoking an unknown token is harmless.
    store.revoke_session("tok-unknown")
    assert store.session("tok-2").revoked is False


def test_revoke_sessions_of_a_user(store, alice, bob):
    store.add_session(alice, "a1", 10.0, 100.0)
    store.add_session(alice, "a2", 10.0, 100.0)
    store.add_session(bob, "b1", 10.0, 100.0)
    store.revoke_sessions(alice)
    assert store.session("a1").revoked is True
    assert store.session("a2").revoked is True
    assert store.session("b1").revoked is False


# Submitting.


def test_submit_stores_the_spec(store, alice):
    job_id, created = store.submit(
        alice, "req-1",
        spec(args=["--n", "3", "ü"], priority=4, timeout=12.5, name="nightly"),
        42.0,
    )
    assert created is True
    job = store.job(job_id)
    assert job["id"] == job_id
    assert job["user_id"] == alice
    assert job["request_id"] == "req-1"
    assert job["name"] == "nightly"
    assert job["script"] == "/r/job.py"
    assert job["args"] == ["--n", "3", "ü"]
    assert job["data_dir"] == "/r/data"
    assert job["output_dir"] == "/r/out"
    assert job["priority"] == 4
    assert job["max_attempts"] == 3
    assert job["timeout"] == 12.5
    assert job["submitted_at"] == 42.0
    assert job["state"] == "queued"
    assert (job["attempts"], job["failures"], job["lost"]) == (0, 0, 0)
    assert job["not_before"] == 0.0
    assert job["token"] is None and job["worker"] is None
    assert job["started_at"] is None and job["finished_at"] is None
    assert job["cancel_requested"] is False


def test_submit_defaults(store, alice):
    job = store.job(submit(store, alice, "r"))
    assert job["args"] == []
    assert job["priority"] == 0
    assert job["timeout"] is None
    assert job["name"] is None


def test_submit_is_idempotent_per_user(store, alice, bob):
    first, created = store.submit(alice, "req-1", spec(), 10.0)
    assert created is True
    again, created = store.submit(alice, "req-1", spec(script="/other"), 11.0)
    assert (again, created) == (first, False)
    # The repeat changed nothing.
    assert store.job(first)["script"] == "/r/job.py"
    assert store.job(first)["submitted_at"] == 10.0
    # Another user's request with the same id is a new job.
    other, created = store.submit(bob, "req-1", spec(), 12.0)
    assert created is True and other != first
    # Another request of the same user too.
    third, created = store.submit(alice, "req-2", spec(), 13.0)
    assert created is True and third not in (first, other)
    assert len(store.jobs()) == 3


def test_unknown_job(store):
    assert store.job(999) is None
    assert store.attempts(999) == []


# Claiming.


def test_claim_order_is_priority_then_submission(store, alice):
    ids = {}
    for name, priority in [
        ("a", 0), ("b", 5), ("c", 0), ("d", 5), ("e", -1), ("f", 9),
    ]:
        ids[name] = submit(store, alice, name, priority=priority)
    claimed = [j["id"] for j in store.claim(100.0, 10)]
    assert claimed == [ids[n] for n in "fbdace"]


def test_claim_respects_count(store, alice):
    ids = [submit(store, alice, f"r{i}") for i in range(5)]
    assert [j["id"] for j in store.claim(100.0, 2)] == ids[:2]
    assert store.claim(100.0, 0) == []


def test_claim_does_not_change_the_job(store, alice):
    job_id = submit(store, alice, "r")
    assert [j["id"] for j in store.claim(100.0, 1)] == [job_id]
    assert [j["id"] for j in store.claim(100.0, 1)] == [job_id]
    assert store.job(job_id)["state"] == "queued"


def test_claim_returns_only_queued_jobs(store, alice):
    running = submit(store, alice, "r1", priority=9)
    cancelled = submit(store, alice, "r2", priority=8)
    waiting = submit(store, alice, "r3")
    start(store, running, "t1", 20.0)
    assert store.cancel_queued(cancelled, 21.0)
    assert [j["id"] for j in store.claim(100.0, 10)] == [waiting]


def test_claimed_row_holds_the_job(store, alice):
    job_id = submit(store, alice, "r", args=["x"], priority=2)
    (job,) = store.claim(100.0, 1)
    assert job == store.job(job_id)
    assert job["args"] == ["x"]


def test_not_before_hides_a_job_until_its_time(store, alice):
    job_id = submit(store, alice, "r")
    start(store, job_id, "t1", 100.0)
    assert store.end_attempt(
        job_id, "t1", 101.0, "failed", job_state="queued", failed=1,
        not_before=150.0,
    )
    later = submit(store, alice, "later", priority=-5)
    assert store.job(job_id)["not_before"] == 150.0
    assert [j["id"] for j in store.claim(149.999, 10)] == [later]
    assert [j["id"] for j in store.claim(150.0, 10)] == [job_id, later]
    assert [j["id"] for j in store.claim(1e9, 10)] == [job_id, later]


# Attempts.


def test_start_attempt(store, alice):
    job_id = submit(store, alice, "r")
    assert start(store, job_id, "tok-1", 100.0, worker="host-1") == 1
    job = store.job(job_id)
    assert job["state"] == "running"
    assert job["attempts"] == 1
    assert job["token"] == "tok-1"
    assert job["worker"] == "host-1"
    assert job["started_at"] == 100.0
    assert job["finished_at"] is None
    (attempt,) = store.attempts(job_id)
    assert attempt["job_id"] == job_id
    assert attempt["number"] == 1
    assert attempt["token"] == "tok-1"
    assert attempt["worker"] == "host-1"
    assert attempt["started_at"] == 100.0
    assert attempt["ended_at"] is None
    assert attempt["outcome"] is None
    assert [j["id"] for j in store.running()] == [job_id]


def test_end_attempt_succeeded(store, alice):
    job_id = submit(store, alice, "r")
    start(store, job_id, "tok-1", 100.0)
    usage = {"wall": 3.5, "user": 2.25, "system": 0.5, "max_rss_kb": 2048}
    assert store.end_attempt(
        job_id, "tok-1", 104.0, "succeeded", job_state="succeeded",
        exit_code=0, usage=usage, cost=0.75,
    ) is True
    job = store.job(job_id)
    assert job["state"] == "succeeded"
    assert (job["attempts"], job["failures"], job["lost"]) == (1, 0, 0)
    assert job["finished_at"] == 104.0
    assert job["exit_code"] == 0
    assert job["error"] is None
    assert job["token"] is None and job["worker"] is None
    assert store.running() == []
    (attempt,) = store.attempts(job_id)
    assert attempt["ended_at"] == 104.0
    assert attempt["outcome"] == "succeeded"
    assert attempt["exit_code"] == 0
    assert attempt["wall_seconds"] == 3.5
    assert attempt["cpu_user"] == 2.25
    assert attempt["cpu_system"] == 0.5
    assert attempt["max_rss_kb"] == 2048
    assert attempt["cost"] == 0.75


def test_end_attempt_requeues(store, alice):
    job_id = submit(store, alice, "r")
    start(store, job_id, "tok-1", 100.0)
    assert store.end_attempt(
        job_id, "tok-1", 105.0, "failed", job_state="queued", failed=1,
        not_before=106.0, exit_code=3, error="exit status 3",
    )
    job = store.job(job_id)
    assert job["state"] == "queued"
    assert (job["attempts"], job["failures"], job["lost"]) == (1, 1, 0)
    assert job["not_before"] == 106.0
    assert job["finished_at"] is None
    assert job["token"] is None and job["worker"] is None
    assert job["exit_code"] == 3
    assert job["error"] == "exit status 3"
    (attempt,) = store.attempts(job_id)
    assert attempt["outcome"] == "failed"
    assert attempt["exit_code"] == 3
    assert attempt["error"] == "exit status 3"
    assert attempt["ended_at"] == 105.0


def test_end_attempt_failed(store, alice):
    job_id = submit(store, alice, "r", attempts=1)
    start(store, job_id, "tok-1", 100.0)
    assert store.end_attempt(
        job_id, "tok-1", 107.0, "timed_out", job_state="failed", failed=1,
        error="timed out after 5 s",
    )
    job = store.job(job_id)
    assert job["state"] == "failed"
    assert (job["attempts"], job["failures"], job["lost"]) == (1, 1, 0)
    assert job["finished_at"] == 107.0
    assert job["error"] == "timed out after 5 s"
    assert store.claim(1e9, 10) == []


def test_attempts_and_counters_over_a_job_life(store, alice):
    job_id = submit(store, alice, "r")
    # 1: fails and is re-queued.
    assert start(store, job_id, "t1", 100.0, worker="w1") == 1
    assert store.end_attempt(
        job_id, "t1", 101.0, "failed", job_state="queued", failed=1,
        not_before=102.0,
    )
    # 2: its worker is lost; re-queued without spending an attempt.
    assert start(store, job_id, "t2", 102.0, worker="w2") == 2
    assert store.end_attempt(
        job_id, "t2", 103.0, "lost", job_state="queued", lost=1,
    )
    job = store.job(job_id)
    assert (job["attempts"], job["failures"], job["lost"]) == (2, 1, 1)
    assert job["not_before"] == 0.0
    # 3: succeeds.
    assert start(store, job_id, "t3", 104.0, worker="w3") == 3
    assert store.end_attempt(
        job_id, "t3", 109.0, "succeeded", job_state="succeeded", exit_code=0,
    )
    job = store.job(job_id)
    assert job["state"] == "succeeded"
    assert (job["attempts"], job["failures"], job["lost"]) == (3, 1, 1)
    # started_at is the first start, finished_at the end.
    assert job["started_at"] == 100.0
    assert job["finished_at"] == 109.0
    rows = store.attempts(job_id)
    assert [(a["number"], a["token"], a["worker"], a["outcome"]) for a in rows] == [
        (1, "t1", "w1", "failed"),
        (2, "t2", "w2", "lost"),
        (3, "t3", "w3", "succeeded"),
    ]
    assert [a["ended_at"] for a in rows] == [101.0, 103.0, 109.0]


def test_end_attempt_cancelled(store, alice):
    job_id = submit(store, alice, "r")
    start(store, job_id, "t1", 100.0)
    store.request_cancel(job_id)
    assert store.job(job_id)["cancel_requested"] is True
    assert store.end_attempt(
        job_id, "t1", 101.0, "cancelled", job_state="cancelled",
    )
    job = store.job(job_id)
    assert job["state"] == "cancelled"
    assert job["finished_at"] == 101.0
    assert (job["failures"], job["lost"]) == (0, 0)


def test_end_attempt_with_a_stale_token_changes_nothing(store, alice):
    job_id = submit(store, alice, "r")
    start(store, job_id, "t1", 100.0)
    before, attempts_before = store.job(job_id), store.attempts(job_id)
    assert store.end_attempt(
        job_id, "not-the-token", 101.0, "succeeded", job_state="succeeded",
    ) is False
    assert store.job(job_id) == before
    assert store.attempts(job_id) == attempts_before


def test_end_attempt_with_the_token_of_an_earlier_attempt(store, alice):
    job_id = submit(store, alice, "r")
    start(store, job_id, "t1", 100.0)
    assert store.end_attempt(
        job_id, "t1", 101.0, "lost", job_state="queued", lost=1,
    )
    start(store, job_id, "t2", 102.0)
    before, attempts_before = store.job(job_id), store.attempts(job_id)
    # A late report from attempt 1.
    assert store.end_attempt(
        job_id, "t1", 103.0, "succeeded", job_state="succeeded",
    ) is False
    assert store.job(job_id) == before
    assert store.job(job_id)["state"] == "running"
    assert store.attempts(job_id) == attempts_before


def test_end_attempt_with_the_token_of_another_job(store, alice):
    one = submit(store, alice, "r1")
    two = submit(store, alice, "r2")
    start(store, one, "t1", 100.0)
    start(store, two, "t2", 100.0)
    assert store.end_attempt(
        two, "t1", 101.0, "succeeded", job_state="succeeded",
    ) is False
    assert store.job(one)["state"] == "running"
    assert store.job(two)["state"] == "running"


def test_end_attempt_twice_records_once(store, alice):
    job_id = submit(store, alice, "r")
    start(store, job_id, "t1", 100.0)
    args = dict(job_state="queued", failed=1, not_before=200.0, exit_code=1)
    assert store.end_attempt(job_id, "t1", 101.0, "failed", **args) is True
    after_first = store.job(job_id)
    assert store.end_attempt(job_id, "t1", 102.0, "failed", **args) is False
    job = store.job(job_id)
    assert job == after_first
    assert job["failures"] == 1
    (attempt,) = store.attempts(job_id)
    assert attempt["ended_at"] == 101.0


def test_end_attempt_twice_after_success(store, alice):
    job_id = submit(store, alice, "r")
    start(store, job_id, "t1", 100.0)
    assert store.end_attempt(
        job_id, "t1", 101.0, "succeeded", job_state="succeeded",
    )
    assert not store.end_attempt(
        job_id, "t1", 102.0, "failed", job_state="failed", failed=1,
    )
    job = store.job(job_id)
    assert job["state"] == "succeeded"
    assert job["failures"] == 0
    assert job["finished_at"] == 101.0
    assert store.attempts(job_id)[0]["outcome"] == "succeeded"


def test_set_progress_needs_the_current_token(store, alice):
    job_id = submit(store, alice, "r")
    start(store, job_id, "t1", 100.0)
    store.set_progress(job_id, "t1", 0.25)
    store.set_progress(job_id, "stale", 0.9)
    assert store.job(job_id)["progress"] == 0.25


# Cancelling.


def test_cancel_queued(store, alice):
    job_id = submit(store, alice, "r")
    assert store.cancel_queued(job_id, 50.0) is True
    job = store.job(job_id)
    assert job["state"] == "cancelled"
    assert job["finished_at"] == 50.0
    assert job["error"] == "cancelled while queued"
    # Once only.
    assert store.cancel_queued(job_id, 51.0) is False
    assert store.job(job_id)["finished_at"] == 50.0


def test_cancel_queued_leaves_other_states_alone(store, alice):
    running = submit(store, alice, "r1")
    done = submit(store, alice, "r2")
    start(store, running, "t1", 100.0)
    start(store, done, "t2", 100.0)
    store.end_attempt(done, "t2", 101.0, "succeeded", job_state="succeeded")
    assert store.cancel_queued(running, 102.0) is False
    assert store.cancel_queued(done, 102.0) is False
    assert store.cancel_queued(999, 102.0) is False
    assert store.job(running)["state"] == "running"
    assert store.job(running)["token"] == "t1"
    assert store.job(done)["state"] == "succeeded"


def test_cancel_queued_of_a_requeued_job(store, alice):
    job_id = submit(store, alice, "r")
    start(store, job_id, "t1", 100.0)
    store.end_attempt(
        job_id, "t1", 101.0, "failed", job_state="queued", failed=1,
        not_before=500.0,
    )
    assert store.cancel_queued(job_id, 102.0) is True
    assert store.job(job_id)["state"] == "cancelled"


# Figures.


def test_counts(store, alice):
    assert store.counts() == dict.fromkeys(JOB_STATES, 0)
    a = submit(store, alice, "a")
    b = submit(store, alice, "b")
    c = submit(store, alice, "c")
    submit(store, alice, "d")
    start(store, a, "ta", 100.0)
    start(store, b, "tb", 100.0)
    store.end_attempt(b, "tb", 101.0, "failed", job_state="failed", failed=1)
    store.cancel_queued(c, 102.0)
    assert store.counts() == {
        "queued": 1, "running": 1, "succeeded": 0, "failed": 1,
        "cancelled": 1,
    }


def test_queue_depth(store, alice):
    assert store.queue_depth(100.0) == {"by_priority": {}, "oldest_wait": None}
    submit(store, alice, "a", now=10.0, priority=0)
    submit(store, alice, "b", now=20.0, priority=5)
    submit(store, alice, "c", now=30.0, priority=0)
    gone = submit(store, alice, "d", now=5.0, priority=1)
    store.cancel_queued(gone, 40.0)
    assert store.queue_depth(100.0) == {
        "by_priority": {"5": 1, "0": 2},
        "oldest_wait": 90.0,
    }
    assert list(store.queue_depth(100.0)["by_priority"]) == ["5", "0"]
    # A clock behind the submissions gives no negative wait.
    assert store.queue_depth(0.0)["oldest_wait"] == 0.0


@pytest.fixture
def history(store, alice, bob):
    """Six jobs of two users, submitted at 10, 20, ... 60."""
    ids = []
    for i, user in enumerate([alice, bob, alice, bob, alice, alice]):
        ids.append(submit(store, user, f"r{i}", now=10.0 * (i + 1)))
    start(store, ids[0], "t0", 100.0)
    store.end_attempt(ids[0], "t0", 101.0, "succeeded", job_state="succeeded")
    start(store, ids[1], "t1", 100.0)
    start(store, ids[2], "t2", 100.0)
    store.end_attempt(ids[2], "t2", 101.0, "failed", job_state="failed", failed=1)
    return ids


def test_jobs_newest_first(store, history):
    rows = store.jobs()
    assert [r["id"] for r in rows] == history[::-1]
    assert [r["user"] for r in rows] == [
        "alice", "alice", "bob", "alice", "bob", "alice",
    ]
    assert rows[-1]["state"] == "succeeded"
    assert rows[-1]["args"] == []


def test_jobs_by_user(store, history, alice, bob):
    assert [r["id"] for r in store.jobs(user_id=bob)] == [
        history[3], history[1],
    ]
    assert [r["id"] for r in store.jobs(user_id=alice)] == [
        history[5], history[4], history[2], history[0],
    ]
    assert store.jobs(user_id=999) == []


def test_jobs_by_state(store, history, alice):
    assert [r["id"] for r in store.jobs(state="queued")] == [
        history[5], history[4], history[3],
    ]
    assert [r["id"] for r in store.jobs(state="running")] == [history[1]]
    assert [r["id"] for r in store.jobs(state="failed")] == [history[2]]
    assert store.jobs(state="cancelled") == []
    assert [r["id"] for r in store.jobs(user_id=alice, state="queued")] == [
        history[5], history[4],
    ]


def test_jobs_since(store, history, bob):
    # since is inclusive: submitted at 40, 50, 60.
    assert [r["id"] for r in store.jobs(since=40.0)] == history[:2:-1]
    assert [r["id"] for r in store.jobs(since=40.5)] == history[:3:-1]
    assert store.jobs(since=61.0) == []
    assert [r["id"] for r in store.jobs(user_id=bob, since=20.0)] == [
        history[3], history[1],
    ]


def test_jobs_limit(store, history):
    assert [r["id"] for r in store.jobs(limit=2)] == [history[5], history[4]]
    assert [r["id"] for r in store.jobs(state="queued", limit=1)] == [
        history[5],
    ]
    assert len(store.jobs(limit=100)) == 6


@pytest.fixture
def billed(store, alice, bob):
    """Attempts of alice and bob that ended at 110, 120, 130; one running."""
    a1 = submit(store, alice, "a1", name="first", script="/r/a.py")
    a2 = submit(store, alice, "a2")
    b1 = submit(store, bob, "b1", script="/r/b.py")
    running = submit(store, alice, "run")
    start(store, a1, "ta1", 100.0, worker="w1")
    start(store, a2, "ta2", 100.0, worker="w2")
    start(store, b1, "tb1", 100.0, worker="w3")
    start(store, running, "trun", 100.0)
    usage = {"wall": 10.0, "user": 8.0, "system": 1.0, "max_rss_kb": 512}
    store.end_attempt(
        a1, "ta1", 110.0, "succeeded", job_state="succeeded", usage=usage,
        cost=1.5,
    )
    store.end_attempt(b1, "tb1", 120.0, "failed", job_state="failed", failed=1)
    store.end_attempt(a2, "ta2", 130.0, "lost", job_state="queued", lost=1)
    return {"a1": a1, "a2": a2, "b1": b1}


def test_usage_in_the_window(store, billed):
    rows = store.usage(0.0, 1000.0)
    assert [(r["job"], r["user"], r["outcome"]) for r in rows] == [
        (billed["a1"], "alice", "succeeded"),
        (billed["b1"], "bob", "failed"),
        (billed["a2"], "alice", "lost"),
    ]
    assert rows[0] == {
        "job": billed["a1"], "user": "alice", "name": "first",
        "script": "/r/a.py", "number": 1, "outcome": "succeeded",
        "wall_seconds": 10.0, "cpu_user": 8.0, "cpu_system": 1.0,
        "max_rss_kb": 512, "cost": 1.5, "started_at": 100.0,
        "ended_at": 110.0, "worker": "w1",
    }
    assert rows[1]["wall_seconds"] is None and rows[1]["cost"] is None


def test_usage_window_includes_since_and_excludes_until(store, billed):
    assert [r["job"] for r in store.usage(110.0, 130.0)] == [
        billed["a1"], billed["b1"],
    ]
    assert [r["job"] for r in store.usage(110.001, 130.001)] == [
        billed["b1"], billed["a2"],
    ]
    assert store.usage(131.0, 200.0) == []
    assert store.usage(0.0, 110.0) == []


def test_usage_of_one_user(store, billed, alice, bob):
    assert [r["job"] for r in store.usage(0.0, 1000.0, user_id=bob)] == [
        billed["b1"],
    ]
    assert [r["job"] for r in store.usage(0.0, 1000.0, user_id=alice)] == [
        billed["a1"], billed["a2"],
    ]


def test_usage_by_user_sums_attempts_ended_since(store, billed):
    # a2 ended twice: lost at 130, then succeeded at 140 without usage.
    start(store, billed["a2"], "ta2b", 135.0)
    store.end_attempt(billed["a2"], "ta2b", 140.0, "succeeded",
                      job_state="succeeded",
                      usage={"wall": 2.0, "user": 0.5, "system": 0.25})

    assert store.usage_by_user(0.0) == [
        {"user": "alice", "jobs": 2, "attempts": 3, "cpu_seconds": 9.75,
         "wall_seconds": 12.0},
        {"user": "bob", "jobs": 1, "attempts": 1, "cpu_seconds": 0.0,
         "wall_seconds": 0.0},
    ]
    assert store.usage_by_user(120.0) == [
        {"user": "alice", "jobs": 1, "attempts": 2, "cpu_seconds": 0.75,
         "wall_seconds": 2.0},
        {"user": "bob", "jobs": 1, "attempts": 1, "cpu_seconds": 0.0,
         "wall_seconds": 0.0},
    ]
    assert store.usage_by_user(141.0) == []


def test_finished_since(store, history):
    # history ended one job at 101 and failed another at 101.
    assert store.finished_since(101.0) == [101.0, 101.0]
    assert store.finished_since(101.5) == []


# Workers.


def test_worker_seen_and_done(store):
    store.worker_seen("w1", "host-a", 10.0, "idle")
    store.worker_seen("w1", "host-b", 20.0, "busy")
    store.worker_done("w1")
    store.worker_done("w1")
    (w,) = store.m.Worker.select()
    assert (w.name, w.host, w.first_seen, w.last_seen, w.state) == (
        "w1", "host-b", 10.0, 20.0, "busy",
    )
    assert w.jobs_done == 2


def test_atomic_rolls_back(store, alice):
    with pytest.raises(RuntimeError):
        with store.atomic():
            submit(store, alice, "r")
            raise RuntimeError("boom")
    assert store.jobs() == []


def test_a_savepoint_undoes_its_own_writes_only(store, alice):
    with store.atomic():
        kept = submit(store, alice, "kept")
        with pytest.raises(RuntimeError):
            with store.atomic():
                submit(store, alice, "inner")
                with store.atomic():
                    submit(store, alice, "innermost")
                raise RuntimeError("boom")
        # The same depth again, after the rollback: a fresh savepoint.
        with store.atomic():
            after = submit(store, alice, "after")
        with pytest.raises(RuntimeError):
            with store.atomic():
                with store.atomic():
                    submit(store, alice, "deep")
                    raise RuntimeError("boom")
    assert sorted(j["id"] for j in store.jobs()) == [kept, after]
    assert store._savepoints == 0


def test_a_failed_statement_in_a_savepoint_leaves_the_transaction_usable(
    store, alice
):
    with store.atomic():
        first = submit(store, alice, "first")
        with pytest.raises(Exception):
            with store.atomic():
                store._exec("INSERT INTO no_such_table VALUES (1)")
        # PostgreSQL aborts a transaction on an error until the rollback
        # to the savepoint: this statement proves it happened.
        second = submit(store, alice, "second")
    assert sorted(j["id"] for j in store.jobs()) == [first, second]


def test_reopening_keeps_the_data(store, alice, tmp_path):
    if store.url.startswith("sqlite"):
        job_id = submit(store, alice, "r")
        store.close()
        again = Store(store.url)
        try:
            assert again.job(job_id)["request_id"] == "r"
            assert again.user("alice").id == alice
        finally:
            again.close()
    else:
        schema = store.db.execute_sql("SHOW search_path").fetchone()[0]
        job_id = submit(store, alice, "r")
        again = Store(PG_URL, schema=schema)
        try:
            assert again.job(job_id)["request_id"] == "r"
        finally:
            again.close()


# SQLite specifics.


def test_sqlite_uses_wal(tmp_path):
    path = tmp_path / "wal.db"
    s = Store(f"sqlite:///{path}")
    try:
        mode = s.db.execute_sql("PRAGMA journal_mode").fetchone()[0]
        assert mode.lower() == "wal"
        assert s.db.execute_sql("PRAGMA foreign_keys").fetchone()[0] == 1
        assert s.db.execute_sql("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    finally:
        s.close()
    # WAL is a property of the file: a plain connection sees it too.
    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()


def test_sqlite_synchronous_setting(tmp_path):
    s = Store(f"sqlite:///{tmp_path / 'n.db'}", synchronous="normal")
    try:
        assert s.db.execute_sql("PRAGMA synchronous").fetchone()[0] == 1
    finally:
        s.close()


def test_unsupported_store_url():
    with pytest.raises(ConfigError) as info:
        Store("mysql://root@localhost/msp")
    assert "unsupported store URL 'mysql://root@localhost/msp'" in str(info.value)
