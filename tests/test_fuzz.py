"""Random frames at the broker's message handling, driven without sockets.

The broker core (:meth:`Broker.handle`) gets random frame lists, random
bytes, and plausible JSON bodies for known and unknown commands, with and
without a valid session or attempt token. Whatever it gets, it must not
fail, must answer every client message that has an envelope exactly once
(OK or ERR), must answer every bad worker message with an ERROR, and must
leave the stored jobs, attempts, users and sessions as they were whenever
it refuses a message.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from msp import protocol

from .conftest import ADMIN_PASSWORD
from .core import Core

SETTINGS = settings(
    max_examples=200, deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture,
                           HealthCheck.too_slow],
)
# Client commands whose valid requests are answered later, off the loop.
OFFLOADED = {b"LOGIN", b"PASSWD", b"USER_ADD"}


@pytest.fixture
def core(tmp_path):
    c = Core(tmp_path)
    yield c
    c.broker.close()


def replies_to(out, identity):
    return [frames for _, frames in out if frames[0] == identity]


def decoded(frames) -> tuple[bytes, dict]:
    """(command, body) of a reply; the client's have a delimiter."""
    if frames[1] == b"":
        frames = frames[1:]
    assert frames[1] == protocol.VERSION
    return frames[2], json.loads(frames[3])


# Strategies.

