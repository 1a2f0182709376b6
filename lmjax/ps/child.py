"""Entry point of a parameter-server role process started by the local supervisor.

Its first instruction ties the process to the supervisor (Linux PR_SET_PDEATHSIG), before
the seconds of imports the role needs, so a supervisor killed at any moment takes every
child with it. It imports only the standard library until then.
"""

import ctypes
import os
import runpy
import signal

PARENT_ENV = "LMJAX_PS_SUPERVISOR"  # the supervisor's pid, set in the child's environment


def die_with_parent() -> None:
    """Asks for SIGKILL when the supervisor dies, even by SIGKILL; set in the child
    itself, since forking with a hook is unsafe in the supervisor's threaded process."""
    parent = os.environ.get(PARENT_ENV)
    if parent is None:
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        return
    if os.getppid() != int(parent):  # the supervisor died before the prctl call
        os._exit(1)


if __name__ == "__main__":
    die_with_parent()
    # Then the role itself, as the program `python -m lmjax.ps.launch ARGS` would run it.
    runpy.run_module("lmjax.ps.launch", run_name="__main__", alter_sys=True)
