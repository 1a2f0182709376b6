"""Mixed load against one `lmjax serve` process (experiments/robustness/serve_load.py):
300 concurrent valid requests among hostile ones. Slow: minutes on a 2-core CPU."""

import importlib.util

import pytest
from conftest import REPO, run_cli, tiny_args

MAX_GROWTH_MB = 100


def _serve_load():
    path = REPO / "experiments" / "robustness" / "serve_load.py"
    spec = importlib.util.spec_from_file_location("serve_load", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_mixed_load_answers_every_valid_request_and_refuses_every_hostile_one(tmp_path):
    workdir = tmp_path / "run"
    trained = run_cli(*tiny_args(workdir))
    assert trained.returncode == 0, trained.stderr[-2000:]
    load = _serve_load()
    figures = load.measure(str(workdir), requests=300, repeats=4, slots=8,
                           port=load.free_port())
    print(load.report(figures))
    for phase in ("alone", "mixed"):
        assert figures[phase]["correct"] == figures[phase]["valid"] == 300  # as generate
    mixed = figures["mixed"]
    for name, want in mixed["expected"].items():
        assert mixed["hostile"][name] == {str(want): 4}, name
    assert mixed["hostile"]["client hangs up mid-stream"] == {"closed": 4}
    assert figures["end"] == {"slots_in_use": 0, "queue_depth": 0, "health": 200}
    rss = figures["rss_mb"]
    assert rss["peak_mixed"] - rss["idle"] < MAX_GROWTH_MB, rss
    assert "Traceback" not in figures["server_log_tail"]
