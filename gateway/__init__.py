"""pdg, the Public Data Gateway: the HTTP edge (data plane, OAuth, admin API,
operations endpoints). The ``pdg`` command line is ``cli``."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("public-data-gateway")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0"
