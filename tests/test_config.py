"""config.load: defaults, the TOML file, the environment and overrides."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest

from msp import config
from msp.config import BrokerConfig, ClientConfig, Config, WorkerConfig
from msp.errors import ConfigError


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "msp.toml"
    path.write_text(text)
    return path


def _error(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        config.load(*args, **kwargs)
    assert info.value.code == "config"
    return info.value.message


# Defaults.


def test_defaults():
    cfg = config.load(env={})
    b = cfg.broker
    assert b.client_endpoint == "tcp://127.0.0.1:5555"
    assert b.worker_endpoint == "tcp://127.0.0.1:5556"
    assert b.events_endpoint == "tcp://127.0.0.1:5557"
    assert b.data_dir == "var/msp"
    assert b.store == ""
    assert b.heartbeat_interval == 1.0
    assert b.liveness == 3
    assert b.max_message_size == 1 << 20
    assert b.allowed_roots == ["."]
    assert b.attempts == 3
    assert b.max_lost == 3
    assert b.retry_backoff == 1.0
    assert b.retry_backoff_factor == 2.0
    assert b.retry_backoff_max == 60.0
    assert b.session_ttl == 86400.0
    assert b.worker_secret == ""
    assert b.sqlite_synchronous == "FULL"
    assert b.hash_time_cost == 3

    w = cfg.worker
    assert w.broker == "tcp://127.0.0.1:5556"
    assert w.python == sys.executable
    assert w.heartbeat_interval == 1.0
    assert w.liveness == 3
    assert w.reconnect_min == 1.0
    assert w.reconnect_max == 32.0
    assert w.kill_grace == 5.0
    assert w.drain_timeout == 60.0
    assert w.secret == ""
    assert w.executor == "subprocess"
    assert w.max_message_size == 1 << 20

    c = cfg.client
    assert c == ClientConfig(
        broker="tcp://127.0.0.1:5555", events="tcp://127.0.0.1:5557",
        timeout=5.0, retries=3, token_file="~/.config/msp/token",
    )


def test_default_worker_name_is_host_and_pid():
    cfg = config.load(env={})
    assert cfg.worker.name == f"{socket.gethostname()}-{os.getpid()}"


def test_defaults_equal_the_dataclass_defaults():
    cfg = config.load(env={})
    assert cfg.broker == BrokerConfig()
    assert cfg.client == ClientConfig()
    assert cfg.worker == WorkerConfig(name=cfg.worker.name)


def test_default_lists_are_not_shared():
    a, b = BrokerConfig(), BrokerConfig()
    a.allowed_roots.append("/x")
    assert b.allowed_roots == ["."]


def test_real_environment_is_read_when_env_is_not_given(monkeypatch):
    monkeypatch.delenv("MSP_CONFIG", raising=False)
    monkeypatch.setenv("MSP_BROKER_LIVENESS", "9")
    assert config.load().broker.liveness == 9


# The file.


def test_file_values(tmp_path):
    path = _write(tmp_path, """
[broker]
client_endpoint = "tcp://0.0.0.0:6000"
liveness = 5
heartbeat_interval = 0.25
allowed_roots = ["/srv/jobs", "/data/ñ"]
store = "postgresql://msp@db:5432/msp"

[worker]
name = "w1"
executor = "fork"
kill_grace = 2

[client]
timeout = 1.5
retries = 7
""")
    cfg = config.load(path, env={})
    assert cfg.broker.client_endpoint == "tcp://0.0.0.0:6000"
    assert cfg.broker.liveness == 5
    assert cfg.broker.heartbeat_interval == 0.25
    assert cfg.broker.allowed_roots == ["/srv/jobs", "/data/ñ"]
    assert cfg.broker.store == "postgresql://msp@db:5432/msp"
    assert cfg.worker.name == "w1"
    assert cfg.worker.executor == "fork"
    assert cfg.client.timeout == 1.5
    assert cfg.client.retries == 7
    # Keys the file leaves out keep their defaults.
    assert cfg.broker.worker_endpoint == "tcp://127.0.0.1:5556"
    assert cfg.worker.reconnect_max == 32.0


def test_integer_for_a_float_setting_becomes_a_float(tmp_path):
    path = _write(tmp_path, "[worker]\nkill_grace = 2\n")
    value = config.load(path, env={}).worker.kill_grace
    assert value == 2.0 and type(value) is float


def test_file_given_as_str_or_path(tmp_path):
    path = _write(tmp_path, "[client]\nretries = 4\n")
    assert config.load(str(path), env={}).client.retries == 4
    assert config.load(path, env={}).client.retries == 4


def test_msp_config_env_names_the_file(tmp_path):
    path = _write(tmp_path, "[client]\nretries = 11\n")
    cfg = config.load(env={"MSP_CONFIG": str(path)})
    assert cfg.client.retries == 11


def test_explicit_path_wins_over_msp_config(tmp_path):
    first = _write(tmp_path, "[client]\nretries = 1\n")
    other = tmp_path / "other.toml"
    other.write_text("[client]\nretries = 2\n")
    cfg = config.load(first, env={"MSP_CONFIG": str(other)})
    assert cfg.client.retries == 1


def test_empty_file(tmp_path):
    path = _write(tmp_path, "")
    assert config.load(path, env={}).broker == BrokerConfig()


def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    assert _error(path, env={}) == f"config file {path} does not exist"


def test_invalid_toml(tmp_path):
    path = _write(tmp_path, "[broker\nliveness = 3\n")
    message = _error(path, env={})
    assert message.startswith(f"config file {path}: ")


def test_config_path_that_is_a_folder(tmp_path):
    message = _error(tmp_path, env={})
    assert str(tmp_path) in message


# The environment.


def test_env_overrides_the_file(tmp_path):
    path = _write(tmp_path, """
