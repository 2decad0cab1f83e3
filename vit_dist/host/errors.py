"""User errors: each one line that names the problem and the fix. The CLI prints it once (rank 0)
and exits with EXIT_USER_ERROR, whatever the subcommand."""

import difflib

EXIT_USER_ERROR = 2


def did_you_mean(word: str, choices, prefix: str = "") -> str:
    """The hint ` (did you mean 'PREFIX<closest>'?)` for the choice closest to word; '' if none is close."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.5)
    return f" (did you mean '{prefix}{close[0]}'?)" if close else ""


class UserError(Exception):
    """A problem with what the user gave (config, data, files, arguments), phrased as one line."""


class ConfigError(UserError, ValueError):
    """A config key or value, or a command-line argument, that cannot work."""


class DataError(UserError):
    """A dataset folder or image file that cannot be trained or evaluated on."""


class CheckpointError(UserError):
    """A checkpoint or weights file that cannot be read, written or loaded into the model."""


class OutputError(UserError):
    """A file of the run cannot be written: a full disk, a read-only folder, a quota."""


class DependencyError(UserError):
    """An optional package a command needs is not installed."""
