"""Where an attempt writes, and how its output reaches the output folder.

Each attempt runs in a scratch folder of its own inside the job's output
folder, ``.msp/attempt-<number>-<token prefix>``. When an attempt ends the job,
the broker moves what the attempt wrote up into the output folder and writes
``msp-status.json`` beside it; the scratch folders of earlier attempts stay
under ``.msp/`` with their logs, for debugging.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import stat
from pathlib import Path

log = logging.getLogger(__name__)

SCRATCH = ".msp"
STDOUT = "stdout.log"
STDERR = "stderr.log"
STATUS = "msp-status.json"
STATUS_TMP = f".{STATUS}.tmp"
MARKERS = {"failed": "FAILED", "cancelled": "CANCELLED"}
# Names in the output folder that belong to msp, not to the script.
RESERVED = frozenset((SCRATCH, STATUS, STATUS_TMP, *MARKERS.values()))
# A status larger than this is not one msp wrote (its list of files would
# have to name a million of them).
MAX_STATUS = 64 << 20


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

    The broker does this for every job that ends, on its loop: it is
    written with plain system calls, a dozen for a usual job (pathlib's
    checks made it three times as many and about a millisecond).
    """
    out = os.fspath(output)
    try:
        os.mkdir(out)
    except FileExistsError:
        pass
    except FileNotFoundError:
        os.makedirs(out, exist_ok=True)
    earlier = _read_status(out)
    moved = earlier.get("files")
    moved = [f for f in moved if isinstance(f, str)] \
        if isinstance(moved, list) else []
    files = []
    if earlier.get("attempt") == status.get("attempt"):
        files = moved
    else:
        for name in moved:
            _remove(output, name)
    if scratch is not None:
        source = os.fspath(scratch)
        try:
            names = os.listdir(source)
        except (FileNotFoundError, NotADirectoryError):
            names = None
        if names is not None:
            for name in names:
                if name in RESERVED:
                    continue  # a script may not replace msp's own files
                _move(os.path.join(source, name), os.path.join(out, name))
                if name not in files:
                    files.append(name)
            try:
                os.rmdir(source)
            except OSError:
                # What is left is msp's own names, which a script may not
                # use.
                shutil.rmtree(source)
            try:
                # Only if no earlier attempt left logs.
                os.rmdir(os.path.dirname(source))
            except OSError:
                pass
    status = dict(status, files=sorted(files))
    state = status["state"]
    for marker_state, marker in MARKERS.items():
        path = os.path.join(out, marker)
        if marker_state == state:
            _write(path, f"{status.get('error') or state}\n")
        else:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
    tmp = os.path.join(out, STATUS_TMP)
    _write(tmp, json.dumps(status, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, os.path.join(out, STATUS))


def _move(source: str, target: str) -> None:
    """Rename ``source`` to ``target``, replacing a folder there."""
    try:
        os.replace(source, target)
        return
    except OSError as exc:
        if exc.errno not in (errno.EISDIR, errno.ENOTEMPTY, errno.EEXIST):
            raise
    if os.path.isdir(target) and not os.path.islink(target):
        shutil.rmtree(target)
    os.replace(source, target)


def _write(path: str, text: str) -> None:
    """A new file at ``path``: whatever had the name, a link to a file
    elsewhere say, is removed, not written through."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                 | os.O_CLOEXEC, 0o666)
    try:
        data = text.encode()
        while data:
            data = data[os.write(fd, data):]
    finally:
        os.close(fd)


def _read_status(output: str) -> dict:
    """The status an earlier promotion wrote; {} for anything else there (a
    script can write into the output folder): no link is followed and no
    FIFO waited on."""
    try:
        fd = os.open(os.path.join(output, STATUS), os.O_RDONLY | os.O_CLOEXEC
                     | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return {}
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_STATUS:
            return {}
        chunks, left = [], MAX_STATUS + 1
        while left > 0 and (chunk := os.read(fd, min(left, 1 << 16))):
            chunks.append(chunk)
            left -= len(chunk)
        if left <= 0:
            return {}  # grew while read
        status = json.loads(b"".join(chunks))
    except (OSError, ValueError):
        return {}
    finally:
        os.close(fd)
    return status if isinstance(status, dict) else {}


def _remove(output: Path, name: str) -> None:
    """Remove what an earlier promotion moved into ``output``."""
    if name in ("", ".", "..", *RESERVED) or "/" in name:
        return
    target = Path(output) / name
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
