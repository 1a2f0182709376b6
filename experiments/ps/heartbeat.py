"""What jax.distributed does when a process dies (jax 0.10.2, CPU, 127.0.0.1).

    python experiments/ps/heartbeat.py            # default settings
    python experiments/ps/heartbeat.py --recoverable

Starts 3 processes (0 hosts the coordination service), SIGKILLs process 2 after 6 s,
restarts it 3 s later, and prints how each process ended and what process 1 saw from
`get_live_nodes` each second. Runs about 30 s (up to 2 minutes when a process hangs).
"""

import argparse
import signal
import socket
import subprocess
import sys
import time

CHILD = """
import sys, time, jax
if sys.argv[3] == "1":
    jax.config.update("jax_enable_recoverability", True)
pid, port = int(sys.argv[1]), sys.argv[2]
jax.distributed.initialize(f"127.0.0.1:{port}", 3, pid, heartbeat_timeout_seconds=4,
                           initialization_timeout=30)
from jax._src.distributed import global_state
start = time.time()
while time.time() - start < (25 if pid == 0 else 15):  # the service's host leaves last
    time.sleep(1)
    # get_live_nodes is a barrier over the live processes listed: all of them call it.
    live = sorted(global_state.client.get_live_nodes([0, 1, 2]))
    if pid == 1:
        print(f"t={time.time() - start:4.1f}s live={live}", flush=True)
print("finished", flush=True)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recoverable", action="store_true")
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    flag = "1" if args.recoverable else "0"

    def start(pid):
        return subprocess.Popen([sys.executable, "-c", CHILD, str(pid), port, flag],
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    procs = {pid: start(pid) for pid in range(3)}
    time.sleep(6)
    procs[2].send_signal(signal.SIGKILL)
    time.sleep(3)
    restarted = start(2)
    for name, proc in [("0", procs[0]), ("1", procs[1]), ("2 (restarted)", restarted)]:
        try:
            out, _ = proc.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            proc.kill()
            out = proc.communicate()[0] + "\nstill running after 90 s: killed"
        lines = [ln for ln in out.splitlines() if ln.startswith(("t=", "finished", "F", "still"))]
        print(f"process {name}: exit code {proc.returncode}")
        for line in lines[:25]:
            print("   ", line[:160])


if __name__ == "__main__":
    main()
