"""The wire protocol: encoding, parsing and every way a message can be bad."""

from __future__ import annotations

import json

import pytest

from msp import protocol
from msp.errors import ProtocolError
from msp.protocol import (
    BROKER_COMMANDS,
    CLIENT_COMMANDS,
    VERSION,
    WORKER_COMMANDS,
    Message,
    encode,
    parse,
)

MAX = 1 << 20

SCHEMAS = {
    "client": CLIENT_COMMANDS,
    "worker": WORKER_COMMANDS,
    "broker": BROKER_COMMANDS,
}

# A value of each wire type, non-ASCII where it can be, to check UTF-8.
SAMPLES = {
    str: "välue ñ 数据 δ",
    int: 42,
    float: 2.5,
    list: ["a", 1, {"k": None}],
    dict: {"wall": 1.5, "max_rss_kb": 1024},
    bool: True,
    type(None): None,
}


def _sample(types: tuple) -> object:
    # The first type of a field is its main one (null is only ever an extra).
    return SAMPLES[types[0]]


def _all_commands() -> list:
    return [
        pytest.param(
            schema_name, command, id=f"{schema_name}-{command.decode()}"
        )
        for schema_name, schema in SCHEMAS.items()
        for command in schema
    ]


def _full_body(fields: dict) -> dict:
    return {key: _sample(types) for key, (types, _) in fields.items()}


def _required_body(fields: dict) -> dict:
    return {
        key: _sample(types)
        for key, (types, required) in fields.items()
        if required
    }


def _code(frames, schema=CLIENT_COMMANDS, max_size=MAX) -> ProtocolError:
    with pytest.raises(ProtocolError) as info:
        parse(frames, schema, max_size)
    return info.value


# Encoding and round trips.


def test_encode_gives_three_frames():
    frames = encode(b"STATUS", {"token": "t", "job": 3})
    assert frames == [b"MSP1", b"STATUS", b'{"token":"t","job":3}']


def test_encode_without_body_sends_an_empty_object():
    assert encode(b"PING") == [b"MSP1", b"PING", b"{}"]
    assert encode(b"PING", None) == [b"MSP1", b"PING", b"{}"]


def test_encode_gives_utf8_json_of_the_body():
    body = {"user": "ñandú 数据", "password": "pässwörd δ 🐍"}
    frames = encode(b"LOGIN", body)
    # Raw UTF-8 or \\u escapes: either way, UTF-8 JSON of the same body.
    assert json.loads(frames[2].decode("utf-8")) == body


def test_encode_never_fails_on_a_lone_surrogate():
    # What os.fsdecode makes of a non-UTF-8 file name.
    frames = encode(b"LOGIN", {"user": "bad\udcffname", "password": "p"})
    assert json.loads(frames[2].decode("utf-8"))["user"] == "bad\udcffname"


@pytest.mark.parametrize(
    "body",
    [
        b'{"token":"\\ud800","job":1}',
        b'{"token":"ok\\udcffok","job":1}',
    ],
    ids=["high", "low"],
)
def test_escaped_lone_surrogate_is_refused(body):
    exc = _code([VERSION, b"STATUS", body])
    assert exc.code == "bad_request"
    assert exc.message == "STATUS: field 'token' is not valid UTF-8"


def test_lone_surrogate_inside_a_list_or_object_is_refused():
    frames = encode(b"SUBMIT", {**SUBMIT, "args": ["ok", ["\udcff"]]})
    exc = _code(frames)
    assert exc.code == "bad_request"
    assert exc.message == "SUBMIT: field 'args' is not valid UTF-8"
    body = {"job": 1, "token": "t", "outcome": "failed", "usage": {"\ud800": 1}}
    exc = _code(encode(b"RESULT", body), schema=WORKER_COMMANDS)
    assert exc.message == "RESULT: field 'usage' is not valid UTF-8"


def test_escaped_valid_pair_is_accepted():
    body = b'{"token":"\\ud83d\\udc0d","job":1}'
    msg = parse([VERSION, b"STATUS", body], CLIENT_COMMANDS, MAX)
    assert msg.body["token"] == "🐍"


@pytest.mark.parametrize("schema_name, command", _all_commands())
def test_round_trip_with_every_field(schema_name, command):
    schema = SCHEMAS[schema_name]
    body = _full_body(schema[command])
    msg = parse(encode(command, body), schema, MAX)
    assert msg == Message(command, body)
    assert msg.body == json.loads(json.dumps(body))


