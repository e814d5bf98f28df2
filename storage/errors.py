"""Exceptions for expected failures: the CLIs print their message, one line, no traceback."""


class UserError(Exception):
    """An expected failure a user can fix; the message names the file or scene and what to do."""


class StoreError(UserError):
    """The store is missing, of another format, lacks a feature set, or is not complete."""
