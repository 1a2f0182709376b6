"""Helpers the experiment scripts share: run the lmjax CLI, read its metrics, record results."""

import fcntl
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def train(workdir: Path, gin_file: str, params: list[str], devices: int | None = None) -> float:
    """Runs `python -m lmjax.main train`; returns its wall time in seconds (raises on failure)."""
    env = dict(os.environ)
    if devices:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    args = [sys.executable, "-m", "lmjax.main", "train", f"--workdir={workdir}",
            f"--gin_file={gin_file}", *[f"--gin_param={p}" for p in params]]
    start = time.perf_counter()
    result = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"{' '.join(args)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def records(workdir: Path, split: str) -> list[dict]:
    with open(Path(workdir) / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r["split"] == split]


def save_record(results: Path, key: str, record: dict) -> None:
    """Sets `key` in the JSON file `results` (written whole, then renamed into place); a
    lock beside it lets several studies add records side by side."""
    with open(results.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        recorded = json.loads(results.read_text()) if results.exists() else {}
        recorded[key] = record
        tmp = results.with_suffix(".tmp")
        tmp.write_text(json.dumps(recorded, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, results)
