"""Running other people's code: limits, environment, user and accounting,
with real scripts on a real worker."""

from __future__ import annotations

import os
import pwd
import shutil
import tempfile
from pathlib import Path

import psutil
import pytest

from msp.broker import Broker
from msp.client import Client
from msp.config import WorkerConfig
from msp.errors import LimitError
from msp.worker import Worker

from .conftest import ADMIN_PASSWORD, FAST, broker_config, wait_for

SPIN = "while True:\n    pass\n"

BIG_ALLOC = "x = bytearray(400 * 1024 * 1024)\nprint('allocated')\n"

BIG_FILE = """\
with open("big.bin", "wb") as f:
    for _ in range(4):
        f.write(b"x" * (512 * 1024))
"""

MANY_FILES = """\
import os
held = [open(os.devnull) for _ in range(50)]
"""

ENV = """\
import os, sys
print(sorted(os.environ))
print(repr(sys.stdin.read()))
"""

TRIVIAL = "pass\n"

DETACH = """\
import os, subprocess, sys
child = subprocess.Popen(
    [sys.executable, "-c", "import time; time.sleep(600)"],
    start_new_session=True,
)
open(os.path.join(os.environ["MSP_OUTPUT_DIR"], "pid"), "w").write(
    str(child.pid))
"""

STUBBORN = """\
import signal
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("msp:progress 0.1", flush=True)
while True:
    pass
"""


def run(cluster, body, name, attempts=1, **kw):
    c = cluster.admin()
    job = c.submit(cluster.script(name, body), cluster.data,
                   cluster.output(name), attempts=attempts, **kw)
    view = c.wait(job, timeout=60)
    return view, c.status(job)["attempts"]


def test_cpu_limit_ends_the_script_with_sigxcpu(make_cluster):
    cluster = make_cluster()
    view, attempts = run(cluster, SPIN, "spin.py", cpu=1)
    assert view["state"] == "failed"
    assert "CPU time limit exceeded (SIGXCPU): 1 s" in view["error"]
    assert view["exit_code"] == -24
    cpu = attempts[0]["cpu_user"] + attempts[0]["cpu_system"]
    # The kernel checks the limit on its scheduler's clock and reports
    # usage split by samples of user and system time: they differ a little.
    assert 0.8 <= cpu < 3.0


def test_memory_limit_ends_the_script(make_cluster):
    cluster = make_cluster(workers=0)
    cluster.add_worker(memory_limit_mb=200)
    view, _ = run(cluster, BIG_ALLOC, "alloc.py")
    assert view["state"] == "failed"
    assert "memory limit exceeded: 200 MiB" in view["error"]
    assert "MemoryError" in view["error"]
    # The job's own ask overrides the worker's default.
    view, _ = run(cluster, BIG_ALLOC, "alloc2.py", memory=1024)
    assert view["state"] == "succeeded"


def test_output_size_limit_ends_the_script(make_cluster):
    cluster = make_cluster(workers=0)
    cluster.add_worker(output_limit_mb=1)
    view, _ = run(cluster, BIG_FILE, "big.py")
    assert view["state"] == "failed"
    assert "file size limit exceeded (SIGXFSZ): 1 MiB" in view["error"]
    assert (cluster.output("big.py") / "big.bin").stat().st_size == 1 << 20


def test_open_files_limit(make_cluster):
    cluster = make_cluster(workers=0)
    cluster.add_worker(files_limit=20)
    view, _ = run(cluster, MANY_FILES, "files.py")
    assert view["state"] == "failed"
    assert "open files limit reached: 20" in view["error"]


def test_job_limits_are_checked_against_the_brokers_maxima(make_cluster):
    cluster = make_cluster(workers=0, max_job_cpu=60.0, max_job_memory_mb=512)
    c = cluster.admin()
    script = cluster.script("ok.py", "")
    with pytest.raises(LimitError, match="cpu 61 s is over"):
        c.submit(script, cluster.data, cluster.output(), cpu=61)
    with pytest.raises(LimitError, match="memory 513 MiB is over"):
        c.submit(script, cluster.data, cluster.output(), memory=513)
    with pytest.raises(Exception) as bad:
        c.submit(script, cluster.data, cluster.output(), cpu=-1)
    assert bad.value.code == "bad_request"
    assert c.jobs() == []
    job = c.submit(script, cluster.data, cluster.output(), cpu=60,
                   memory=512)
    view = c.status(job)["job"]
    assert (view["cpu"], view["memory"]) == (60, 512)


def test_environment_is_scrubbed_to_the_allow_list(make_cluster,
                                                   monkeypatch):
    monkeypatch.setenv("MSP_TEST_VISIBLE", "yes")
    monkeypatch.setenv("MSP_TEST_HIDDEN", "no")
    cluster = make_cluster(workers=0)
    cluster.add_worker(env_allow=["PATH", "MSP_TEST_VISIBLE"])
    view, _ = run(cluster, ENV, "env.py")
    assert view["state"] == "succeeded"
    names, stdin = (cluster.output("env.py") / "stdout.log").read_text() \
        .splitlines()
    # Python itself sets LC_CTYPE when it finds the C locale (PEP 538).
    assert [n for n in eval(names) if n != "LC_CTYPE"] == sorted([
        "PATH", "MSP_TEST_VISIBLE", "MSP_JOB_ID", "MSP_ATTEMPT",
        "MSP_DATA_DIR", "MSP_OUTPUT_DIR", "PYTHONUNBUFFERED",
    ])
    assert stdin == "''"


