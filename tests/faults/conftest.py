"""Helpers for the fault-injection tests: real broker and worker processes,
scripts that wait for the test's word, and the checks every test makes."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import psutil
import pytest

from ..conftest import Processes, wait_for

# A script that records which attempt ran it, in its output and in its data
# folder, and (attempt 1 only, unless told otherwise) waits until the test
# writes "go" in the data folder: the test decides when it may end.
GATED = """\
import os, pathlib, sys, time
attempt = os.environ["MSP_ATTEMPT"]
data = pathlib.Path(os.environ["MSP_DATA_DIR"])
out = pathlib.Path(os.environ["MSP_OUTPUT_DIR"])
tag = sys.argv[1] if len(sys.argv) > 1 else "job"
(out / f"from-attempt-{attempt}.txt").write_text(attempt)
(data / f"{tag}-started-{attempt}").write_text(str(os.getpid()))
gated = sys.argv[2].split(",") if len(sys.argv) > 2 else ["1"]
if attempt in gated:
    deadline = time.monotonic() + 60
    while not (data / f"{tag}-go").exists():
        if time.monotonic() > deadline:
            sys.exit("never told to go")
        time.sleep(0.02)
print("done", tag, attempt)
"""

FINAL = ("succeeded", "failed", "cancelled")


def start(processes, workers=("w1",), **broker_env) -> Processes:
    """A broker and named workers as processes, every worker registered."""
    p = processes(**broker_env)
    p.start_broker()
    for name in workers:
        p.start_worker(name)
    c = p.client()
    try:
        wait_for(lambda: sorted(w["name"] for w in c.workers())
                 == sorted(workers), timeout=30,
                 message=f"workers {workers} to join")
    finally:
        c.close()
    return p


def gated_job(p: Processes, c, tag: str, gated="1", **submit):
    """Submit a GATED job with a data folder of its own; (job, data, out)."""
    script = p.root / "gated.py"
    if not script.exists():
        script.write_text(GATED)
    data = p.root / f"data-{tag}"
    data.mkdir(exist_ok=True)
    out = p.root / f"out-{tag}"
    job = c.submit(script, data, out, [tag, gated], **submit)
    return job, data, out


def started(data: Path, tag: str, attempt: int, timeout=30) -> int:
    """Wait until ``attempt`` of job ``tag`` runs; its script's pid."""
    path = data / f"{tag}-started-{attempt}"
    wait_for(lambda: path.exists() and path.read_text(), timeout=timeout,
             message=f"{tag} attempt {attempt} to start")
    return int(path.read_text())


def go(data: Path, tag: str) -> None:
    (data / f"{tag}-go").write_text("")


def holder(c, job) -> str:
    """The worker running ``job`` now."""
    return wait_for(
        lambda: next((w["name"] for w in c.workers() if w["job"] == job),
                     None),
        timeout=30, message=f"a worker to hold job {job}")


def settled(c, job, state: str, outcomes: list[str], timeout=60):
    """Wait for ``job`` to end, then check it ended once, in ``state``,
    after exactly the attempts with ``outcomes``, none overlapping the
    next, and with one success record exactly when it succeeded."""
    view = c.wait(job, timeout=timeout)
    assert view["state"] == state, view
    assert view["finished_at"] is not None
    attempts = c.status(job)["attempts"]
    assert [a["outcome"] for a in attempts] == outcomes, attempts
    assert [a["number"] for a in attempts] == list(
        range(1, len(outcomes) + 1))
    assert view["attempts"] == len(outcomes)
    assert all(a["ended_at"] is not None for a in attempts)
    for earlier, later in zip(attempts, attempts[1:], strict=False):
        # Never two attempts at once: each ended before the next began.
        assert earlier["ended_at"] <= later["started_at"]
    wins = [a for a in attempts if a["outcome"] == "succeeded"]
    assert len(wins) == (1 if state == "succeeded" else 0)
    return view, attempts


def promoted(out: Path) -> dict:
    """What the output folder says: its status and the attempts whose
    files it holds."""
    status = json.loads((out / "msp-status.json").read_text())
    from_attempts = sorted(
        int(p.name.split("-")[-1].split(".")[0])
        for p in out.glob("from-attempt-*.txt")
    )
    return {"status": status, "from": from_attempts}


def gone(pid: int) -> bool:
    """Whether process ``pid`` has ended (a zombie has)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def signal_worker(p: Processes, name: str, sig: int) -> None:
    os.kill(p.workers[name].pid, sig)


@pytest.fixture
def strays():
    """Pids a test leaves behind on purpose (a killed worker's script);
    killed at the end whatever happened."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