@pytest.mark.parametrize("schema_name, command", _all_commands())
def test_round_trip_with_required_fields_only(schema_name, command):
    schema = SCHEMAS[schema_name]
    body = _required_body(schema[command])
    msg = parse(encode(command, body), schema, MAX)
    assert msg.command == command
    assert msg.body == body


def test_every_command_of_each_schema_is_covered():
    # Guards the parametrization above: a new command gets tested too.
    ids = {p.id for p in _all_commands()}
    assert "client-SUBMIT" in ids and "worker-RESULT" in ids
    assert "broker-ASSIGN" in ids
    assert len(ids) == (
        len(CLIENT_COMMANDS) + len(WORKER_COMMANDS) + len(BROKER_COMMANDS)
    )


def test_nullable_fields_accept_null():
    body = {
        "token": "t", "request_id": "r", "script": "/s.py", "data": "/d",
        "output": "/o", "timeout": None, "name": None,
    }
    msg = parse(encode(b"SUBMIT", body), CLIENT_COMMANDS, MAX)
    assert msg.body["timeout"] is None
    assert msg.body["name"] is None


def test_number_fields_accept_int_and_float():
    for timeout in (3, 2.5, 0):
        body = {"token": "t", "job": 1, "timeout": timeout}
        msg = parse(encode(b"WAIT", body), CLIENT_COMMANDS, MAX)
        assert msg.body["timeout"] == timeout


def test_empty_body_frame_is_an_empty_object():
    assert parse([VERSION, b"PING", b""], CLIENT_COMMANDS, MAX) == Message(
        b"PING", {}
    )


def test_body_of_exactly_max_size_is_accepted():
    body = b'{"token":"' + b"x" * 100 + b'","job":1}'
    msg = parse([VERSION, b"STATUS", body], CLIENT_COMMANDS, len(body))
    assert msg.body == {"token": "x" * 100, "job": 1}


# Frames, version and command.


@pytest.mark.parametrize("count", [0, 1, 2, 4])
def test_wrong_frame_count(count):
    frames = [VERSION, b"PING", b"{}", b"{}"][:count]
    exc = _code(frames)
    assert exc.code == "bad_request"
    assert exc.message == f"expected 3 frames, got {count}"


def test_three_empty_frames_fail_on_the_version():
    exc = _code([b"", b"", b""])
    assert exc.code == "version"
    assert "expected MSP1" in exc.message


def test_empty_command_frame_is_an_unknown_command():
    exc = _code([VERSION, b"", b"{}"])
    assert exc.code == "unknown_command"


def test_empty_body_of_a_command_with_required_fields():
    exc = _code([VERSION, b"STATUS", b""])
    assert exc.code == "bad_request"
    assert exc.message == "STATUS: missing field 'token'"


@pytest.mark.parametrize(
    "version", [b"MSP2", b"msp1", b"MSP1 ", b"MSP", b"\xff\xfe", b"MSP0"]
)
def test_wrong_version(version):
    exc = _code([version, b"PING", b"{}"])
    assert exc.code == "version"
    assert exc.message.startswith("unsupported protocol version")
    assert repr(version) in exc.message


def test_version_is_checked_before_the_command():
    exc = _code([b"MSP9", b"NOPE", b"not json"])
    assert exc.code == "version"


def test_huge_version_frame_is_truncated_in_the_message():
    exc = _code([b"V" * 10_000, b"PING", b"{}"])
    assert exc.code == "version"
    assert len(exc.message) < 200


@pytest.mark.parametrize(
    "command", [b"FOO", b"ping", b"PING ", b"\xff", b"STATUSX"]
)
def test_unknown_command(command):
    exc = _code([VERSION, command, b"{}"])
    assert exc.code == "unknown_command"
    assert exc.message == f"unknown command {command!r}"


def test_command_of_another_schema_is_unknown():
    # A worker command sent on the client socket and the other way round.
    assert _code([VERSION, b"READY", b"{}"]).code == "unknown_command"
    exc = _code([VERSION, b"SUBMIT", b"{}"], schema=WORKER_COMMANDS)
    assert exc.code == "unknown_command"
    exc = _code([VERSION, b"ASSIGN", b"{}"], schema=WORKER_COMMANDS)
    assert exc.code == "unknown_command"


# Body size and encoding.


