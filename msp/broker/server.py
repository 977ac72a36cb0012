"""The broker's sockets, event loop and transactions.

One loop turn receives every message waiting on the client and worker
sockets, handles them all inside one database transaction, commits, and only
then sends the replies and publishes the events. A reply therefore never
acknowledges anything that is not durable, and a busy broker pays for one
commit per turn rather than one per message.

Events (``docs/protocol.md``, section 10) leave in the order their changes
were made, numbered by ``seq`` within the broker's ``run``; a STATS reply
names the last ``seq`` its figures include, so that a subscriber can join
the two. The events socket is an XPUB: the broker knows which topics
someone subscribed to, and encodes and sends no event nobody asked for
(its ``seq`` is taken all the same).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import secrets
import threading
import time
from pathlib import Path
from typing import Callable

import zmq
from tornado.ioloop import IOLoop, PeriodicCallback

from .. import audit, paths, protocol
from ..auth import Passwords
from ..config import BillingConfig, BrokerConfig, store_url
from ..errors import ConfigError, MspError
from ..store import Store
from .clients import ClientHandler
from .curve import CurveGuard
from .workers import WorkerHandler

log = logging.getLogger(__name__)

# Messages read from one socket in one turn, so that neither side starves.
TURN_BUDGET = 500
# The tick event tells subscribers the broker is alive and carries the
# workers' liveness: twice a heartbeat interval, and at least every second.
TICK_MAX = 1.0


class Broker:
    """The msp broker.

    ``start()`` runs it in a background thread and returns once its sockets
    are bound; ``run()`` runs it in the calling thread until ``stop()``.
    """

    def __init__(
        self,
        config: BrokerConfig,
        *,
        context: zmq.Context | None = None,
        admin_password: str | None = None,
        schema: str | None = None,
        billing: BillingConfig | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ):
        self.config = config
        self.billing = billing or BillingConfig()
        self.curve = (
            CurveGuard(self, config) if config.curve_secret_key_file else None
        )
        # A CURVE broker has a context of its own: the ZAP handler is per
        # context, and must not judge another broker's peers in tests.
        self._own_context = context is None and self.curve is not None
        self.context = context or (
            zmq.Context() if self._own_context else zmq.Context.instance()
        )
        self.roots = paths.resolve_roots(config.allowed_roots)
        self.clock = clock
        self.wall = wall
        self.endpoints: dict[str, str] = {}
        self.store: Store | None = None
        self.passwords = Passwords(config.hash_time_cost)
        self.workers = WorkerHandler(self)
        self.clients = ClientHandler(self)
        self._admin_password = admin_password
        self._schema = schema
        self._sockets: dict[str, zmq.Socket] = {}
        self._outbox: list[tuple[str, list[bytes]]] = []
        self._events: list[tuple[bytes, dict]] = []
        # Topic prefixes some subscriber of the events socket asked for,
        # and for each topic events were published on, how many of those
        # prefixes it matches (kept up to date with each subscription, so
        # that a flood of them costs the broker nothing per event).
        self._topics: set[bytes] = set()
        self._matches: dict[bytes, int] = {}
        self._ended: set[int] = set()
        # Names this run of the broker in every event: seq starts again at
        # 1 on a restart, and a subscriber must not take the new numbers
        # for old ones.
        self.run_id = secrets.token_hex(4)
        self._seq = 0
        self._next_tick = 0.0
        self._loop: IOLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self.pending: queue.SimpleQueue = queue.SimpleQueue()

    # Life cycle.

    def open(self) -> None:
        """Open the store and bind the sockets (in the loop's thread)."""
        # Bind first: a broker that cannot have its endpoints should leave
        # nothing behind. The ZAP handler comes before any endpoint, or a
        # CURVE peer could connect before anyone checks its key.
        if self.curve is not None:
            self.curve.start(self.context)
        for name, kind in (("client", zmq.ROUTER), ("worker", zmq.ROUTER)):
            self._bind(name, kind, getattr(self.config, f"{name}_endpoint"))
        if self.config.events_endpoint:
            # XXX: the stream is not authenticated: whoever can connect
            # sees every user's names, scripts and errors. Keep it on ipc,
            # loopback or a trusted network, like the other sockets.
            self._bind("events", zmq.XPUB, self.config.events_endpoint)
        self.open_store()
        log.info(
            "broker up: clients %s, workers %s, events %s, store %s%s",
            self.endpoints["client"], self.endpoints["worker"],
            self.endpoints.get("events", "off"),
            _safe_url(self.store.url),
            "" if self.curve is None else ", CURVE on tcp endpoints",
        )

    def open_store(self) -> None:
        """Open the store, create the first admin, recover what a previous
        broker left running. Without sockets, this is all a test needs to
        drive :meth:`handle` and :meth:`step` itself."""
        data_dir = Path(self.config.data_dir).expanduser()
        data_dir.mkdir(parents=True, exist_ok=True)
        url = store_url(self.config)
        self.store = Store(url, self._schema, self.config.sqlite_synchronous)
        with self.store.atomic():
            self._bootstrap_admin(data_dir)
            self.workers.recover(self.clock())

    def _bind(self, name: str, kind: int, endpoint: str) -> None:
        sock = self.context.socket(kind)
        sock.linger = 0
        if kind == zmq.ROUTER:
            # Oversized messages are refused by libzmq before we read them;
            # the frames around the body get a little headroom.
            sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_size + 4096)
            sock.setsockopt(zmq.RCVHWM, 100_000)
        elif kind == zmq.XPUB:
            # What it receives are subscriptions to topic prefixes (msp's
            # topics are a few bytes), and the CURVE handshake (a few
            # hundred).
            sock.setsockopt(zmq.MAXMSGSIZE, 4096)
        sock.setsockopt(zmq.SNDHWM, 100_000)
        if self.curve is not None and self.curve.applies(endpoint):
            self.curve.secure(sock, name)
        try:
            sock.bind(endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise ConfigError(
                f"cannot bind the {name} endpoint {endpoint}: {exc}; set "
                f"[broker] {name}_endpoint or MSP_BROKER_{name.upper()}"
                "_ENDPOINT"
            ) from None
        self._sockets[name] = sock
        self.endpoints[name] = sock.getsockopt_string(zmq.LAST_ENDPOINT)

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close(linger=0)
        self._sockets.clear()
        if self.curve is not None:
            self.curve.stop()
        if self._own_context:
            self.context.term()
        self.clients.close()
        if self.store is not None:
            self.store.close()
            self.store = None

    def run(self) -> None:
        """Serve in this thread until :meth:`stop`."""
        self._loop = IOLoop()
        try:
            self.open()
            for name in ("client", "worker"):
                sock = self._sockets[name]
                self._loop.add_handler(
                    sock.getsockopt(zmq.FD), self._on_readable, IOLoop.READ
                )
            period = self.config.heartbeat_interval * 1000 / 4
            ticker = PeriodicCallback(self._tick, period)
            ticker.start()
            self._loop.add_callback(self._turn)
            self._ready.set()
            self._loop.start()
            ticker.stop()
            if self._failure is not None:
                raise self._failure
        except BaseException as exc:
            self._failure = self._failure or exc
            raise
        finally:
            self._ready.set()
            self.close()
            self._loop.close(all_fds=False)
            log.info("broker down")

    def start(self, timeout: float = 10.0) -> "Broker":
        self._thread = threading.Thread(
            target=self._run_quietly, name="msp-broker", daemon=True
        )
        self._thread.start()
        if not self._ready.wait(timeout):
            raise MspError(f"broker did not start within {timeout} s")
        if self._failure is not None:
            raise self._failure
        return self

    def _run_quietly(self) -> None:
        try:
            self.run()
        except BaseException:  # kept in _failure for start() to raise
            log.exception("broker failed")

    def stop(self, timeout: float = 10.0) -> None:
        loop = self._loop
        if loop is not None:
            loop.add_callback(loop.stop)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _bootstrap_admin(self, data_dir: Path) -> None:
        """Create the first admin when the store has no user at all."""
        if self.store.count_users():
            return
        password = self._admin_password or secrets.token_urlsafe(12)
        now = self.wall()
        self.store.add_user("admin", self.passwords.hash(password), "admin", now)
        self.audit(now, "user_add", None, user="admin", role="admin")
        if self._admin_password is None:
            path = data_dir / "admin-password"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(password + "\n")
            log.info("created user 'admin'; its password is in %s", path)
        else:
            log.info("created user 'admin' with the given password")

    # One turn of the loop.

    def _on_readable(self, fd, events) -> None:
        self._turn()

    def _turn(self) -> None:
        batch = []
        for name in ("client", "worker"):
            sock = self._sockets[name]
            # Asked first: an empty recv raises, which costs more.
            for _ in range(TURN_BUDGET):
                if not sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                    break
                try:
                    batch.append((name, *_receive(sock)))
                except zmq.Again:
                    break
        if batch:
            now, wall = self.clock(), self.wall()
            if all(name == "worker" and frames[2:3] == _HEARTBEAT
                   for name, frames, _ in batch):
                # Heartbeats write nothing: no transaction to commit, the
                # most common turn of a broker with many idle workers.
                self._handle_batch(batch, now, wall)
                self.flush()
            else:
                self.transact(lambda: self._handle_batch(batch, now, wall))
        # The sockets' descriptors signal edges, not levels: look again
        # after every read and write, or a waiting message could sit there.
        if any(
            self._sockets[n].getsockopt(zmq.EVENTS) & zmq.POLLIN
            for n in ("client", "worker")
        ):
            self._loop.add_callback(self._turn)

    def _handle_batch(self, batch, now: float, wall: float) -> None:
        for name, frames, peer in batch:
            self.handle(name, frames, now, wall, peer)
        # A batch of heartbeats changes neither the queue nor who is idle:
        # no need to look for work (with hundreds of idle workers, that
        # look was most of what their heartbeats cost). The tick looks
        # anyway.
        if any(name != "worker" or frames[2:3] not in _NO_WORK
               for name, frames, _ in batch):
            self.workers.dispatch(now, wall)

    def _tick(self) -> None:
        now, wall = self.clock(), self.wall()
        self.transact(lambda: self.step(now, wall))
        self._turn()

    def step(self, now: float, wall: float) -> None:
        """The timed work of one tick: liveness, heartbeats, expired waits,
        dispatch. Tests may call it with their own clock, in steps shorter
        than a heartbeat interval: a longer step is taken for a stall of the
        broker's own, and gives every worker a fresh liveness period."""
        self.workers.tick(now, wall)
        self.clients.tick(now, wall)
        self.workers.dispatch(now, wall)
        if now >= self._next_tick and "events" in self._sockets:
            # XXX: every tick carries the whole worker table, about 300
            # bytes a worker: fine for hundreds, megabytes a second for
            # tens of thousands, where only changed rows should go.
            self._next_tick = now + self.tick_period
            self.publish("broker", event="tick",
                         workers=self.workers.snapshot(now))

    @property
    def tick_period(self) -> float:
        """Seconds between two tick events."""
        return min(self.config.heartbeat_interval / 2, TICK_MAX)

    @property
    def seq(self) -> int:
        """The number of the last event published or about to be."""
        return self._seq

    def handle(self, name: str, frames: list[bytes], now: float, wall: float,
               peer: str = ""):
        """Handle one message from a client or a worker socket; ``peer`` is
        the sender's address where the transport has one (tcp)."""
        mark = self.mark()
        handler = self.clients if name == "client" else self.workers
        try:
            handler.handle(frames, now, wall, peer)
        except Exception:
            # A bug, not bad input: the handler's savepoint has rolled its
            # writes back; drop what it queued and keep serving.
            log.exception("unexpected error handling a %s message", name)
            self.drop_since(mark)
            handler.internal_error(frames)

    def mark(self) -> tuple:
        """Where the queued messages and events stand, for
        :meth:`drop_since`."""
        return len(self._outbox), len(self._events), self._seq, \
            set(self._ended)

    def drop_since(self, mark: tuple) -> None:
        """Forget what was queued since ``mark``: the writes it announced
        were rolled back."""
        del self._outbox[mark[0]:]
        del self._events[mark[1]:]
        # The dropped events were never sent: reuse their numbers, or
        # subscribers would see a gap and fetch a snapshot for nothing.
        self._seq, self._ended = mark[2], set(mark[3])

    def transact(self, work: Callable[[], None]) -> None:
        """Run ``work`` in one transaction, then send what it queued."""
        try:
            with self.store.atomic():
                work()
        except Exception:
            # The in-memory view (who runs what) may now be ahead of the
            # store; the store is the truth, so stop and let a restart
            # recover from it rather than serve from a view that lies.
            log.critical("commit failed; stopping the broker", exc_info=True)
            self._failure = self._failure or RuntimeError("commit failed")
            self._outbox.clear()
            self._events.clear()
            self._ended.clear()
            self._loop.stop()
            raise
        self.flush()

    def flush(self) -> None:
        ended, self._ended = self._ended, set()
        if ended:
            self.clients.jobs_ended(ended)
        for name, frames in self._outbox:
            try:
                self._sockets[name].send_multipart(frames, zmq.NOBLOCK)
            except zmq.Again:
                log.warning("dropped a message to a %s: queue full", name)
        self._outbox.clear()
        # XXX: every subscriber gets every event (job ids, users, scripts):
        # CURVE keeps strangers off, but not one user off another's jobs.
        pub = self._sockets.get("events")
        if pub is not None and self._events:
            self._subscriptions(pub)
            for topic, body in self._events:
                if self._subscribed(topic):
                    data = json.dumps(body, separators=(",", ":")).encode()
                    pub.send_multipart([topic, data])
        self._events.clear()

    def _subscriptions(self, pub: zmq.Socket) -> None:
        """Take in the (un)subscriptions that arrived since the last look
        (XPUB passes the first subscription to a prefix and the last
        unsubscription)."""
        # Asked first: most turns bring none, and an empty recv raises.
        while pub.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            try:
                message = pub.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            change, prefix = message[:1], message[1:]
            if change == b"\x01" and prefix not in self._topics:
                self._topics.add(prefix)
                step = 1
            elif change == b"\x00" and prefix in self._topics:
                self._topics.discard(prefix)
                step = -1
            else:
                continue
            for topic in self._matches:
                if topic.startswith(prefix):
                    self._matches[topic] += step

    def _subscribed(self, topic: bytes) -> bool:
        """Whether some subscription's prefix matches ``topic``."""
        count = self._matches.get(topic)
        if count is None:
            count = self._matches[topic] = sum(
                1 for prefix in self._topics if topic.startswith(prefix))
        return count > 0

    # What handlers call.

    def send(self, name: str, frames: list[bytes]) -> None:
        """Queue a message; it leaves after the turn's commit."""
        self._outbox.append((name, frames))

    def publish(self, topic: str, **body) -> None:
        """Queue an event; it leaves after the turn's commit, in order."""
        self._seq += 1
        body["seq"] = self._seq
        body["run"] = self.run_id
        body["at"] = self.wall()
        self._events.append((topic.encode(), body))

    def audit(self, wall: float, event: str, actor: str | None,
              **detail) -> None:
        """Record a security-relevant event (in the current transaction)."""
        audit.record(self.store, wall, event, actor, **detail)

    def job_ended(self, job_id: int) -> None:
        self._ended.add(job_id)

    def later(self, work: Callable[[], None]) -> None:
        """Run ``work`` in a turn of its own (from any thread).

        Without a loop (a test driving the core) the work waits in
        ``pending`` until the test runs it."""
        if self._loop is None:
            self.pending.put(work)
        else:
            self._loop.add_callback(self.transact, work)


# Worker messages after which there is nothing new to dispatch.
_HEARTBEAT = [protocol.HEARTBEAT]
_NO_WORK = (_HEARTBEAT, [protocol.STARTED], [protocol.PROGRESS])


def _receive(sock: zmq.Socket) -> tuple[list[bytes], str]:
    """One message and the address of the peer that sent it ("" when the
    transport has none)."""
    frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
    try:
        peer = frames[-1].get("Peer-Address")
    except zmq.ZMQError:
        peer = ""
    return [f.bytes for f in frames], peer or ""


def _safe_url(url: str) -> str:
    """A store URL without its password, for the log."""
    if "@" in url and ":" in url.split("@")[0].split("//")[-1]:
        scheme, rest = url.split("//", 1)
        cred, host = rest.split("@", 1)
        return f"{scheme}//{cred.split(':')[0]}:***@{host}"
    return url
