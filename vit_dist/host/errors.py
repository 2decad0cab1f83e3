"""User errors: each one line that names the problem and the fix. The CLI prints it once (rank 0)
and exits with EXIT_USER_ERROR, whatever the subcommand."""

EXIT_USER_ERROR = 2


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