def test_peak_memory_is_the_scripts_not_the_workers(make_cluster):
    cluster = make_cluster()
    view, attempts = run(cluster, TRIVIAL, "trivial.py")
    assert view["state"] == "succeeded"
    worker_kb = psutil.Process().memory_info().rss // 1024
    peak = attempts[0]["max_rss_kb"]
    # An interpreter that does nothing holds some 10 MB; this process
    # (broker, worker and pytest) several times that.
    assert 2_000 < peak < 40_000 < worker_kb


def test_what_a_script_leaves_behind_is_killed(make_cluster):
    cluster = make_cluster()
    view, _ = run(cluster, DETACH, "detach.py")
    assert view["state"] == "succeeded"
    pid = int((cluster.output("detach.py") / "pid").read_text())
    wait_for(lambda: not psutil.pid_exists(pid) or
             psutil.Process(pid).status() == psutil.STATUS_ZOMBIE,
             message="the detached child to be gone")


def test_usage_survives_a_hard_kill(make_cluster):
    cluster = make_cluster(workers=0)
    cluster.add_worker(kill_grace=0.5)
    view, attempts = run(cluster, STUBBORN, "stubborn.py", timeout=1.0)
    assert view["state"] == "failed"
    assert "timed out after 1 s" in view["error"]
    a = attempts[0]
    assert a["outcome"] == "timed_out"
    # Reported by the job server: the script's own peak, not the worker's,
    # and the CPU it burnt until it was killed.
    assert a["max_rss_kb"] < 40_000
    assert a["cpu_user"] + a["cpu_system"] > 0.05


def _nobody():
    try:
        return pwd.getpwnam("nobody")
    except KeyError:
        return None


# An interpreter outside root's home, which the unprivileged user can run.
SYSTEM_PYTHON = shutil.which("python3", path="/usr/bin:/bin")


@pytest.mark.skipif(os.geteuid() != 0 or _nobody() is None or
                    SYSTEM_PYTHON is None,
                    reason="needs a worker running as root, a 'nobody' user "
                    "and /usr/bin/python3")
def test_scripts_run_as_the_configured_user():
    # A root the unprivileged user can traverse (pytest's is private).
    root = Path(tempfile.mkdtemp(prefix="msp-run-as-"))
    os.chmod(root, 0o755)
    broker = worker = client = None
    try:
        broker = Broker(broker_config(root, "tcp"),
                        admin_password=ADMIN_PASSWORD).start()
        worker = Worker(WorkerConfig(
            broker=broker.endpoints["worker"], name="w", run_as="nobody",
            python=SYSTEM_PYTHON, **FAST,
        )).start()
        (root / "data").mkdir()
        script = root / "who.py"
        script.write_text(
            "import os\n"
            "print(os.getuid(), os.getgid(), os.environ['HOME'])\n"
            "open('made-by-script.txt', 'w').write('hi')\n"
        )
        client = Client(broker.endpoints["client"], timeout=5.0)
        client.login("admin", ADMIN_PASSWORD)
        job = client.submit(script, root / "data", root / "out")
        view = client.wait(job, timeout=30)
        assert view["state"] == "succeeded", view["error"]
        nobody = _nobody()
        assert (root / "out" / "stdout.log").read_text().split() == [
            str(nobody.pw_uid), str(nobody.pw_gid), nobody.pw_dir,
        ]
        made = root / "out" / "made-by-script.txt"
        assert made.stat().st_uid == nobody.pw_uid
    finally:
        if client is not None:
            client.close()
        if worker is not None:
            worker.stop(drain=False, timeout=10)
        if broker is not None:
            broker.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_run_as_mistakes_are_refused():
    from msp.errors import ConfigError
    from msp.executor import SubprocessExecutor

    with pytest.raises(ConfigError, match="no such user"):
        SubprocessExecutor("python3", run_as="no-such-user-here")
    if os.geteuid() == 0:
        with pytest.raises(ConfigError, match="unprivileged"):
            SubprocessExecutor("python3", run_as="root")


PIDS = """\
import os, subprocess, sys, time
child = subprocess.Popen(
    [sys.executable, "-c", "import time; time.sleep(600)"],
    start_new_session=True,
)
with open(os.path.join(os.environ["MSP_DATA_DIR"], "pids.tmp"), "w") as f:
    f.write(f"{os.getpid()} {child.pid}")
os.replace(os.path.join(os.environ["MSP_DATA_DIR"], "pids.tmp"),
           os.path.join(os.environ["MSP_DATA_DIR"], "pids"))
time.sleep(600)
"""


def test_a_dead_workers_script_tree_goes_with_it(processes):
    p = processes()
    p.start_broker()
    worker = p.start_worker("w1")
    data = p.root / "data"
    data.mkdir()
    script = p.root / "pids.py"
    script.write_text(PIDS)
    c = p.client()
    c.submit(script, data, p.root / "out")
    pids = wait_for(lambda: (data / "pids").exists() and
                    [int(x) for x in (data / "pids").read_text().split()],
                    timeout=30, message="the script to start")
    try:
        worker.kill()  # SIGKILL: the worker cannot clean up
        worker.wait(10)

        def gone(pid):
            try:
                return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                return True

        # The script and the child it detached from its group both end.
        wait_for(lambda: all(gone(pid) for pid in pids), timeout=10,
                 message="the dead worker's processes to end")
    finally:
        for pid in pids:
            try:
                os.kill(pid, 9)
            except OSError:
                pass
