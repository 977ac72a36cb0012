"""Fixtures that start real brokers and workers over real sockets."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import zmq

from msp.broker import Broker
from msp.client import Client
from msp.config import BrokerConfig, WorkerConfig
from msp.worker import Worker

ADMIN_PASSWORD = "admin-password"
# Fast liveness so that tests about it take a fraction of a second.
FAST = {"heartbeat_interval": 0.2, "liveness": 3}


def wait_for(predicate, timeout=10.0, interval=0.01, message="condition"):
    """Poll ``predicate`` until it returns a true value; return it."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for "
                                 f"{message}")
        time.sleep(interval)


def endpoints(transport: str, tmp: Path) -> dict[str, str]:
    tag = uuid.uuid4().hex[:8]
    if transport == "tcp":
        return {k: "tcp://127.0.0.1:*" for k in ("client", "worker", "events")}
    if transport == "ipc":
        return {k: f"ipc://{tmp}/{k}-{tag}.sock"
                for k in ("client", "worker", "events")}
    return {k: f"inproc://{k}-{tag}" for k in ("client", "worker", "events")}


@dataclass
class Cluster:
    """A broker and workers in this process, and a logged-in admin."""

    root: Path
    broker: Broker
    workers: list = field(default_factory=list)
    clients: list = field(default_factory=list)

    @property
    def worker_endpoint(self) -> str:
        return self.broker.endpoints["worker"]

    def client(self, **kw) -> Client:
        c = Client(self.broker.endpoints["client"], timeout=5.0, **kw)
        self.clients.append(c)
        return c

    def admin(self) -> Client:
        c = self.client()
        c.login("admin", ADMIN_PASSWORD)
        return c

    def user(self, name: str, password: str = "user-password") -> Client:
        self.admin().user_add(name, password)
        c = self.client()
        c.login(name, password)
        return c

    def add_worker(self, name: str | None = None, **overrides) -> Worker:
        settings = dict(FAST, kill_grace=2.0, drain_timeout=10.0,
                        reconnect_min=0.1, reconnect_max=0.5)
        settings.update(overrides)
        cfg = WorkerConfig(
            broker=self.worker_endpoint,
            name=name or f"w{len(self.workers) + 1}", **settings,
        )
        w = Worker(cfg).start()
        self.workers.append(w)
        return w

    def script(self, name: str, body: str) -> Path:
        path = self.root / "scripts" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(body)
        return path

    @property
    def data(self) -> Path:
        path = self.root / "data"
        path.mkdir(exist_ok=True)
        return path

    def output(self, name: str = "out") -> Path:
        return self.root / "outputs" / name

    def close(self) -> None:
        for c in self.clients:
            c.close()
        for w in self.workers:
            w.stop(drain=False, timeout=10)
        self.broker.stop()


def broker_config(root: Path, transport: str = "tcp", **overrides):
    eps = endpoints(transport, root)
    settings = dict(
        client_endpoint=eps["client"], worker_endpoint=eps["worker"],
        events_endpoint=eps["events"], data_dir=str(root / "var"),
        allowed_roots=[str(root)], hash_time_cost=1, retry_backoff=0.0,
        sqlite_synchronous="NORMAL", **FAST,
    )
    settings.update(overrides)
    return BrokerConfig(**settings)


@pytest.fixture
def make_cluster(tmp_path):
    made = []

    def make(transport="tcp", workers=1, billing=None,
             **overrides) -> Cluster:
        root = tmp_path / f"c{len(made)}"
        root.mkdir()
        cfg = broker_config(root, transport, **overrides)
        broker = Broker(cfg, admin_password=ADMIN_PASSWORD,
                        billing=billing).start()
        cluster = Cluster(root=root, broker=broker)
        made.append(cluster)
        for _ in range(workers):
            cluster.add_worker()
        return cluster

    yield make
    for cluster in made:
        cluster.close()


@pytest.fixture(params=["tcp", "ipc", "inproc"])
def transport(request):
    return request.param


PG_URL = "postgresql://postgres@127.0.0.1:5432/test"


def postgres_answers() -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", 5432), timeout=1):
            return True
    except OSError:
        return False


def cli_env(cluster: Cluster, folder: Path) -> dict:
    """The environment for mspctl, logged in as admin, to use ``cluster``."""
    token = folder / "token"
    token.write_text(cluster.admin().token + "\n")
    env = dict(
        os.environ,
        MSP_CLIENT_BROKER=cluster.broker.endpoints["client"],
        MSP_CLIENT_EVENTS=cluster.broker.endpoints["events"],
        MSP_CLIENT_TOKEN_FILE=str(token), MSP_CLIENT_TIMEOUT="3",
    )
    env.pop("MSP_CONFIG", None)
    return env


