"""Errors a person can act on: each names the file, line, field or option at fault.

The CLI prints these without a traceback; anything else is a bug and keeps its traceback.
"""


class LMForgeError(Exception):
    """Base class for errors caused by input, configuration or files, not by lmforge itself."""


class DataError(LMForgeError, ValueError):
    """A corpus, dataset or packed directory is missing, empty or malformed."""


class ConfigError(LMForgeError, ValueError):
    """A model or training setting is unknown, inconsistent or out of range."""


class CheckpointError(LMForgeError):
    """A checkpoint directory is missing a file, belongs to another model, or cannot be resumed."""


class Interrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C after saving its checkpoint: the CLI exits 130 (as a shell does for SIGINT), so a
    script can tell an interrupted run from a finished one; from Python, the KeyboardInterrupt Ctrl-C means."""
