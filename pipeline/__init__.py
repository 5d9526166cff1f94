"""layerfuse.pipeline: sources -> extract -> cache -> loader (phase one and the cache reader)."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("layerfuse")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
