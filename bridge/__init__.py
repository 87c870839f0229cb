"""trackbridge: move experiment-tracking data between MLflow, W&B and Neptune.

The import package is ``bridge``; the distribution and its command are ``trackbridge``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("trackbridge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"

__all__ = ["__version__"]
