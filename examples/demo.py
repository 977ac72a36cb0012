"""Run the example job end to end: the first command of the README.

Starts a broker (SQLite in var/demo) and two workers on loopback ports,
creates a demo user, submits examples/wordfreq with mspctl, waits for it,
prints its final state and where its output is, then stops what it started.
"""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VAR = ROOT / "var" / "demo"
EXAMPLE = ROOT / "examples" / "wordfreq"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    shutil.rmtree(VAR, ignore_errors=True)
    VAR.mkdir(parents=True)
    ports = [free_port() for _ in range(3)]
    admin_password = secrets.token_urlsafe(12)
    env = dict(
        os.environ,
        MSP_BROKER_CLIENT_ENDPOINT=f"tcp://127.0.0.1:{ports[0]}",
        MSP_BROKER_WORKER_ENDPOINT=f"tcp://127.0.0.1:{ports[1]}",
        MSP_BROKER_EVENTS_ENDPOINT=f"tcp://127.0.0.1:{ports[2]}",
        MSP_BROKER_DATA_DIR=str(VAR / "broker"),
        MSP_BROKER_ALLOWED_ROOTS=str(ROOT),
        MSP_WORKER_BROKER=f"tcp://127.0.0.1:{ports[1]}",
        MSP_CLIENT_BROKER=f"tcp://127.0.0.1:{ports[0]}",
        MSP_CLIENT_EVENTS=f"tcp://127.0.0.1:{ports[2]}",
        MSP_CLIENT_TOKEN_FILE=str(VAR / "token"),
        MSP_ADMIN_PASSWORD=admin_password,
    )
    env.pop("MSP_CONFIG", None)
    python = [sys.executable, "-m", "msp"]
    logs = open(VAR / "servers.log", "w")
    procs = []

    def start(*args):
        procs.append(subprocess.Popen(
            [*python, *args], env=env, cwd=ROOT, stdout=logs, stderr=logs,
        ))

    def ctl(*args, check=True):
        return subprocess.run([*python, *args], env=env, cwd=ROOT,
                              check=check)

    try:
        print(f"broker on 127.0.0.1 ports {ports[0]} (clients), {ports[1]} "
              f"(workers), {ports[2]} (events); 2 workers; their log: "
              f"{VAR / 'servers.log'}")
        start("broker")
        start("worker", "--name", "demo-worker-1")
        start("worker", "--name", "demo-worker-2")

        # The broker is up once it answers a login.
        deadline = time.monotonic() + 30
        while subprocess.run(
            [*python, "login", "admin", "--password", admin_password],
            env=env, cwd=ROOT, capture_output=True,
        ).returncode != 0:
            if time.monotonic() > deadline or procs[0].poll() is not None:
                print("the broker did not start; see the log above",
                      file=sys.stderr)
                return 1
            time.sleep(0.2)

        ctl("user", "add", "demo", "--password", "demo-password")
        ctl("login", "demo", "--password", "demo-password")
        output = VAR / "out" / "wordfreq"
        done = ctl(
            "submit", str(EXAMPLE / "wordfreq.py"),
            "--data", str(EXAMPLE / "data"), "--output", str(output),
            "--name", "wordfreq", "--wait", check=False,
        )
        if done.returncode == 0:
            files = sorted(p.name for p in output.iterdir()
                           if not p.name.startswith("."))
            print(f"\nthe job wrote {', '.join(files)}\nin {output}")
        return done.returncode
    finally:
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        logs.close()


if __name__ == "__main__":
    sys.exit(main())
