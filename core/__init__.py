"""layerfuse.core: what every other package may use and that imports nothing else from the project.

errors (the one exception hierarchy), atomic file writes, config fingerprints, config reading and closed choices,
option parsing, timing, the BENCHMARKS.md writer, storage dtypes, hub-id resolution, the learning-rate schedule,
torch.distributed and DataLoader worker setup.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("layerfuse")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
