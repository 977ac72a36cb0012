"""The fork server's own process: see :mod:`msp.forkserver`.

This file is run by path, ``python _forkserver.py FD [MODULE...]``, in the
interpreter that runs the jobs, which need not have msp installed: it uses
the standard library only. It imports the given modules once, then serves
requests on the socket ``FD``: for each it forks a child that becomes a job,
and it reports each child's pid and, once it has reaped it with ``wait4``,
its wait status and resource usage.

Messages both ways are JSON objects, each behind a 4-byte big-endian
length. The server is single-threaded, so forking it is safe.
"""

import atexit
import ctypes
import gc
import importlib.util
import io
import json
import os
import runpy
import select
import signal
import struct
import sys

HEADER = struct.Struct("!I")
PR_SET_PDEATHSIG = 1
set_limits = None  # launch.set_limits, loaded by main()
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: no such safeguard
    _prctl = None


def main(argv):
    fd = int(argv[1])
    here = os.path.dirname(os.path.abspath(__file__))
    # The launcher's limits, loaded under a name no script imports.
    global set_limits
    spec = importlib.util.spec_from_file_location(
        "_msp_launch", os.path.join(here, "launch.py"))
    launch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(launch)
    set_limits = launch.set_limits
    # Run by path, this file's folder (msp/) came first on sys.path; a
    # script importing "config" or "paths" must not find msp's modules.
    if sys.path and os.path.abspath(sys.path[0] or ".") == here:
        del sys.path[0]
    failed = {}
    for name in argv[2:]:
        try:
            __import__(name)
        except BaseException as exc:  # a preload must not kill the server
            failed[name] = f"{type(exc).__name__}: {exc}"
    # run_path imports pkgutil: once here rather than in each fork. Not
    # threading: its at-fork hook alone doubled the cost of a fork (186
    # page faults instead of 69), and a job that starts no thread never
    # needs it.
    import pkgutil  # noqa: F401

    # The collector would touch every object's header in each child and so
    # copy most of the server's pages; what exists now is never garbage.
    gc.collect()
    gc.freeze()
    Server(fd).serve(failed)


class Server:
    def __init__(self, fd):
        self.fd = fd
        self.pid = os.getpid()
        self.children = {}  # pid -> request id
        self.inbox = bytearray()

    def send(self, message):
        data = json.dumps(message, separators=(",", ":")).encode()
        data = HEADER.pack(len(data)) + data
        while data:
            data = data[os.write(self.fd, data):]

    def serve(self, failed):
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        self.wake = (wake_r, wake_w)
        # SIGCHLD only has to interrupt the poll; reaping happens below.
        signal.signal(signal.SIGCHLD, _ignore)
        signal.set_wakeup_fd(wake_w)
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(wake_r, select.POLLIN)
        self.send({"hello": os.getpid(), "failed": failed})
        while True:
            for fd, _ in poller.poll():
                if fd == wake_r:
                    _drain(wake_r)
                elif not self.receive():
                    # The worker is gone (it closed us, or it died): its
                    # jobs go with it, as the subprocess executor's do.
                    for pid in self.children:
                        try:
                            os.killpg(pid, signal.SIGKILL)
                        except OSError:
                            pass
                    return
            self.reap()

    def receive(self):
        data = os.read(self.fd, 1 << 16)
        if not data:
            return False
        self.inbox += data
        while len(self.inbox) >= HEADER.size:
            (size,) = HEADER.unpack_from(self.inbox)
            if len(self.inbox) < HEADER.size + size:
                break
            body = bytes(self.inbox[HEADER.size:HEADER.size + size])
            del self.inbox[:HEADER.size + size]
            self.run(json.loads(body))
        return True

    def reap(self):
        while self.children:
            try:
                pid, status, ru = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            ident = self.children.pop(pid, None)
            if ident is not None:
                self.send({
                    "id": ident, "exit": status,
                    "rusage": [ru.ru_utime, ru.ru_stime, ru.ru_maxrss],
                })

    def run(self, req):
        ident = req["id"]
        # Opened here, before the fork, so that a failure is reported as
        # the attempt's error rather than lost inside the child.
        opened = []
        try:
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
            opened.append(os.open(req["cwd"], flags))
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
            opened.append(os.open(req["stdout"], flags, 0o666))
            opened.append(os.open(req["stderr"], flags, 0o666))
            if req.get("user"):
                for fd in opened[1:]:
                    os.fchown(fd, *req["user"])
            pid = os.fork()
        except OSError as exc:
            for fd in opened:
                os.close(fd)
            self.send({"id": ident, "error": str(exc)})
            return
        if pid == 0:
            _child(req, self.pid, *opened)  # never returns
        for fd in opened:
            os.close(fd)
        self.children[pid] = ident
        self.send({"id": ident, "pid": pid})


