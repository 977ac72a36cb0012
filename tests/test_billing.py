"""Accounting and billing: usage a test controls, priced by a plan, shown
by mspctl billing, and credit limits enforced at submit."""

from __future__ import annotations

import csv
import io
import json
import os

import pytest

from msp.broker import Broker
from msp.config import BillingConfig
from msp.errors import ForbiddenError, LimitError

from .conftest import ADMIN_PASSWORD, run_cli, wait_for

# Burns user CPU until the kernel says it has used half a second (asking
# it seldom, or the asking would be system time).
BURN = """\
import resource
while resource.getrusage(resource.RUSAGE_SELF).ru_utime < 0.5:
    for _ in range(20_000):
        pass
"""

FAIL = "import sys\nsys.exit(3)\n"

LOSE_FIRST = """\
import os, time
if os.environ["MSP_ATTEMPT"] == "1":
    print("msp:progress 0.5", flush=True)
    time.sleep(60)
"""

PLAN = BillingConfig(currency="EUR", per_cpu_second=0.01,
                     per_wall_second=0.001, per_job=0.25, per_gb_hour=2.0,
                     charge_failed=True)


def expected_cost(plan, a, final):
    """The plan applied by hand to what the store recorded."""
    cpu = a["cpu_user"] + a["cpu_system"]
    gib = a["max_rss_kb"] / (1024 * 1024)
    return (plan.per_cpu_second * cpu + plan.per_wall_second *
            a["wall_seconds"] + plan.per_gb_hour * gib * a["wall_seconds"]
            / 3600 + (plan.per_job if final else 0.0))


def cli_env(cluster, tmp_path, name="token"):
    env = dict(os.environ,
               MSP_CLIENT_BROKER=cluster.broker.endpoints["client"],
               MSP_CLIENT_TOKEN_FILE=str(tmp_path / name))
    env.pop("MSP_CONFIG", None)
    return env


def test_controlled_cpu_is_recorded_priced_and_billed(make_cluster,
                                                      tmp_path):
    cluster = make_cluster(billing=PLAN)
    alice = cluster.user("alice")
    job = alice.submit(cluster.script("burn.py", BURN), cluster.data,
                       cluster.output(), name="burn")
    assert alice.wait(job, timeout=60)["state"] == "succeeded"
    [a] = alice.status(job)["attempts"]

    # What the script burnt, plus an interpreter's start and exit.
    assert 0.5 <= a["cpu_user"] < 1.0
    assert 0.0 <= a["cpu_system"] < 0.2
    assert a["wall_seconds"] >= a["cpu_user"]
    assert 2_000 < a["max_rss_kb"] < 40_000
    assert a["cost"] == pytest.approx(expected_cost(PLAN, a, final=True),
                                      rel=1e-12)

    env = cli_env(cluster, tmp_path)
    assert run_cli("login", "alice", "--password", "user-password",
                   env=env).returncode == 0
    shown = run_cli("billing", "--format", "json", env=env)
    assert shown.returncode == 0, shown.stderr
    bill = json.loads(shown.stdout)
    assert bill["user"] == "alice" and bill["currency"] == "EUR"
    [line] = bill["jobs"]
    assert line["job"] == job and line["name"] == "burn"
    assert line["attempts"] == 1 and line["outcomes"] == ["succeeded"]
    assert line["cpu_seconds"] == a["cpu_user"] + a["cpu_system"]
    assert line["wall_seconds"] == a["wall_seconds"]
    assert line["peak_mb"] == a["max_rss_kb"] / 1024
    assert line["cost"] == a["cost"]
    assert bill["totals"]["cost"] == a["cost"]
    assert bill["totals"]["jobs"] == 1

    as_csv = run_cli("billing", "-f", "csv", env=env)
    rows = list(csv.reader(io.StringIO(as_csv.stdout)))
    assert rows[0] == ["job", "user", "name", "attempts", "cpu_seconds",
                       "wall_seconds", "peak_mb", "cost", "currency"]
    assert rows[1][:4] == [str(job), "alice", "burn", "1"]
    assert rows[1][7] == f"{a['cost']:.6f}" and rows[1][8] == "EUR"
    assert rows[2][0] == "total" and rows[2][7] == f"{a['cost']:.6f}"

    table = run_cli("billing", env=env)
    assert table.returncode == 0
    assert f"{a['cost']:.4f}" in table.stdout and "burn" in table.stdout

    # A period that ends before the job shows nothing.
    empty = run_cli("billing", "-f", "json", "--since", "2000-01-01",
                    "--until", "2000-01-31", env=env)
    assert json.loads(empty.stdout)["jobs"] == []
    bad = run_cli("billing", "--since", "yesterday", env=env)
    assert bad.returncode == 2 and "expected a date" in bad.stderr
    # Users see only their own statement.
    other = run_cli("billing", "--all", env=env)
    assert other.returncode == 4


