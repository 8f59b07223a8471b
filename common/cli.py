"""Script entry: run main(), turning a UserError into one line on stderr and exit status 2."""
import os
import sys
from typing import Callable

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def run_cli(main: Callable[[], None]) -> None:
    from common.errors import UserError

    try:
        main()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
