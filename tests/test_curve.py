"""ZeroMQ CURVE: encrypted, key-authenticated endpoints, with real keys
and real sockets."""

from __future__ import annotations

import json
import os
import shutil
import threading

import pytest
import zmq

from msp import keys
from msp.client import Client
from msp.config import WorkerConfig
from msp.errors import BrokerUnavailable, ConfigError
from msp.worker import Worker

from .conftest import ADMIN_PASSWORD, run_cli, wait_for


@pytest.fixture
def keyring(tmp_path):
    """Key pairs for the broker, a worker, a user and a stranger; the
    worker's and the user's public keys are allowed."""
    folder = tmp_path / "keys"
    allowed = tmp_path / "allowed"
    workers = tmp_path / "workers"
    allowed.mkdir()
    workers.mkdir()
    ring = {}
    for name in ("broker", "worker", "alice", "stranger"):
        public, secret = keys.generate(folder, name)
        ring[name] = {"public": str(public), "secret": str(secret)}
    for name in ("worker", "alice"):
        shutil.copy(ring[name]["public"], allowed)
    shutil.copy(ring["worker"]["public"], workers)
    ring["allowed"], ring["workers"] = str(allowed), str(workers)
    return ring


def curve(ring, name, server="broker"):
    public, secret = keys.load_secret(ring[name]["secret"])
    return {"public": public, "secret": secret,
            "server": keys.load_public(ring[server]["public"])}


def broker_keys(ring, **extra):
    return dict(curve_secret_key_file=ring["broker"]["secret"],
                curve_allowed_keys_dir=ring["allowed"], **extra)


def worker_keys(ring, name):
    return dict(curve_secret_key_file=ring[name]["secret"],
                curve_server_key_file=ring["broker"]["public"])


def refused(admin, endpoint):
    return [e for e in admin.audit(event="key_refused")
            if e["detail"]["endpoint"] == endpoint]


def test_keys_generate_writes_a_private_pair(tmp_path):
    env = dict(os.environ)
    env.pop("MSP_CONFIG", None)
    done = run_cli("keys", "generate", "w1", "--dir", str(tmp_path / "k"),
                   env=env)
    assert done.returncode == 0, done.stderr
    public, secret = tmp_path / "k" / "w1.key", tmp_path / "k" / "w1.key_secret"
    assert secret.stat().st_mode & 0o777 == 0o600
    assert public.stat().st_mode & 0o777 == 0o644
    pub, sec = keys.load_secret(str(secret))
    assert keys.load_public(str(public)) == pub and len(sec) == 40
    assert "secret-key" not in public.read_text()

    again = run_cli("keys", "generate", "w1", "--dir", str(tmp_path / "k"),
                    env=env)
    assert again.returncode == 2 and "--force" in again.stderr
    assert keys.load_secret(str(secret)) == (pub, sec)
    forced = run_cli("keys", "generate", "w1", "--dir",
                     str(tmp_path / "k"), "--force", env=env)
    assert forced.returncode == 0
    assert keys.load_secret(str(secret)) != (pub, sec)


def test_right_keys_run_jobs_and_wrong_keys_get_nothing(
    make_cluster, keyring
):
    cluster = make_cluster(workers=0, **broker_keys(keyring))
    cluster.add_worker("good", **worker_keys(keyring, "worker"))
    admin = cluster.client(curve=curve(keyring, "alice"))
    admin.login("admin", ADMIN_PASSWORD)
    script = cluster.script("ok.py", "print('over curve')\n")

    job = admin.submit(script, cluster.data, cluster.output())
    assert admin.wait(job, timeout=30)["state"] == "succeeded"
    assert admin.logs(job)["data"] == "over curve\n"

    # No keys, a stranger's keys, or the wrong broker key: no reply at all.
    for keyset in (None, curve(keyring, "stranger"),
                   curve(keyring, "alice", server="stranger")):
        c = Client(cluster.broker.endpoints["client"], timeout=0.3,
                   retries=2, curve=keyset)
        with pytest.raises(BrokerUnavailable, match="after 2 tries"):
            c.ping()
        c.close()
    entries = wait_for(lambda: refused(admin, "client"))
    stranger = keys.load_public(keyring["stranger"]["public"]).decode()
    assert [e["detail"]["key"] for e in entries] == [stranger]
    assert entries[0]["detail"]["address"] == "127.0.0.1"


def test_a_worker_with_unknown_keys_is_never_registered(
    make_cluster, keyring
):
    cluster = make_cluster(workers=0, **broker_keys(keyring))
    admin = cluster.client(curve=curve(keyring, "alice"))
    admin.login("admin", ADMIN_PASSWORD)
    job = admin.submit(cluster.script("ok.py", ""), cluster.data,
                       cluster.output())
    rogue = Worker(WorkerConfig(
        broker=cluster.worker_endpoint, name="rogue", heartbeat_interval=0.1,
        reconnect_min=0.1, reconnect_max=0.2,
        **worker_keys(keyring, "stranger"),
    ))
    thread = threading.Thread(target=rogue.run, daemon=True)
    thread.start()
    try:
        entries = wait_for(lambda: refused(admin, "worker"))
        assert entries[0]["detail"]["key"] == \
            keys.load_public(keyring["stranger"]["public"]).decode()
        assert admin.workers() == []
        assert admin.status(job)["job"]["state"] == "queued"
        assert not rogue.connected.is_set()
    finally:
        rogue.stop(drain=False)
        thread.join(5)
    cluster.add_worker("good", **worker_keys(keyring, "worker"))
    assert admin.wait(job, timeout=30)["state"] == "succeeded"
    assert [w["name"] for w in admin.workers()] == ["good"]


