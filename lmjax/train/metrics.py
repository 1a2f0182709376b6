"""Metrics to `metrics.jsonl` (one JSON object per line) and TensorBoard event files."""

import json
import os
from collections.abc import Callable


class MetricWriter:
    """Appends records; on resume, drops records newer than the restored checkpoint.

    That keeps `metrics.jsonl` equal to an uninterrupted run's after a killed run resumes
    (for the trainer and for a restarted parameter-server shard alike).
    """

    def __init__(self, workdir: str, resume_step: int | None):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._truncate(resume_step or 0)
        # Imported here: tensorboardX imports torch (seconds), which the processes of a
        # multi-process job other than process 0 never need.
        from tensorboardX import SummaryWriter

        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def _truncate(self, keep_until: int) -> None:
        rewrite_jsonl(self.path, lambda record: record["step"] <= keep_until)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key not in ("step", "split") and isinstance(value, (int, float)):
                self.tb.add_scalar(f"{record['split']}/{key}", value, record["step"])

    def close(self) -> None:
        self.tb.close()


class NullWriter:
    """A MetricWriter that writes nothing (the processes of a job other than process 0)."""

    def write(self, record: dict) -> None:
        del record

    def close(self) -> None:
        pass


def rewrite_jsonl(path: str, keep: Callable[[dict], bool]) -> None:
    """Atomically rewrites a JSONL file with the records `keep` accepts.

    A line cut short by a killed writer is dropped rather than failing the resume.
    """
    if not os.path.exists(path):
        return
    kept = []
    with open(path) as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if keep(record):
                kept.append(json.dumps(record) + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(kept)
    os.replace(tmp, path)
