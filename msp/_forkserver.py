"""The job server's own process: see :mod:`msp.executor`.

This file is run by path, ``python _forkserver.py FD [MODULE...]``: by the
subprocess executor as ``python -I -S`` on the worker's interpreter, by the
fork executor (:mod:`msp.forkserver`) in the interpreter that runs the
jobs, which need not have msp installed: it uses the standard library only.
It imports the given modules once, then serves requests on the socket
``FD``: for each it forks a child that becomes a job, either by executing
the job's interpreter on the script (a request with ``exec``) or by running
the script itself (the fork executor), and it reports each child's pid and,
once it has reaped it with ``wait4``, its wait status and resource usage.

The server is the subreaper of its jobs (Linux's PR_SET_CHILD_SUBREAPER):
whatever a job starts and leaves, even detached from its session, comes
back to it as its child. When a job ends and no other job runs, the server
kills the job's group and every such stray with SIGKILL, reaps them, and
only then reports the job's end, with their CPU time added to the job's and
the largest peak memory of them all. A server runs one job at a time in
practice (a worker runs one); strays are left alone while another job
runs, since they may be its.

Why fork from here rather than from the worker: a forked child's peak
resident size (ru_maxrss) counts the pages of the process it was forked
from, so a trivial script forked from the worker would report the worker's
size; this server is small (and with ``-I -S`` about an interpreter's
baseline). Setting limits here, single-threaded, also spares the worker a
preexec_fn in a multi-threaded process.

When the worker's end of the socket closes (the worker ended, even by
kill -9), the server kills its jobs' groups and strays and exits; each job
gets SIGKILL if the server itself dies (PR_SET_PDEATHSIG).

Messages both ways are JSON objects, each behind a 4-byte big-endian
length. The server is single-threaded, so forking it is safe.
"""

import atexit
import ctypes
import gc
import io
import json
import os
import resource
import select
import signal
import struct
import sys
import time

HEADER = struct.Struct("!I")
PR_SET_PDEATHSIG = 1
PR_SET_CHILD_SUBREAPER = 36
# Seconds between the CPU limit's SIGXCPU and the kernel's SIGKILL.
CPU_GRACE = 1
# How long the server waits for a job's strays to die once it ended.
REAP_PATIENCE = 5.0
try:
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except (OSError, AttributeError):  # not Linux: no such safeguard
    _prctl = None


def main(argv):
    fd = int(argv[1])
    here = os.path.dirname(os.path.abspath(__file__))
    # Run by path, this file's folder (msp/) came first on sys.path; a
    # script importing "config" or "paths" must not find msp's modules.
    if sys.path and os.path.abspath(sys.path[0] or ".") == here:
        del sys.path[0]
    if _prctl is not None:
        _prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    failed = {}
    for name in argv[2:]:
        try:
            __import__(name)
        except BaseException as exc:  # a preload must not kill the server
            failed[name] = f"{type(exc).__name__}: {exc}"
    # Not threading: its at-fork hook alone doubled the cost of a fork
    # (186 page faults instead of 69), and a job that starts no thread
    # never needs it.
    # The collector would touch every object's header in each child and so
    # copy most of the server's pages; what exists now is never garbage.
    gc.collect()
    gc.freeze()
    Server(fd).serve(failed)


