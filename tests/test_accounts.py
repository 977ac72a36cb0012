"""Sessions, revocation, password guessing and the audit trail, against a
real broker over real sockets."""

from __future__ import annotations

import json
import logging
import os
import time

import pytest
import zmq
from argon2 import extract_parameters

from msp import auth, protocol
from msp.broker import Broker
from msp.client import Client
from msp.errors import AuthError, MspError, ThrottledError

from .conftest import ADMIN_PASSWORD, broker_config, run_cli, wait_for


class Clock:
    """time.monotonic or time.time, moved forward by the test."""

    def __init__(self, base):
        self.base = base
        self.offset = 0.0

    def __call__(self) -> float:
        return self.base() + self.offset


@pytest.fixture
def make_broker(tmp_path):
    made = []

    def make(transport="tcp", clock=None, wall=None, **overrides) -> Broker:
        root = tmp_path / f"b{len(made)}"
        root.mkdir()
        cfg = broker_config(root, transport, **overrides)
        kw = {}
        if clock is not None:
            kw["clock"] = clock
        if wall is not None:
            kw["wall"] = wall
        broker = Broker(cfg, admin_password=ADMIN_PASSWORD, **kw).start()
        made.append(broker)
        return broker

    yield make
    for broker in made:
        broker.stop()


def client(broker, **kw) -> Client:
    return Client(broker.endpoints["client"], timeout=5.0, **kw)


def admin(broker) -> Client:
    c = client(broker)
    c.login("admin", ADMIN_PASSWORD)
    return c


def test_logout_revokes_the_token(make_broker):
    broker = make_broker()
    c = admin(broker)
    token = c.token
    assert c.jobs() == []
    c.logout()

    stale = client(broker, token=token)
    with pytest.raises(AuthError, match="revoked"):
        stale.jobs()
    # The store says so too: a restarted broker would refuse it as well.
    found = broker.store.session(auth.token_hash(token))
    assert found.revoked is True
    entries = admin(broker).audit(event="logout")
    assert [e["actor"] for e in entries] == ["admin"]


def test_disabling_a_user_revokes_their_sessions_and_logins(make_broker):
    broker = make_broker()
    a = admin(broker)
    a.user_add("mallory", "mallory-password")
    m = client(broker)
    m.login("mallory", "mallory-password")
    assert m.jobs() == []

    a.user_disable("mallory")

    with pytest.raises(AuthError, match="revoked"):
        m.jobs()
    with pytest.raises(AuthError) as caught:
        client(broker).login("mallory", "mallory-password")
    # A disabled user hears what a wrong password hears.
    assert caught.value.code == "unauthenticated"
    assert caught.value.message == "wrong user name or password"
    entries = a.audit(event="user_disable")
    assert entries[0]["actor"] == "admin"
    assert entries[0]["detail"]["user"] == "mallory"


def test_an_expired_session_is_refused(make_broker):
    wall = Clock(time.time)
    broker = make_broker(wall=wall, session_ttl=60.0)
    c = admin(broker)
    assert c.jobs() == []
    wall.offset = 61.0
    with pytest.raises(AuthError, match="expired"):
        c.jobs()


def test_unknown_user_and_wrong_password_look_the_same(make_broker):
    broker = make_broker()
    c = client(broker)
    answers = []
    for name in ("admin", "nobody", "x" * 65):
        with pytest.raises(AuthError) as caught:
            c.login(name, "wrong-password")
        answers.append((caught.value.code, caught.value.message))
    assert answers == [("unauthenticated", "wrong user name or password")] * 3
    # Equal work: the hash an unknown name is checked against has the
    # same argon2 cost as a real user's.
    real = broker.store.user("admin").password_hash
    assert extract_parameters(broker.passwords._dummy) == \
        extract_parameters(real)


def test_failed_logins_of_a_name_are_throttled_with_doubling_delays(
    make_broker
):
    clock = Clock(time.monotonic)
    broker = make_broker(
        clock=clock, login_throttle_after=3, login_throttle_peer_after=1000,
        login_throttle_delay=60.0, login_throttle_max=240.0,
    )
    throttle = broker.clients.throttle
    admin(broker).user_add("alice", "alice-password")
    c = client(broker)

    for _ in range(3):
        with pytest.raises(AuthError, match="wrong user name"):
            c.login("alice", "guess-guess")
    failures, until = throttle.state("user", "alice")
    assert failures == 3

    # Blocked, even with the right password, and without a hash spent.
    with pytest.raises(ThrottledError) as caught:
        c.login("alice", "alice-password")
    assert caught.value.code == "throttled"
    assert caught.value.message == \
        "too many failed logins; retry in 60 s"
    assert throttle.state("user", "alice")[0] == 3
    # Another name is not affected.
    assert admin(broker).token

    # Each further failure doubles the delay, up to the cap.
    for delay in (120, 240, 240):
        clock.offset = until - clock.base() + 1  # the block is over
        with pytest.raises(AuthError, match="wrong user name"):
            c.login("alice", "guess-guess")
        failures, until = throttle.state("user", "alice")
        with pytest.raises(ThrottledError) as caught:
            c.login("alice", "guess-guess")
        assert caught.value.message == \
            f"too many failed logins; retry in {delay} s"

    # Once the delay is over, the right password works and clears the count.
    clock.offset = until - clock.base() + 1
    assert c.login("alice", "alice-password")["user"] == "alice"
    assert throttle.state("user", "alice") == (0, 0.0)

    a = admin(broker)
    throttled = a.audit(event="login_throttled")
    assert [e["detail"]["delay"] for e in reversed(throttled)] == \
        [60.0, 120.0, 240.0, 240.0]
    assert {e["actor"] for e in throttled} == {"alice"}
    assert len(a.audit(event="login_failed", actor="alice")) == 6


