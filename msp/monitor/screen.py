"""The live screen: rich's Live on the alternate screen, keys in cbreak mode.

One thread does everything: it waits on the event stream, the STATS reply
and the keyboard at once (:meth:`Feed.step`), then draws a frame from a view
of the model. ``q`` or Ctrl-C quits; the terminal's modes and screen are
restored however the loop ends.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import termios
import time
import tty

from rich.console import Console
from rich.live import Live

from .feed import Feed
from .view import render

QUIT_KEYS = (b"q", b"Q")


def frame(feed: Feed, console: Console):
    """One frame: a view of the model first, then rendered from it."""
    view = feed.model.view(feed.clock(), feed.wall())
    size = console.size
    return render(view, size.width, size.height)


@contextlib.contextmanager
def cbreak(stream):
    """Keys one at a time without echo; the old modes back on the way out.
    Yields the descriptor to read keys from, or None when not a terminal."""
    if stream is None or not stream.isatty():
        yield None
        return
    fd = stream.fileno()
    saved = termios.tcgetattr(fd)
    try:
        tty.setcbreak(fd)
        yield fd
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


def _terminate(signum, frame):
    # SIGTERM unwinds like Ctrl-C, so the terminal is restored.
    raise KeyboardInterrupt


def run(feed: Feed, console: Console, refresh: float = 0.5,
        keys=sys.stdin) -> None:
    """Show the live screen until a quit key, Ctrl-C or SIGTERM."""
    refresh = min(max(refresh, 0.05), 1.0)
    # Ctrl-C too, taken here: started with SIGINT ignored (a shell's
    # background job), python would install no handler of its own.
    previous = {sig: signal.signal(sig, _terminate)
                for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with cbreak(keys) as fd, Live(
            console=console, screen=True, auto_refresh=False,
            redirect_stdout=False, redirect_stderr=False,
        ) as live:
            fds = [] if fd is None else [fd]
            next_frame = 0.0
            while True:
                now = time.monotonic()
                if now >= next_frame:
                    live.update(frame(feed, console), refresh=True)
                    next_frame = now + refresh
                ready = feed.step(next_frame - time.monotonic(), fds)
                if ready:
                    pressed = os.read(fd, 64)
                    if any(k in pressed for k in QUIT_KEYS):
                        return
    except KeyboardInterrupt:
        return
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
