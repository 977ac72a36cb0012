"""Draw docs/monitor.svg: the monitor's screen over a real broker.

Starts a broker and two workers in this process (in a temporary folder, on
loopback), runs jobs into several states, follows them with the monitor's
own model and feed for a moment, and saves one frame as SVG. Run it from
the repository's root:

    python docs/make_monitor_svg.py [OUTPUT.svg]
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

from rich.console import Console

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from msp.broker import Broker  # noqa: E402
from msp.client import Client  # noqa: E402
from msp.config import BrokerConfig, WorkerConfig  # noqa: E402
from msp.monitor import Feed, Model, render  # noqa: E402
from msp.worker import Worker  # noqa: E402

WIDTH, HEIGHT = 110, 30
PASSWORD = "monitor-picture"
QUICK = "import time\ntime.sleep(0.3)\nprint('done')\n"
BROKEN = "import sys\nprint('no input file', file=sys.stderr)\nsys.exit(2)\n"
# Steps through its work (its last argument: how many steps) until a file
# appears beside its data.
TRAIN = f"""\
import os, sys, time
sys.path.insert(0, {str(ROOT)!r})
import msp
steps = int(sys.argv[-1])
stop = os.path.join(os.environ["MSP_DATA_DIR"], "stop")
for step in range(1, 10 * steps):
    if os.path.exists(stop):
        break
    msp.progress(min(step / steps, 0.99), f"step {{step}} of {{steps}}")
    time.sleep(0.1)
"""


def wait(predicate, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit("the picture's jobs took too long")
        time.sleep(0.05)


def main(output: Path) -> None:
    # The broker's warnings (a retry, jobs given up at the end) are
    # expected here.
    logging.basicConfig(level=logging.ERROR)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = root / "data"
        data.mkdir()
        scripts = {}
        for name, body in (("report.py", QUICK), ("convert.py", BROKEN),
                           ("train.py", TRAIN)):
            scripts[name] = root / name
            scripts[name].write_text(body)
        cfg = BrokerConfig(
            client_endpoint="tcp://127.0.0.1:*",
            worker_endpoint="tcp://127.0.0.1:*",
            events_endpoint="tcp://127.0.0.1:*", data_dir=str(root / "var"),
            allowed_roots=[str(root)], hash_time_cost=1, retry_backoff=0.0,
            heartbeat_interval=0.5,
        )
        broker = Broker(cfg, admin_password=PASSWORD).start()
        workers = [
            Worker(WorkerConfig(broker=broker.endpoints["worker"], name=name,
                                heartbeat_interval=0.5)).start()
            for name in ("node1-gpu", "node2-cpu")
        ]
        admin = Client(broker.endpoints["client"])
        admin.login("admin", PASSWORD)
        admin.user_add("alice", "alice-password")
        alice = Client(broker.endpoints["client"])
        alice.login("alice", "alice-password")
        try:
            _run_jobs(admin, alice, scripts, data, root)
            model = Model(broker.endpoints["client"],
                          broker.endpoints["events"])
            with Feed(admin, broker.endpoints["events"], model) as feed:
                model.load(admin.stats(), feed.clock(), feed.wall())
                end = time.monotonic() + 2.0
                while time.monotonic() < end:
                    feed.step(0.1)
                view = model.view(feed.clock(), feed.wall())
            console = Console(width=WIDTH, height=HEIGHT, record=True,
                              force_terminal=True, color_system="truecolor",
                              file=open("/dev/null", "w"))
            console.print(render(view, WIDTH, HEIGHT))
            output.write_text(console.export_svg(title="mspctl monitor"))
            (data / "stop").write_text("")
        finally:
            for c in (admin, alice):
                c.close()
            for w in workers:
                w.stop(drain=False, timeout=10)
            broker.stop()
    print(f"wrote {output}")


def _run_jobs(admin, alice, scripts, data, root) -> None:
    out = iter(root / "out" / str(i) for i in range(100))
    done = [alice.submit(scripts["report.py"], data, next(out),
                         name=f"daily report {i}") for i in range(3)]
    done.append(admin.submit(scripts["report.py"], data, next(out)))
    broken = alice.submit(scripts["convert.py"], data, next(out), attempts=2)
    for job in done + [broken]:
        admin.wait(job, timeout=30)
    training = [
        alice.submit(scripts["train.py"], data, next(out),
                     ["--lr", "0.01", "--epochs", "50"], name="train resnet"),
        admin.submit(scripts["train.py"], data, next(out), ["--shards", "120"],
                     name="index build"),
    ]
    wait(lambda: all(admin.status(j)["job"]["progress"] for j in training))
    alice.submit(scripts["report.py"], data, next(out), priority=5,
                 name="urgent report")
    admin.submit(scripts["report.py"], data, next(out))
    dropped = alice.submit(scripts["report.py"], data, next(out))
    alice.cancel(dropped)
    wait(lambda: all(admin.status(j)["job"]["progress"] > 0.3
                     for j in training))


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1
         else ROOT / "docs" / "monitor.svg")
