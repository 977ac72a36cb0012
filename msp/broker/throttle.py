"""Slowing down password guessing.

Failed logins are counted per user name and per peer address. Once a key
has failed ``after`` times, each further failure blocks it for a delay that
starts at ``delay`` and doubles up to ``cap``; while blocked, the broker
refuses its logins at once with the code ``throttled`` and spends no
password hash on them. A key that has not failed for ``window`` seconds
starts afresh, and a successful login clears its user name (not its peer,
or one valid account would reset the count of guesses from that peer).

Refusing instead of answering late keeps the broker's loop free and the
state observable: the counts and deadlines are plain numbers a test reads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Keys remembered at most; past it, the stale ones are dropped first.
MAX_KEYS = 10_000


@dataclass(slots=True)
class Entry:
    failures: int = 0
    last: float = 0.0
    until: float = 0.0
    # Logins of the key whose password is being checked right now.
    pending: int = 0


class LoginThrottle:
    """Failure counts and blocks, per user name and per peer address.

    XXX: anyone may fail logins on purpose for a name and so keep its owner
    out for up to ``cap`` at a time; a per-name block is the price of
    slowing down guesses spread over many addresses.
    """

    def __init__(self, after: int, peer_after: int, window: float,
                 delay: float, cap: float):
        self.after = after
        self.peer_after = peer_after
        self.window = window
        self.delay = delay
        self.cap = cap
        self._entries: dict[tuple[str, str], Entry] = {}

    @staticmethod
    def keys(name: str, peer: str) -> list[tuple[str, str]]:
        keys = [("user", name[:64])]
        # ipc and inproc peers have no address; they share the name's count.
        if peer:
            keys.append(("peer", peer))
        return keys

    def retry_after(self, name: str, peer: str, now: float) -> float:
        """Seconds before ``name`` from ``peer`` may try again; 0: now.

        Logins still being checked count as failures here, so that a burst
        sent at once cannot get more guesses checked than a slow series.
        """
        left = 0.0
        for kind, value in self.keys(name, peer):
            entry = self._entries.get((kind, value))
            if entry is None:
                continue
            left = max(left, entry.until - now)
            after = self.after if kind == "user" else self.peer_after
            fresh = now - entry.last <= self.window
            if entry.pending and entry.failures * fresh + entry.pending >= after:
                left = max(left, self.delay)
        return left

    def begin(self, name: str, peer: str, now: float) -> None:
        """A login of ``name`` from ``peer`` goes to the password check."""
        for key in self.keys(name, peer):
            self._entry(key, now).pending += 1

    def _end(self, key: tuple[str, str]) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry.pending:
            entry.pending -= 1

    def failed(self, name: str, peer: str, now: float) -> list[dict]:
        """Count a failure; the keys it blocks, with their delays."""
        blocked = []
        for kind, value in self.keys(name, peer):
            self._end((kind, value))
            entry = self._entry((kind, value), now)
            if now - entry.last > self.window:
                entry.failures = 0
            entry.failures += 1
            entry.last = now
            after = self.after if kind == "user" else self.peer_after
            if entry.failures >= after:
                delay = min(
                    self.delay * 2 ** (entry.failures - after), self.cap
                )
                entry.until = now + delay
                blocked.append({kind: value, "failures": entry.failures,
                                "delay": delay})
        return blocked

    def succeeded(self, name: str, peer: str) -> None:
        for key in self.keys(name, peer):
            self._end(key)
        entry = self._entries.get(("user", name[:64]))
        if entry is not None and not entry.pending:
            del self._entries[("user", name[:64])]
        elif entry is not None:
            entry.failures, entry.until = 0, 0.0

    def state(self, kind: str, value: str) -> tuple[int, float]:
        """(failures, blocked until) of a key, for tests and the log."""
        entry = self._entries.get((kind, value))
        return (0, 0.0) if entry is None else (entry.failures, entry.until)

    def _entry(self, key: tuple[str, str], now: float) -> Entry:
        entry = self._entries.get(key)
        if entry is None:
            if len(self._entries) >= MAX_KEYS:
                self._prune(now)
            entry = self._entries[key] = Entry()
        return entry

    def _prune(self, now: float) -> None:
        stale = [k for k, e in self._entries.items()
                 if now - e.last > self.window and e.until <= now
                 and not e.pending]
        for key in stale:
            del self._entries[key]
        if len(self._entries) >= MAX_KEYS:
            # A flood of fresh names: forget the oldest half.
            by_age = sorted(self._entries, key=lambda k: self._entries[k].last)
            for key in by_age[: len(by_age) // 2]:
                del self._entries[key]


def seconds(left: float) -> int:
    """A wait as people read it: whole seconds, rounded up."""
    return max(1, math.ceil(left))
