"""The msp worker: a DEALER that runs one job at a time for the broker.

It announces itself with READY, then heartbeats every interval while it
hears from the broker, a job running or not. When the broker has been
silent for ``liveness`` intervals it closes its socket and reconnects after
a back-off that doubles up to a ceiling (Paranoid Pirate). A job keeps
running meanwhile; on its return the worker says which job it holds, and the
broker keeps it or tells it to stop.

A result is sent again until the broker acknowledges it, so it survives a
broker restart; the broker records it once.
"""

from __future__ import annotations

import logging
import os
import queue
import re
import socket
import threading
import time
from typing import Callable

import zmq

from . import keys, outputs, protocol
from .config import WorkerConfig
from .errors import MspError, ProtocolError
from .executor import (
    Assignment, NoopExecutor, Outcome, Running, SubprocessExecutor,
)

log = logging.getLogger(__name__)

# A line a script prints on stdout to report its progress, e.g.
# "msp:progress 0.25 reading input" or "msp:progress 25%".
PROGRESS = re.compile(
    rb"^msp:progress[ \t]+([0-9]*\.?[0-9]+)(%?)(?:[ \t]+([^\r\n]*))?\r?$",
    re.M,
)
PROGRESS_PERIOD = 0.5


def make_executor(config: WorkerConfig):
    if config.executor == "noop":
        return NoopExecutor()
    if config.executor == "fork":
        from .forkserver import ForkExecutor

        return ForkExecutor.from_config(config)
    return SubprocessExecutor.from_config(config)


