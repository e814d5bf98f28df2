"""The common ending of every command's `main()`: logging in user terms, and a `UserError`
turned into one line `error: ...` on stderr and an exit status instead of a traceback."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from cli.errors import UserError

LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


def run_command(body: Callable[[], int | None], *, error_status: int = 1,
                level: int = logging.INFO, log_format: str = LOG_FORMAT) -> int:
    """Configure logging, run `body` and return its exit status (None: 0); a UserError it
    raises prints `error: <message>` to stderr and returns `error_status`."""
    logging.basicConfig(level=level, format=log_format)
    try:
        status = body()
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return error_status
    return 0 if status is None else status
