"""The installed distribution's version, for manifests and ``--version``. Its own module
so that the core can name it without importing the package's top (the shim's API)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("trackbridge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+source"
