"""Many jobs in one request (SUBMIT_MANY) and one wait for many (WAIT with
"jobs"), against a real broker and worker."""

from __future__ import annotations

import pytest

from msp.broker.clients import MAX_BATCH
from msp.client import job_body
from msp.errors import ConflictError, NotFoundError, PathError, ProtocolError

ECHO = "import sys\nprint('job', *sys.argv[1:])\n"


def jobs_for(cluster, script, n, first=0):
    return [
        {"script": script, "data": cluster.data,
         "output": cluster.output(f"o{first + i}"), "args": [str(first + i)]}
        for i in range(n)
    ]


def test_many_jobs_in_one_request_run_and_end_together(make_cluster):
    cluster = make_cluster()
    script = cluster.script("echo.py", ECHO)
    c = cluster.admin()

    ids = c.submit_many(jobs_for(cluster, script, 5))
    views = c.wait_all(ids, timeout=60)

    assert len(set(ids)) == 5 and ids == sorted(ids)
    assert [v["id"] for v in views] == ids
    assert [v["state"] for v in views] == ["succeeded"] * 5
    for i in range(5):
        out = (cluster.output(f"o{i}") / "stdout.log").read_text()
        assert out == f"job {i}\n"


def test_one_bad_job_refuses_the_whole_request_and_names_it(
    make_cluster, tmp_path
):
    cluster = make_cluster(workers=0)
    script = cluster.script("echo.py", ECHO)
    c = cluster.admin()
    jobs = jobs_for(cluster, script, 4)
    jobs[2]["data"] = tmp_path.parent  # outside the allowed roots

    with pytest.raises(PathError, match=r"^jobs\[2\]: data folder"):
        c.submit_many(jobs)

    assert c.jobs() == []


def test_a_bad_field_names_its_job(make_cluster):
    cluster = make_cluster(workers=0)
    script = cluster.script("echo.py", ECHO)
    c = cluster.admin()
    jobs = jobs_for(cluster, script, 3)
    body = {"token": c.token, "request_id": "r1",
            "jobs": [*(job_body(**j) for j in jobs[:2]), {"script": 7}]}
    with pytest.raises(ProtocolError, match=r"jobs\[2\]: .*'script' must be"):
        c.request("SUBMIT_MANY", body)
    body["jobs"][2] = "not an object"
    with pytest.raises(ProtocolError, match=r"jobs\[2\]: .*must be an object"):
        c.request("SUBMIT_MANY", body)
    body["jobs"][2] = dict(job_body(**jobs[2]), priority=5000)
    with pytest.raises(ProtocolError, match=r"jobs\[2\]: priority"):
        c.request("SUBMIT_MANY", body)
    assert c.jobs() == []


def test_a_retried_request_makes_no_new_jobs(make_cluster):
    cluster = make_cluster(workers=0)
    script = cluster.script("echo.py", ECHO)
    c = cluster.admin()
    jobs = jobs_for(cluster, script, 3)

    first = c.submit_many(jobs, request_id="batch-1")
    again = c.request("SUBMIT_MANY", {
        "token": c.token, "request_id": "batch-1",
        "jobs": [job_body(**j) for j in jobs],
    })

    assert again == {"jobs": first, "created": False}
    assert len(c.jobs()) == 3
    with pytest.raises(ConflictError, match="fewer jobs"):
        c.submit_many(jobs_for(cluster, script, 4), request_id="batch-1")
    assert len(c.jobs()) == 3


@pytest.mark.parametrize("jobs, request_id, message", [
    ([], "r", "1 to 1000 jobs"),
    ("many", "r", "SUBMIT_MANY: field 'jobs' must be a list"),
    (None, "x" * 60, "request_id must have 1 to 59 characters"),
    (None, "", "request_id must have 1 to 59 characters"),
])
def test_malformed_requests_are_refused(make_cluster, jobs, request_id,
                                        message):
    cluster = make_cluster(workers=0)
    script = cluster.script("echo.py", ECHO)
    c = cluster.admin()
    if jobs is None:
        jobs = [job_body(**j) for j in jobs_for(cluster, script, 1)]
    with pytest.raises(ProtocolError, match=message):
        c.request("SUBMIT_MANY", {"token": c.token, "request_id": request_id,
                                  "jobs": jobs})
    assert c.jobs() == []


