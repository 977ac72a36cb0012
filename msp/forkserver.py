"""A fork-server executor: each job is a fork of a warm interpreter.

:class:`ForkExecutor` starts, once, a server process in the configured
interpreter (``msp/_forkserver.py``, standard library only), which imports
the ``preload`` modules and then waits on a Unix socket. For each job it
opens the attempt's stdout and stderr files and scratch folder, forks, and
the child becomes the job: a new session (so a process group of its own),
standard input from /dev/null, the files on descriptors 1 and 2, every other
descriptor closed, the scratch folder as working directory, the same
scrubbed environment :class:`~msp.executor.SubprocessExecutor` builds,
``sys.argv`` and ``sys.path[0]`` as ``python script.py`` sets them, the
attempt's limits and, for a root worker, the configured unprivileged user
(``run_as``), then the script's code runs as module ``__main__``
(compiled by the server before the fork, where the parser's memory is
warm, unless the job runs as another user, which reads its own script).
Its exit status follows python's: 0, the ``SystemExit`` code, or 1 with the traceback on stderr for
an uncaught exception. The server reaps each child with ``wait4`` and sends
back its status and resource usage. A job thus starts in about a
millisecond instead of the tens an interpreter takes to start. It is the
same server :class:`~msp.executor.SubprocessExecutor` uses, which execs a
fresh interpreter in the child instead of running the script there.

The promises are SubprocessExecutor's: the same syntax check before
anything starts, the same outcomes, cancellation by SIGTERM to the whole
group (and every descendant found), SIGKILL after the grace period,
whatever the script leaves running killed when it ends (the server is the
subreaper of its jobs' trees), and a script that does not outlive its
worker: the server kills its jobs' trees and exits when the worker's end of
the socket closes (the worker ended, even by kill -9), and each job gets
SIGKILL if the server itself dies (PR_SET_PDEATHSIG).

Caveats, all from the fork:

- Modules the server imported (``preload``, and what the interpreter
  imports at start-up) are already imported in the job, in the state the
  server left them: a module that keeps state, caches or connections at
  import time shares them, as they were at the fork, with every job.
  Preload only modules that are safe to fork (no threads, no open
  connections).
- A job that changes interpreter-global state (``sys.modules``,
  ``sys.path``, environment, signal handlers, monkey-patching) changes it
  in its own fork only; the next job starts from the server's state again.
- Every job inherits the server's hash seed, so the iteration order of
  sets of strings is the same from job to job (a fresh interpreter draws a
  new seed). ``random`` re-seeds itself after a fork; other generators
  (numpy's, if preloaded) do not.
- Settings read only at interpreter start-up (``PYTHON*`` variables,
  ``-X`` options) come from the server's start, with the environment that
  has no job's variables in it. ``sys.orig_argv`` and ``os.getppid()``
  are the server's.
- The reported peak memory (``max_rss_kb``) counts the server's pages that
  the child mapped, as a fresh interpreter's counts its own start-up;
  likewise the memory limit (RLIMIT_AS) counts the server's address space
  the child starts with.
- With ``run_as``, the server runs as the worker's user (root) and each
  child drops to the configured user right after the fork: the job starts
  from a memory image a root process made (nothing secret is in it unless
  a preloaded module put it there).
- If the server dies, the jobs it ran are reported lost (so the broker
  retries them) and the next job starts a new server.
"""

from __future__ import annotations

import logging

from .executor import (
    DEFAULT_ENV_ALLOW, Assignment, Limits, SubprocessExecutor,
)

log = logging.getLogger(__name__)


class ForkExecutor(SubprocessExecutor):
    """Runs each job in a fork of a warm interpreter; see the module."""

    server_name = "fork server"

    def __init__(self, python: str, *, kill_grace: float = 5.0,
                 env_allow=DEFAULT_ENV_ALLOW, environ=None,
                 limits: Limits = Limits(), run_as: str = "",
                 preload: tuple[str, ...] | list[str] = (),
                 start_timeout: float = 30.0):
        super().__init__(python, kill_grace=kill_grace, env_allow=env_allow,
                         environ=environ, limits=limits, run_as=run_as,
                         start_timeout=start_timeout)
        self.preload = tuple(preload)
        # Started now, so that the first job finds it warm; if it cannot
        # start, each job tries again and reports why it could not.
        try:
            self._ensure_server()
        except OSError as exc:
            log.error("fork server: %s", exc)

    def _server_process(self):
        # The jobs' own interpreter, as they would start it. Its
        # environment is the jobs' without a job in it, so that what python
        # reads at start-up is the same.
        env = dict(self.base_env, PYTHONUNBUFFERED="1")
        return [self.python], env, self.preload

    def _request(self, a: Assignment) -> dict:
        return {}  # the script runs in the fork itself

