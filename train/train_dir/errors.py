"""The one exception type for user mistakes: train.py prints it as a single line and exits non-zero."""


class UserError(Exception):
    """Bad input from the user (flags, data, checkpoints, paths): reported without a traceback."""