def test_more_than_the_most_jobs_is_refused(make_cluster):
    cluster = make_cluster(workers=0, max_message_size=1 << 22)
    script = cluster.script("echo.py", ECHO)
    c = cluster.admin()
    one = job_body(**jobs_for(cluster, script, 1)[0])
    with pytest.raises(ProtocolError, match=f"1 to {MAX_BATCH} jobs"):
        c.request("SUBMIT_MANY", {"token": c.token, "request_id": "r",
                                  "jobs": [one] * (MAX_BATCH + 1)})
    assert c.jobs() == []


def test_submit_many_needs_a_login(make_cluster):
    cluster = make_cluster(workers=0)
    script = cluster.script("echo.py", ECHO)
    c = cluster.client()
    with pytest.raises(Exception) as err:
        c.request("SUBMIT_MANY", {
            "token": "never-issued", "request_id": "r",
            "jobs": [job_body(**j) for j in jobs_for(cluster, script, 1)],
        })
    assert getattr(err.value, "code", None) == "unauthenticated"
    assert cluster.admin().jobs() == []


def test_a_wait_for_many_returns_when_its_time_is_up(make_cluster):
    cluster = make_cluster(workers=0)
    script = cluster.script("echo.py", ECHO)
    c = cluster.admin()
    ids = c.submit_many(jobs_for(cluster, script, 3))

    views = c.wait_all(ids, timeout=0.3)

    assert [v["state"] for v in views] == ["queued"] * 3


def test_a_wait_for_many_ends_with_the_last_job(make_cluster):
    cluster = make_cluster(workers=0)
    script = cluster.script("echo.py", ECHO)
    c = cluster.admin()
    ids = c.submit_many(jobs_for(cluster, script, 3))
    c.cancel(ids[1])
    worker = cluster.add_worker()

    views = c.wait_all([*ids, ids[0]], timeout=60)

    assert worker.jobs_done == 2
    assert [v["id"] for v in views] == ids  # each once, in order
    assert [v["state"] for v in views] == [
        "succeeded", "cancelled", "succeeded"]


def test_a_wait_for_many_sees_only_the_callers_jobs(make_cluster):
    cluster = make_cluster(workers=0)
    script = cluster.script("echo.py", ECHO)
    alice, bob = cluster.user("alice"), cluster.user("bob")
    mine = alice.submit_many(jobs_for(cluster, script, 1))
    theirs = bob.submit_many(jobs_for(cluster, script, 1, first=1))
    with pytest.raises(NotFoundError, match=f"no job {theirs[0]}"):
        alice.wait_all([*mine, *theirs], timeout=0)


@pytest.mark.parametrize("body, message", [
    ({}, "one of 'job' and 'jobs'"),
    ({"job": 1, "jobs": [1]}, "one of 'job' and 'jobs'"),
    ({"jobs": []}, "1 to 1000 job ids"),
    ({"jobs": [1, "2"]}, "1 to 1000 job ids"),
    ({"jobs": [True]}, "1 to 1000 job ids"),
    ({"jobs": list(range(1, MAX_BATCH + 2))}, "1 to 1000 job ids"),
])
def test_malformed_waits_are_refused(make_cluster, body, message):
    cluster = make_cluster(workers=0)
    c = cluster.admin()
    with pytest.raises(ProtocolError, match=message):
        c.request("WAIT", {"token": c.token, "timeout": 0, **body})
    assert c.ping()


def test_a_lone_surrogate_in_a_job_is_refused(make_cluster):
    cluster = make_cluster(workers=0)
    script = cluster.script("echo.py", ECHO)
    c = cluster.admin()
    jobs = [job_body(**j) for j in jobs_for(cluster, script, 2)]
    jobs[1]["args"] = ["ok", "\ud800"]
    with pytest.raises(ProtocolError, match="'jobs' is not valid UTF-8"):
        c.request("SUBMIT_MANY", {"token": c.token, "request_id": "r",
                                  "jobs": jobs})
    assert c.jobs() == []
