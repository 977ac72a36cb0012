"""Settings for the broker, the worker and the client.

Read once, at the edge of the program, into one typed :class:`Config`. Each
setting comes from, highest precedence first: a command-line flag, an
``MSP_<SECTION>_<KEY>`` environment variable, the TOML file (``--config`` or
``MSP_CONFIG``), the default below. ``conf/msp.toml`` documents every key.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, get_type_hints

from .errors import ConfigError

# The environment variables a script may see unless [worker] env_allow says.
ENV_ALLOW = (
    "PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TZ", "TMPDIR", "USER",
    "LOGNAME",
)


@dataclass
class BrokerConfig:
    client_endpoint: str = "tcp://127.0.0.1:5555"
    worker_endpoint: str = "tcp://127.0.0.1:5556"
    # Where job and worker events are published; empty turns them off.
    events_endpoint: str = "tcp://127.0.0.1:5557"
    data_dir: str = "var/msp"
    # A database URL; empty means SQLite in data_dir.
    store: str = ""
    heartbeat_interval: float = 1.0
    liveness: int = 3
    max_message_size: int = 1 << 20
    allowed_roots: list[str] = field(default_factory=lambda: ["."])
    attempts: int = 3
    max_lost: int = 3
    retry_backoff: float = 1.0
    retry_backoff_factor: float = 2.0
    retry_backoff_max: float = 60.0
    session_ttl: float = 86400.0
    # Workers must present this secret in READY; empty accepts any worker.
    worker_secret: str = ""
    # FULL makes each commit durable against power loss, not only crashes.
    sqlite_synchronous: str = "FULL"
    # Cost of the password hash (argon2 time_cost); tests lower it.
    hash_time_cost: int = 3
    # Failed logins: after `login_throttle_after` failures of one user
    # name (or `login_throttle_peer_after` from one address) within
    # `login_throttle_window` seconds, logins are refused for a delay that
    # starts at `login_throttle_delay` and doubles up to the max.
    login_throttle_after: int = 5
    login_throttle_peer_after: int = 20
    login_throttle_window: float = 900.0
    login_throttle_delay: float = 1.0
    login_throttle_max: float = 300.0
    # The most CPU seconds and memory (MiB) a job may ask for; 0: no cap.
    max_job_cpu: float = 0.0
    max_job_memory_mb: int = 0
    # ZeroMQ CURVE: the broker's secret certificate turns it on for the
    # tcp endpoints; clients and workers must then hold a key whose public
    # certificate is in curve_allowed_keys_dir (or, for the worker endpoint,
    # in curve_worker_keys_dir when that is set).
    curve_secret_key_file: str = ""
    curve_allowed_keys_dir: str = ""
    curve_worker_keys_dir: str = ""
    # Leave tcp endpoints on loopback addresses plain when CURVE is on.
    curve_plain_loopback: bool = False


@dataclass
class WorkerConfig:
    broker: str = "tcp://127.0.0.1:5556"
    name: str = ""
    python: str = sys.executable
    heartbeat_interval: float = 1.0
    liveness: int = 3
    reconnect_min: float = 1.0
    reconnect_max: float = 32.0
    kill_grace: float = 5.0
    drain_timeout: float = 60.0
    secret: str = ""
    executor: str = "subprocess"
    max_message_size: int = 1 << 20
    # Variables of the worker's environment a script may see.
    env_allow: list[str] = field(default_factory=lambda: list(ENV_ALLOW))
    # When the worker runs as root: the user ("name" or "name:group")
    # scripts run as. Empty: the worker's own user.
    run_as: str = ""
    # Limits of each script: CPU seconds and memory (MiB, address space)
    # when the job asks for none; open files; bytes of any file it writes,
    # its logs included (MiB). 0: no limit.
    cpu_limit: float = 0.0
    memory_limit_mb: int = 0
    files_limit: int = 1024
    output_limit_mb: int = 0
    # CURVE: this worker's secret certificate and the broker's public one.
    curve_secret_key_file: str = ""
    curve_server_key_file: str = ""

    def __post_init__(self):
        if not self.name:
            self.name = f"{socket.gethostname()}-{os.getpid()}"


@dataclass
class ClientConfig:
    broker: str = "tcp://127.0.0.1:5555"
    events: str = "tcp://127.0.0.1:5557"
    timeout: float = 5.0
    retries: int = 3
    token_file: str = "~/.config/msp/token"
    # CURVE: this client's secret certificate and the broker's public one.
    curve_secret_key_file: str = ""
    curve_server_key_file: str = ""


@dataclass
class BillingConfig:
    """The price plan: what an attempt's usage costs."""

    currency: str = "EUR"
    per_cpu_second: float = 0.0
    per_wall_second: float = 0.0
    # Charged once per job, with the attempt that ends it.
    per_job: float = 0.0
    # Per GiB of peak memory held for an hour of wall time.
    per_gb_hour: float = 0.0
    # Whether failed (and timed-out) attempts are charged; lost ones never.
    charge_failed: bool = True


