"""Checks on the paths of a job, made by the broker before it stores one.

A job names a script, a data folder and an output folder. Each must be an
absolute path that resolves, symlinks followed, under one of the roots the
configuration allows; the script must be a readable file, the data folder an
existing folder, and the output folder creatable and outside the data folder.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import PathError

# Linux's PATH_MAX counts the closing NUL.
MAX_PATH_BYTES = 4095


@dataclass(frozen=True)
class JobPaths:
    """A job's paths, resolved."""

    script: str
    data: str
    output: str


def resolve_roots(roots: list[str]) -> tuple[Path, ...]:
    return tuple(Path(r).expanduser().resolve() for r in roots)


def check(script: str, data: str, output: str, roots: tuple[Path, ...],
          memo: dict | None = None):
    """Resolve and check the three paths of a job; raise PathError.

    ``memo``, a dict kept for the jobs of one request, spares checking
    again a script and data folder that an earlier job of it had."""
    try:
        return _check(script, data, output, roots, memo)
    except OSError as exc:
        # A name too long for the file system, a loop of links, an I/O
        # error: the path is unusable, whichever it is.
        where = exc.filename or "a path"
        raise PathError(f"{where}: {exc.strerror or exc}") from None


def _check(script: str, data: str, output: str, roots: tuple[Path, ...],
           memo: dict | None):
    memo = {} if memo is None else memo
    known = memo.get((script, data))
    if known is None:
        known = memo[(script, data)] = _check_inputs(script, data, roots)
    script_path, data_path = known
    output_path, exists = _resolve("output folder", output, roots, memo)
    if _under(output_path, data_path):
        raise PathError(
            f"output folder {output}: inside the data folder {data}"
        )
    if _under(data_path, output_path):
        raise PathError(
            f"output folder {output}: holds the data folder {data}"
        )
    _check_creatable(output, output_path, exists, memo)
    return JobPaths(script_path, data_path, output_path)


def _check_inputs(script: str, data: str, roots: tuple[Path, ...]):
    script_path, _ = _resolve("script", script, roots)
    data_path, _ = _resolve("data folder", data, roots)
    if not stat.S_ISREG(_mode(script_path)):
        raise PathError(f"script {script}: not an existing file")
    if not os.access(script_path, os.R_OK):
        raise PathError(f"script {script}: not readable")
    if not stat.S_ISDIR(_mode(data_path)):
        raise PathError(f"data folder {data}: not an existing folder")
    if not os.access(data_path, os.R_OK | os.X_OK):
        raise PathError(f"data folder {data}: not readable")
    return script_path, data_path


def _resolve(what: str, raw: str, roots: tuple[Path, ...],
             memo: dict | None = None) -> tuple[str, bool | None]:
    """The path resolved, as a string, once it is known to be allowed; and
    whether it exists (None: not known)."""
    shown = raw if len(raw) <= 200 else raw[:200] + "..."
    try:
        encoded = raw.encode("utf-8")
    except UnicodeEncodeError:
        raise PathError(f"{what} {shown!r}: not valid UTF-8") from None
    if not raw:
        raise PathError(f"{what}: empty path")
    if b"\0" in encoded:
        raise PathError(f"{what} {shown!r}: contains a NUL byte")
    if len(encoded) > MAX_PATH_BYTES:
        raise PathError(
            f"{what} {shown}: longer than {MAX_PATH_BYTES} bytes"
        )
    if not os.path.isabs(raw):
        raise PathError(f"{what} {shown}: must be an absolute path")
    try:
        path, exists = _realpath(raw, memo)
    except (OSError, RuntimeError) as exc:
        raise PathError(f"{what} {shown}: cannot be resolved ({exc})") from None
    if not any(_under(path, root) for root in roots):
        allowed = ", ".join(str(r) for r in roots) or "none configured"
        raise PathError(
            f"{what} {shown}: resolves to {path}, outside the allowed roots "
            f"({allowed}; the broker's [broker] allowed_roots setting)"
        )
    return path, exists


