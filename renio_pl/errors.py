"""The one exception type for bad user input (config, data, model paths)."""


class ConfigError(ValueError):
    """Bad input from the user: the message names the problem and the fix, in one line.

    The `renio-pl` command prints it as `error: <message>` and exits with status 2, with no
    traceback. Anything else that escapes is a bug and keeps its traceback.
    """
