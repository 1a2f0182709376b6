"""The base of errors a user can act on: the CLI prints their message and exits 1."""


class RunError(Exception):
    """A run stopped for a reason its message explains (not a bug in lmjax)."""
