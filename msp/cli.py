"""mspctl: run a broker or a worker, and use msp from the shell.

Errors are one red line on stderr. Exit status: 0 success; 1 an error the
broker reported; 2 bad usage or configuration; 3 the broker did not answer;
4 not logged in or not allowed; 5 the job ended failed or cancelled
(``submit --wait``, ``wait``).
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import signal
import sys
import time
import uuid
from datetime import datetime, timedelta
from enum import Enum
from pathlib import Path
from typing import List, Optional

import typer
import zmq
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from . import config as msp_config
from . import keys
from .client import FINAL_STATES, Client
from .errors import (
    AuthError,
    BrokerUnavailable,
    ConfigError,
    ForbiddenError,
    MspError,
)
from .monitor import Feed, Model, screen
from .monitor.model import view_of
from .monitor.view import (
    STATE_STYLES,
    duration,
    job_duration,
    job_label,
    printable,
    progress_bar,
    render,
    state_text,
    workers_table,
)

EXIT_ERROR, EXIT_USAGE, EXIT_UNAVAILABLE, EXIT_AUTH, EXIT_JOB = 1, 2, 3, 4, 5


class JobState(str, Enum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


app = typer.Typer(
    help="msp: run Python script jobs on workers through a ZeroMQ broker.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
user_app = typer.Typer(
    help="Manage users (admins). Example: mspctl user add alice",
    no_args_is_help=True,
)
app.add_typer(user_app, name="user")
keys_app = typer.Typer(help="CURVE key pairs for encrypted, authenticated "
                       "connections.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


class State:
    """What the global options chose, shared by every command."""

    config_path: Optional[str] = None
    broker: Optional[str] = None
    _config: Optional[msp_config.Config] = None

    def config(self, **overrides) -> msp_config.Config:
        if overrides or self._config is None:
            given = {"client": {"broker": self.broker}}
            for section, values in overrides.items():
                given.setdefault(section, {}).update(values)
            self._config = msp_config.load(self.config_path, overrides=given)
        return self._config


state = State()


@app.callback()
def main_options(
    config: Optional[str] = typer.Option(
        None, "--config", "-c", envvar="MSP_CONFIG",
        help="TOML configuration file (see conf/msp.toml).",
    ),
    broker: Optional[str] = typer.Option(
        None, "--broker", "-b", help="Broker client endpoint, e.g. "
        "tcp://127.0.0.1:5555 (default: client.broker in the config).",
    ),
):
    state.config_path = config
    state.broker = broker


def say_error(message: str) -> None:
    """One red line on stderr; the message is text, never markup."""
    err.print(f"[red]error:[/red] {escape(message)}", highlight=False,
              soft_wrap=True)


def fail(message: str, code: int = EXIT_ERROR) -> typer.Exit:
    say_error(message)
    return typer.Exit(code)


def _exit_code(exc: MspError) -> int:
    if isinstance(exc, BrokerUnavailable):
        return EXIT_UNAVAILABLE
    if isinstance(exc, (AuthError, ForbiddenError)):
        return EXIT_AUTH
    if isinstance(exc, ConfigError):
        return EXIT_USAGE
    return EXIT_ERROR


def main() -> None:
    """The console entry point: an error becomes one red line."""
    try:
        # Outside standalone mode click leaves usage errors to us (one
        # line, not a box) and returns a typer.Exit's status.
        status = app(prog_name="mspctl", standalone_mode=False)
        if isinstance(status, int) and status:
            sys.exit(status)
    except MspError as exc:
        say_error(exc.message)
        sys.exit(_exit_code(exc))
    except zmq.ZMQError as exc:
        say_error(f"{exc}; an endpoint looks like tcp://127.0.0.1:5555 or "
                  "ipc:///path/to/socket")
        sys.exit(EXIT_USAGE)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.Abort:
        err.print("[red]aborted[/red]")
        sys.exit(EXIT_ERROR)
    except Exception as exc:
        # Usage errors of click (or of the click typer carries inside).
        if not hasattr(exc, "format_message") or \
                not hasattr(exc, "exit_code"):
            raise
        ctx = getattr(exc, "ctx", None)
        hint = f" (see: {ctx.command_path} --help)" if ctx else ""
        say_error(f"{exc.format_message()}{hint}")
        sys.exit(EXIT_USAGE)


# Client side.

def _token_path(cfg) -> Path:
    return Path(cfg.client.token_file).expanduser()


def client(need_login: bool = True) -> Client:
    cfg = state.config()
    token = None
    path = _token_path(cfg)
    if path.exists():
        token = path.read_text().strip() or None
    if need_login and not token:
        raise AuthError("not logged in; run 'mspctl login' first")
    return Client(cfg.client.broker, token=token, timeout=cfg.client.timeout,
                  retries=cfg.client.retries,
                  curve=keys.client_curve(cfg.client))


def _save_token(cfg, token: str) -> Path:
    path = _token_path(cfg)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
    os.chmod(path, 0o600)
    return path


def _print_json(data) -> None:
    print(json.dumps(data, indent=2, sort_keys=True, default=str))


def when(t: Optional[float]) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(t).strftime("%m-%d %H:%M:%S")


def styled(state_name: str) -> str:
    return f"[{STATE_STYLES.get(state_name, 'white')}]{state_name}[/]"


def plain(text: str, lines: bool = False) -> Text:
    """A user's or a script's text, shown as it is: no markup, no
    terminal control."""
    return Text(printable(text, lines))


@app.command()
def login(
    user: str = typer.Argument(None, help="User name (default: $USER)."),
    password: Optional[str] = typer.Option(
        None, "--password", envvar="MSP_PASSWORD",
        help="Password (default: asked for; or $MSP_PASSWORD).",
    ),
):
    """Log in and keep the session token for later commands.

    Example: mspctl login alice
    """
    user = user or getpass.getuser()
    if password is None:
        password = getpass.getpass(f"password for {user}: ")
    cfg = state.config()
    with client(need_login=False) as c:
        reply = c.login(user, password)
    path = _save_token(cfg, reply["token"])
    out.print(f"logged in as [bold]{reply['user']}[/] ({reply['role']}); "
              f"session until {when(reply['expires'])}, token in {path}")


@app.command()
def logout():
    """End the session and forget its token.

    Example: mspctl logout
    """
    cfg = state.config()
    with client() as c:
        c.logout()
    _token_path(cfg).unlink(missing_ok=True)
    out.print("logged out")


@app.command()
def submit(
    script: Path = typer.Argument(..., help="The Python script to run."),
    args: Optional[List[str]] = typer.Argument(
        None, help="Arguments for the script (after --)."),
    data: Path = typer.Option(..., "--data", "-d",
                              help="Folder the script reads."),
    output: Path = typer.Option(..., "--output", "-o",
                                help="Folder the script writes."),
    priority: int = typer.Option(0, help="Higher runs first."),
    attempts: Optional[int] = typer.Option(
        None, help="Attempts before the job fails (default: broker's)."),
    timeout: Optional[float] = typer.Option(
        None, help="Wall-clock seconds an attempt may run."),
    name: Optional[str] = typer.Option(None, help="A name to show."),
    cpu: Optional[float] = typer.Option(
        None, help="CPU seconds an attempt may use (default: the worker's)."),
    memory: Optional[int] = typer.Option(
        None, help="MiB of memory an attempt may map (default: the "
        "worker's)."),
    wait: bool = typer.Option(False, "--wait", "-w",
                              help="Wait for the job to end."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Submit a job: a script, its data folder and its output folder.

    Example: mspctl submit examples/wordfreq/wordfreq.py -d
    examples/wordfreq/data -o /tmp/out --wait -- --top 20
    """
    with client() as c:
        job = c.submit(str(script), str(data), str(output), args or [],
                       priority=priority, attempts=attempts,
                       timeout=timeout, name=name, cpu=cpu, memory=memory)
        if not wait:
            if as_json:
                _print_json({"job": job})
            else:
                out.print(f"job [bold]{job}[/] queued")
            return
        view = _wait_live(c, job, quiet=as_json)
    _ended(view, as_json)


