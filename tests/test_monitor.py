"""mspctl monitor: its model, its screen and its terminal, on real brokers."""

from __future__ import annotations

import io
import json
import re
import signal
import sys

import pexpect
import pytest
import zmq
from rich.cells import cell_len
from rich.console import Console

from msp import protocol
from msp.broker import Broker
from msp.client import Client
from msp.monitor import Feed, Model, render
from msp.monitor.model import view_of
from msp.monitor.view import liveness_style

from .conftest import (
    ADMIN_PASSWORD,
    BLOCK,
    broker_config,
    cli_env,
    free_port,
    run_cli,
    wait_for,
)

OK = "print('ok')\n"
FAIL = "import sys\nprint('no', file=sys.stderr)\nsys.exit(3)\n"


def make_busy(cluster):
    """With two workers: each on a job that waits; a job in every other
    state."""
    c = cluster.admin()
    ok = cluster.script("ok.py", OK)
    data = cluster.data
    jobs = {}
    jobs["succeeded"] = c.submit(ok, data, cluster.output("ok"))
    assert c.wait(jobs["succeeded"], timeout=30)["state"] == "succeeded"
    jobs["failed"] = c.submit(cluster.script("fail.py", FAIL), data,
                              cluster.output("fail"), attempts=1)
    assert c.wait(jobs["failed"], timeout=30)["state"] == "failed"
    block = cluster.script("block.py", BLOCK)
    running = [c.submit(block, data, cluster.output(f"b{i}"), [f"go{i}"])
               for i in (1, 2)]
    for job in running:
        wait_for(lambda job=job: c.status(job)["job"]["progress"] == 0.5)
    jobs["queued"] = c.submit(ok, data, cluster.output("q"), priority=5)
    jobs["cancelled"] = c.submit(ok, data, cluster.output("c"))
    c.cancel(jobs["cancelled"])
    return c, jobs, running


def screen(view: dict, width: int, height: int | None) -> str:
    console = Console(width=width, height=height or 1000, record=True,
                      file=io.StringIO(), force_terminal=True,
                      color_system="truecolor", legacy_windows=False)
    console.print(render(view, width, height))
    return console.export_text(styles=False)


def header_of(text: str, first: str) -> str:
    return next(line for line in text.splitlines()
                if line.split()[:1] == [first])


def test_screen_fits_80x24_and_uses_200x50(make_cluster):
    cluster = make_cluster(workers=2)
    c, jobs, running = make_busy(cluster)
    view = view_of(c.stats(), cluster.broker.endpoints["client"])

    small, large = screen(view, 80, 24), screen(view, 200, 50)

    for text, (width, height) in ((small, (80, 24)), (large, (200, 50))):
        lines = text.splitlines()
        assert len(lines) <= height
        assert max(cell_len(line) for line in lines) <= width
        assert ("queued 1  running 2  succeeded 1  failed 1  cancelled 1"
                in text)
        assert "queue 1 waiting (p5 1)" in text
        for name in ("w1", "w2"):
            [row] = [line for line in lines if line.startswith(name + " ")]
            assert " busy " in row and "50%" in row
        for state, job in jobs.items():
            assert any(line.split()[:2] == [str(job), state]
                       for line in lines), (state, job)
        for job in running:
            assert any(line.split()[:2] == [str(job), "running"]
                       and "50%" in line for line in lines)
    # At 80 columns the least useful columns go; 200 has room for them.
    assert "pid" not in header_of(small, "worker").split()
    assert "worker" not in header_of(small, "job").split()
    assert "pid" in header_of(large, "worker").split()
    assert "worker" in header_of(large, "job").split()
    assert "exit status 3" in large and "exit status 3" not in small
    # Admins see usage today: one user, two jobs ended in one attempt each;
    # beside the workers on a wide screen, under the jobs on a small one.
    usage = re.compile(r"\badmin +2 +2 ")
    assert usage.search(small.splitlines()[-1])
    [beside] = [line for line in large.splitlines() if usage.search(line)]
    assert beside.startswith("w1 ")