def _ignore(signum, frame):
    pass


def _drain(fd):
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _child(req, server_pid, cwd_fd, out_fd, err_fd):
    """Become the job: a fresh session, the job's files, folder,
    environment and argv; then run the script as __main__ and exit."""
    code = 1
    try:
        os.setsid()
        set_limits(req.get("limits") or {})
        if req.get("user"):
            uid, gid = req["user"]
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
        # Killed with the server, whose death would leave nobody to report
        # or stop the job (asked after setuid, which clears it).
        if _prctl is not None:
            _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
        if os.getppid() != server_pid:
            os._exit(1)  # the server died before the safeguard took hold
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        os.fchdir(cwd_fd)
        # The control socket and every other descriptor of the server.
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        env = req["env"]
        # Only what differs: every change is a putenv or unsetenv, and
        # the server's environment is the job's without the job's part.
        for key in [k for k in os.environ if k not in env]:
            del os.environ[key]
        for key, value in env.items():
            if os.environ.get(key) != value:
                os.environ[key] = value
        _std_streams(bool(env.get("PYTHONUNBUFFERED")))
        script = req["script"]
        sys.argv = [script, *req["args"]]
        sys.path.insert(0, os.path.dirname(script))
        code = _run_script(script)
        code = _finalize(code)
    except BaseException as exc:
        try:
            os.write(2, f"msp: cannot start the script: {exc}\n".encode())
        except OSError:
            pass
    finally:
        os._exit(code)


def _std_streams(unbuffered):
    """New sys.stdin/stdout/stderr on descriptors 0-2, set up as a fresh
    interpreter would set them up in the same environment."""
    old = sys.__stdout__ or sys.stdout
    encoding = getattr(old, "encoding", None) or "utf-8"
    errors = getattr(old, "errors", None) or "strict"

    def writer(fd, errors):
        raw = io.FileIO(fd, "w", closefd=False)
        buffer = raw if unbuffered else io.BufferedWriter(raw)
        return io.TextIOWrapper(buffer, encoding=encoding, errors=errors,
                                write_through=unbuffered)

    sys.stdin = sys.__stdin__ = io.TextIOWrapper(
        io.BufferedReader(io.FileIO(0, "r", closefd=False)),
        encoding=encoding, errors=errors,
    )
    sys.stdout = sys.__stdout__ = writer(1, errors)
    sys.stderr = sys.__stderr__ = writer(2, "backslashreplace")


def _run_script(script):
    """Run the script; its exit status as `python script` would give it."""
    try:
        runpy.run_path(script, run_name="__main__")
    except SystemExit as exc:
        return _exit_status(exc.code)
    except BaseException as exc:
        tb = exc.__traceback__
        # Hide the frames of this server and of runpy, as python does.
        while tb is not None and tb.tb_frame.f_code.co_filename != script:
            tb = tb.tb_next
        if tb is not None:
            # The hook prints the traceback the exception carries.
            exc.__traceback__ = tb
        try:
            sys.excepthook(type(exc), exc, exc.__traceback__)
        except BaseException:
            pass
        if isinstance(exc, KeyboardInterrupt):
            # python ends by the signal itself, so its parent knows.
            _flush()
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
        return 1
    return 0


def _exit_status(code):
    if code is None:
        return 0
    if isinstance(code, int):
        return code if -(1 << 31) <= code < (1 << 31) else -1
    try:
        sys.stderr.write(f"{code}\n")
    except BaseException:
        pass
    return 1


def _finalize(code):
    """What the interpreter does on the way out: wait for non-daemon
    threads, run the atexit functions, flush the streams."""
    threading = sys.modules.get("threading")
    try:
        if threading is not None:
            threading._shutdown()
    except BaseException:
        pass
    try:
        atexit._run_exitfuncs()
    except SystemExit as exc:
        code = _exit_status(exc.code)
    except BaseException:
        pass
    _flush()
    return code


def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass


if __name__ == "__main__":
    main(sys.argv)