def _realpath(raw: str, memo: dict | None = None) -> tuple[str, bool | None]:
    """``Path(raw).resolve()`` as a string, and whether the path exists
    (None: not known), with the kernel resolving the part of the path that
    exists: a descriptor opened with O_PATH (nothing is read, a FIFO does
    not block) names its file's resolved path in /proc. Python's own
    resolve looks at every component with lstat, which made the path
    checks most of the broker's work per submit.

    Only the last components may be missing (a new output folder); when
    one of them is ``.``, ``..`` or a dangling link, or anything but
    ENOENT goes wrong, the answer is ``resolve()``'s, whatever it makes of
    the case (a loop of links, say). ``memo`` keeps, for one request, the folders resolved
    above each path: the jobs of a request often share them.
    """
    head, tail = raw, []
    while True:
        resolved = memo.get(head) if memo is not None and tail else None
        if resolved is not None:
            break
        try:
            fd = os.open(head, _O_PATH)
        except FileNotFoundError:
            parent, name = os.path.split(head)
            if name in ("", ".", "..") or parent == head or \
                    os.path.islink(head):
                # A link to nothing yet still says where the path goes.
                return _resolved(raw)
            tail.append(name)
            head = parent
            continue
        except OSError:
            return _resolved(raw)
        try:
            resolved = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            return _resolved(raw)
        finally:
            os.close(fd)
        if not resolved.startswith("/") or resolved.endswith(" (deleted)"):
            return _resolved(raw)
        break
    if not tail:
        return resolved, True
    if any(name in (".", "..") for name in tail):
        return _resolved(raw)
    if memo is not None:
        # Every folder above the path, missing ones too, for the next job.
        for name in reversed(tail[1:]):
            memo[head] = resolved
            head = os.path.join(head, name)
            resolved = os.path.join(resolved, name)
        memo[head] = resolved
        return os.path.join(resolved, tail[0]), False
    return os.path.join(resolved, *reversed(tail)), False


def _resolved(raw: str) -> tuple[str, None]:
    return str(Path(raw).resolve()), None


_O_PATH = getattr(os, "O_PATH", 0) | os.O_CLOEXEC


def _under(path: str | Path, folder: str | Path) -> bool:
    """``path`` is ``folder`` or inside it; both resolved and absolute.

    Compared as strings: ``folder in path.parents`` builds a Path per
    parent and cost the broker about 0.1 ms per submit."""
    p, f = str(path), str(folder)
    return p == f or p.startswith(f if f.endswith("/") else f + "/")


def _mode(path: str) -> int:
    """The file's mode, 0 if there is none; as pathlib's ``exists`` and
    ``is_file``, an error other than a missing file (a name too long, say)
    is raised, not taken for "no such file"."""
    try:
        return os.stat(path).st_mode
    except (FileNotFoundError, NotADirectoryError):
        return 0
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return 0
        raise


def _exists(path: str) -> bool:
    return _mode(path) != 0


def _check_creatable(raw: str, path: str, exists: bool | None,
                     memo: dict) -> None:
    if exists is None:
        exists = _exists(path)
    if exists:
        if not stat.S_ISDIR(_mode(path)):
            raise PathError(f"output folder {raw}: exists and is not a folder")
        if not os.access(path, os.W_OK | os.X_OK):
            raise PathError(f"output folder {raw}: not writable")
        return
    parent = os.path.dirname(path)
    key = ("creatable", parent)
    found = memo.get(key)
    if found is None:
        ancestor = parent
        while not _exists(ancestor):
            ancestor = os.path.dirname(ancestor)
        found = memo[key] = (ancestor, stat.S_ISDIR(_mode(ancestor))
                             and os.access(ancestor, os.W_OK | os.X_OK))
    ancestor, ok = found
    if not ok:
        raise PathError(
            f"output folder {raw}: cannot be created ({ancestor} is not a "
            "writable folder)"
        )
