"""The broker's core driven without sockets or a loop, for tests that feed
it messages and move its clock themselves."""

from __future__ import annotations

import time

from msp import auth, protocol
from msp.broker import Broker

from .conftest import ADMIN_PASSWORD, broker_config, wait_for

NOW = 1000.0
TABLES = ("msp_job", "msp_attempt", "msp_user", "msp_session")


class Core:
    """A broker with its store open and no sockets: messages go in through
    ``feed`` and what it would send comes back as a list."""

    def __init__(self, root):
        # Its clock is the test's, so a short interval costs nothing.
        config = broker_config(root, sqlite_synchronous="OFF",
                               max_message_size=4096,
                               heartbeat_interval=0.1, liveness=3)
        self.root = root
        self.broker = Broker(config, admin_password=ADMIN_PASSWORD)
        self.broker.open_store()
        self.store = self.broker.store
        self.admin_id = self.store.user("admin").id
        self.script = root / "job.py"
        self.script.write_text("print('hi')\n")
        (root / "data").mkdir()
        self.fake = b"\x00fake-worker"
        self.job = self.token = None
        self._n = 0
        self.feed("worker", [self.fake, *protocol.encode(
            protocol.READY, {"name": "fake"})])

    def feed(self, name: str, frames: list[bytes], now: float = NOW):
        """Handle one message in a transaction, as a loop turn would; the
        messages it queued, as (socket, frames)."""
        with self.store.atomic():
            self.broker.handle(name, frames, now, time.time())
        return self._sent()

    def step(self, now: float):
        """One tick of the broker at ``now``; what it sent."""
        with self.store.atomic():
            self.broker.step(now, time.time())
        return self._sent()

    def _sent(self):
        out = list(self.broker._outbox)
        self.broker._outbox.clear()
        self.broker._events.clear()
        self.broker._ended.clear()
        return out

    def run_later(self):
        """Run work handed off the loop (password hashing), as the loop
        would once it is done; what it sent."""
        work = wait_for(lambda: not self.broker.pending.empty()
                        and self.broker.pending.get(),
                        timeout=10, message="the offloaded work")
        with self.store.atomic():
            work()
        out = list(self.broker._outbox)
        self.broker._outbox.clear()
        return out

    def expire_waits(self):
        self.broker.clients.tick(NOW + 1e6, time.time())
        out = list(self.broker._outbox)
        self.broker._outbox.clear()
        return out

    def session(self) -> str:
        token = auth.new_token()
        now = time.time()
        self.store.add_session(self.admin_id, auth.token_hash(token), now,
                               now + 3600)
        return token

    def assign(self):
        """Make sure the fake worker holds a job; its (job, token)."""
        peer = self.broker.workers.peers.get(self.fake)
        if peer is None:
            self.feed("worker", [self.fake, *protocol.encode(
                protocol.READY, {"name": "fake"})])
            peer = self.broker.workers.peers[self.fake]
        if peer.job is None or peer.stale:
            self._n += 1
            with self.store.atomic():
                self.store.submit(self.admin_id, f"r{self._n}", {
                    "script": str(self.script), "data": str(self.root),
                    "output": str(self.root / f"out{self._n}"),
                    "attempts": 3,
                }, time.time())
                self.broker.workers.dispatch(NOW, time.time())
            self.broker._outbox.clear()
            self.broker._events.clear()
        return peer.job, peer.token

    def tables(self) -> dict:
        return {t: self.store._exec(f"SELECT * FROM {t} ORDER BY id")
                .fetchall() for t in TABLES}

    def memory(self) -> tuple:
        w = self.broker.workers
        return (
            {k: (p.name, p.job, p.token, p.stale, p.draining)
             for k, p in w.peers.items()},
            dict(w.idle), dict(w.by_job), dict(w.orphans),
        )
