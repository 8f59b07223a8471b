"""Script entry: run main(), turning a UserError into one line on stderr and exit status 2."""
import os
import sys
from typing import Callable

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def one_line(error: Exception) -> str:
    """The user-facing message, the library's argument names (`data_path`) shown as flags (-data_path).
    A UserError re-raised from a DataLoader worker carries the worker's traceback in its text, whose last
    line is the original message."""
    from cfg import in_flag_terms

    message = str(error).strip()
    if "Original Traceback" in message:
        message = message.splitlines()[-1].split(": ", 1)[-1]
    return in_flag_terms(message)


def restart_for_host_memory(policy: str) -> None:
    """Start this script again, same command line, when -host_memory `policy` needs an environment that
    only a process's start applies (glibc's tunables, engine/host_memory.py); the new process has it, so
    this happens once. Call it from a script run only."""
    from engine.host_memory import start_up_environment

    environment = start_up_environment(policy, os.environ)
    if environment != dict(os.environ):
        sys.stdout.flush()
        sys.stderr.flush()
        os.execve(sys.executable, sys.orig_argv, environment)


def run_cli(main: Callable[[], None]) -> None:
    from common.errors import UserError

    try:
        main()
    except UserError as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        sys.exit(2)
