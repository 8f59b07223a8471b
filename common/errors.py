"""The one error type that reaches the user as a one-line message."""


class UserError(Exception):
    """Bad input from the user: a flag, a file or a folder. Scripts print it on one line and exit 2."""
