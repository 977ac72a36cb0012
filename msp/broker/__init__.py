"""The msp broker: the server that stores, queues and dispatches jobs.

:class:`Broker` owns the sockets and the event loop; it hands client requests
to :class:`ClientHandler` and worker messages to :class:`WorkerHandler`.
"""

from .server import Broker

__all__ = ["Broker"]
