"""trackbridge: move experiment-tracking data between MLflow, W&B and Neptune.

The import package is ``bridge``; the distribution and its command are ``trackbridge``.
"""

from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("trackbridge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

__all__ = ["__version__", "init"]


def init(*args: Any, **kwargs: Any) -> Any:
    """Start a dual-logging run; see ``bridge.shim.init``. Imported lazily so that
    ``import bridge`` stays cheap for the CLI."""
    from bridge.shim import init as _init

    return _init(*args, **kwargs)
