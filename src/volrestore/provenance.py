"""What produced an output: the installed package's version and the command line, as provenance records them."""

import sys
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("volrestore")
except PackageNotFoundError:  # running from a source tree without installation
    __version__ = "0.0.0+unknown"


def command_line() -> str:
    """The command as the user typed it (`volrestore ARGS`), for provenance."""
    return " ".join(["volrestore", *sys.argv[1:]])
