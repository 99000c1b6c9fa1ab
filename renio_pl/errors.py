"""Errors the `renio-pl` command reports in one line: bad input, and a run that diverged."""


class ConfigError(ValueError):
    """Bad input from the user: the message names the problem and the fix, in one line.

    The `renio-pl` command prints it as `error: <message>` and exits with status 2, with no
    traceback. Anything else that escapes is a bug and keeps its traceback.
    """


class TrainingDiverged(RuntimeError):
    """The loss became NaN or inf; raised before the bad update, so the last checkpoint is good.

    The `renio-pl` command prints it as `error: <message>` and exits with status 1.
    """