def run_cli(*args, env=None, timeout=60, check=False, **kw):
    """Run mspctl in a real process."""
    return subprocess.run(
        [sys.executable, "-m", "msp", *args], env=env, timeout=timeout,
        capture_output=True, text=True, check=check, **kw,
    )


@pytest.fixture
def zmq_context():
    ctx = zmq.Context()
    yield ctx
    ctx.destroy(linger=0)


def free_port() -> int:
    """A free port below the ephemeral range, so that no outgoing
    connection takes it between now and the bind in another process."""
    import random
    import socket

    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port between 20000 and 32000")


class Processes:
    """A broker and workers as real processes (``python -m msp``)."""

    def __init__(self, root: Path, **broker_env):
        self.root = root
        ports = [free_port() for _ in range(3)]
        self.client_endpoint = f"tcp://127.0.0.1:{ports[0]}"
        self.worker_endpoint = f"tcp://127.0.0.1:{ports[1]}"
        self.events_endpoint = f"tcp://127.0.0.1:{ports[2]}"
        self.env = dict(
            os.environ,
            MSP_BROKER_CLIENT_ENDPOINT=self.client_endpoint,
            MSP_BROKER_WORKER_ENDPOINT=self.worker_endpoint,
            MSP_BROKER_EVENTS_ENDPOINT=self.events_endpoint,
            MSP_BROKER_DATA_DIR=str(root / "var"),
            MSP_BROKER_ALLOWED_ROOTS=str(root),
            MSP_BROKER_HASH_TIME_COST="1",
            MSP_BROKER_RETRY_BACKOFF="0",
            MSP_BROKER_HEARTBEAT_INTERVAL="0.2",
            MSP_WORKER_HEARTBEAT_INTERVAL="0.2",
            MSP_WORKER_RECONNECT_MIN="0.2",
            MSP_WORKER_RECONNECT_MAX="1",
            MSP_WORKER_KILL_GRACE="2",
            MSP_WORKER_BROKER=self.worker_endpoint,
            MSP_CLIENT_BROKER=self.client_endpoint,
            MSP_CLIENT_EVENTS=self.events_endpoint,
            MSP_CLIENT_TOKEN_FILE=str(root / "token"),
            MSP_CLIENT_TIMEOUT="3",
            MSP_ADMIN_PASSWORD=ADMIN_PASSWORD,
        )
        self.env.pop("MSP_CONFIG", None)
        self.env.update({k: str(v) for k, v in broker_env.items()})
        self.broker: subprocess.Popen | None = None
        self.workers: dict[str, subprocess.Popen] = {}
        self._logs = []

    def _spawn(self, name: str, *args) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "ab")
        self._logs.append(log)
        return subprocess.Popen(
            [sys.executable, "-m", "msp", *args, "--log-level", "debug"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )

    def start_broker(self) -> None:
        self.broker = self._spawn("broker", "broker")
        c = Client(self.client_endpoint, timeout=0.5, retries=1)
        try:
            def up():
                assert self.broker.poll() is None, self.log("broker")
                try:
                    return c.ping()
                except Exception:
                    return False
            wait_for(up, timeout=20, message="the broker to answer")
        finally:
            c.close()

    def start_worker(self, name: str) -> subprocess.Popen:
        proc = self._spawn(name, "worker", "--name", name)
        self.workers[name] = proc
        return proc

    def log(self, name: str) -> str:
        path = self.root / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def ctl(self, *args, timeout=60):
        return run_cli(*args, env=self.env, timeout=timeout)

    def client(self) -> Client:
        c = Client(self.client_endpoint, timeout=5.0)
        c.login("admin", ADMIN_PASSWORD)
        return c

    def stop(self) -> None:
        procs = [*self.workers.values(), self.broker]
        for proc in procs:
            if proc is not None and proc.poll() is None:
                # A test may have left one stopped (SIGSTOP).
                proc.send_signal(signal.SIGCONT)
                proc.terminate()
        for proc in procs:
            if proc is None:
                continue
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        for log in self._logs:
            log.close()


@pytest.fixture
def processes(tmp_path):
    made = []

    def make(**broker_env) -> Processes:
        root = tmp_path / f"p{len(made)}"
        root.mkdir()
        p = Processes(root, **broker_env)
        made.append(p)
        return p

    yield make
    for p in made:
        p.stop()


# The msp this test run imports, for scripts that use it: a job's scrubbed
# environment has no PYTHONPATH.
MSP_ROOT = str(Path(__file__).resolve().parent.parent)

# A job that reports half its progress, then runs until the file named by
# its first argument appears in its data folder (or a minute passes).
BLOCK = f"""\
import os, sys, time
sys.path.insert(0, {MSP_ROOT!r})
import msp
print("started", flush=True)
msp.progress(0.5, "half way")
go = os.path.join(os.environ["MSP_DATA_DIR"], sys.argv[1])
deadline = time.monotonic() + 60
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.02)
print("done", flush=True)
"""