class Worker:
    """A worker. ``start()`` runs it in a thread; ``run()`` in this one."""

    def __init__(self, config: WorkerConfig, *, context=None, executor=None,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.name = config.name
        self.context = context or zmq.Context.instance()
        self.curve = keys.client_curve(config)
        # An executor made here is closed here (a fork server has a process).
        self._own_executor = executor is None
        self.executor = executor or make_executor(config)
        self.clock = clock
        self.period = config.heartbeat_interval * config.liveness
        self.jobs_done = 0
        # Why the broker refused this worker, if it did.
        self.refused: str | None = None
        self._sock: zmq.Socket | None = None
        self._poller = zmq.Poller()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._poller.register(self._wake_r, zmq.POLLIN)
        self._finished: queue.SimpleQueue = queue.SimpleQueue()
        self._running: Running | None = None
        self._assignment: Assignment | None = None
        # The RESULT frames not yet acknowledged, and when last sent.
        self._result: dict | None = None
        self._result_sent = 0.0
        self._heard = 0.0
        self._next_heartbeat = 0.0
        self._reconnect_at: float | None = None
        self._delay = config.reconnect_min
        self._stopping = False
        self._drain_now = False
        self._drain_deadline: float | None = None
        self._said_bye = False
        self._progress_at = 0.0
        self._progress_pos = 0
        self._progress_value: float | None = None
        self._thread: threading.Thread | None = None
        self.connected = threading.Event()

    # Life cycle.

    def start(self, timeout: float = 10.0) -> "Worker":
        """Run in a thread; return once the broker has answered."""
        self._thread = threading.Thread(
            target=self.run, name=f"msp-worker-{self.name}", daemon=True
        )
        self._thread.start()
        if not self.connected.wait(timeout):
            raise MspError(f"worker {self.name}: no broker answered within "
                           f"{timeout} s at {self.config.broker}")
        if self.refused is not None:
            raise MspError(f"worker {self.name}: refused by the broker: "
                           f"{self.refused}")
        return self

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Leave: finish (``drain``) or give up the running job, then exit.
        Safe to call from any thread or a signal handler."""
        self._stopping = True
        self._drain_now = not drain
        self._wake(b"s")
        if self._thread is not None and \
                threading.current_thread() is not self._thread:
            self._thread.join(timeout)

    def run(self) -> None:
        log.info("worker %s connecting to %s (%s executor)", self.name,
                 self.config.broker, self.config.executor)
        self._connect()
        try:
            while self._step():
                pass
        finally:
            if self._sock is not None:
                # A BYE just sent must reach the broker, or it would keep
                # this worker on its books and assign it a job meanwhile;
                # the wait for it is bounded.
                linger = self.config.heartbeat_interval if self._said_bye \
                    else 0
                self._sock.close(linger=int(linger * 1000))
            # Forget the pipe before closing it: a stop() or a job ending
            # after this must not write to a descriptor reused elsewhere.
            wake_r, wake_w = self._wake_r, self._wake_w
            self._wake_w = None
            os.close(wake_r)
            os.close(wake_w)
            close = getattr(self.executor, "close", None)
            if self._own_executor and close is not None:
                close()
            log.info("worker %s stopped after %d job(s)", self.name,
                     self.jobs_done)

    # The loop.

    def _step(self) -> bool:
        """One iteration; False when the worker should exit."""
        now = self.clock()
        timeout = max(0.0, min(self._next_heartbeat, self._next_due(now)) - now)
        events = dict(self._poller.poll(timeout * 1000))
        now = self.clock()
        if self._sock is not None and self._sock in events:
            self._receive(now)
        if self._wake_r in events:
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass
        while not self._finished.empty():
            self._report(self._finished.get(), now)
        self._watch_job(now)
        return self._keep_alive(now)

    def _next_due(self, now: float) -> float:
        due = now + self.config.heartbeat_interval
        if self._reconnect_at is not None:
            due = min(due, self._reconnect_at)
        if self._running is not None:
            due = min(due, now + PROGRESS_PERIOD)
        return due

    def _connect(self) -> None:
        sock = self.context.socket(zmq.DEALER)
        sock.linger = 0
        sock.setsockopt(zmq.MAXMSGSIZE, self.config.max_message_size + 4096)
        keys.apply_client(sock, self.curve)
        sock.connect(self.config.broker)
        self._sock = sock
        self._poller.register(sock, zmq.POLLIN)
        now = self.clock()
        self._heard = now
        self._reconnect_at = None
        # The job held: running, or ended with its result not yet taken.
        job = token = None
        if self._assignment is not None:
            job, token = self._assignment.job, self._assignment.token
        elif self._result is not None:
            job, token = self._result["job"], self._result["token"]
        self._send(protocol.READY, {
            "name": self.name, "host": socket.gethostname(),
            "pid": os.getpid(), "secret": self.config.secret or None,
            "job": job, "token": token,
        })
        if self._result is not None:
            self._send(protocol.RESULT, self._result)
            self._result_sent = now
        # A new socket is a new worker to the broker: say again that we
        # are leaving before it can give us anything.
        self._said_bye = False
        if self._stopping:
            self._send_bye()

    def _disconnect(self, now: float) -> None:
        self._poller.unregister(self._sock)
        self._sock.close(linger=0)
        self._sock = None
        delay = self._delay
        if self._assignment is not None or self._result is not None:
            # A restarted broker waits three liveness periods for the
            # worker of a running job before it runs the job again: one
            # that holds a job (or its result) knocks at least once a
            # period, whatever its back-off has grown to.
            delay = min(delay, self.period)
        self._reconnect_at = now + delay
        log.warning("worker %s: broker at %s silent; reconnecting in %.1f s",
                    self.name, self.config.broker, delay)
        self._delay = min(self._delay * 2, self.config.reconnect_max)

    def _send(self, command: bytes, body: dict | None = None) -> None:
        if self._sock is None:
            return
        self._sock.send_multipart(protocol.encode(command, body))
        self._next_heartbeat = self.clock() + self.config.heartbeat_interval

    def _keep_alive(self, now: float) -> bool:
        if self._stopping and self._leave(now):
            return False
        if self._sock is None:
            if self._reconnect_at is not None and now >= self._reconnect_at:
                self._connect()
            return True
        if now - self._heard > self.period:
            self._disconnect(now)
            return True
        if self._result is not None and now - self._result_sent > \
                self.config.heartbeat_interval * 2:
            self._send(protocol.RESULT, self._result)
            self._result_sent = now
        if now >= self._next_heartbeat:
            self._send(protocol.HEARTBEAT)
        return True

    def _leave(self, now: float) -> bool:
        """Work toward leaving; True once the worker may exit."""
        if self._drain_deadline is None:
            self._drain_deadline = now + (
                0.0 if self._drain_now else self.config.drain_timeout
            )
            log.info("worker %s leaving%s", self.name,
                     "" if self._running is None else "; draining its job")
        self._send_bye()
        if self._running is not None and now >= self._drain_deadline:
            self._running.stop("lost")
        busy = self._assignment is not None or self._result is not None
        # Without a broker there is nobody to hand a result to.
        return not busy or (self._sock is None and self._running is None)

    def _send_bye(self) -> None:
        if not self._said_bye and self._sock is not None:
            self._send(protocol.BYE)
            self._said_bye = True

    # From the broker.

    def _receive(self, now: float) -> None:
        while True:
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._heard = now
            self._delay = self.config.reconnect_min
            try:
                msg = protocol.parse(frames, protocol.BROKER_COMMANDS,
                                     self.config.max_message_size)
            except ProtocolError as exc:
                log.warning("worker %s: bad message from broker: %s",
                            self.name, exc)
                continue
            if msg.command != protocol.ERROR:
                self.connected.set()
            self._on_message(msg, now)
            if self._sock is None:
                return

    def _on_message(self, msg: protocol.Message, now: float) -> None:
        body = msg.body
        if msg.command == protocol.ASSIGN:
            self._assign(body, now)
        elif msg.command == protocol.CANCEL:
            a = self._assignment
            if a is not None and (a.job, a.token) == (
                body["job"], body["token"]
            ):
                log.info("worker %s: job %d %s", self.name, a.job,
                         body.get("reason", "cancelled"))
                if self._running is not None:
                    self._running.stop("cancelled")
                elif self._result is None:
                    self._finished.put((a, Outcome("cancelled")))
        elif msg.command == protocol.ACK:
            r = self._result
            if r is not None and (r["job"], r["token"]) == (
                body["job"], body["token"]
            ):
                self._result = None
        elif msg.command == protocol.ERROR:
            if body["code"] == "not_ready":
                # The broker forgot us (it restarted): announce again.
                self._poller.unregister(self._sock)
                self._sock.close(linger=0)
                self._sock = None
                self._connect()
            elif body["code"] == "unauthenticated":
                # Trying again cannot help: say why and leave.
                log.error("worker %s: refused by the broker: %s", self.name,
                          body["message"])
                self.refused = body["message"]
                self._stopping = self._drain_now = True
                self.connected.set()
            else:
                log.error("worker %s: broker says %s: %s", self.name,
                          body["code"], body["message"])
                r = self._result
                if r is not None and (r["job"], r["token"]) == (
                    body.get("job"), body.get("token")
                ):
                    # The broker will never take this result: stop sending.
                    self._result = None

    def _assign(self, body: dict, now: float) -> None:
        if self._assignment is not None or self._stopping:
            # It crossed our BYE (or, were the broker wrong about us, our
            # job): give it back at once, so that it is re-queued without
            # spending an attempt, rather than waited for in vain.
            why = "leaving" if self._stopping else "busy"
            log.warning("worker %s: gave back job %d: %s", self.name,
                        body["job"], why)
            if self._stopping:
                self._send_bye()
            self._send(protocol.RESULT, {
                "job": body["job"], "token": body["token"],
                "outcome": "lost", "error": f"worker {self.name} was {why}",
            })
            return
        a = Assignment(
            job=body["job"], token=body["token"], attempt=body["attempt"],
            script=body["script"], args=[str(x) for x in body["args"]],
            data=body["data"], output=body["output"],
            timeout=body.get("timeout"), cpu=body.get("cpu"),
            memory=body.get("memory"),
        )
        self._assignment = a
        self._progress_pos, self._progress_value = 0, None
        log.info("worker %s: job %d attempt %d: %s", self.name, a.job,
                 a.attempt, a.script)
        self._send(protocol.STARTED, {"job": a.job, "token": a.token})
        try:
            self._running = self.executor.start(
                a, lambda outcome, a=a: self._job_done(a, outcome)
            )
        except OSError as exc:
            self._job_done(a, Outcome("error", None, f"cannot start: {exc}"))

    def _job_done(self, a: Assignment, outcome: Outcome) -> None:
        """From the executor's thread: hand the outcome to the loop."""
        self._finished.put((a, outcome))
        self._wake(b"d")

    def _wake(self, why: bytes) -> None:
        """Wake the loop from another thread or a signal handler."""
        fd = self._wake_w
        if fd is None:  # the loop has ended
            return
        try:
            os.write(fd, why)
        except OSError:
            pass

    # The job.

    def _report(self, item, now: float) -> None:
        a, outcome = item
        if self._assignment is not a:
            return
        self._check_progress(now, force=True)
        self._running = None
        self._assignment = None
        self.jobs_done += 1
        self._result = {
            "job": a.job, "token": a.token, "outcome": outcome.outcome,
            "exit_code": outcome.exit_code, "error": outcome.error,
            "usage": outcome.usage, "output": outcome.output,
        }
        log.info("worker %s: job %d %s in %.2f s", self.name, a.job,
                 outcome.outcome, outcome.usage.get("wall", 0.0))
        self._send(protocol.RESULT, self._result)
        self._result_sent = now

    def _watch_job(self, now: float) -> None:
        running = self._running
        if running is None:
            return
        if running.deadline is not None and now >= running.deadline:
            running.stop("timed_out")
        if now - self._progress_at >= PROGRESS_PERIOD:
            self._check_progress(now)

    def _check_progress(self, now: float, force: bool = False) -> None:
        """Forward the latest progress line the script printed."""
        a = self._assignment
        if a is None:
            return
        self._progress_at = now
        try:
            with open(a.scratch / outputs.STDOUT, "rb") as f:
                f.seek(self._progress_pos)
                chunk = f.read(1 << 20)
        except OSError:
            return
        end = chunk.rfind(b"\n") + 1
        if end == 0 and len(chunk) == 1 << 20:
            end = len(chunk)  # a megabyte without a newline: skip it
        self._progress_pos += end
        matches = PROGRESS.findall(chunk[:end])
        if not matches:
            return
        number, percent, message = matches[-1]
        value = float(number) / (100 if percent else 1)
        if value != self._progress_value:
            self._progress_value = value
            self._send(protocol.PROGRESS, {
                "job": a.job, "token": a.token, "value": value,
                "message": message.decode("utf-8", "replace")[:200],
            })
