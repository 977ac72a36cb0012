"""Passwords and session tokens.

Passwords are hashed with argon2 (argon2-cffi). A session token is a random
string handed to the client once; the store keeps only its SHA-256, so a copy
of the database lets nobody log in.
"""

from __future__ import annotations

import hashlib
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

ROLES = ("admin", "user")
MIN_PASSWORD = 8
MAX_PASSWORD = 1024


class Passwords:
    def __init__(self, time_cost: int = 3):
        self._hasher = PasswordHasher(time_cost=time_cost)
        # Verified against when a user does not exist, so that an unknown
        # name costs as much time as a wrong password.
        self._dummy = self._hasher.hash(secrets.token_hex(16))

    def hash(self, password: str) -> str:
        return self._hasher.hash(password)

    def verify(self, password_hash: str | None, password: str) -> bool:
        try:
            ok = self._hasher.verify(password_hash or self._dummy, password)
        except (VerificationError, InvalidHashError, UnicodeEncodeError):
            return False
        return ok and password_hash is not None


def new_token() -> str:
    return secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


def check_password(password: str) -> str | None:
    """Why ``password`` is not acceptable, or None."""
    try:
        password.encode()
    except UnicodeEncodeError:
        return "password must be valid UTF-8"
    if len(password) < MIN_PASSWORD:
        return f"password must have at least {MIN_PASSWORD} characters"
    if len(password) > MAX_PASSWORD:
        return f"password must have at most {MAX_PASSWORD} characters"
    return None
