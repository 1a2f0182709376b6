"""Long runs of the real configs (`python -m pytest -m slow`; `.ci/run` runs them)."""

import json

import pytest
from conftest import run_cli


@pytest.mark.slow
def test_baby_config_reaches_nanogpt_loss(tmp_path):
    """nanoGPT reports about 1.88 for this config; the acceptance bound is 1.95."""
    result = run_cli("train", f"--workdir={tmp_path}",
                     "--gin_file=configs/experiments/shakespeare_char_baby.gin", timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    with open(tmp_path / "metrics.jsonl") as f:
        evals = [r for r in map(json.loads, f) if r["split"] == "eval"]
    assert evals[-1]["step"] == 2000
    assert evals[-1]["loss"] <= 1.95
