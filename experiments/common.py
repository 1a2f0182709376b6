"""Helpers the experiment scripts share: run the lmjax CLI, read its metrics."""

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
