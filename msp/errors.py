"""The msp exception tree.

Every error msp raises on purpose is an :class:`MspError`. Errors that cross
the wire carry a stable ``code`` (see ``docs/protocol.md``) so that a peer in
any language can act on them without parsing the message.
"""


class MspError(Exception):
    """Root of every error msp raises on purpose."""

    code = "error"

    def __init__(self, message: str, code: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return self.args[0]


class ConfigError(MspError, ValueError):
    code = "config"


class ProtocolError(MspError):
    """A message that does not follow the protocol."""

    code = "bad_request"


class AuthError(MspError):
    code = "unauthenticated"


class ForbiddenError(MspError):
    code = "forbidden"


class NotFoundError(MspError, LookupError):
    code = "not_found"


class PathError(MspError):
    """A job path that is missing, of the wrong kind, or outside the roots."""

    code = "invalid_path"


class ConflictError(MspError):
    """The request does not fit the current state (cancel an ended job...)."""

    code = "conflict"


class LimitError(MspError):
    code = "limit"


class ThrottledError(AuthError):
    """Too many failed logins: the broker refuses more for a while."""

    code = "throttled"


class BrokerUnavailable(MspError, ConnectionError):
    """The broker did not answer within the client's retries."""

    code = "unavailable"


# Codes a broker may send, mapped back to exception classes by the client.
BY_CODE = {
    cls.code: cls
    for cls in (
        ProtocolError,
        AuthError,
        ForbiddenError,
        NotFoundError,
        PathError,
        ConflictError,
        LimitError,
        ThrottledError,
    )
}


def from_wire(code: str, message: str) -> MspError:
    cls = BY_CODE.get(code, MspError)
    return cls(message, code)
