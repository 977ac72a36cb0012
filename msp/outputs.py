"""Where an attempt writes, and how its output reaches the output folder.

Each attempt runs in a scratch folder of its own inside the job's output
folder, ``.msp/attempt-<number>-<token prefix>``. When an attempt ends the job,
the broker moves what the attempt wrote up into the output folder and writes
``msp-status.json`` beside it; the scratch folders of earlier attempts stay
under ``.msp/`` with their logs, for debugging.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

SCRATCH = ".msp"
STDOUT = "stdout.log"
STDERR = "stderr.log"
STATUS = "msp-status.json"
MARKERS = {"failed": "FAILED", "cancelled": "CANCELLED"}
# Names in the output folder that belong to msp, not to the script.
RESERVED = frozenset((SCRATCH, STATUS, *MARKERS.values()))


def scratch_dir(output: str | os.PathLike, number: int, token: str) -> Path:
    return Path(output) / SCRATCH / f"attempt-{number}-{token[:8]}"


def promote(output: Path, scratch: Path | None, status: dict) -> None:
    """Move the attempt's files into ``output`` and write its status.

    ``status["files"]`` becomes the names moved up. Idempotent: run again
    after a crash, it moves what is left and rewrites the status, so a
    result recorded twice leaves one attempt's files. When the broker died
    between promoting an attempt and recording it, and another attempt ends
    the job after all, the first one's files go before the second's come.
    ``scratch`` None writes the status alone (an attempt whose files cannot
    be trusted stays under ``.msp/``).
    """
    output.mkdir(parents=True, exist_ok=True)
    earlier = _read_status(output)
    moved = earlier.get("files")
    moved = [f for f in moved if isinstance(f, str)] \
        if isinstance(moved, list) else []
    files = []
    if earlier.get("attempt") == status.get("attempt"):
        files = moved
    else:
        for name in moved:
            _remove(output, name)
    if scratch is not None and scratch.is_dir():
        for entry in scratch.iterdir():
            if entry.name in RESERVED:
                continue  # a script may not replace msp's own files
            target = output / entry.name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            os.replace(entry, target)
            if entry.name not in files:
                files.append(entry.name)
        # What is left is msp's own names, which a script may not use.
        shutil.rmtree(scratch)
        try:
            scratch.parent.rmdir()  # only if no earlier attempt left logs
        except OSError:
            pass
    status = dict(status, files=sorted(files))
    state = status["state"]
    for marker_state, marker in MARKERS.items():
        path = output / marker
        if marker_state == state:
            path.write_text(f"{status.get('error') or state}\n")
        elif path.exists():
            path.unlink()
    tmp = output / f".{STATUS}.tmp"
    tmp.write_text(json.dumps(status, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, output / STATUS)


def _read_status(output: Path) -> dict:
    try:
        status = json.loads((output / STATUS).read_text())
    except (OSError, ValueError):
        return {}
    return status if isinstance(status, dict) else {}


def _remove(output: Path, name: str) -> None:
    """Remove what an earlier promotion moved into ``output``."""
    if name in ("", ".", "..", *RESERVED) or "/" in name:
        return
    target = output / name
    try:
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()
    except FileNotFoundError:
        pass


def tail(path: Path, size: int = 2000) -> str:
    """The last ``size`` bytes of a text file, decoded leniently."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""
