"""Child processes that die with the process that started them (standard library only).

A child calls `die_with_parent` first thing, before the seconds of imports it needs, so
a launcher killed at any moment (SIGKILL included) takes every child with it.
"""

import ctypes
import os
import signal

LAUNCHER_ENV = "LMJAX_LAUNCHER"  # the pid of `lmjax launch`, in its children's environment


def die_with_parent(parent_env: str) -> None:
    """Asks Linux for SIGKILL when the parent whose pid is in $`parent_env` dies
    (PR_SET_PDEATHSIG); set in the child itself, since forking with a hook is unsafe in a
    threaded parent. Does nothing when the variable is unset or off Linux."""
    parent = os.environ.get(parent_env)
    if parent is None:
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() != int(parent):  # the parent died before the prctl call
        os._exit(1)
