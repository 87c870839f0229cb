"""trackbridge: move experiment-tracking data between MLflow, W&B and Neptune.

The import package, the distribution and the command are all ``trackbridge``.
"""

from typing import Any

from trackbridge.version import __version__

__all__ = ["__version__", "init"]


def init(*args: Any, **kwargs: Any) -> Any:
    """Start a dual-logging run; see ``trackbridge.shim.init``. Imported lazily so that
    ``import trackbridge`` stays cheap for the CLI."""
    from trackbridge.shim import init as _init

    return _init(*args, **kwargs)
