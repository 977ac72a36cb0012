"""The msp wire protocol: every message between client, broker and worker.

A message is a ZeroMQ multipart message of three frames::

    [version, command, body]

``version`` is ``b"MSP1"``, ``command`` an upper-case ASCII word and ``body``
a UTF-8 JSON object. A client's REQ socket adds an empty delimiter frame in
front, and the broker's ROUTER sockets add the peer's identity; both are
stripped before a message reaches :func:`parse`. ``docs/protocol.md`` is the
reference for peers written in other languages.

Every body is checked against the schema of its command before use, so the
broker and the worker only ever see well-typed fields.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from .errors import ProtocolError

VERSION = b"MSP1"

# Replies to a client request.
OK = b"OK"
ERR = b"ERR"

# Broker to worker.
ASSIGN = b"ASSIGN"
CANCEL = b"CANCEL"
ACK = b"ACK"
ERROR = b"ERROR"

# Both directions between broker and worker.
HEARTBEAT = b"HEARTBEAT"

# Worker to broker.
READY = b"READY"
STARTED = b"STARTED"
PROGRESS = b"PROGRESS"
RESULT = b"RESULT"
BYE = b"BYE"

# Attempt outcomes a worker reports. "lost" is also what the broker records
# for the attempt of a worker that died; a worker reports it when it gives
# an attempt back (it is leaving), so that the job is re-queued.
OUTCOMES = ("succeeded", "failed", "timed_out", "error", "cancelled", "lost")

# Field types: a tuple of accepted Python types, after JSON decoding.
_STR = (str,)
_INT = (int,)
_NUM = (int, float)
_LIST = (list,)
_DICT = (dict,)
_BOOL = (bool,)
_NONE = (type(None),)

# What a job is made of, in SUBMIT and in each item of SUBMIT_MANY.
JOB_FIELDS: dict[str, tuple[tuple, bool]] = {
    "script": (_STR, True),
    "args": (_LIST, False),
    "data": (_STR, True),
    "output": (_STR, True),
    "priority": (_INT, False),
    "attempts": (_INT, False),
    "timeout": (_NUM + _NONE, False),
    "name": (_STR + _NONE, False),
    "cpu": (_NUM + _NONE, False),
    "memory": (_INT + _NONE, False),
}

# command -> {field: (types, required)}. Fields not listed are refused.
CLIENT_COMMANDS: dict[bytes, dict[str, tuple[tuple, bool]]] = {
    b"PING": {},
    b"LOGIN": {"user": (_STR, True), "password": (_STR, True)},
    b"LOGOUT": {"token": (_STR, True)},
    b"PASSWD": {
        "token": (_STR, True),
        "user": (_STR + _NONE, False),
        "password": (_STR, True),
    },
    b"SUBMIT": {
        "token": (_STR, True),
        "request_id": (_STR, True),
        **JOB_FIELDS,
    },
    # Many jobs in one request, stored all or none; each item of "jobs"
    # has the fields of JOB_FIELDS.
    b"SUBMIT_MANY": {
        "token": (_STR, True),
        "request_id": (_STR, True),
        "jobs": (_LIST, True),
    },
    b"STATUS": {"token": (_STR, True), "job": (_INT, True)},
    # One of "job" (a job id) and "jobs" (a list of them).
    b"WAIT": {
        "token": (_STR, True),
        "job": (_INT, False),
        "jobs": (_LIST, False),
        "timeout": (_NUM, False),
    },
    b"LIST": {
        "token": (_STR, True),
        "state": (_STR + _NONE, False),
        "user": (_STR + _NONE, False),
        "since": (_NUM + _NONE, False),
        "limit": (_INT, False),
    },
    b"CANCEL": {"token": (_STR, True), "job": (_INT, True)},
    b"LOGS": {
        "token": (_STR, True),
        "job": (_INT, True),
        "stream": (_STR, False),
        "offset": (_INT, False),
        "limit": (_INT, False),
    },
    b"USER_ADD": {
        "token": (_STR, True),
        "user": (_STR, True),
        "password": (_STR, True),
        "role": (_STR, False),
        "credit_limit": (_NUM + _NONE, False),
    },
    b"USER_LIST": {"token": (_STR, True)},
    b"USER_SET": {
        "token": (_STR, True),
        "user": (_STR, True),
        "credit_limit": (_NUM + _NONE, True),
    },
    b"USER_DISABLE": {"token": (_STR, True), "user": (_STR, True)},
    b"WORKERS": {"token": (_STR, True)},
    b"STATS": {"token": (_STR, True)},
    b"BILLING": {
        "token": (_STR, True),
        "user": (_STR + _NONE, False),
        "all": (_BOOL, False),
        "since": (_NUM + _NONE, False),
        "until": (_NUM + _NONE, False),
    },
    b"AUDIT": {
        "token": (_STR, True),
        "event": (_STR + _NONE, False),
        "actor": (_STR + _NONE, False),
        "since": (_NUM + _NONE, False),
        "limit": (_INT, False),
    },
}

WORKER_COMMANDS: dict[bytes, dict[str, tuple[tuple, bool]]] = {
    READY: {
        "name": (_STR, True),
        "host": (_STR, False),
        "pid": (_INT, False),
        "secret": (_STR + _NONE, False),
        "job": (_INT + _NONE, False),
        "token": (_STR + _NONE, False),
    },
    HEARTBEAT: {},
    STARTED: {"job": (_INT, True), "token": (_STR, True)},
    PROGRESS: {
        "job": (_INT, True),
        "token": (_STR, True),
        "value": (_NUM, True),
        "message": (_STR, False),
    },
    RESULT: {
        "job": (_INT, True),
        "token": (_STR, True),
        "outcome": (_STR, True),
        "exit_code": (_INT + _NONE, False),
        "error": (_STR + _NONE, False),
        "usage": (_DICT, False),
        "output": (_BOOL, False),
    },
    BYE: {},
}

BROKER_COMMANDS: dict[bytes, dict[str, tuple[tuple, bool]]] = {
    ASSIGN: {
        "job": (_INT, True),
        "token": (_STR, True),
        "attempt": (_INT, True),
        "script": (_STR, True),
        "args": (_LIST, True),
        "data": (_STR, True),
        "output": (_STR, True),
        "timeout": (_NUM + _NONE, False),
        # Limits the job asked for: CPU seconds, memory in MiB.
        "cpu": (_NUM + _NONE, False),
        "memory": (_INT + _NONE, False),
    },
    HEARTBEAT: {},
    CANCEL: {
        "job": (_INT, True),
        "token": (_STR, True),
        "reason": (_STR, False),
    },
    ACK: {"job": (_INT, True), "token": (_STR, True)},
    # "job" and "token" name the job an error is about, where one is.
    ERROR: {
        "code": (_STR, True),
        "message": (_STR, True),
        "job": (_INT, False),
        "token": (_STR, False),
    },
}


@dataclass(frozen=True, slots=True)
class Message:
    command: bytes
    body: dict[str, Any]


def encode(command: bytes, body: dict[str, Any] | None = None) -> list[bytes]:
    """The three frames of a message."""
    # ASCII escapes keep any str encodable, lone surrogates included.
    data = json.dumps(body or {}, separators=(",", ":"))
    return [VERSION, command, data.encode()]


def parse(frames: list[bytes], schema: dict, max_size: int) -> Message:
    """Check ``frames`` against ``schema`` and return the message.

    Raises :class:`ProtocolError` with a code and a message a person can act
    on; never anything else, whatever the frames hold.
    """
    if len(frames) != 3:
        raise ProtocolError(f"expected 3 frames, got {len(frames)}")
    version, command, raw = frames
    if version != VERSION:
        raise ProtocolError(
            f"unsupported protocol version {version[:16]!r}, "
            f"expected {VERSION.decode()}",
            "version",
        )
    fields = schema.get(command)
    if fields is None:
        raise ProtocolError(
            f"unknown command {command[:32]!r}", "unknown_command"
        )
    if len(raw) > max_size:
        raise ProtocolError(
            f"body of {len(raw)} bytes exceeds the limit of {max_size}",
            "too_large",
        )
    try:
        # Decode first: json.loads would also take UTF-16 and UTF-32 bytes.
        # (An empty body, a heartbeat's, is the most common of all.)
        body = json.loads(raw.decode(), parse_constant=_no_constant) \
            if raw and raw != b"{}" else {}
    except RecursionError:
        raise ProtocolError("body is nested too deeply") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"body is not UTF-8 JSON: {exc}") from None
    if not isinstance(body, dict):
        raise ProtocolError("body must be a JSON object")
    _check_values(body, 0)
    # Decoded strictly, the bytes hold no surrogate; only a JSON escape
    # can make one, and only then need the strings be looked at.
    text = b"\\ud" in raw or b"\\uD" in raw
    _check_fields(command, body, fields, text)
    return Message(command, body)


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


# What every number in a body must be, whatever its field: the store takes
# these without surprises. (Strings are checked field by field below.)
INT_MIN, INT_MAX = -(1 << 63), (1 << 63) - 1
MAX_DEPTH = 32


def _check_values(value: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ProtocolError(f"body is nested deeper than {MAX_DEPTH}")
    if isinstance(value, bool):
        pass
    elif isinstance(value, int):
        if not INT_MIN <= value <= INT_MAX:
            raise ProtocolError("an integer does not fit in 64 bits")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ProtocolError("a number is too large")
    elif isinstance(value, list):
        for item in value:
            _check_values(item, depth + 1)
    elif isinstance(value, dict):
        for item in value.values():
            _check_values(item, depth + 1)


def check_item(where: str, item: Any, fields: dict) -> dict:
    """Check one object nested in a body that :func:`parse` returned (an
    item of a list) against ``fields``; ``where`` names it in errors.
    (``parse`` has checked the strings of the whole body already.)"""
    if not isinstance(item, dict):
        raise ProtocolError(f"{where} must be an object")
    _check_fields(where, item, fields, False)
    return item


def _check_fields(command: bytes | str, body: dict, fields: dict,
                  text: bool = True) -> None:
    name = command if isinstance(command, str) else command.decode()
    for key, value in body.items():
        spec = fields.get(key)
        if spec is None:
            raise ProtocolError(f"{name}: unknown field {key[:64]!r}")
        types, _ = spec
        # bool is an int in Python, but never a valid int on the wire.
        if not isinstance(value, types) or (
            isinstance(value, bool) and bool not in types
        ):
            expected = " or ".join(_type_name(t) for t in types)
            raise ProtocolError(f"{name}: field {key!r} must be {expected}")
        if text and not _is_text(value):
            raise ProtocolError(f"{name}: field {key!r} is not valid UTF-8")
    for key, (_, required) in fields.items():
        if required and key not in body:
            raise ProtocolError(f"{name}: missing field {key!r}")


def _is_text(value: Any) -> bool:
    """False for strings holding lone surrogates (JSON can escape them; no
    file name, database or peer can use them)."""
    if isinstance(value, str):
        if value.isascii():
            return True
        try:
            value.encode()
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(value, list):
        return all(_is_text(v) for v in value)
    if isinstance(value, dict):
        return all(_is_text(k) and _is_text(v) for k, v in value.items())
    return True


def _type_name(t: type) -> str:
    return {
        str: "a string",
        int: "an integer",
        float: "a number",
        list: "a list",
        dict: "an object",
        bool: "a boolean",
        type(None): "null",
    }.get(t, t.__name__)


def error_body(code: str, message: str) -> dict[str, str]:
    return {"code": code, "message": message}
