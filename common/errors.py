"""The one error type that reaches the user as a one-line message."""


class UserError(Exception):
    """Bad input from the user: a flag, a file or a folder. Scripts print it on one line and exit 2.

    Library code names the arguments it was given in backticks (`data_path`), never as flags; the
    scripts' run_cli shows each as the flag that sets it (cfg.in_flag_terms: -data_path)."""
