"""Errors meant for the user: the message says what is wrong and names the culprit.

Command-line entry points print these as one paragraph, without a traceback, and exit
with status 2 (see :func:`dinov2.utils.cli.run_cli`). Anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """Bad input from the user: a file, a label, a config value, a checkpoint."""


class ConfigError(UserError):
    """A configuration value is missing, unknown or inconsistent."""


class TreeError(UserError):
    """The hierarchy violates a Tree invariant (duplicate, empty or reserved name)."""


class LabelError(UserError):
    """A raw label does not map to a node of the hierarchy."""


class DataError(UserError):
    """A manifest row, an image file or a data folder is missing or unreadable."""


class CheckpointError(UserError):
    """A checkpoint cannot be read or does not fit the model."""


class TrainingError(UserError):
    """Training cannot go on (for example a NaN or infinite loss)."""


class OutputError(UserError):
    """An output file or folder cannot be written (bad path, no permission, full disk)."""