def test_failed_and_lost_attempts(make_cluster):
    free_failures = BillingConfig(per_cpu_second=1.0, per_job=1.0,
                                  charge_failed=False)
    cluster = make_cluster(billing=free_failures)
    c = cluster.admin()
    failing = c.submit(cluster.script("fail.py", FAIL), cluster.data,
                       cluster.output("f"), attempts=2)
    assert c.wait(failing, timeout=60)["state"] == "failed"
    assert [a["cost"] for a in c.status(failing)["attempts"]] == [0.0, 0.0]

    lost = c.submit(cluster.script("lose.py", LOSE_FIRST), cluster.data,
                    cluster.output("l"))
    wait_for(lambda: c.status(lost)["job"]["progress"] == 0.5)
    cluster.workers[0].stop(drain=False, timeout=10)
    wait_for(lambda: c.status(lost)["job"]["state"] == "queued")
    cluster.add_worker("w2")
    assert c.wait(lost, timeout=60)["state"] == "succeeded"
    first, second = c.status(lost)["attempts"]
    assert first["outcome"] == "lost" and first["cost"] == 0.0
    assert second["cost"] == pytest.approx(
        expected_cost(free_failures, second, final=True), rel=1e-12)
    assert second["cost"] >= 1.0


def test_failed_attempts_are_charged_when_the_plan_says(make_cluster):
    cluster = make_cluster(billing=PLAN)
    c = cluster.admin()
    job = c.submit(cluster.script("fail.py", FAIL), cluster.data,
                   cluster.output(), attempts=2)
    assert c.wait(job, timeout=60)["state"] == "failed"
    first, second = c.status(job)["attempts"]
    # The fee per job comes once, with the attempt that ends the job.
    assert first["cost"] == pytest.approx(
        expected_cost(PLAN, first, final=False), rel=1e-12)
    assert second["cost"] == pytest.approx(
        expected_cost(PLAN, second, final=True), rel=1e-12)
    assert second["cost"] > PLAN.per_job > first["cost"] > 0


def test_a_new_plan_does_not_rewrite_what_was_billed(make_cluster):
    cluster = make_cluster(billing=PLAN)
    c = cluster.admin()
    job = c.submit(cluster.script("ok.py", ""), cluster.data,
                   cluster.output())
    assert c.wait(job, timeout=60)["state"] == "succeeded"
    billed = c.billing()["totals"]["cost"]
    assert billed > PLAN.per_job
    for w in cluster.workers:
        w.stop(drain=False, timeout=10)
    cluster.workers.clear()
    cfg = cluster.broker.config
    cluster.broker.stop()
    cluster.broker = Broker(cfg, admin_password=ADMIN_PASSWORD,
                            billing=BillingConfig(per_job=100.0)).start()
    again = cluster.admin().billing()
    assert again["totals"]["cost"] == billed
    assert again["plan"]["per_job"] == 100.0


def test_credit_limit_refuses_submits_once_reached(make_cluster, tmp_path):
    cluster = make_cluster(billing=PLAN)
    admin = cluster.admin()
    admin.user_add("carol", "carol-password", credit_limit=0.2)
    carol = cluster.client()
    carol.login("carol", "carol-password")
    script = cluster.script("ok.py", "")

    job = carol.submit(script, cluster.data, cluster.output("a"))
    assert carol.wait(job, timeout=60)["state"] == "succeeded"
    spent = carol.billing()["totals"]["cost"]
    assert spent >= 0.25
    with pytest.raises(LimitError) as caught:
        carol.submit(script, cluster.data, cluster.output("b"))
    assert caught.value.code == "limit"
    assert caught.value.message.startswith(
        f"credit limit reached: {spent:.2f} of 0.20 EUR charged this month"
    )
    assert [j["id"] for j in carol.jobs()] == [job]

    # An admin raises it, with mspctl.
    env = cli_env(cluster, tmp_path)
    run_cli("login", "admin", "--password", ADMIN_PASSWORD, env=env)
    raised = run_cli("user", "limit", "carol", "10", env=env)
    assert raised.returncode == 0, raised.stderr
    assert "credit limit 10" in raised.stdout
    again = carol.submit(script, cluster.data, cluster.output("b"))
    assert carol.wait(again, timeout=60)["state"] == "succeeded"
    # And removes it; user add takes one too.
    assert run_cli("user", "limit", "carol", env=env).returncode == 0
    added = run_cli("user", "add", "dan", "--password", "dan-password",
                    "--credit-limit", "5", env=env)
    assert added.returncode == 0, added.stderr
    users = {u["user"]: u for u in admin.users()}
    assert users["carol"]["credit_limit"] is None
    assert users["dan"]["credit_limit"] == 5.0


def test_admins_bill_anyone_users_only_themselves(make_cluster):
    cluster = make_cluster(billing=PLAN)
    alice, bob = cluster.user("alice"), cluster.user("bob")
    script = cluster.script("ok.py", "")
    jobs = {}
    for name, c in (("alice", alice), ("bob", bob)):
        jobs[name] = c.submit(script, cluster.data, cluster.output(name))
        assert c.wait(jobs[name], timeout=60)["state"] == "succeeded"
    admin = cluster.admin()
    everyone = admin.billing(all_users=True)
    assert {line["user"] for line in everyone["jobs"]} == {"alice", "bob"}
    assert everyone["user"] is None
    assert [line["job"] for line in admin.billing("bob")["jobs"]] == \
        [jobs["bob"]]
    assert [line["job"] for line in bob.billing()["jobs"]] == [jobs["bob"]]
    with pytest.raises(ForbiddenError):
        bob.billing("alice")
    with pytest.raises(ForbiddenError):
        bob.billing(all_users=True)
    total = sum(line["cost"] for line in everyone["jobs"])
    assert everyone["totals"]["cost"] == pytest.approx(total, rel=1e-12)
