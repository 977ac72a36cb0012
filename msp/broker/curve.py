"""The broker's side of ZeroMQ CURVE: encryption and peer keys.

With ``[broker] curve_secret_key_file`` set, every tcp endpoint of the
broker (clients, workers, events) is a CURVE server: traffic is encrypted,
and a ZAP handler admits only peers whose public key is in
``curve_allowed_keys_dir`` (for the worker endpoint, in
``curve_worker_keys_dir`` when that is set, so a user's key cannot serve as
a worker's). A refused peer never gets a message through; the broker
audits it, once a minute per key at most.

ipc and inproc endpoints stay plain: they do not leave the machine, and an
ipc socket is guarded by its file's permissions. ``curve_plain_loopback``
also leaves tcp endpoints on loopback addresses plain, for sites that
trust everyone on the broker's host.
"""

from __future__ import annotations

import ipaddress
import logging
import time

import zmq
from zmq.auth.thread import ThreadAuthenticator

from .. import keys
from ..config import BrokerConfig
from ..errors import ConfigError

log = logging.getLogger(__name__)

# The ZAP domains of the broker's sockets, named after them.
DOMAINS = ("client", "worker", "events")
# A refused key is audited at most this often.
REFUSAL_PERIOD = 60.0
MAX_REMEMBERED = 1000


class _Authenticator(ThreadAuthenticator):
    """Remembers the address of the ZAP request being handled, for the
    audit of a refusal."""

    address = ""

    async def handle_zap_message(self, msg: list[bytes]) -> None:
        self.address = msg[3].decode("utf-8", "replace") if len(msg) > 3 \
            else ""
        await super().handle_zap_message(msg)


class CurveGuard:
    """Keys, socket options and the ZAP handler of a CURVE broker.

    XXX: the allowed keys are read once, at start: adding or removing a key
    takes a broker restart. And a peer that does not speak CURVE at all
    fails its handshake before the ZAP handler sees it, so it is not
    audited (only logged by libzmq, if at all).
    """

    def __init__(self, broker, config: BrokerConfig):
        if not config.curve_allowed_keys_dir:
            raise ConfigError("[broker] curve_secret_key_file needs "
                              "curve_allowed_keys_dir: the keys it admits")
        self.broker = broker
        self.public, self.secret = keys.load_secret(
            config.curve_secret_key_file
        )
        self.allowed = keys.load_allowed(config.curve_allowed_keys_dir)
        self.workers = (
            keys.load_allowed(config.curve_worker_keys_dir)
            if config.curve_worker_keys_dir else None
        )
        self.plain_loopback = config.curve_plain_loopback
        self._auth: _Authenticator | None = None
        self._refused: dict[bytes, float] = {}

    def applies(self, endpoint: str) -> bool:
        """Whether ``endpoint`` is to be a CURVE server."""
        if not endpoint.startswith("tcp://"):
            return False
        if not self.plain_loopback:
            return True
        host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
        if host == "localhost":
            return False
        try:
            return not ipaddress.ip_address(host).is_loopback
        except ValueError:
            return True

    def start(self, context: zmq.Context) -> None:
        self._auth = _Authenticator(context, log=log)
        self._auth.start()
        for domain in DOMAINS:
            self._auth.configure_curve_callback(domain=domain,
                                                credentials_provider=self)

    def stop(self) -> None:
        if self._auth is not None:
            self._auth.stop()
            self._auth = None

    def secure(self, sock: zmq.Socket, domain: str) -> None:
        sock.curve_server = True
        sock.curve_secretkey = self.secret
        sock.curve_publickey = self.public
        sock.zap_domain = domain.encode()

    def callback(self, domain: str, key: bytes) -> bool:
        """Called by the ZAP handler (its thread) with a z85 public key."""
        allowed = self.allowed
        if domain == "worker" and self.workers is not None:
            allowed = self.workers
        if key in allowed:
            log.debug("admitted key %s on the %s endpoint", key, domain)
            return True
        address = self._auth.address if self._auth else ""
        now = time.monotonic()
        if now - self._refused.get(key, -REFUSAL_PERIOD) >= REFUSAL_PERIOD:
            if len(self._refused) >= MAX_REMEMBERED:
                self._refused.clear()
            self._refused[key] = now
            text = key.decode("ascii", "replace")
            wall = self.broker.wall()
            self.broker.later(lambda: self.broker.audit(
                wall, "key_refused", None, endpoint=domain, key=text,
                address=address,
            ))
        return False
