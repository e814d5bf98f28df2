"""The project-wide exception for expected failures: a command prints its message, one line,
no traceback (`cli.run.run_command`)."""


class UserError(Exception):
    """An expected failure a user can fix; the message names the file or scene and what to do."""