# The fields a line of submit-many's file may have.
JOB_KEYS = ("script", "data", "output", "args", "priority", "attempts",
            "timeout", "name", "cpu", "memory")
# Jobs per SUBMIT_MANY (the broker's most).
BATCH = 1000


@app.command("submit-many")
def submit_many(
    jobs_file: str = typer.Argument(
        ..., metavar="FILE",
        help="JSON lines, a job each ('-': standard input)."),
    wait: bool = typer.Option(False, "--wait", "-w",
                              help="Wait for every job to end."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Submit many jobs, 1000 per request, each request all or none.

    Each line of FILE is a JSON object with "script", "data", "output"
    and any of "args", "priority", "attempts", "timeout", "name", "cpu",
    "memory" (as submit's options). With --wait, exit 5 unless every job
    succeeded.

    Example: mspctl submit-many jobs.jsonl --wait
    """
    jobs = _read_jobs(jobs_file)
    ids: list[int] = []
    base = uuid.uuid4().hex
    with client() as c:
        for start in range(0, len(jobs), BATCH):
            chunk = jobs[start:start + BATCH]
            try:
                ids += c.submit_many(chunk,
                                     request_id=f"{base}-{start // BATCH}")
            except MspError as exc:
                queued = f"; jobs {ids[0]} to {ids[-1]} (lines 1 to " \
                         f"{start}) were queued" if ids else ""
                say_error(f"lines {start + 1} to {start + len(chunk)}: "
                          f"{_line_of(exc.message, start)}{queued}")
                raise typer.Exit(_exit_code(exc)) from None
        if not wait:
            if as_json:
                _print_json({"jobs": ids})
            else:
                out.print(f"{len(ids)} jobs queued: {_span(ids)}")
            return
        views = []
        for start in range(0, len(ids), BATCH):
            views += c.wait_all(ids[start:start + BATCH])
    if as_json:
        _print_json(views)
    else:
        counts: dict[str, int] = {}
        for view in views:
            counts[view["state"]] = counts.get(view["state"], 0) + 1
        out.print(", ".join(f"{n} {styled(state)}"
                            for state, n in sorted(counts.items())))
        for view in views:
            if view["state"] != "succeeded":
                _print_outcome(view)
    if any(view["state"] != "succeeded" for view in views):
        raise typer.Exit(EXIT_JOB)


def _read_jobs(source: str) -> list[dict]:
    """The jobs of a JSON-lines file; a usage error names the bad line."""
    try:
        if source == "-":
            text = sys.stdin.read()
        else:
            text = Path(source).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise fail(f"cannot read {source}: {exc}", EXIT_USAGE) from None
    jobs = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            job = json.loads(line)
        except ValueError as exc:
            raise fail(f"{source}, line {number}: not JSON: {exc}",
                       EXIT_USAGE) from None
        if not isinstance(job, dict):
            raise fail(f"{source}, line {number}: not a JSON object",
                       EXIT_USAGE)
        unknown = sorted(set(job) - set(JOB_KEYS))
        missing = [k for k in ("script", "data", "output") if k not in job]
        if unknown or missing:
            what = f"unknown {', '.join(unknown)}" if unknown else \
                f"missing {', '.join(missing)}"
            raise fail(f"{source}, line {number}: {what} (a job has "
                       f"{', '.join(JOB_KEYS)})", EXIT_USAGE)
        if not all(isinstance(job[k], str)
                   for k in ("script", "data", "output")):
            raise fail(f"{source}, line {number}: script, data and output "
                       "must be strings", EXIT_USAGE)
        if not isinstance(job.get("args", []), list):
            raise fail(f"{source}, line {number}: args must be a list",
                       EXIT_USAGE)
        jobs.append(job)
    if not jobs:
        raise fail(f"{source}: no jobs in it", EXIT_USAGE)
    return jobs


def _line_of(message: str, start: int) -> str:
    """The broker's "jobs[i]: ..." with the line number instead."""
    if message.startswith("jobs["):
        index, _, rest = message[5:].partition("]: ")
        if index.isdigit():
            return f"line {start + int(index) + 1}: {rest}"
    return message


def _span(ids: list[int]) -> str:
    if ids == list(range(ids[0], ids[0] + len(ids))):
        return f"{ids[0]} to {ids[-1]}" if len(ids) > 1 else str(ids[0])
    return " ".join(map(str, ids))


def _wait_live(c: Client, job: int, quiet: bool = False) -> dict:
    """Wait for the job, showing a status line with elapsed time."""
    start = time.monotonic()
    if quiet or not err.is_terminal:
        return c.wait(job)
    with err.status(f"job {job}: queued") as status:
        while True:
            view = c.wait(job, timeout=1.0)
            if view["state"] in FINAL_STATES:
                return view
            status.update(_wait_line(view, time.monotonic() - start))


def _wait_line(view: dict, elapsed: float) -> Text:
    """``job 7: running (attempt 1 of 3) ━━━━━───── 50% 12.0s``"""
    line = Text(f"job {view['id']}: ")
    line.append(state_text(view["state"]))
    line.append(f" (attempt {view['attempts']} of {view['max_attempts']}) ")
    if view["state"] == "running" and view.get("progress") is not None:
        line.append(progress_bar(view["progress"]))
        line.append(" ")
    line.append(duration(elapsed))
    return line


def _ended(view: dict, as_json: bool) -> None:
    """Say how the job waited for ended; exit 5 unless it succeeded."""
    if as_json:
        _print_json(view)
    else:
        _print_outcome(view)
    if view["state"] != "succeeded":
        raise typer.Exit(EXIT_JOB)


def _print_outcome(view: dict) -> None:
    line = f"job [bold]{view['id']}[/] {styled(view['state'])} after " \
           f"{view['attempts']} attempt(s)"
    out.print(line)
    if view.get("error"):
        out.print(Text("  error: ") + plain(view["error"], lines=True))
    out.print(Text("  output: ") + plain(view["output"]))


@app.command("wait")
def wait_cmd(
    job: int = typer.Argument(..., help="Job id."),
    timeout: Optional[float] = typer.Option(None, help="Give up after."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Wait until a job ends; exit 5 unless it succeeded.

    Example: mspctl wait 42
    """
    with client() as c:
        view = c.wait(job, timeout)
    _ended(view, as_json)


@app.command()
def status(
    job: int = typer.Argument(..., help="Job id."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Show a job and every attempt.

    Example: mspctl status 42
    """
    with client() as c:
        reply = c.status(job)
    if as_json:
        _print_json(reply)
        return
    view = reply["job"]
    table = Table.grid(padding=(0, 2))
    table.add_column(style="bold")
    table.add_column()
    rows = [
        ("job", plain(str(view["id"]) + (f" ({view['name']})"
                                         if view.get("name") else ""))),
        ("state", styled(view["state"])),
        ("script", plain(" ".join([view["script"], *view["args"]]))),
        ("data", plain(view["data"])), ("output", plain(view["output"])),
        ("priority", str(view["priority"])),
        ("attempts", f"{view['attempts']} started, {view['failures']} "
                     f"failed of {view['max_attempts']}, {view['lost']} lost"),
        ("submitted", when(view["submitted_at"])),
        ("finished", when(view["finished_at"])),
    ]
    if view.get("progress") is not None and view["state"] == "running":
        rows.append(("progress", progress_bar(view["progress"], 20)))
    if view.get("error"):
        rows.append(("error", plain(view["error"], lines=True)))
    for key, value in rows:
        table.add_row(key, value)
    out.print(table)
    attempts = Table(title="attempts", title_justify="left")
    for col in ("#", "worker", "started", "took", "outcome", "exit",
                "cpu s", "peak MB"):
        attempts.add_column(col)
    for a in reply["attempts"]:
        cpu = None if a["cpu_user"] is None else a["cpu_user"] + \
            (a["cpu_system"] or 0)
        attempts.add_row(
            str(a["number"]), plain(a["worker"]), when(a["started_at"]),
            duration(None if a["ended_at"] is None
                     else a["ended_at"] - a["started_at"]),
            styled(a["outcome"] or "running"),
            "-" if a["exit_code"] is None else str(a["exit_code"]),
            "-" if cpu is None else f"{cpu:.2f}",
            "-" if a["max_rss_kb"] is None else f"{a['max_rss_kb'] / 1024:.0f}",
        )
    if reply["attempts"]:
        out.print(attempts)


@app.command("list")
def list_cmd(
    state_: Optional[JobState] = typer.Option(
        None, "--state", "-s", help="Only jobs in this state."),
    user: Optional[str] = typer.Option(None, "--user", "-u",
                                       help="Only this user's (admins)."),
    since: Optional[float] = typer.Option(
        None, min=0, help="Only jobs submitted in the last SINCE hours."),
    limit: int = typer.Option(50, "--limit", "-n", help="At most this many."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """List jobs, newest first.

    Example: mspctl list --state failed --since 24
    """
    start = None if since is None else time.time() - since * 3600
    with client() as c:
        jobs = c.jobs(state_ and state_.value, user, start, limit)
    if as_json:
        _print_json(jobs)
        return
    table = Table()
    for col, width in (("job", 3), ("user", 4), ("name / script", 8),
                       ("state", 9), ("tries", 5), ("submitted", 14),
                       ("took", 6)):
        table.add_column(col, overflow="ellipsis", no_wrap=True,
                         min_width=width)
    for j in jobs:
        table.add_row(
            str(j["id"]), plain(j.get("user") or "-"), plain(job_label(j)),
            styled(j["state"]),
            f"{j['attempts']}/{j['max_attempts']}", when(j["submitted_at"]),
            duration(job_duration(j, time.time())),
        )
    out.print(table)


@app.command()
def cancel(job: int = typer.Argument(..., help="Job id.")):
    """Cancel a job: at once if queued, by stopping it if running.

    Example: mspctl cancel 42
    """
    with client() as c:
        reply = c.cancel(job)
    if reply.get("cancel_requested"):
        out.print(f"job {job}: cancel requested; its worker is stopping it")
    else:
        out.print(f"job {job} cancelled")


@app.command()
def logs(
    job: int = typer.Argument(..., help="Job id."),
    stderr: bool = typer.Option(False, "--stderr", "-e",
                                help="Show stderr instead of stdout."),
    follow: bool = typer.Option(False, "--follow", "-f",
                                help="Keep printing while the job runs."),
):
    """Print a job's stdout (or stderr) as the broker sees it.

    Example: mspctl logs 42 --follow
    """
    stream = "stderr" if stderr else "stdout"
    offset = 0
    with client() as c:
        while True:
            chunk = c.logs(job, stream, offset)
            sys.stdout.write(chunk["data"])
            sys.stdout.flush()
            offset = chunk["offset"]
            if chunk["data"]:
                continue
            if not follow or chunk["state"] in FINAL_STATES:
                return
            # XXX: a retry starts a new log; seen queued between the two, it
            # is read from its start, but a retry that starts within one
            # poll is read from the old log's offset and loses its head.
            if chunk["state"] == "queued":
                offset = 0
            time.sleep(0.5)


@app.command()
def workers(as_json: bool = typer.Option(False, "--json",
                                         help="Print JSON.")):
    """List the workers the broker knows, coloured as they lose liveness.

    Example: mspctl workers
    """
    with client() as c:
        rows = c.workers()  # admins only
        if as_json:
            _print_json(rows)
            return
        view = _snapshot_view(c.stats())
    out.print(workers_table(view, out.width))


@app.command()
def stats(as_json: bool = typer.Option(False, "--json", help="Print JSON.")):
    """Print the snapshot the monitor starts from: jobs by state, queue,
    throughput, workers, recent jobs and (admins) usage today.

    Example: mspctl stats --json
    """
    with client() as c:
        snap = c.stats()
    if as_json:
        _print_json(snap)
        return
    out.print(render(_snapshot_view(snap), out.width))


def _snapshot_view(snap: dict) -> dict:
    cfg = state.config()
    return view_of(snap, cfg.client.broker, cfg.client.events)


@app.command()
def monitor(
    once: bool = typer.Option(False, "--once",
                              help="Print one snapshot and exit."),
    as_json: bool = typer.Option(False, "--json",
                                 help="Print one snapshot as JSON and exit."),
    events: Optional[str] = typer.Option(
        None, "--events", "-e", help="The broker's events endpoint "
        "(default: client.events in the config)."),
    refresh: float = typer.Option(
        0.5, help="Seconds between frames (0.05 to 1)."),
):
    """Watch workers, queue, jobs and throughput live; q or Ctrl-C quits.

    Fed by the broker's event stream, with a full snapshot at start and
    whenever events were missed. Without a terminal it prints once.

    Example: mspctl monitor --events tcp://broker.example.org:5557
    """
    cfg = state.config(client={"events": events})
    endpoint = cfg.client.events
    with client() as c:
        if as_json or once or not out.is_terminal:
            view = _snapshot_view(c.stats())
            if as_json:
                _print_json(view)
            else:
                out.print(render(view, out.width))
            return
        model = Model(cfg.client.broker, endpoint)
        # Subscribe first: an event missed between the two then shows as a
        # gap and brings a new snapshot, rather than being lost silently.
        with Feed(c, endpoint, model,
                  timeout=min(cfg.client.timeout, 2.0)) as feed:
            model.load(c.stats(), feed.clock(), feed.wall())
            screen.run(feed, out, refresh)


# Users.

def _new_password(password: Optional[str], prompt: str) -> str:
    if password is not None:
        return password
    first = getpass.getpass(prompt)
    if getpass.getpass("again: ") != first:
        raise fail("the passwords differ", EXIT_USAGE)
    return first


@user_app.command("add")
def user_add(
    name: str = typer.Argument(..., help="The new user's name."),
    role: str = typer.Option("user", help="user or admin."),
    password: Optional[str] = typer.Option(
        None, "--password", envvar="MSP_NEW_PASSWORD",
        help="Password (default: asked for)."),
    credit_limit: Optional[float] = typer.Option(
        None, help="Most the user may be charged in a month; then submits "
        "are refused."),
):
    """Create a user (admins only).

    Example: mspctl user add alice --role user --credit-limit 50
    """
    password = _new_password(password, f"password for {name}: ")
    with client() as c:
        reply = c.user_add(name, password, role, credit_limit)
    out.print(f"user [bold]{reply['user']}[/] added ({reply['role']})")


@user_app.command("limit")
def user_limit(
    name: str = typer.Argument(..., help="The user."),
    amount: Optional[float] = typer.Argument(
        None, help="Monthly credit limit; leave out to remove it."),
):
    """Set or remove a user's monthly credit limit (admins only).

    Example: mspctl user limit alice 100
    """
    with client() as c:
        reply = c.user_set(name, amount)
    limit = reply["credit_limit"]
    out.print(f"user {name}: " + ("no credit limit" if limit is None
                                  else f"credit limit {limit:g} a month"))


@user_app.command("list")
def user_list(as_json: bool = typer.Option(False, "--json")):
    """List users (admins only).

    Example: mspctl user list
    """
    with client() as c:
        users = c.users()
    if as_json:
        _print_json(users)
        return
    table = Table()
    for col in ("user", "role", "disabled", "credit limit", "created"):
        table.add_column(col)
    for u in users:
        limit = u.get("credit_limit")
        table.add_row(u["user"], u["role"], "yes" if u["disabled"] else "",
                      "-" if limit is None else f"{limit:g}",
                      when(u["created_at"]))
    out.print(table)


@user_app.command("disable")
def user_disable(name: str = typer.Argument(..., help="User to disable.")):
    """Disable a user and end their sessions (admins only).

    Example: mspctl user disable mallory
    """
    with client() as c:
        c.user_disable(name)
    out.print(f"user {name} disabled")


@user_app.command("passwd")
def user_passwd(
    name: Optional[str] = typer.Argument(
        None, help="User (default: yourself; others need admin)."),
    password: Optional[str] = typer.Option(
        None, "--password", envvar="MSP_NEW_PASSWORD",
        help="New password (default: asked for)."),
):
    """Change a password.

    Example: mspctl user passwd
    """
    password = _new_password(password, "new password: ")
    with client() as c:
        c.passwd(password, name)
    out.print("password changed")


@app.command()
def audit(
    event: Optional[str] = typer.Option(None, help="Only this event."),
    actor: Optional[str] = typer.Option(None, help="Only by this user."),
    since: Optional[float] = typer.Option(
        None, help="Only the last SINCE hours."),
    limit: int = typer.Option(50, "--limit", "-n", help="At most this many."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
):
    """Show recent security events, newest first (admins only).

    Example: mspctl audit --event login_failed --since 24
    """
    start = None if since is None else time.time() - since * 3600
    with client() as c:
        entries = c.audit(event, actor, start, limit)
    if as_json:
        _print_json(entries)
        return
    table = Table()
    for col in ("when", "event", "by", "detail"):
        table.add_column(col, overflow="fold")
    for e in entries:
        detail = " ".join(f"{k}={v}" for k, v in e["detail"].items()
                          if v not in (None, ""))
        table.add_row(when(e["at"]), e["event"], e["actor"] or "-", detail)
    out.print(table)


def _day(text: str, option: str) -> datetime:
    try:
        return datetime.strptime(text, "%Y-%m-%d")
    except ValueError:
        raise fail(f"{option} {text!r}: expected a date like 2024-05-31",
                   EXIT_USAGE) from None


@app.command("billing")
def billing_cmd(
    user: Optional[str] = typer.Option(
        None, "--user", "-u", help="This user's statement (admins)."),
    all_users: bool = typer.Option(False, "--all",
                                   help="Every user's jobs (admins)."),
    since: Optional[str] = typer.Option(
        None, help="First day, YYYY-MM-DD (default: the 1st of this month)."),
    until: Optional[str] = typer.Option(
        None, help="Last day, YYYY-MM-DD, included (default: now)."),
    fmt: str = typer.Option("table", "--format", "-f",
                            help="table, csv or json."),
):
    """A statement: each job's attempts, usage and cost in a period.

    Example: mspctl billing --since 2024-05-01 --until 2024-05-31 -f csv
    """
    if fmt not in ("table", "csv", "json"):
        raise fail(f"--format {fmt!r}: one of table, csv, json", EXIT_USAGE)
    if user and all_users:
        raise fail("--user and --all exclude each other", EXIT_USAGE)
    start = None if since is None else _day(since, "--since").timestamp()
    end = None
    if until is not None:
        end = (_day(until, "--until") + timedelta(days=1)).timestamp()
    with client() as c:
        bill = c.billing(user, start, end, all_users)
    if fmt == "json":
        _print_json(bill)
    elif fmt == "csv":
        _print_billing_csv(bill)
    else:
        _print_billing_table(bill)


BILL_COLUMNS = ("job", "user", "name", "attempts", "cpu_seconds",
                "wall_seconds", "peak_mb", "cost")


def _print_billing_csv(bill: dict) -> None:
    import csv

    writer = csv.writer(sys.stdout, lineterminator="\n")
    writer.writerow([*BILL_COLUMNS, "currency"])
    for line in bill["jobs"]:
        writer.writerow([
            line["job"], line["user"], line["name"] or
            Path(line["script"]).name, line["attempts"],
            f"{line['cpu_seconds']:.3f}", f"{line['wall_seconds']:.3f}",
            f"{line['peak_mb']:.1f}", f"{line['cost']:.6f}",
            bill["currency"],
        ])
    t = bill["totals"]
    writer.writerow([
        "total", "", "", t["attempts"], f"{t['cpu_seconds']:.3f}",
        f"{t['wall_seconds']:.3f}", f"{t['peak_mb']:.1f}",
        f"{t['cost']:.6f}", bill["currency"],
    ])


def _print_billing_table(bill: dict) -> None:
    who = bill["user"] or "all users"
    out.print(f"statement for [bold]{who}[/], {when(bill['since'])} to "
              f"{when(bill['until'])} ({bill['currency']})", highlight=False)
    table = Table()
    for col in ("job", "user", "name / script", "attempts", "cpu s",
                "wall s", "peak MB", "cost"):
        table.add_column(col, justify="right" if col in (
            "attempts", "cpu s", "wall s", "peak MB", "cost") else "left")
    for line in bill["jobs"]:
        table.add_row(
            str(line["job"]), line["user"],
            line["name"] or Path(line["script"]).name,
            str(line["attempts"]), f"{line['cpu_seconds']:.2f}",
            f"{line['wall_seconds']:.2f}", f"{line['peak_mb']:.0f}",
            f"{line['cost']:.4f}",
        )
    t = bill["totals"]
    table.add_section()
    table.add_row("total", "", f"{t['jobs']} job(s)", str(t["attempts"]),
                  f"{t['cpu_seconds']:.2f}", f"{t['wall_seconds']:.2f}",
                  f"{t['peak_mb']:.0f}", f"{t['cost']:.4f}")
    out.print(table)


@keys_app.command("generate")
def keys_generate(
    name: str = typer.Argument(..., help="Whose keys: broker, a worker, "
                               "a user."),
    directory: Path = typer.Option(..., "--dir", "-d",
                                   help="Folder to write them to."),
    force: bool = typer.Option(False, help="Overwrite existing files."),
):
    """Write a CURVE key pair: NAME.key (public) and NAME.key_secret
    (secret, mode 0600).

    Example: mspctl keys generate worker-1 --dir /etc/msp/keys
    """
    public, secret = keys.generate(directory, name, force=force)
    out.print(f"public key: {public}\nsecret key: {secret} (keep it "
              "private)", highlight=False)


# Servers.

def _setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
    )


@app.command()
def broker(
    client_endpoint: Optional[str] = typer.Option(None, help="Client ROUTER."),
    worker_endpoint: Optional[str] = typer.Option(None, help="Worker ROUTER."),
    events_endpoint: Optional[str] = typer.Option(None, help="Events PUB."),
    data_dir: Optional[str] = typer.Option(None, help="State folder."),
    store: Optional[str] = typer.Option(
        None, help="Database URL: sqlite:///PATH or postgresql://..."),
    allowed_root: Optional[List[str]] = typer.Option(
        None, help="A folder jobs may use (repeat for more)."),
    log_level: str = typer.Option("info", help="debug, info, warning."),
):
    """Run the broker in the foreground until SIGTERM or Ctrl-C.

    Example: mspctl --config conf/msp.toml broker
    """
    from .broker import Broker

    _setup_logging(log_level)
    cfg = state.config(broker={
        "client_endpoint": client_endpoint,
        "worker_endpoint": worker_endpoint,
        "events_endpoint": events_endpoint, "data_dir": data_dir,
        "store": store, "allowed_roots": allowed_root or None,
    })
    server = Broker(cfg.broker, billing=cfg.billing,
                    admin_password=os.environ.get("MSP_ADMIN_PASSWORD"))
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: server.stop())
    server.run()


@app.command()
def worker(
    broker_endpoint: Optional[str] = typer.Option(
        None, "--connect", help="Broker worker endpoint."),
    name: Optional[str] = typer.Option(None, help="Worker name."),
    executor: Optional[str] = typer.Option(
        None, help="subprocess (default), fork or noop."),
    log_level: str = typer.Option("info", help="debug, info, warning."),
):
    """Run a worker in the foreground. SIGTERM drains: the running job
    finishes first; a second signal gives it up.

    Example: mspctl --config conf/msp.toml worker --name gpu-1
    """
    from .worker import Worker

    _setup_logging(log_level)
    cfg = state.config(worker={
        "broker": broker_endpoint, "name": name, "executor": executor,
    })
    w = Worker(cfg.worker)
    signals = []

    def on_signal(*_):
        signals.append(1)
        w.stop(drain=len(signals) == 1)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    w.run()
    if w.refused is not None:
        raise fail(f"the broker refused this worker: {w.refused}", EXIT_AUTH)


if __name__ == "__main__":
    main()