@dataclass
class Config:
    broker: BrokerConfig = field(default_factory=BrokerConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    billing: BillingConfig = field(default_factory=BillingConfig)


SECTIONS = ("broker", "worker", "client", "billing")


def load(
    path: str | os.PathLike | None = None,
    env: Mapping[str, str] | None = None,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Config:
    """Build the configuration from file, environment and overrides.

    ``overrides`` maps a section to the settings given as flags; ``None``
    values there mean "not given" and are skipped.
    """
    env = os.environ if env is None else env
    path = path or env.get("MSP_CONFIG") or None
    raw: dict[str, Any] = {}
    if path:
        try:
            raw = tomllib.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path}: cannot read: {exc}") \
                from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
    for name, section in raw.items():
        if name in SECTIONS and not isinstance(section, dict):
            raise ConfigError(
                f"config file {path}: [{name}] must be a table of settings"
            )
    unknown = set(raw) - set(SECTIONS)
    if unknown:
        raise ConfigError(
            f"config file {path}: unknown section(s) {sorted(unknown)}; "
            f"expected {list(SECTIONS)}"
        )
    sections = {}
    for name in SECTIONS:
        cls = {
            "broker": BrokerConfig,
            "worker": WorkerConfig,
            "client": ClientConfig,
            "billing": BillingConfig,
        }[name]
        values = dict(raw.get(name, {}))
        values.update(_from_env(name, cls, env))
        given = (overrides or {}).get(name, {})
        values.update({k: v for k, v in given.items() if v is not None})
        sections[name] = _build(name, cls, values)
    config = Config(**sections)
    _validate(config)
    return config


def _from_env(section: str, cls: type, env: Mapping[str, str]) -> dict:
    prefix = f"MSP_{section.upper()}_"
    hints = get_type_hints(cls)
    values = {}
    for f in dataclasses.fields(cls):
        text = env.get(prefix + f.name.upper())
        if text is not None:
            values[f.name] = _coerce(prefix + f.name.upper(), hints[f.name], text)
    return values


def _coerce(name: str, kind: Any, text: str) -> Any:
    try:
        if kind is bool:
            return text.strip().lower() in ("1", "true", "yes", "on")
        if kind is int:
            return int(text)
        if kind is float:
            return float(text)
        if kind == list[str]:
            return [p for p in text.split(os.pathsep) if p]
    except ValueError:
        raise ConfigError(f"{name}={text!r} is not a valid {kind}") from None
    return text


def _build(section: str, cls: type, values: dict) -> Any:
    hints = get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for key, value in values.items():
        if key not in names:
            raise ConfigError(
                f"[{section}] unknown setting {key!r}; known: {sorted(names)}"
            )
        kind = hints[key]
        if kind is float and isinstance(value, int) and not isinstance(
            value, bool
        ):
            values[key] = float(value)
        elif kind == list[str]:
            if not (isinstance(value, list) and all(
                isinstance(v, str) for v in value
            )):
                raise ConfigError(f"[{section}] {key} must be a list of strings")
        elif not isinstance(value, kind) or (
            isinstance(value, bool) and kind is not bool
        ):
            raise ConfigError(
                f"[{section}] {key} must be {kind.__name__}, "
                f"got {type(value).__name__}"
            )
    return cls(**values)


def _validate(config: Config) -> None:
    b, w = config.broker, config.worker
    for where, interval, liveness in (
        ("broker", b.heartbeat_interval, b.liveness),
        ("worker", w.heartbeat_interval, w.liveness),
    ):
        if interval <= 0:
            raise ConfigError(f"[{where}] heartbeat_interval must be > 0")
        if liveness < 1:
            raise ConfigError(f"[{where}] liveness must be at least 1")
    if b.attempts < 1:
        raise ConfigError("[broker] attempts must be at least 1")
    if b.max_message_size < 1024:
        raise ConfigError("[broker] max_message_size must be at least 1024")
    if w.executor not in ("subprocess", "fork", "noop"):
        raise ConfigError(
            f"[worker] executor {w.executor!r} is not one of "
            "subprocess, fork, noop"
        )
    if b.sqlite_synchronous.upper() not in ("OFF", "NORMAL", "FULL", "EXTRA"):
        raise ConfigError(
            "[broker] sqlite_synchronous must be OFF, NORMAL, FULL or EXTRA"
        )
    if b.login_throttle_after < 1 or b.login_throttle_peer_after < 1:
        raise ConfigError("[broker] login_throttle_after and "
                          "login_throttle_peer_after must be at least 1")
    if b.login_throttle_delay <= 0 or \
            b.login_throttle_max < b.login_throttle_delay:
        raise ConfigError("[broker] login_throttle_delay must be > 0 and "
                          "at most login_throttle_max")
    for where, values in (
        ("broker", {"max_job_cpu": b.max_job_cpu,
                    "max_job_memory_mb": b.max_job_memory_mb}),
        ("worker", {"cpu_limit": w.cpu_limit,
                    "memory_limit_mb": w.memory_limit_mb,
                    "files_limit": w.files_limit,
                    "output_limit_mb": w.output_limit_mb}),
    ):
        for key, value in values.items():
            if value < 0:
                raise ConfigError(f"[{where}] {key} must be >= 0 (0: none)")
    for key, value in dataclasses.asdict(config.billing).items():
        if isinstance(value, float) and value < 0:
            raise ConfigError(f"[billing] {key} must be >= 0")
    if bool(b.curve_allowed_keys_dir or b.curve_worker_keys_dir) and \
            not b.curve_secret_key_file:
        raise ConfigError("[broker] curve_allowed_keys_dir needs "
                          "curve_secret_key_file")
    for where, section in (("worker", w), ("client", config.client)):
        if bool(section.curve_secret_key_file) != bool(
            section.curve_server_key_file
        ):
            raise ConfigError(
                f"[{where}] curve_secret_key_file and curve_server_key_file "
                "go together"
            )


def store_url(broker: BrokerConfig) -> str:
    """The database URL the broker uses."""
    if broker.store:
        return broker.store
    path = Path(broker.data_dir).expanduser().resolve() / "msp.db"
    return f"sqlite:///{path}"