def test_a_short_screen_cuts_lists_and_says_how_much(make_cluster):
    cluster = make_cluster(workers=2)
    c, jobs, running = make_busy(cluster)
    view = view_of(c.stats(), cluster.broker.endpoints["client"])

    text = screen(view, 80, 12)

    lines = text.splitlines()
    assert len(lines) <= 12
    assert max(cell_len(line) for line in lines) <= 80
    assert "w1" in text and "more" in text
    # Given as much room as it wants, nothing is cut.
    assert "more" not in screen(view, 80, None)


def test_events_keep_the_model_equal_to_a_fresh_snapshot(make_cluster):
    cluster = make_cluster(workers=2)
    c = cluster.admin()
    model = Model(cluster.broker.endpoints["client"])
    with Feed(c, cluster.broker.endpoints["events"], model) as feed:
        model.load(c.stats(), feed.clock(), feed.wall())
        # Every job below is only known to the model through events.
        _, jobs, running = make_busy(cluster)

        def caught_up():
            feed.step(0.05)
            states = {j["id"]: j["state"] for j in model.recent}
            return all(states.get(job) == state
                       for state, job in jobs.items())

        wait_for(caught_up, message="the model to see every job")
        wait_for(lambda: feed.step(0.05) or all(
            w["job"] in running for w in model.workers.values()
        ))
        mine = model.view(feed.clock(), feed.wall())
        fresh = view_of(c.stats())

    assert model.snapshots == 1
    assert mine["counts"] == fresh["counts"]
    assert mine["queue"]["by_priority"] == fresh["queue"]["by_priority"]
    assert sum(mine["finished_per_minute"]) == \
        sum(fresh["finished_per_minute"])

    def jobs_of(view):
        return [(j["id"], j["state"], j["attempts"], j["progress"])
                for j in view["recent"]]

    def workers_of(view):
        return [(w["name"], w["state"], w["job"]) for w in view["workers"]]

    assert jobs_of(mine) == jobs_of(fresh)
    assert workers_of(mine) == workers_of(fresh)


def test_a_missed_event_or_a_new_run_asks_for_a_snapshot():
    snap = {
        "run": "r1", "seq": 10, "time": 1000.0, "user": "admin",
        "admin": True, "heartbeat_interval": 1.0, "liveness": 3,
        "tick": 0.5, "workers": [], "recent": [],
        "counts": {"queued": 1}, "queue": {"by_priority": {"0": 1},
                                           "oldest_wait": 5.0},
        "finished_per_minute": [0] * 15,
    }
    model = Model()
    model.load(snap, 0.0, 1000.0)
    assert model.wants_snapshot(0.1) is None

    def job(seq, run="r1", **kw):
        return {"run": run, "seq": seq, "at": 1001.0, "job": 7,
                "event": "assigned", "state": "running", "was": "queued",
                "priority": 0, **kw}

    # Older than the snapshot: already counted.
    model.apply("job", job(10), 0.2)
    assert model.counts["running"] == 0 and model.seq == 10
    model.apply("job", job(11), 0.2)
    assert model.counts["running"] == 1 and model.counts["queued"] == 0
    assert model.by_priority == {} and model.oldest_at is None
    # A gap: nothing applied until a new snapshot.
    model.apply("job", job(13, job=8), 0.3)
    assert model.seq == 11 and model.wants_snapshot(0.3)
    # Asked for (the feed does that); event 14 comes first, and is kept.
    model.snapshot_asked()
    model.apply("job", job(14, job=9), 0.35)
    assert model.seq == 11
    # The snapshot includes 13; 14 goes on top of it.
    model.load(dict(snap, seq=13, counts={"queued": 2}), 0.4, 1000.0)
    assert model.seq == 14
    assert model.counts["running"] == 1 and model.counts["queued"] == 1
    assert model.wants_snapshot(0.5) is None
    # A restarted broker: numbers start again under a new run.
    model.apply("job", job(1, run="r2"), 0.6)
    assert model.wants_snapshot(0.6) == "the broker restarted"
    model.snapshot_asked()
    model.load(dict(snap, run="r2", seq=1), 0.7, 1000.0)
    # Stragglers of the old run change nothing any more.
    model.apply("job", job(14), 0.8)
    assert model.run == "r2" and model.seq == 1
    assert model.wants_snapshot(0.8) is None
    # Silence: a snapshot after a few missed ticks.
    assert model.wants_snapshot(0.8 + model.silence) == "no events"


