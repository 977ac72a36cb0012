"""``mspctl monitor``: the whole system live in one terminal.

- :mod:`.model`: a STATS snapshot brought forward by the event stream;
- :mod:`.feed`: the sockets that feed the model, without blocking;
- :mod:`.view`: pure functions from a view of the model to rich renderables;
- :mod:`.screen`: the live full-screen loop and the keyboard.
"""

from .feed import Feed
from .model import Model
from .view import render

__all__ = ["Feed", "Model", "render"]
