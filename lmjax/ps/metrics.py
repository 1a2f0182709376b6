"""`metrics.jsonl` of a parameter-server run: one record per applied update, then workers.

A restarted server shard 0 replays the updates after its checkpoint, so the writer
first drops update records newer than the checkpoint (and a line cut short by a kill).
"""

import json
import os


class PSMetricWriter:
    def __init__(self, workdir: str, resume_step: int):
        os.makedirs(workdir, exist_ok=True)
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._truncate(resume_step)

    def _truncate(self, keep_until: int) -> None:
        if not os.path.exists(self.path):
            return
        kept = []
        with open(self.path) as f:
            for line in f:
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # the last line of a killed writer
                    continue
                if record.get("split") != "train" or record["step"] <= keep_until:
                    kept.append(json.dumps(record) + "\n")
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, self.path)

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
