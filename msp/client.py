"""The msp client library.

A few lines run a job::

    from msp.client import Client

    with Client("tcp://127.0.0.1:5555") as c:
        c.login("alice", "secret-password")
        job = c.submit("count.py", data="texts", output="out")
        print(c.wait(job)["state"])

Requests go over a REQ socket, Lazy Pirate style: a request that gets no
reply within the timeout is sent again on a fresh socket, up to ``retries``
times, then :class:`BrokerUnavailable` is raised. Each submit carries a
request id made here, so a submit sent twice still makes one job. Errors
come back as :class:`MspError` subclasses with the broker's message.
"""

from __future__ import annotations

import json
import logging
import os
import time
import uuid
from typing import Any

import zmq

from . import keys, protocol
from .errors import BrokerUnavailable, ConfigError, ProtocolError, from_wire

log = logging.getLogger(__name__)

FINAL_STATES = ("succeeded", "failed", "cancelled")
# Longest a single WAIT request asks the broker to hold.
WAIT_SLICE = 30.0


class Client:
    def __init__(self, endpoint: str = "tcp://127.0.0.1:5555", *,
                 token: str | None = None, timeout: float = 5.0,
                 retries: int = 3, context: zmq.Context | None = None,
                 curve: dict | None = None):
        self.endpoint = endpoint
        self.token = token
        self.timeout = timeout
        self.retries = retries
        self.context = context or zmq.Context.instance()
        # CURVE keys {"public", "secret", "server"} (see msp.keys), or None.
        self.curve = curve
        self._sock: zmq.Socket | None = None

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None

    def new_socket(self) -> zmq.Socket:
        """A fresh REQ socket to the broker, set up as this client's; for a
        caller that polls for the reply itself and reads it with
        :meth:`decode` (the monitor)."""
        sock = self.context.socket(zmq.REQ)
        sock.linger = 0
        keys.apply_client(sock, self.curve)
        try:
            sock.connect(self.endpoint)
        except zmq.ZMQError as exc:
            sock.close(linger=0)
            raise ConfigError(
                f"cannot use broker endpoint {self.endpoint!r}: {exc}; "
                "write it like tcp://127.0.0.1:5555"
            ) from None
        return sock

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            self._sock = self.new_socket()
        return self._sock

    def request(self, command: str, body: dict | None = None,
                timeout: float | None = None) -> dict:
        """Send one request and return the reply body; raise on ERR."""
        frames = protocol.encode(command.encode(), body or {})
        timeout = self.timeout if timeout is None else timeout
        for attempt in range(1, self.retries + 1):
            sock = self._socket()
            sock.send_multipart(frames)
            if sock.poll(timeout * 1000, zmq.POLLIN):
                return self._decode(sock.recv_multipart())
            # Lazy Pirate: the REQ socket is stuck; drop it, try afresh.
            log.debug("%s: no reply in %.1f s (try %d of %d)", command,
                      timeout, attempt, self.retries)
            self.close()
        raise BrokerUnavailable(
            f"no reply from the broker at {self.endpoint} after "
            f"{self.retries} tries of {timeout:g} s"
        )

    @staticmethod
    def _decode(frames: list[bytes]) -> dict:
        if len(frames) != 3 or frames[0] != protocol.VERSION or \
                frames[1] not in (protocol.OK, protocol.ERR):
            raise ProtocolError("malformed reply from the broker")
        try:
            body = json.loads(frames[2])
        except ValueError:
            raise ProtocolError("reply body is not JSON") from None
        if not isinstance(body, dict):
            raise ProtocolError("reply body is not a JSON object")
        if frames[1] == protocol.ERR:
            raise from_wire(str(body.get("code")), str(body.get("message")))
        return body

    # Public for a caller that polls a socket of new_socket() itself.
    decode = _decode

    def _authed(self, command: str, body: dict | None = None,
                timeout: float | None = None) -> dict:
        if not self.token:
            raise from_wire("unauthenticated", "not logged in")
        return self.request(command, {"token": self.token, **(body or {})},
                            timeout)

    # Commands.

    def ping(self) -> dict:
        return self.request("PING")

    def login(self, user: str, password: str) -> dict:
        reply = self.request("LOGIN", {"user": user, "password": password})
        self.token = reply["token"]
        return reply

    def logout(self) -> None:
        self._authed("LOGOUT")
        self.token = None

    def passwd(self, password: str, user: str | None = None) -> None:
        self._authed("PASSWD", {"user": user, "password": password})

    def submit(self, script: str, data: str, output: str,
               args: list[str] | tuple = (), *, priority: int = 0,
               attempts: int | None = None, timeout: float | None = None,
               name: str | None = None,
               request_id: str | None = None, cpu: float | None = None,
               memory: int | None = None) -> int:
        """Queue a job; return its id. Paths are made absolute here.
        ``cpu`` (seconds) and ``memory`` (MiB) ask for limits of its own.

        A caller that tries again after :class:`BrokerUnavailable` passes
        the same ``request_id`` (1 to 64 characters) each time, so that
        however many of its tries reached the broker, one job is made.
        """
        body = job_body(script, data, output, args, priority=priority,
                    attempts=attempts, timeout=timeout, name=name, cpu=cpu,
                    memory=memory)
        body["request_id"] = request_id or uuid.uuid4().hex
        return self._authed("SUBMIT", body)["job"]

    def submit_many(self, jobs, *, request_id: str | None = None
                    ) -> list[int]:
        """Queue up to 1000 jobs in one request, all or none; their ids,
        in order. Each job is a dict of :meth:`submit`'s arguments
        (``script``, ``data``, ``output`` and any of ``args``,
        ``priority``, ``attempts``, ``timeout``, ``name``, ``cpu``,
        ``memory``). A refusal names the job at fault (``jobs[3]: ...``).
        ``request_id`` (1 to 59 characters) makes a retry safe, as for
        :meth:`submit`.
        """
        body = {
            "request_id": request_id or uuid.uuid4().hex,
            "jobs": [job_body(**job) for job in jobs],
        }
        return self._authed("SUBMIT_MANY", body)["jobs"]

    def status(self, job: int) -> dict:
        """The job and its attempts: ``{"job": {...}, "attempts": [...]}``."""
        return self._authed("STATUS", {"job": job})

    def wait(self, job: int, timeout: float | None = None) -> dict:
        """Block until the job ends (or ``timeout`` seconds); the job."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = WAIT_SLICE if deadline is None else min(
                WAIT_SLICE, max(0.0, deadline - time.monotonic())
            )
            view = self._authed("WAIT", {"job": job, "timeout": left},
                                timeout=left + self.timeout)["job"]
            if view["state"] in FINAL_STATES or (
                deadline is not None and time.monotonic() >= deadline
            ):
                return view

    def wait_all(self, jobs: list[int], timeout: float | None = None
                 ) -> list[dict]:
        """Block until every one of ``jobs`` (up to 1000 ids) has ended, or
        ``timeout`` seconds; the jobs, in the order given."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            left = WAIT_SLICE if deadline is None else min(
                WAIT_SLICE, max(0.0, deadline - time.monotonic())
            )
            views = self._authed("WAIT", {"jobs": list(jobs), "timeout": left},
                                 timeout=left + self.timeout)["jobs"]
            if all(v["state"] in FINAL_STATES for v in views) or (
                deadline is not None and time.monotonic() >= deadline
            ):
                return views

    def jobs(self, state: str | None = None, user: str | None = None,
             since: float | None = None, limit: int = 100) -> list[dict]:
        return self._authed("LIST", {"state": state, "user": user,
                                     "since": since, "limit": limit})["jobs"]

    def cancel(self, job: int) -> dict:
        return self._authed("CANCEL", {"job": job})

    def logs(self, job: int, stream: str = "stdout", offset: int = 0,
             limit: int = 65536) -> dict:
        return self._authed("LOGS", {"job": job, "stream": stream,
                                     "offset": offset, "limit": limit})

    def user_add(self, user: str, password: str, role: str = "user",
                 credit_limit: float | None = None) -> dict:
        return self._authed("USER_ADD", {"user": user, "password": password,
                                         "role": role,
                                         "credit_limit": credit_limit})

    def user_set(self, user: str, credit_limit: float | None) -> dict:
        """Set (or with None remove) a user's monthly credit limit."""
        return self._authed("USER_SET", {"user": user,
                                         "credit_limit": credit_limit})

    def users(self) -> list[dict]:
        return self._authed("USER_LIST")["users"]

    def user_disable(self, user: str) -> dict:
        return self._authed("USER_DISABLE", {"user": user})

    def workers(self) -> list[dict]:
        return self._authed("WORKERS")["workers"]

    def stats(self) -> dict:
        return self._authed("STATS")

    def billing(self, user: str | None = None, since: float | None = None,
                until: float | None = None, all_users: bool = False) -> dict:
        """A statement of usage and cost; the default period is this
        month, the default user the caller."""
        body: dict[str, Any] = {"user": user, "since": since, "until": until}
        if all_users:
            body["all"] = True
        return self._authed("BILLING", body)

    def audit(self, event: str | None = None, actor: str | None = None,
              since: float | None = None, limit: int = 100) -> list[dict]:
        """Recent audit entries, newest first (admins)."""
        return self._authed("AUDIT", {"event": event, "actor": actor,
                                      "since": since, "limit": limit})["entries"]


