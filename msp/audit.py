"""The audit trail: security-relevant events, stored and logged.

Each event (a login, a failed login, a user changed, a job cancelled by an
admin, a worker or a key refused, a name throttled) becomes a row of the
store's ``msp_audit`` table, written in the transaction of the request that
caused it, and a line on the ``msp.audit`` logger, so that a site can send
it to its own log collector.
"""

from __future__ import annotations

import json
import logging

log = logging.getLogger(__name__)

# Events that mean something was refused; logged as warnings.
REFUSALS = frozenset((
    "login_failed", "login_throttled", "worker_refused", "key_refused",
))


def record(store, wall: float, event: str, actor: str | None,
           **detail) -> None:
    """Store the event and log it on ``msp.audit``."""
    store.audit(wall, event, actor, **detail)
    level = logging.WARNING if event in REFUSALS else logging.INFO
    log.log(level, "%s by %s %s", event, actor or "-",
            json.dumps(detail, sort_keys=True, default=str))
