"""msp: run Python script jobs on workers through a ZeroMQ broker."""

import sys

from .errors import MspError

__version__ = "0.1.0"

__all__ = ["MspError", "__version__", "progress"]


def progress(value: float, message: str = "") -> None:
    """Report a job's progress from its script: ``value`` from 0 to 1.

    It prints the line the worker watches stdout for (``msp:progress 0.4
    message``), so a script may as well print it itself; ``mspctl status``,
    ``submit --wait`` and the monitor show it as a bar. Costs nothing
    outside msp: the line just goes to stdout.
    """
    value = float(value)
    if value != value:
        raise ValueError("progress must be a number from 0 to 1, not NaN")
    value = min(max(value, 0.0), 1.0)
    # One line: a line break would end the message early.
    text = " ".join(str(message).split())
    print(f"msp:progress {value:.4f} {text}".rstrip(), file=sys.stdout,
          flush=True)
