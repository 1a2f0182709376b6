"""Entry point of a parameter-server role process started by the local supervisor.

Its first instruction ties the process to the supervisor (Linux PR_SET_PDEATHSIG), before
the seconds of imports the role needs, so a supervisor killed at any moment takes every
child with it. It imports only the standard library until then.
"""

import runpy

from lmjax.lifeline import die_with_parent

PARENT_ENV = "LMJAX_PS_SUPERVISOR"  # the supervisor's pid, set in the child's environment


if __name__ == "__main__":
    die_with_parent(PARENT_ENV)
    # Then the role itself, as the program `python -m lmjax.ps.launch ARGS` would run it.
    runpy.run_module("lmjax.ps.launch", run_name="__main__", alter_sys=True)
