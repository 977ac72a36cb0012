"""msp: run Python script jobs on workers through a ZeroMQ broker."""

from .errors import MspError

__version__ = "0.1.0"

__all__ = ["MspError", "__version__"]