def test_failed_logins_from_one_peer_are_throttled(make_broker):
    broker = make_broker(login_throttle_after=100,
                         login_throttle_peer_after=4,
                         login_throttle_delay=60.0)
    c = client(broker)
    for i in range(4):
        with pytest.raises(AuthError, match="wrong user name"):
            c.login(f"name{i}", "guess-guess")
    with pytest.raises(ThrottledError, match="retry in 60 s"):
        c.login("admin", ADMIN_PASSWORD)
    failures, _ = broker.clients.throttle.state("peer", "127.0.0.1")
    assert failures == 4


def test_a_burst_of_guesses_gets_no_more_checks_than_a_series(make_broker):
    broker = make_broker(login_throttle_after=3,
                         login_throttle_peer_after=1000,
                         login_throttle_delay=60.0)
    context = zmq.Context.instance()
    socks = []
    for _ in range(8):
        sock = context.socket(zmq.REQ)
        sock.linger = 0
        sock.connect(broker.endpoints["client"])
        socks.append(sock)
    for sock in socks:
        sock.send_multipart(protocol.encode(
            b"LOGIN", {"user": "admin", "password": "guess-guess"}
        ))
    codes = []
    for sock in socks:
        assert sock.poll(10_000), "no reply"
        reply = sock.recv_multipart()
        codes.append(json.loads(reply[2])["code"])
        sock.close(linger=0)
    assert sorted(codes) == ["throttled"] * 5 + ["unauthenticated"] * 3
    assert broker.clients.throttle.state("user", "admin")[0] == 3


def test_security_events_reach_the_audit_table_and_logger(
    make_cluster, caplog
):
    caplog.set_level(logging.INFO, logger="msp.audit")
    cluster = make_cluster(workers=0, worker_secret="right-secret")
    a = cluster.admin()
    with pytest.raises(AuthError):
        cluster.client().login("admin", "wrong-password")
    bob = cluster.user("bob")
    job = bob.submit(cluster.script("ok.py", ""), cluster.data,
                     cluster.output())
    a.cancel(job)
    a.user_set("bob", 10.0)
    a.passwd("another-password", "bob")
    a.user_disable("bob")
    rogue = zmq.Context.instance().socket(zmq.DEALER)
    rogue.linger = 0
    rogue.connect(cluster.worker_endpoint)
    rogue.send_multipart(protocol.encode(protocol.READY, {"name": "rogue"}))
    wait_for(lambda: a.audit(event="worker_refused"))
    rogue.close(linger=0)

    events = [e["event"] for e in reversed(a.audit())]
    for expected in ("user_add", "login", "login_failed", "cancel_by_admin",
                     "user_set", "passwd", "user_disable", "worker_refused"):
        assert expected in events, expected
    logged = [r.getMessage() for r in caplog.records
              if r.name == "msp.audit"]
    assert any(m.startswith("login_failed by admin") for m in logged)
    assert any(m.startswith("cancel_by_admin by admin") and
               f'"job": {job}' in m for m in logged)
    assert any(m.startswith("worker_refused by -") for m in logged)
    # Users may not read the trail.
    with pytest.raises(MspError) as caught:
        cluster.user("carol").audit()
    assert caught.value.code == "forbidden"


def test_mspctl_audit_lists_recent_entries(make_cluster, tmp_path):
    cluster = make_cluster(workers=0)
    cluster.admin().user_add("dave", "dave-password")
    env = dict(os.environ,
               MSP_CLIENT_BROKER=cluster.broker.endpoints["client"],
               MSP_CLIENT_TOKEN_FILE=str(tmp_path / "token"))
    env.pop("MSP_CONFIG", None)
    assert run_cli("login", "admin", "--password", ADMIN_PASSWORD,
                   env=env).returncode == 0
    shown = run_cli("audit", "--limit", "5", env=env)
    assert shown.returncode == 0, shown.stderr
    assert "user_add" in shown.stdout and "dave" in shown.stdout
    as_json = run_cli("audit", "--event", "user_add", "--json", env=env)
    entries = json.loads(as_json.stdout)
    assert [e["detail"]["user"] for e in entries] == ["dave", "admin"]

    assert run_cli("login", "dave", "--password", "dave-password",
                   env=env).returncode == 0
    refused = run_cli("audit", env=env)
    assert refused.returncode == 4
    assert "admin role" in refused.stderr


def test_token_file_is_private(make_cluster, tmp_path):
    cluster = make_cluster(workers=0)
    token_file = tmp_path / "cfg" / "token"
    env = dict(os.environ,
               MSP_CLIENT_BROKER=cluster.broker.endpoints["client"],
               MSP_CLIENT_TOKEN_FILE=str(token_file))
    env.pop("MSP_CONFIG", None)
    done = run_cli("login", "admin", "--password", ADMIN_PASSWORD, env=env)
    assert done.returncode == 0, done.stderr
    assert token_file.stat().st_mode & 0o777 == 0o600
    assert token_file.parent.stat().st_mode & 0o777 == 0o700
    token = token_file.read_text().strip()
    assert client(cluster.broker, token=token).jobs() == []
    assert run_cli("logout", env=env).returncode == 0
    assert not token_file.exists()
    with pytest.raises(AuthError):
        client(cluster.broker, token=token).jobs()