[broker]
liveness = 5
data_dir = "/from/file"
heartbeat_interval = 2.0
[worker]
name = "file-name"
""")
    env = {
        "MSP_BROKER_LIVENESS": "8",
        "MSP_BROKER_HEARTBEAT_INTERVAL": "0.5",
        "MSP_WORKER_NAME": "env-name",
        "MSP_WORKER_KILL_GRACE": "7",
    }
    cfg = config.load(path, env=env)
    assert cfg.broker.liveness == 8
    assert cfg.broker.heartbeat_interval == 0.5
    assert cfg.worker.name == "env-name"
    assert cfg.worker.kill_grace == 7.0
    assert type(cfg.worker.kill_grace) is float
    # Not in the environment: the file's value stays.
    assert cfg.broker.data_dir == "/from/file"


def test_env_list_is_split_on_pathsep():
    env = {"MSP_BROKER_ALLOWED_ROOTS": os.pathsep.join(["/a", "", "/b c"])}
    assert config.load(env=env).broker.allowed_roots == ["/a", "/b c"]


def test_env_of_another_section_does_not_leak():
    cfg = config.load(env={"MSP_WORKER_LIVENESS": "9"})
    assert cfg.worker.liveness == 9
    assert cfg.broker.liveness == 3


def test_env_client_section():
    cfg = config.load(env={"MSP_CLIENT_RETRIES": "0", "MSP_CLIENT_TIMEOUT": "9"})
    assert cfg.client.retries == 0
    assert cfg.client.timeout == 9.0


def test_unrelated_env_vars_are_ignored():
    cfg = config.load(env={"MSP_BROKER_NO_SUCH": "1", "MSP_OTHER_X": "y"})
    assert cfg.broker == BrokerConfig()


@pytest.mark.parametrize(
    "name, text, kind",
    [
        ("MSP_BROKER_LIVENESS", "three", "int"),
        ("MSP_BROKER_LIVENESS", "2.5", "int"),
        ("MSP_BROKER_HEARTBEAT_INTERVAL", "fast", "float"),
        ("MSP_WORKER_MAX_MESSAGE_SIZE", "", "int"),
    ],
)
def test_env_value_of_the_wrong_type(name, text, kind):
    message = _error(env={name: text})
    assert message.startswith(f"{name}={text!r} is not a valid")
    assert kind in message


# Overrides (command-line flags).


def test_overrides_override_env_and_file(tmp_path):
    path = _write(tmp_path, "[broker]\nliveness = 5\nattempts = 4\n")
    env = {"MSP_BROKER_LIVENESS": "8", "MSP_BROKER_ATTEMPTS": "6"}
    cfg = config.load(path, env=env, overrides={"broker": {"liveness": 12}})
    assert cfg.broker.liveness == 12
    assert cfg.broker.attempts == 6


def test_none_overrides_mean_not_given(tmp_path):
    path = _write(tmp_path, "[worker]\nname = \"file\"\n")
    cfg = config.load(
        path,
        env={"MSP_WORKER_SECRET": "s3"},
        overrides={"worker": {"name": None, "secret": None, "liveness": None}},
    )
    assert cfg.worker.name == "file"
    assert cfg.worker.secret == "s3"
    assert cfg.worker.liveness == 3


def test_overrides_of_several_sections():
    cfg = config.load(env={}, overrides={
        "broker": {"data_dir": "/tmp/x"},
        "client": {"broker": "tcp://h:1"},
    })
    assert cfg.broker.data_dir == "/tmp/x"
    assert cfg.client.broker == "tcp://h:1"


# Errors.


def test_unknown_section(tmp_path):
    path = _write(tmp_path, "[brokr]\nliveness = 3\n")
    message = _error(path, env={})
    assert message == (
        f"config file {path}: unknown section(s) ['brokr']; "
        "expected ['broker', 'worker', 'client', 'billing']"
    )


def test_unknown_key(tmp_path):
    path = _write(tmp_path, "[broker]\nlivenes = 3\n")
    message = _error(path, env={})
    assert message.startswith("[broker] unknown setting 'livenes'; known: [")
    assert "'liveness'" in message


def test_unknown_key_in_overrides():
    message = _error(env={}, overrides={"client": {"colour": "red"}})
    assert message.startswith("[client] unknown setting 'colour'")
    assert "'token_file'" in message


def test_nested_table_is_an_unknown_key(tmp_path):
    path = _write(tmp_path, "[broker.extra]\nx = 1\n")
    message = _error(path, env={})
    assert message.startswith("[broker] unknown setting 'extra'")


@pytest.mark.parametrize(
    "section, line, message",
    [
        ("broker", 'liveness = "3"', "[broker] liveness must be int, got str"),
        ("broker", "liveness = 3.0", "[broker] liveness must be int, got float"),
        ("broker", "liveness = true", "[broker] liveness must be int, got bool"),
        (
            "broker", "heartbeat_interval = true",
            "[broker] heartbeat_interval must be float, got bool",
        ),
        (
            "broker", 'heartbeat_interval = "1"',
            "[broker] heartbeat_interval must be float, got str",
        ),
        ("broker", "data_dir = 5", "[broker] data_dir must be str, got int"),
        ("worker", "name = []", "[worker] name must be str, got list"),
        (
            "broker", 'allowed_roots = "/srv"',
            "[broker] allowed_roots must be a list of strings",
        ),
        (
            "broker", 'allowed_roots = ["/srv", 1]',
            "[broker] allowed_roots must be a list of strings",
        ),
        ("client", "retries = 1.5", "[client] retries must be int, got float"),
    ],
)
def test_wrong_type_in_file(tmp_path, section, line, message):
    path = _write(tmp_path, f"[{section}]\n{line}\n")
    assert _error(path, env={}) == message


def test_wrong_type_in_overrides():
    message = _error(env={}, overrides={"broker": {"liveness": "many"}})
    assert message == "[broker] liveness must be int, got str"


@pytest.mark.parametrize("value", ["1", '"x"', "[1, 2]"])
def test_section_that_is_not_a_table(tmp_path, value):
    path = _write(tmp_path, f"broker = {value}\n")
    message = _error(path, env={})
    assert "broker" in message


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"broker": {"liveness": 0}}, "[broker] liveness must be at least 1"),
        (
            {"worker": {"heartbeat_interval": 0}},
            "[worker] heartbeat_interval must be > 0",
        ),
        (
            {"broker": {"heartbeat_interval": -1.0}},
            "[broker] heartbeat_interval must be > 0",
        ),
        ({"broker": {"attempts": 0}}, "[broker] attempts must be at least 1"),
        (
            {"broker": {"max_message_size": 1023}},
            "[broker] max_message_size must be at least 1024",
        ),
        (
            {"worker": {"executor": "thread"}},
            "[worker] executor 'thread' is not one of subprocess, fork, noop",
        ),
    ],
)
def test_invalid_values(overrides, message):
    assert _error(env={}, overrides=overrides) == message


def test_sqlite_synchronous_is_checked():
    message = _error(env={}, overrides={"broker": {"sqlite_synchronous": "x"}})
    assert "sqlite_synchronous" in message
    cfg = config.load(env={}, overrides={"broker": {"sqlite_synchronous": "normal"}})
    assert cfg.broker.sqlite_synchronous == "normal"


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)


# store_url.


def test_store_url_default_points_into_data_dir(tmp_path):
    broker = BrokerConfig(data_dir=str(tmp_path / "var"))
    url = config.store_url(broker)
    assert url == f"sqlite:///{(tmp_path / 'var').resolve()}/msp.db"
    assert url.startswith("sqlite:////")


def test_store_url_with_a_relative_data_dir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    url = config.store_url(BrokerConfig())
    assert url == f"sqlite:///{tmp_path.resolve()}/var/msp/msp.db"


def test_store_url_expands_the_home_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    url = config.store_url(BrokerConfig(data_dir="~/msp"))
    assert url == f"sqlite:///{tmp_path.resolve()}/msp/msp.db"


def test_store_url_from_loaded_config(tmp_path):
    cfg = config.load(env={"MSP_BROKER_DATA_DIR": str(tmp_path)})
    assert config.store_url(cfg.broker) == (
        f"sqlite:///{tmp_path.resolve()}/msp.db"
    )


def test_explicit_store_url_is_used_as_is():
    url = "postgresql://msp@db:5432/msp?schema=x"
    assert config.store_url(BrokerConfig(store=url)) == url


def test_config_holds_the_three_sections():
    cfg = config.load(env={})
    assert isinstance(cfg, Config)
    assert isinstance(cfg.broker, BrokerConfig)
    assert isinstance(cfg.worker, WorkerConfig)
    assert isinstance(cfg.client, ClientConfig)


def test_shipped_config_file_holds_the_defaults():
    path = Path(__file__).resolve().parents[1] / "conf" / "msp.toml"
    cfg = config.load(path, env={})
    assert cfg.broker == BrokerConfig()
    assert cfg.client == ClientConfig()
    assert cfg.worker == WorkerConfig(name=cfg.worker.name)