def test_oversized_body():
    body = b'{"token":"' + b"x" * 2000 + b'","job":1}'
    exc = _code([VERSION, b"STATUS", body], max_size=1024)
    assert exc.code == "too_large"
    assert exc.message == (
        f"body of {len(body)} bytes exceeds the limit of 1024"
    )


def test_oversized_body_is_refused_before_it_is_decoded():
    exc = _code([VERSION, b"PING", b"\xff" * 2000], max_size=1024)
    assert exc.code == "too_large"


def test_one_byte_over_the_limit():
    body = b'{"token":"t","job":1}'
    exc = _code([VERSION, b"STATUS", body], max_size=len(body) - 1)
    assert exc.code == "too_large"


@pytest.mark.parametrize(
    "body",
    [
        b'{"token":"\xff","job":1}',
        b'{"token":"\xc3","job":1}',
        b"\x80{}",
    ],
    ids=["ff", "truncated", "leading-continuation"],
)
def test_invalid_utf8(body):
    exc = _code([VERSION, b"STATUS", body])
    assert exc.code == "bad_request"
    assert exc.message.startswith("body is not UTF-8 JSON")


def test_encoded_surrogate_is_invalid_utf8():
    # json.loads decodes bytes with "surrogatepass"; the field check catches
    # the lone surrogate that lets through.
    body = b'{"token":"\xed\xa0\x80","job":1}'
    exc = _code([VERSION, b"STATUS", body])
    assert exc.code == "bad_request"
    assert "UTF-8" in exc.message


@pytest.mark.parametrize(
    "body",
    [b"{", b"{'token':'t'}", b"nul", b"{}x", b'{"a":}', b"{,}", b"   "],
)
def test_invalid_json(body):
    exc = _code([VERSION, b"PING", body])
    assert exc.code == "bad_request"
    assert exc.message.startswith("body is not UTF-8 JSON")


def test_integer_with_too_many_digits_is_bad_json():
    body = b'{"token":"t","job":1' + b"0" * 5000 + b"}"
    exc = _code([VERSION, b"STATUS", body])
    assert exc.code == "bad_request"


def test_deeply_nested_json_is_a_protocol_error():
    body = b"[" * 100_000 + b"]" * 100_000
    exc = _code([VERSION, b"PING", body])
    assert exc.code == "bad_request"


@pytest.mark.parametrize(
    "body", [b"[]", b"[1,2]", b"1", b"2.5", b'"text"', b"null", b"true"]
)
def test_json_that_is_not_an_object(body):
    exc = _code([VERSION, b"PING", body])
    assert exc.code == "bad_request"
    assert exc.message == "body must be a JSON object"


# Fields.


def test_unknown_field():
    exc = _code(encode(b"PING", {"extra": 1}))
    assert exc.code == "bad_request"
    assert exc.message == "PING: unknown field 'extra'"


def test_unknown_field_next_to_valid_ones():
    exc = _code(encode(b"STATUS", {"token": "t", "job": 1, "jobs": 2}))
    assert exc.code == "bad_request"
    assert exc.message == "STATUS: unknown field 'jobs'"


def test_long_unknown_field_name_is_truncated():
    exc = _code(encode(b"PING", {"k" * 10_000: 1}))
    assert exc.code == "bad_request"
    assert len(exc.message) < 120


@pytest.mark.parametrize(
    "command, body, missing",
    [
        (b"STATUS", {"token": "t"}, "job"),
        (b"STATUS", {"job": 1}, "token"),
        (b"LOGIN", {"user": "u"}, "password"),
        (
            b"SUBMIT",
            {"token": "t", "request_id": "r", "script": "/s", "data": "/d"},
            "output",
        ),
    ],
)
def test_missing_required_field(command, body, missing):
    exc = _code(encode(command, body))
    assert exc.code == "bad_request"
    assert exc.message == f"{command.decode()}: missing field {missing!r}"


def test_missing_required_field_of_a_worker_message():
    exc = _code(
        encode(b"RESULT", {"job": 1, "token": "t"}), schema=WORKER_COMMANDS
    )
    assert exc.code == "bad_request"
    assert exc.message == "RESULT: missing field 'outcome'"