def test_monitor_says_the_broker_is_gone_and_resyncs_after_restart(
    tmp_path,
):
    ports = {k: free_port() for k in ("client", "worker", "events")}
    cfg = broker_config(
        tmp_path, **{f"{k}_endpoint": f"tcp://127.0.0.1:{p}"
                     for k, p in ports.items()}
    )
    broker = Broker(cfg, admin_password=ADMIN_PASSWORD).start()
    c = Client(broker.endpoints["client"], timeout=2.0, retries=1)
    c.login("admin", ADMIN_PASSWORD)
    model = Model(broker.endpoints["client"], broker.endpoints["events"])
    feed = Feed(c, broker.endpoints["events"], model, timeout=0.5,
                retry=0.2)
    try:
        model.load(c.stats(), feed.clock(), feed.wall())
        first = broker.run_id
        wait_for(lambda: feed.step(0.05) or model.heard_at is not None
                 and model.seq > 0)

        broker.stop()
        wait_for(lambda: feed.step(0.05) or not model.connected,
                 timeout=20, message="the monitor to see the broker gone")
        assert "broker not answering" in model.problem
        text = screen(model.view(feed.clock(), feed.wall()), 80, 24)
        assert "broker not answering" in text

        def start_again():
            # libzmq frees the old sockets' ports in the background.
            try:
                return Broker(cfg, admin_password=ADMIN_PASSWORD).start()
            except zmq.ZMQError as exc:
                if exc.errno != zmq.EADDRINUSE:
                    raise
                return None

        broker = wait_for(start_again, message="the ports to be free")
        wait_for(lambda: feed.step(0.05) or model.run == broker.run_id
                 and model.connected and model.problem is None,
                 timeout=20, message="the monitor to resync")
        assert broker.run_id != first and model.snapshots >= 2

        # Events of the new run flow into the model again.
        script = tmp_path / "ok.py"
        script.write_text(OK)
        (tmp_path / "data").mkdir()
        job = c.submit(script, tmp_path / "data", tmp_path / "out")
        wait_for(lambda: feed.step(0.05) or any(
            j["id"] == job for j in model.recent))
        assert model.counts["queued"] == 1
    finally:
        feed.close()
        c.close()
        broker.stop()


def test_a_silent_worker_turns_yellow_then_red_before_it_is_dropped(
    make_cluster, zmq_context
):
    cluster = make_cluster(workers=0, heartbeat_interval=0.4, liveness=6)
    c = cluster.admin()
    model = Model()
    styles = []
    with Feed(c, cluster.broker.endpoints["events"], model) as feed:
        model.load(c.stats(), feed.clock(), feed.wall())
        fake = zmq_context.socket(zmq.DEALER)
        fake.linger = 0
        fake.connect(cluster.worker_endpoint)
        fake.send_multipart(protocol.encode(protocol.READY, {"name": "mute"}))

        def watch():
            feed.step(0.02)
            view = model.view(feed.clock(), feed.wall())
            rows = [w for w in view["workers"] if w["name"] == "mute"]
            if rows:
                style = liveness_style(rows[0]["liveness"], view["liveness"])
                if not styles or styles[-1] != style:
                    styles.append(style)
            return styles and not rows

        wait_for(watch, timeout=20, message="the silent worker to go")
    assert styles == ["", "yellow", "red"]