class Events:
    """The broker's event stream (``docs/protocol.md``, section 10): a SUB
    socket.

    ::

        with Events("tcp://127.0.0.1:5557") as events:
            while (event := events.receive(timeout=5.0)) is not None:
                topic, body = event
                print(topic, body["event"], body["seq"])

    A subscriber joins late and may fall behind (the broker drops events a
    slow subscriber has no room for): ``seq`` tells it when it missed some.
    """

    def __init__(self, endpoint: str, topics=("",), *,
                 context: zmq.Context | None = None,
                 curve: dict | None = None):
        self.endpoint = endpoint
        self.context = context or zmq.Context.instance()
        self.socket = self.context.socket(zmq.SUB)
        self.socket.linger = 0
        # A CURVE broker publishes to keyed subscribers only (msp.keys).
        keys.apply_client(self.socket, curve)
        self.socket.setsockopt(zmq.RCVHWM, 100_000)
        for topic in topics:
            self.socket.setsockopt_string(zmq.SUBSCRIBE, topic)
        self.socket.connect(endpoint)

    def __enter__(self) -> "Events":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.socket.close(linger=0)

    def receive(self, timeout: float | None = None):
        """The next event as ``(topic, body)``, or None after ``timeout``
        seconds (None waits forever) or on a malformed message."""
        if not self.socket.poll(None if timeout is None else timeout * 1000):
            return None
        return self.decode(self.socket.recv_multipart())

    @staticmethod
    def decode(frames: list[bytes]):
        if len(frames) != 2:
            log.debug("dropped an event of %d frames", len(frames))
            return None
        try:
            body = json.loads(frames[1])
            topic = frames[0].decode()
        except ValueError:
            log.debug("dropped an event that is not UTF-8 JSON")
            return None
        if not isinstance(body, dict) or not isinstance(body.get("seq"), int):
            log.debug("dropped an event without a seq")
            return None
        return topic, body


def job_body(script: str, data: str, output: str, args=(), *,
             priority: int = 0, attempts: int | None = None,
             timeout: float | None = None, name: str | None = None,
             cpu: float | None = None,
             memory: int | None = None) -> dict[str, Any]:
    """A job's fields as SUBMIT carries them; paths made absolute."""
    body: dict[str, Any] = {
        "script": os.path.abspath(script),
        "data": os.path.abspath(data),
        "output": os.path.abspath(output),
        "args": [str(a) for a in args],
        "priority": priority,
        "timeout": timeout,
        "name": name,
    }
    if attempts is not None:
        body["attempts"] = attempts
    if cpu is not None:
        body["cpu"] = cpu
    if memory is not None:
        body["memory"] = memory
    return body
