"""alignloop: a self-hosted workbench for prompting, instruction-tuning and aligning your own assistant model."""

__version__ = "0.1.0"


class AlignloopError(Exception):
    """An error the user can act on: the CLI prints its message as one line, without a traceback."""
