"""The store's expected failures: the commands print their message, one line, no traceback."""

from cli.errors import UserError


class StoreError(UserError):
    """The store is missing, of another format, lacks a feature set, or is not complete."""


class StoreUnreachable(StoreError):
    """The server of a store URL could not be reached: a retry may succeed."""
