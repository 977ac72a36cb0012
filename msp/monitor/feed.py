"""The monitor's sockets: the event stream (SUB) and STATS requests (REQ).

Nothing here blocks: :meth:`Feed.step` polls both sockets and any other
descriptor (the keyboard) together, so the screen stays responsive while a
request goes unanswered. A request not answered in ``timeout`` seconds is
given up with its socket (Lazy Pirate) and asked again ``retry`` seconds
later, until the broker answers again.
"""

from __future__ import annotations

import logging
import time

import zmq

from .. import protocol
from ..client import Client, Events
from ..errors import MspError
from .model import Model

log = logging.getLogger(__name__)

# Events handled in one step at most, so that a flood cannot freeze the
# screen; the rest wait for the next step.
BATCH = 5000


class Feed:
    def __init__(self, client: Client, events: str, model: Model, *,
                 timeout: float = 2.0, retry: float = 1.0,
                 clock=time.monotonic, wall=time.time):
        self.client = client
        self.model = model
        self.timeout = timeout
        self.retry = retry
        self.clock = clock
        self.wall = wall
        self.events = Events(events, context=client.context,
                             curve=client.curve)
        self._req: zmq.Socket | None = None
        self._deadline = 0.0
        self._next_try = 0.0

    def close(self) -> None:
        self.events.close()
        self._drop_request()

    def __enter__(self) -> "Feed":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def step(self, timeout: float, fds=()) -> set:
        """Wait up to ``timeout`` seconds for anything; handle what came.
        Returns those of ``fds`` that are readable."""
        self._maybe_request(self.clock())
        poller = zmq.Poller()
        poller.register(self.events.socket, zmq.POLLIN)
        if self._req is not None:
            poller.register(self._req, zmq.POLLIN)
        for fd in fds:
            poller.register(fd, zmq.POLLIN)
        ready = dict(poller.poll(max(timeout, 0.0) * 1000))
        now = self.clock()
        if self.events.socket in ready:
            self._drain(now)
        if self._req is not None and self._req in ready:
            self._answered(now)
        elif self._req is not None and now >= self._deadline:
            self._unanswered(now)
        if self.model.connected and self.model.events_silent(now):
            self._set_problem(
                f"no events from {self.model.events}; figures refresh "
                f"every {self.model.silence:g} s", now,
            )
        elif self.model.connected and self.model.problem:
            self._set_problem(None, now)
        return {fd for fd in fds if fd in ready}

    def _drain(self, now: float) -> None:
        sock = self.events.socket
        for _ in range(BATCH):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            event = Events.decode(frames)
            if event is not None:
                self.model.apply(*event, now)

    def _maybe_request(self, now: float) -> None:
        if self._req is not None or now < self._next_try:
            return
        why = self.model.wants_snapshot(now)
        if why is None:
            return
        log.debug("asking for a snapshot: %s", why)
        self._req = self.client.new_socket()
        self._req.send_multipart(
            protocol.encode(b"STATS", {"token": self.client.token or ""})
        )
        self._deadline = now + self.timeout
        self.model.snapshot_asked()

    def _answered(self, now: float) -> None:
        frames = self._req.recv_multipart()
        self._drop_request()
        try:
            snap = self.client.decode(frames)
        except MspError as exc:
            self.model.snapshot_lost()
            # Logged out, or a broker that does not know us: say so and
            # keep asking, so that a new login shows at once.
            self.model.connected = False
            self._set_problem(f"the broker refused: {exc.message}", now)
            self._next_try = now + self.retry
            return
        try:
            self.model.load(snap, now, self.wall())
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            # A broker of another version: say so rather than crash.
            log.debug("snapshot not understood: %r", exc)
            self.model.snapshot_lost()
            self.model.connected = False
            self.model.stale = "a snapshot it did not understand"
            self._set_problem("the broker's STATS reply is not one this "
                              "monitor understands", now)
            self._next_try = now + self.retry

    def _unanswered(self, now: float) -> None:
        self._drop_request()
        self.model.snapshot_lost()
        self.model.connected = False
        self._set_problem(
            f"broker not answering at {self.client.endpoint}; showing what "
            "it last said, retrying", now,
        )
        self._next_try = now + self.retry

    def _drop_request(self) -> None:
        if self._req is not None:
            self._req.close(linger=0)
            self._req = None

    def _set_problem(self, text: str | None, now: float) -> None:
        model = self.model
        if text is None:
            if model.problem:
                log.info("broker back: %s", self.client.endpoint)
            model.problem = model.problem_since = None
            return
        if model.problem is None:
            model.problem_since = now
        model.problem = text
