"""The base of errors a user can act on: the CLI prints their message and exits 1."""


class RunError(Exception):
    """A run stopped for a reason its message explains (not a bug in lmjax)."""

    # True where threads of a library may be stuck and would hold the interpreter's
    # shutdown for ever: the CLI then leaves at once (everything was written already).
    exit_at_once: bool = False
