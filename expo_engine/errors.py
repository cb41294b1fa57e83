"""The engine's exceptions: one class per kind of failure the user can act on.

Every :class:`ExpoError` carries a message meant for the user (it names the file or tensor and says what to do);
the CLI prints it on stderr and exits with status 2, without a traceback.
"""


class ExpoError(Exception):
    """Base class of every error the user can fix (bad input, bad option, unusable output path)."""

    exit_code = 2


class SourceError(ExpoError):
    """A checkpoint cannot be found or resolved (missing folder, unknown Hub repo, no weights in it)."""


class FormatError(ExpoError):
    """A weights or index file is malformed (bad safetensors header, index naming missing files, unsafe pickle)."""


class MismatchError(ExpoError):
    """The two checkpoints do not describe the same architecture (names, shapes or dtypes differ)."""


class OptionError(ExpoError):
    """An option has a value the engine cannot use (non-finite alpha, unknown dtype, bad size)."""


class OutputError(ExpoError):
    """The output path cannot be used (exists and is not empty, lies inside an input, cannot be written)."""


class InputChangedError(ExpoError):
    """An input file changed, shrank or disappeared while the engine was reading it."""


class NonFiniteError(ExpoError):
    """The formula produced NaN or Inf from finite inputs (alpha too large for the output dtype's range)."""


class RewardError(ExpoError):
    """The reward signal of `expo search` failed: its command exited non-zero or printed the wrong lines, its function
    raised or returned a non-number, or its model could not score."""


class Interrupted(ExpoError):
    """The run stopped early (Ctrl-C, SIGTERM); the staging folder and its journal are kept so that a rerun of the
    same command resumes."""

    exit_code = 130
