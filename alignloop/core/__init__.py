"""The kernel: what every stage and the application build on. Imports only itself and third-party packages."""

__version__ = "0.1.0"


class AlignloopError(Exception):
    """An error the user can act on: the CLI prints its message as one line, without a traceback."""