def test_monitor_once_and_json(make_cluster, tmp_path):
    cluster = make_cluster(workers=2)
    c, jobs, running = make_busy(cluster)
    env = dict(cli_env(cluster, tmp_path), COLUMNS="120")

    once = run_cli("monitor", "--once", env=env)
    as_json = run_cli("monitor", "--json", env=env)
    stats = run_cli("stats", env=env)
    workers = run_cli("workers", env=env)

    assert once.returncode == 0, once.stderr
    assert "running 2" in once.stdout and "q quits" not in once.stdout
    assert all(len(line) <= 120 for line in once.stdout.splitlines())
    view = json.loads(as_json.stdout)
    assert view["counts"]["running"] == 2
    assert sorted(w["name"] for w in view["workers"]) == ["w1", "w2"]
    assert sorted(w["job"] for w in view["workers"]) == sorted(running)
    assert {j["id"]: j["state"] for j in view["recent"]}[jobs["queued"]] \
        == "queued"
    assert stats.returncode == 0 and "queue 1 waiting" in stats.stdout
    assert workers.returncode == 0
    assert [line.split()[:2] for line in workers.stdout.splitlines()[1:]] \
        == [["w1", "busy"], ["w2", "busy"]]


def test_monitor_in_a_terminal_quits_on_q_and_restores_it(
    make_cluster, tmp_path
):
    cluster = make_cluster(workers=2)
    env = cli_env(cluster, tmp_path)
    command = f"{sys.executable} -m msp monitor; echo exit=$?; stty -a"
    child = pexpect.spawn("bash", ["-c", command], env=env,
                          dimensions=(24, 80), encoding="utf-8", timeout=30)
    try:
        child.expect("w2")
        child.expect("q quits")
        child.send("q")
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    shown = child.before
    assert "exit=0" in shown
    # The alternate screen was left and the cursor shown again.
    assert "\x1b[?1049l" in shown and "\x1b[?25h" in shown
    # Line editing and echo are back on.
    modes = shown.split("exit=0", 1)[1].split()
    assert "icanon" in modes and "echo" in modes


@pytest.mark.parametrize("inherited", [signal.SIG_DFL, signal.SIG_IGN])
def test_ctrl_c_quits_the_monitor_too(make_cluster, tmp_path, inherited):
    """Also when started with SIGINT ignored, as a shell does for a job it
    starts in the background (python then installs no handler of its
    own): the monitor takes Ctrl-C itself."""
    cluster = make_cluster(workers=1)
    env = cli_env(cluster, tmp_path)
    child = pexpect.spawn(sys.executable, ["-m", "msp", "monitor"], env=env,
                          dimensions=(24, 80), encoding="utf-8", timeout=30,
                          preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                           inherited))
    try:
        child.expect("w1")
        child.sendintr()
        child.expect(pexpect.EOF)
    finally:
        child.close(force=True)
    assert child.exitstatus == 0
    assert "\x1b[?1049l" in child.before