@pytest.mark.parametrize(
    "command, body, field, expected",
    [
        # int fields
        (b"STATUS", {"token": "t", "job": "1"}, "job", "an integer"),
        (b"STATUS", {"token": "t", "job": 1.0}, "job", "an integer"),
        (b"STATUS", {"token": "t", "job": 1.5}, "job", "an integer"),
        (b"STATUS", {"token": "t", "job": [1]}, "job", "an integer"),
        # a bool is an int in Python but never on the wire
        (b"STATUS", {"token": "t", "job": True}, "job", "an integer"),
        (b"STATUS", {"token": "t", "job": False}, "job", "an integer"),
        (
            b"LIST", {"token": "t", "limit": True}, "limit", "an integer",
        ),
        # number fields refuse bools and strings
        (
            b"WAIT", {"token": "t", "job": 1, "timeout": True}, "timeout",
            "an integer or a number",
        ),
        (
            b"WAIT", {"token": "t", "job": 1, "timeout": "5"}, "timeout",
            "an integer or a number",
        ),
        # string fields
        (b"STATUS", {"token": 5, "job": 1}, "token", "a string"),
        (b"LOGIN", {"user": ["u"], "password": "p"}, "user", "a string"),
        (b"LOGIN", {"user": "u", "password": {}}, "password", "a string"),
        # null where it is not allowed
        (b"STATUS", {"token": None, "job": 1}, "token", "a string"),
        (b"STATUS", {"token": "t", "job": None}, "job", "an integer"),
        (
            b"WAIT", {"token": "t", "job": 1, "timeout": None}, "timeout",
            "an integer or a number",
        ),
        # nullable fields still check the type of a non-null value
        (
            b"PASSWD", {"token": "t", "user": 3, "password": "p"}, "user",
            "a string or null",
        ),
    ],
)
def test_wrong_type_client(command, body, field, expected):
    exc = _code(encode(command, body))
    assert exc.code == "bad_request"
    assert exc.message == (
        f"{command.decode()}: field {field!r} must be {expected}"
    )


SUBMIT = {
    "token": "t", "request_id": "r", "script": "/s.py", "data": "/d",
    "output": "/o",
}


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("args", "a b", "a list"),
        ("args", None, "a list"),
        ("args", {"a": 1}, "a list"),
        ("priority", True, "an integer"),
        ("priority", 1.5, "an integer"),
        ("attempts", "3", "an integer"),
        ("attempts", None, "an integer"),
        ("timeout", False, "an integer or a number or null"),
        ("name", 7, "a string or null"),
        ("script", None, "a string"),
    ],
)
def test_wrong_type_submit(field, value, expected):
    exc = _code(encode(b"SUBMIT", {**SUBMIT, field: value}))
    assert exc.code == "bad_request"
    assert exc.message == f"SUBMIT: field {field!r} must be {expected}"


@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("output", 1, "a boolean"),
        ("output", None, "a boolean"),
        ("usage", [], "an object"),
        ("exit_code", True, "an integer or null"),
        ("exit_code", 1.0, "an integer or null"),
        ("outcome", None, "a string"),
    ],
)
def test_wrong_type_worker(field, value, expected):
    body = {"job": 1, "token": "t", "outcome": "succeeded", field: value}
    exc = _code(encode(b"RESULT", body), schema=WORKER_COMMANDS)
    assert exc.code == "bad_request"
    assert exc.message == f"RESULT: field {field!r} must be {expected}"


def test_bool_field_accepts_bools():
    for value in (True, False):
        body = {"job": 1, "token": "t", "outcome": "failed", "output": value}
        msg = parse(encode(b"RESULT", body), WORKER_COMMANDS, MAX)
        assert msg.body["output"] is value


def test_wrong_type_broker_message():
    body = {
        "job": 1, "token": "t", "attempt": "1", "script": "/s", "args": [],
        "data": "/d", "output": "/o",
    }
    exc = _code(encode(b"ASSIGN", body), schema=BROKER_COMMANDS)
    assert exc.code == "bad_request"
    assert exc.message == "ASSIGN: field 'attempt' must be an integer"


def test_error_body():
    assert protocol.error_body("not_found", "no job 3") == {
        "code": "not_found", "message": "no job 3",
    }


def test_protocol_error_default_code():
    assert ProtocolError("x").code == "bad_request"
    assert ProtocolError("x", "version").code == "version"


@pytest.mark.parametrize("raw", [b"[]", b"1", b'"x"', b"null"])
def test_client_refuses_a_reply_that_is_not_an_object(raw):
    from msp.client import Client

    with pytest.raises(ProtocolError, match="not a JSON object"):
        Client.decode([protocol.VERSION, protocol.OK, raw])
