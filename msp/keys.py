"""CURVE key pairs: making them, reading them, and putting them on sockets.

A key pair is two files, as ZeroMQ's own tools write them: ``NAME.key``
holds the public key, to hand out freely (the broker's to every client and
worker, each client's and worker's to the broker's allowed-keys folder),
and ``NAME.key_secret`` holds both keys and stays private (mode 0600).
"""

from __future__ import annotations

import os
from pathlib import Path

import zmq
import zmq.auth

from .errors import ConfigError


def generate(directory: str | os.PathLike, name: str,
             force: bool = False) -> tuple[Path, Path]:
    """Write NAME.key and NAME.key_secret into ``directory``."""
    if not name or "/" in name or name.startswith("."):
        raise ConfigError(f"key name {name!r}: use a plain file name")
    folder = Path(directory).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    public, secret = folder / f"{name}.key", folder / f"{name}.key_secret"
    existing = [p for p in (public, secret) if p.exists()]
    if existing and not force:
        raise ConfigError(
            f"{existing[0]} exists; pass --force to replace the key pair"
        )
    # Created private from the start: no moment where others may read it.
    old = os.umask(0o077)
    try:
        made_public, made_secret = zmq.auth.create_certificates(folder, name)
    finally:
        os.umask(old)
    os.chmod(made_secret, 0o600)
    os.chmod(made_public, 0o644)
    return Path(made_public), Path(made_secret)


def load_secret(path: str) -> tuple[bytes, bytes]:
    """(public, secret) from a NAME.key_secret file."""
    try:
        public, secret = zmq.auth.load_certificate(Path(path).expanduser())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the CURVE key {path}: {exc}") from None
    if not secret:
        raise ConfigError(
            f"{path} holds no secret key; name the NAME.key_secret file"
        )
    return public, secret


def load_public(path: str) -> bytes:
    try:
        public, _ = zmq.auth.load_certificate(Path(path).expanduser())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the CURVE key {path}: {exc}") from None
    return public


def load_allowed(directory: str) -> set[bytes]:
    """The public keys (z85) of the certificates in ``directory``."""
    folder = Path(directory).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"allowed keys folder {directory} does not exist")
    try:
        return set(zmq.auth.load_certificates(folder))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read the keys in {directory}: {exc}") \
            from None


def client_curve(section) -> dict | None:
    """The CURVE keys of a [client] or [worker] section, or None."""
    if not section.curve_secret_key_file:
        return None
    public, secret = load_secret(section.curve_secret_key_file)
    return {"public": public, "secret": secret,
            "server": load_public(section.curve_server_key_file)}


def apply_client(sock: zmq.Socket, curve: dict | None) -> None:
    """Make ``sock`` (before it connects) a CURVE client, if keys given."""
    if curve:
        sock.curve_secretkey = curve["secret"]
        sock.curve_publickey = curve["public"]
        sock.curve_serverkey = curve["server"]
