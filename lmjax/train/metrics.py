"""Metrics to `metrics.jsonl` (one JSON object per line) and TensorBoard event files."""

import json
import os

from tensorboardX import SummaryWriter


class MetricWriter:
    """Appends records; on resume, drops records newer than the restored checkpoint.

    That keeps `metrics.jsonl` equal to an uninterrupted run's after a killed run resumes.
    """

    def __init__(self, workdir: str, resume_step: int | None):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._truncate(resume_step or 0)
        self.tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def _truncate(self, keep_until: int) -> None:
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            kept = [line for line in f if line.strip() and json.loads(line)["step"] <= keep_until]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key not in ("step", "split") and isinstance(value, (int, float)):
                self.tb.add_scalar(f"{record['split']}/{key}", value, record["step"])

    def close(self) -> None:
        self.tb.close()


def read_metrics(workdir: str) -> list[dict]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]