def set_limits(limits):
    """The attempt's limits on this process: {"cpu": s, "memory": bytes,
    "files": n, "fsize": bytes}, a missing or null one meaning none."""
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    cpu = limits.get("cpu")
    if cpu:
        seconds = max(1, int(-(-cpu // 1)))
        resource.setrlimit(resource.RLIMIT_CPU,
                           (seconds, seconds + CPU_GRACE))
    for key, which in (("memory", resource.RLIMIT_AS),
                       ("files", resource.RLIMIT_NOFILE),
                       ("fsize", resource.RLIMIT_FSIZE)):
        value = limits.get(key)
        if value:
            _, hard = resource.getrlimit(which)
            if hard != resource.RLIM_INFINITY:
                value = min(value, hard)
            resource.setrlimit(which, (value, value))


class Server:
    def __init__(self, fd):
        self.fd = fd
        self.pid = os.getpid()
        # pid -> (request id, read end of the exec error pipe or None)
        self.children = {}
        # Jobs reaped, not yet reported: (job, status, usage).
        self.ended = []
        # [user s, system s, peak kB] of the strays reaped since the last
        # report: the next job's to report.
        self.strays = [0.0, 0.0, 0]
        # Until when the server waits for strays to die, while it does.
        self.patience = None
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
        # SIGCHLD only has to interrupt the poll; reaping happens below.
        signal.signal(signal.SIGCHLD, _ignore)
        signal.set_wakeup_fd(wake_w)
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        poller.register(wake_r, select.POLLIN)
        self.send({"hello": os.getpid(), "failed": failed})
        while True:
            # While strays die, look again now and then for more of them.
            timeout = None if self.patience is None else 50
            for fd, _ in poller.poll(timeout):
                if fd == wake_r:
                    _drain(wake_r)
                elif not self.receive():
                    # The worker is gone (it closed us, or it died): its
                    # jobs go with it.
                    self.shutdown()
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
        """Reap what ended; report the jobs among them once their strays
        are gone too."""
        while True:
            try:
                pid, status, ru = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                pid = -1  # no child left at all: the common case
            if pid <= 0:
                break
            usage = [ru.ru_utime, ru.ru_stime, ru.ru_maxrss]
            job = self.children.pop(pid, None)
            if job is None:
                _add(self.strays, usage)
            else:
                # What the job left in its group goes with it.
                _killpg(pid)
                self.ended.append((job, status, usage))
        if not self.ended:
            return
        if pid == 0 and not self.children:
            # Children remain and none is a job: strays (or the job's
            # group, not dead yet).
            now = time.monotonic()
            if self.patience is None:
                self.patience = now + REAP_PATIENCE
            if now < self.patience:
                _kill_children(self.pid)
                return
            # XXX: a stray that SIGKILL does not end within REAP_PATIENCE
            # (stuck in the kernel) is counted with the next job, if it
            # ever ends: its usage is then billed to the wrong job.
        self.patience = None
        ended, self.ended = self.ended, []
        for (ident, errors), status, usage in ended:
            if not self.children:
                # No other job runs: the strays were this one's.
                _add(usage, self.strays)
                self.strays = [0.0, 0.0, 0]
            message = {"id": ident, "exit": status, "rusage": usage}
            if errors is not None:
                error = _read_all(errors)
                if error:
                    message["exec_error"] = error.decode(errors="replace")
            self.send(message)

    def shutdown(self):
        """Kill every job's group and every child, reap them, and return."""
        deadline = time.monotonic() + REAP_PATIENCE
        while True:
            for pid in self.children:
                _killpg(pid)
            _kill_children(self.pid)
            try:
                while os.wait4(-1, os.WNOHANG)[0] > 0:
                    pass
            except ChildProcessError:
                return
            if time.monotonic() > deadline:
                return
            time.sleep(0.01)

    def run(self, req):
        ident = req["id"]
        # Opened here, before the fork, so that a failure is reported as
        # the attempt's error rather than lost inside the child.
        opened = []
        errors = None
        try:
            flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
            opened.append(os.open(req["cwd"], flags))
            flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC
            opened.append(os.open(req["stdout"], flags, 0o666))
            opened.append(os.open(req["stderr"], flags, 0o666))
            if req.get("user"):
                for fd in opened[1:]:
                    os.fchown(fd, *req["user"])
            code = None
            if req.get("exec"):
                # The child says here why it could not exec; a successful
                # exec closes it (both ends are close-on-exec).
                errors, report = os.pipe()
                opened.append(report)
            elif not req.get("user"):
                # Compiled here, where the parser's memory is warm: in the
                # child, its allocations were page faults on fresh copies,
                # three quarters of a job's cost. (A job with its own user
                # reads its script as that user, in the child.)
                code = _compile(req["script"])
            pid = os.fork()
        except OSError as exc:
            for fd in opened:
                os.close(fd)
            if errors is not None:
                os.close(errors)
            self.send({"id": ident, "error": str(exc)})
            return
        if pid == 0:
            _child(req, self.pid, code, *opened)  # never returns
        for fd in opened:
            os.close(fd)
        if errors is not None:
            os.set_blocking(errors, False)
        self.children[pid] = (ident, errors)
        self.send({"id": ident, "pid": pid})


def _ignore(signum, frame):
    pass


def _add(total, usage):
    total[0] += usage[0]
    total[1] += usage[1]
    total[2] = max(total[2], usage[2])


def _killpg(pgid):
    try:
        os.killpg(pgid, signal.SIGKILL)
    except OSError:
        pass


def _kill_children(me):
    """SIGKILL every child of this process."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            try:
                os.kill(int(entry), signal.SIGKILL)
            except OSError:
                pass


def _read_all(fd):
    chunks = []
    try:
        while True:
            chunk = os.read(fd, 4096)
            if not chunk:
                break
            chunks.append(chunk)
    except BlockingIOError:
        pass
    finally:
        os.close(fd)
    return b"".join(chunks)


def _drain(fd):
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _compile(script):
    """The script's code object, or the exception compiling it raised
    (raised again in the job, which reports it as python would)."""
    try:
        with io.open_code(script) as f:
            source = f.read()
        return compile(source, script, "exec", dont_inherit=True)
    except Exception as exc:
        return exc


def _child(req, server_pid, compiled, cwd_fd, out_fd, err_fd,
           report_fd=None):
    """Become the job: a fresh session, the job's limits, user, files and
    folder; then exec the job's interpreter on the script (``exec``), or
    run the script here as __main__ with the job's environment and argv,
    and exit."""
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
        # or stop the job (asked after setuid, which clears it; an exec
        # keeps it).
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
        if report_fd is not None:
            _exec(req, report_fd)  # returns only by an exception
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
        code = _finalize(_run_script(script, compiled))
    except BaseException as exc:
        message = str(exc) if isinstance(exc, _ExecError) else \
            f"cannot start the script: {exc}"
        try:
            if report_fd is not None:
                code = 127
                os.write(report_fd, message.encode())
            else:
                os.write(2, f"msp: {message}\n".encode())
        except OSError:
            pass
    finally:
        os._exit(code)


class _ExecError(Exception):
    pass


def _exec(req, report_fd):
    """Replace this child with ``python script args...`` as python would be
    started by a shell: default signal dispositions, descriptors 0-2 only
    (and ``report_fd``, closed by the exec)."""
    for sig in (signal.SIGPIPE, signal.SIGXFSZ):
        signal.signal(sig, signal.SIG_DFL)
    os.closerange(3, report_fd)
    os.closerange(report_fd + 1, os.sysconf("SC_OPEN_MAX"))
    python = req["exec"]
    argv = [python, req["script"], *req["args"]]
    try:
        if os.sep in python:
            os.execve(python, argv, req["env"])
        else:
            os.execvpe(python, argv, req["env"])
    except OSError as exc:
        raise _ExecError(f"cannot start {python}: {exc}") from None


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


def _run_script(script, code=None):
    """Run the script (``code``, compiled already, or compiled here) as
    module __main__; its exit status as `python script` would give it."""
    try:
        main = type(sys)("__main__")
        main.__file__ = script
        main.__cached__ = None
        sys.modules["__main__"] = main
        if code is None:
            code = _compile(script)
        if isinstance(code, Exception):
            raise code
        exec(code, main.__dict__)
    except SystemExit as exc:
        return _exit_status(exc.code)
    except BaseException as exc:
        tb = exc.__traceback__
        # Hide the frames of this server, as python hides its own: all of
        # them for an error compiling the script, which has no frame.
        while tb is not None and tb.tb_frame.f_code.co_filename != script:
            tb = tb.tb_next
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