json_scalars = (
    st.none() | st.booleans()
    | st.integers(min_value=-(1 << 70), max_value=1 << 70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4)
    | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def commands(own: dict):
    """Mostly the side's own commands, sometimes the other side's or
    random bytes."""
    other = (protocol.WORKER_COMMANDS if own is protocol.CLIENT_COMMANDS
             else protocol.CLIENT_COMMANDS)
    return st.integers(0, 9).flatmap(
        lambda i: st.sampled_from(sorted(own)) if i < 8
        else st.sampled_from(sorted(other)) if i == 8
        else st.binary(max_size=12)
    )


def field_values(core: Core, field: str, token: str, exact: bool):
    """Values for a field: the right kind when ``exact``, else often the
    right kind and sometimes anything."""
    right = {
        "token": st.sampled_from([token] * 3 + [core.token or "t", ""]),
        "job": st.sampled_from([core.job or 1, 1, 2, 10**6]),
        "script": st.sampled_from([str(core.script), "/etc/passwd",
                                   str(core.root / ".." / "x.py")]),
        "data": st.sampled_from([str(core.root / "data"), "/"]),
        "output": st.sampled_from([str(core.root / "o"), "relative"]),
        "user": st.sampled_from(["admin", "nobody", "x" * 100]),
        "password": st.sampled_from([ADMIN_PASSWORD, "short", "p" * 2000]),
        "outcome": st.sampled_from([*protocol.OUTCOMES, "lost", "weird"]),
        "name": st.sampled_from(["w", "fake", ""]),
        "state": st.sampled_from(["queued", "running", "nope"]),
        "stream": st.sampled_from(["stdout", "stderr", "x"]),
        "role": st.sampled_from(["admin", "user", "root"]),
        "request_id": st.sampled_from(["r1", "", "x" * 80]),
    }.get(field)
    if right is None:
        right = json_values if not exact else {
            "value": st.floats(-1, 2), "args": st.lists(st.text(max_size=5),
                                                        max_size=3),
            "priority": st.integers(-5, 5), "attempts": st.integers(0, 5),
            "timeout": st.none() | st.floats(0, 100), "limit": st.integers(),
            "offset": st.integers(0, 10), "exit_code": st.integers(-9, 9),
            "since": st.none(), "until": st.none(), "pid": st.integers(1),
            "host": st.text(max_size=8), "secret": st.none(),
            "message": st.text(max_size=8), "error": st.text(max_size=8),
            "usage": st.dictionaries(st.sampled_from(["wall", "max_rss_kb"]),
                                     json_scalars),
            "output": st.booleans(),
        }.get(field, json_values)
    if exact:
        return right
    return st.integers(0, 4).flatmap(lambda i: right if i else json_values)


@st.composite
def bodies(draw, core: Core, command: bytes, token: str):
    """A JSON body for ``command``: its fields, some missing, some of the
    wrong type, sometimes one it does not know; or random bytes."""
    mode = draw(st.integers(0, 9))
    if mode == 0:
        return draw(st.binary(max_size=64))
    exact = mode >= 5
    schema = {**protocol.CLIENT_COMMANDS, **protocol.WORKER_COMMANDS}.get(
        command, {"junk": ((str,), False)})
    body = {}
    for field, (_, required) in schema.items():
        if required or draw(st.booleans()):
            if exact or draw(st.integers(0, 19)) or not required:
                body[field] = draw(field_values(core, field, token, exact))
    if not exact and draw(st.integers(0, 9)) == 0:
        body[draw(st.text(max_size=8))] = draw(json_values)
    return json.dumps(body).encode()


identities = st.binary(min_size=1, max_size=8)


# Client side.

@SETTINGS
@given(frames=st.lists(st.binary(max_size=64), max_size=7))
def test_random_client_frames(core, frames):
    before = core.tables()
    out = core.feed("client", frames)

    if len(frames) < 2:
        # Documented drop: no envelope, nobody to answer.
        assert out == []
    else:
        assert len(replies_to(out, frames[0])) == 1
        command, reply = decoded(out[0][1])
        assert command == protocol.ERR
        assert reply["code"] != "internal", reply
    assert core.tables() == before


@SETTINGS
@given(data=st.data())
def test_plausible_client_requests(core, data):
    token = core.session()
    identity = data.draw(identities)
    command = data.draw(commands(protocol.CLIENT_COMMANDS))
    body = data.draw(bodies(core, command, token))
    version = data.draw(st.sampled_from([protocol.VERSION] * 9 + [b"MSP0"]))
    before = core.tables()

    out = core.feed("client", [identity, b"", version, command, body])
    mine = replies_to(out, identity)
    if not mine and command in OFFLOADED:
        mine = replies_to(core.run_later(), identity)
    elif not mine and command == b"WAIT":
        mine = replies_to(core.expire_waits(), identity)

    assert len(mine) == 1, (command, body, out)
    reply_command, reply = decoded(mine[0])
    assert reply_command in (protocol.OK, protocol.ERR)
    event(f"reply {reply_command.decode()} {reply.get('code', '')}")
    if reply_command == protocol.ERR:
        assert reply["code"] != "internal", reply
        assert core.tables() == before


# Worker side.

@SETTINGS
@given(frames=st.lists(st.binary(max_size=64), max_size=7))
def test_random_worker_frames(core, frames):
    core.job, core.token = core.assign()
    before = core.tables(), core.memory()
    out = core.feed("worker", frames)

    if len(frames) < 2:
        assert out == []
    else:
        mine = replies_to(out, frames[0])
        assert len(mine) == 1
        command, reply = decoded(mine[0])
        assert command == protocol.ERROR and reply["code"] != "internal"
    assert (core.tables(), core.memory()) == before


@SETTINGS
@given(data=st.data())
def test_plausible_worker_messages(core, data):
    core.job, core.token = core.assign()
    identity = data.draw(st.sampled_from([core.fake]) | identities)
    command = data.draw(commands(protocol.WORKER_COMMANDS))
    body = data.draw(bodies(core, command, core.token))
    version = data.draw(st.sampled_from([protocol.VERSION] * 9 + [b"MSP2"]))
    before = core.tables(), core.memory()
    known = identity in core.broker.workers.peers

    out = core.feed("worker", [identity, version, command, body])

    mine = replies_to(out, identity)
    errors = [decoded(f)[1] for f in mine if decoded(f)[0] == protocol.ERROR]
    event(f"{command[:10]!r}: " + " ".join(
        decoded(f)[0].decode() + ":" + decoded(f)[1].get("code", "")
        for f in mine))
    for error in errors:
        assert error["code"] != "internal", error
    try:
        msg = protocol.parse([version, command, body],
                             protocol.WORKER_COMMANDS, 4096)
    except protocol.ProtocolError:
        msg = None
    if msg is None or (not known and command != protocol.READY):
        # Refused: one ERROR, and nothing changed, stored or in memory.
        assert len(mine) == 1 and len(errors) == 1, (command, body, out)
        assert (core.tables(), core.memory()) == before
    elif command == protocol.RESULT:
        assert len(mine) == 1
        reply_command, reply = decoded(mine[0])
        if reply_command == protocol.ERROR:
            assert core.tables() == before[0]
        else:
            assert reply_command == protocol.ACK
    elif errors:
        # STARTED or PROGRESS under a token not held: nothing changed.
        assert command in (protocol.STARTED, protocol.PROGRESS)
        assert core.tables() == before[0]
    # Never two workers on one job, whatever was said.
    holders = [p.job for p in core.broker.workers.peers.values()
               if p.job is not None and not p.stale]
    assert len(holders) == len(set(holders))
