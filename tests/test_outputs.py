"""How an attempt's files reach the output folder."""

from __future__ import annotations

import json
import os
import threading

import pytest

from msp import outputs


def scratch_with(tmp_path, number, files):
    scratch = outputs.scratch_dir(tmp_path / "out", number, f"token{number}")
    scratch.mkdir(parents=True)
    for name, text in files.items():
        (scratch / name).write_text(text)
    return scratch


def status(number, state="succeeded"):
    return {"job": 1, "state": state, "attempt": number, "outcome": state}


def test_a_later_attempt_replaces_an_earlier_promotion_whole(tmp_path):
    """The broker promoted attempt 1 and died before recording it; attempt
    2 ends the job after all. Only attempt 2's files remain."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("the user's own file")
    one = scratch_with(tmp_path, 1, {"a.txt": "1", "b.txt": "1",
                                     "stdout.log": "one"})
    outputs.promote(out, one, status(1))
    two = scratch_with(tmp_path, 2, {"b.txt": "2", "stdout.log": "two"})

    outputs.promote(out, two, status(2))

    assert sorted(p.name for p in out.iterdir()) == [
        "b.txt", "mine.txt", "msp-status.json", "stdout.log"]
    assert (out / "b.txt").read_text() == "2"
    recorded = json.loads((out / "msp-status.json").read_text())
    assert recorded["attempt"] == 2
    assert recorded["files"] == ["b.txt", "stdout.log"]


def test_promoting_the_same_attempt_again_changes_nothing(tmp_path):
    out = tmp_path / "out"
    two = scratch_with(tmp_path, 2, {"r.txt": "2", "stdout.log": "two"})
    outputs.promote(out, two, status(2))
    before = sorted(p.name for p in out.iterdir())

    outputs.promote(out, two, status(2))

    assert sorted(p.name for p in out.iterdir()) == before
    assert json.loads((out / "msp-status.json").read_text())["files"] == [
        "r.txt", "stdout.log"]


def test_a_status_alone_leaves_the_attempts_files_aside(tmp_path):
    out = tmp_path / "out"
    scratch = scratch_with(tmp_path, 1, {"partial.txt": "half"})

    outputs.promote(out, None, dict(status(1, "failed"), error="lost"))

    assert (scratch / "partial.txt").read_text() == "half"
    assert not (out / "partial.txt").exists()
    assert (out / "FAILED").read_text() == "lost\n"


def test_a_folder_of_the_attempt_replaces_one_of_the_same_name(tmp_path):
    out = tmp_path / "out"
    (out / "results" / "old").mkdir(parents=True)
    (out / "results" / "old" / "x.txt").write_text("old")
    (out / "single").mkdir()
    scratch = scratch_with(tmp_path, 1, {"single": "a file now"})
    (scratch / "results").mkdir()
    (scratch / "results" / "new.txt").write_text("new")

    outputs.promote(out, scratch, status(1))

    assert sorted(p.name for p in (out / "results").iterdir()) == [
        "new.txt"]
    assert (out / "single").read_text() == "a file now"
    assert not (out / ".msp").exists()


def test_msps_own_names_in_the_attempt_stay_out(tmp_path):
    out = tmp_path / "out"
    scratch = scratch_with(tmp_path, 1, {"msp-status.json": "forged",
                                         "FAILED": "forged", "r.txt": "1"})

    outputs.promote(out, scratch, status(1))

    recorded = json.loads((out / "msp-status.json").read_text())
    assert recorded["state"] == "succeeded"
    assert recorded["files"] == ["r.txt"]
    assert not (out / "FAILED").exists()
    assert not scratch.exists() and not (out / ".msp").exists()


def test_markers_follow_the_state(tmp_path):
    out = tmp_path / "out"
    outputs.promote(out, None, dict(status(1, "failed"), error="boom"))
    assert (out / "FAILED").read_text() == "boom\n"

    outputs.promote(out, None, status(1, "cancelled"))

    assert not (out / "FAILED").exists()
    assert (out / "CANCELLED").read_text() == "cancelled\n"
    outputs.promote(out, None, status(2))
    assert not (out / "CANCELLED").exists()


def test_a_missing_scratch_folder_writes_the_status_alone(tmp_path):
    out = tmp_path / "out" / "deeper"
    outputs.promote(out, out / ".msp" / "attempt-1-x", status(1))
    assert json.loads((out / "msp-status.json").read_text())["files"] == []


def test_a_link_the_attempt_left_under_msps_temporary_name_is_not_followed(
    tmp_path
):
    """The status is written beside the output as .msp-status.json.tmp; a
    script's link of that name must not make the broker write elsewhere."""
    victim = tmp_path / "victim"
    victim.write_text("precious")
    scratch = scratch_with(tmp_path, 1, {"r.txt": "1"})
    (scratch / ".msp-status.json.tmp").symlink_to(victim)
    out = tmp_path / "out"

    outputs.promote(out, scratch, status(1))

    assert victim.read_text() == "precious"
    recorded = json.loads((out / "msp-status.json").read_text())
    assert recorded["files"] == ["r.txt"]
    assert sorted(p.name for p in out.iterdir()) == ["msp-status.json",
                                                     "r.txt"]


def test_a_marker_left_as_a_link_is_not_followed(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (out / "FAILED").symlink_to(victim)

    outputs.promote(out, None, status(1, "failed"))

    assert victim.read_text() == "precious"
    assert not (out / "FAILED").is_symlink()
    assert (out / "FAILED").read_text() == "failed\n"


@pytest.mark.parametrize("kind", ["fifo", "endless", "not json"])
def test_a_status_file_that_is_no_status_is_replaced(tmp_path, kind):
    """Whatever a script left as msp-status.json, the broker (which runs
    this on its loop) neither blocks on it nor reads it without end."""
    out = tmp_path / "out"
    out.mkdir()
    path = out / "msp-status.json"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "endless":
        path.symlink_to("/dev/zero")
    else:
        path.write_bytes(b"\xff{not json")
    done = threading.Event()

    def promote():
        outputs.promote(out, scratch_with(tmp_path, 1, {"r.txt": "1"}),
                        status(1))
        done.set()

    worker = threading.Thread(target=promote, daemon=True)
    worker.start()
    try:
        assert done.wait(10), "promote is stuck on the old status"
    finally:
        if kind == "fifo" and not done.is_set():
            # Let the stuck open return.
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
        worker.join(10)
    recorded = json.loads(path.read_text())
    assert recorded["files"] == ["r.txt"] and recorded["attempt"] == 1