def test_malformed_events_are_dropped_or_bring_a_snapshot(
    make_cluster, zmq_context
):
    cluster = make_cluster(workers=0)
    c = cluster.admin()
    fake = zmq_context.socket(zmq.PUB)
    fake.linger = 0
    port = fake.bind_to_random_port("tcp://127.0.0.1")
    model = Model()
    with Feed(c, f"tcp://127.0.0.1:{port}", model) as feed:
        model.load(c.stats(), feed.clock(), feed.wall())
        run, seq = model.run, model.seq
        good = {"run": run, "event": "joined", "worker": "w9", "at": 1.0}

        def publish_until_applied(body):
            # The subscription takes effect some time after connecting.
            def applied():
                fake.send_multipart([b"worker", json.dumps(body).encode()])
                feed.step(0.02)
                return model.seq == body["seq"]
            wait_for(applied, message="the event to be applied")

        publish_until_applied(dict(good, seq=seq + 1))
        for frames in (
            [b"job"], [b"job", b"not json"], [b"job", b"[1, 2]"],
            [b"job", json.dumps({"run": run, "seq": "7"}).encode()],
            [b"\xff", json.dumps(dict(good, seq=seq + 9)).encode()],
        ):
            fake.send_multipart(frames)
        publish_until_applied(dict(good, seq=seq + 2, worker="w10"))
        assert model.stale is None
        assert {"w9", "w10"} <= set(model.workers)

        # Well-formed, but not an event this monitor knows how to apply.
        # (Once the real broker's numbers are past it, so that the
        # snapshot it brings does not have this event replayed on top.)
        wait_for(lambda: cluster.broker.seq > seq + 3)
        fake.send_multipart([b"job", json.dumps(
            {"run": run, "seq": seq + 3, "event": "queued", "at": 1.0}
        ).encode()])
        wait_for(lambda: feed.step(0.02) or model.stale)
        assert model.stale == "an event it did not understand"
        # The broker's own snapshot puts it right.
        wait_for(lambda: feed.step(0.02) or model.snapshots == 2)
        assert model.stale is None and "w9" not in model.workers
    fake.close()


def test_a_user_sees_their_own_jobs_and_no_usage(make_cluster):
    cluster = make_cluster(workers=0)
    alice, bob = cluster.user("alice"), cluster.user("bob")
    ok = cluster.script("ok.py", OK)
    mine = alice.submit(ok, cluster.data, cluster.output("a"))
    bob.submit(ok, cluster.data, cluster.output("b"))
    model = Model()
    with Feed(alice, cluster.broker.endpoints["events"], model) as feed:
        model.load(alice.stats(), feed.clock(), feed.wall())
        later = alice.submit(ok, cluster.data, cluster.output("a2"))
        bob.submit(ok, cluster.data, cluster.output("b2"))
        wait_for(lambda: feed.step(0.05) or model.counts["queued"] == 4)
        view = model.view(feed.clock(), feed.wall())

    assert [j["id"] for j in view["recent"]] == [later, mine]
    assert view["usage_today"] is None and view["admin"] is False
    text = screen(view, 200, 50)
    assert "alice" in text.splitlines()[0]
    assert "user" not in header_of(text, "job").split()
    assert "jobs tries" not in text


def test_a_user_sees_the_workers_but_not_whose_job_they_run(make_cluster,
                                                            tmp_path):
    cluster = make_cluster()
    alice, bob = cluster.user("alice"), cluster.user("bob")
    script = cluster.script("block.py", BLOCK)
    job = alice.submit(script, cluster.data, cluster.output(), ["go"])
    wait_for(lambda: alice.status(job)["job"]["progress"] == 0.5,
             message="the job to run")

    [mine] = alice.stats()["workers"]
    [theirs] = bob.stats()["workers"]
    [admins] = cluster.admin().stats()["workers"]

    assert mine["job"] == job == admins["job"]
    assert mine["progress"] == 0.5
    assert theirs["state"] == "busy" and theirs["name"] == mine["name"]
    assert (theirs["job"], theirs["attempt"], theirs["job_seconds"],
            theirs["progress"]) == (None, None, None, None)
    (cluster.data / "go").write_text("")
    assert alice.wait(job, timeout=30)["state"] == "succeeded"


def test_the_workers_table_is_for_admins(make_cluster, tmp_path):
    cluster = make_cluster()
    env = cli_env(cluster, tmp_path)
    assert run_cli("workers", env=env).returncode == 0
    user = cluster.user("carol")
    (tmp_path / "token").write_text(user.token + "\n")
    refused = run_cli("workers", env=env)
    assert refused.returncode == 4
    assert "admin" in refused.stderr
