"""`metrics.jsonl` of a parameter-server run: one record per applied update, then workers.

A restarted server shard 0 replays the updates after its checkpoint, so the writer
first drops update records newer than the checkpoint (and a line cut short by a kill).
"""

import json
import os

from lmjax.train.metrics import rewrite_jsonl


class PSMetricWriter:
    def __init__(self, workdir: str, resume_step: int):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._truncate(resume_step)

    def _truncate(self, keep_until: int) -> None:
        rewrite_jsonl(self.path, lambda r: r.get("split") != "train" or r["step"] <= keep_until)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