def test_a_users_key_cannot_serve_as_a_worker(make_cluster, keyring):
    cluster = make_cluster(workers=0, **broker_keys(
        keyring, curve_worker_keys_dir=keyring["workers"]))
    admin = cluster.client(curve=curve(keyring, "alice"))
    admin.login("admin", ADMIN_PASSWORD)
    sneaky = Worker(WorkerConfig(
        broker=cluster.worker_endpoint, name="sneaky",
        heartbeat_interval=0.1, reconnect_min=0.1, reconnect_max=0.2,
        **worker_keys(keyring, "alice"),
    ))
    thread = threading.Thread(target=sneaky.run, daemon=True)
    thread.start()
    try:
        wait_for(lambda: refused(admin, "worker"))
        assert admin.workers() == []
    finally:
        sneaky.stop(drain=False)
        thread.join(5)
    cluster.add_worker("good", **worker_keys(keyring, "worker"))
    assert [w["name"] for w in admin.workers()] == ["good"]


def test_events_are_published_over_curve(make_cluster, keyring,
                                         zmq_context):
    cluster = make_cluster(workers=0, **broker_keys(keyring))
    admin = cluster.client(curve=curve(keyring, "alice"))
    admin.login("admin", ADMIN_PASSWORD)
    endpoint = cluster.broker.endpoints["events"]
    subs = {}
    for who in ("alice", "stranger"):
        sub = zmq_context.socket(zmq.SUB)
        sub.linger = 0
        keys.apply_client(sub, curve(keyring, who))
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(endpoint)
        subs[who] = sub
    wait_for(lambda: refused(admin, "events"))
    script = cluster.script("ok.py", "")

    def heard():
        # PUB drops what it sends before a subscription has arrived, so
        # keep submitting until the keyed subscriber hears one.
        admin.submit(script, cluster.data, cluster.output())
        if subs["alice"].poll(200):
            return subs["alice"].recv_multipart()
        return None

    topic, body = wait_for(heard, message="an event over CURVE")
    event = json.loads(body)
    assert topic in (b"job", b"broker")
    assert event["run"] == cluster.broker.run_id and event["seq"] >= 1
    assert subs["stranger"].poll(0) == 0


def test_ipc_and_plain_loopback_endpoints_stay_plain(make_cluster, keyring):
    on_ipc = make_cluster("ipc", workers=1, **broker_keys(keyring))
    c = on_ipc.client()
    c.login("admin", ADMIN_PASSWORD)
    job = c.submit(on_ipc.script("ok.py", ""), on_ipc.data, on_ipc.output())
    assert c.wait(job, timeout=30)["state"] == "succeeded"

    loop = make_cluster("tcp", workers=0, **broker_keys(
        keyring, curve_plain_loopback=True))
    plain = loop.client()
    assert plain.login("admin", ADMIN_PASSWORD)["user"] == "admin"


def test_curve_config_mistakes_are_refused(tmp_path, keyring):
    from msp.broker import Broker

    from .conftest import broker_config

    with pytest.raises(ConfigError, match="curve_allowed_keys_dir"):
        Broker(broker_config(tmp_path, "tcp",
                             curve_secret_key_file=keyring["broker"]["secret"]))
    with pytest.raises(ConfigError, match="holds no secret key"):
        Broker(broker_config(tmp_path, "tcp",
                             curve_secret_key_file=keyring["broker"]["public"],
                             curve_allowed_keys_dir=keyring["allowed"]))
    with pytest.raises(ConfigError, match="does not exist"):
        Broker(broker_config(tmp_path, "tcp",
                             curve_secret_key_file=keyring["broker"]["secret"],
                             curve_allowed_keys_dir=str(tmp_path / "none")))


def test_the_monitor_feed_works_over_curve(make_cluster, keyring):
    from msp.monitor.feed import Feed
    from msp.monitor.model import Model

    cluster = make_cluster(workers=0, **broker_keys(keyring))
    admin = cluster.client(curve=curve(keyring, "alice"))
    admin.login("admin", ADMIN_PASSWORD)
    script = cluster.script("ok.py", "")
    model = Model()
    with Feed(admin, cluster.broker.endpoints["events"], model) as feed:
        model.load(admin.stats(), feed.clock(), feed.wall())

        def counted():
            # Events sent before the subscription arrived are lost: submit
            # until the feed (events or a fresh snapshot) shows one.
            admin.submit(script, cluster.data, cluster.output())
            feed.step(0.1)
            return model.counts["queued"] >= 1

        wait_for(counted, message="the monitor to see a job over CURVE")
        assert model.problem is None
