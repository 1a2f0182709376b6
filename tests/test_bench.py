"""`python -m lmjax.main bench` on the tiny config, through the CLI's own code path.

Data comes from conftest's `offline_data` fixture: $LMJAX_DATA_DIR (else ../shared/data,
failing loudly when missing) and a per-session $LMJAX_TFDS_DIR. conftest also gives the
process 8 emulated CPU devices, so this runs data-parallel over 8 devices that share the
same cores: the measured peak must not be multiplied by 8 (MFU stays below 1).
"""

import json
import math
from pathlib import Path

import gin
import jax
import pytest

from lmjax import main

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "experiments" / "shakespeare_char_tiny.gin"


@pytest.fixture
def clean_gin():
    gin.clear_config()  # gin is global: start from and leave behind an empty config
    yield
    gin.clear_config()


def _expected_flops_per_token(c: dict) -> int:
    """By hand from the config: 6 * (block + final norm + tied lm head params) + attention."""
    d, layers, vocab = c["embed_dim"], c["num_layers"], c["padded_vocab"]
    hidden = 4 * d  # mlp_ratio 4, GELU, biases and LayerNorm (GPTConfig defaults)
    per_layer = (
        2 * (2 * d)  # two LayerNorms, scale + bias
        + d * 3 * d + 3 * d  # qkv
        + d * d + d  # attention output
        + d * hidden + hidden  # mlp up
        + hidden * d + d  # mlp down
    )
    n = layers * per_layer + 2 * d + vocab * d  # + final LayerNorm + tied output projection
    return 6 * n + 12 * layers * d * c["block_size"]


def test_bench_tiny(offline_data, clean_gin, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)  # the gin files include each other by repo-relative paths
    workdir = tmp_path / "run"
    result = main.run(["bench", f"--workdir={workdir}", f"--gin_file={TINY}",
                       "--bench_steps=3", "--collectives"])
    model = {name: gin.query_parameter(f"GPTConfig.{name}")
             for name in ("num_layers", "num_heads", "embed_dim", "block_size")}
    assert gin.query_parameter("train.batch_size") == result["batch_size"] == 8

    assert result["steps"] == 3
    assert result["devices"] == jax.device_count()
    assert math.isfinite(result["tokens_per_sec"]) and result["tokens_per_sec"] > 0
    assert result["tokens_per_sec"] == pytest.approx(8 * model["block_size"]
                                                     * result["steps_per_sec"])
    # 65 characters padded to the vocab_multiple of 64.
    expected = _expected_flops_per_token({**model, "padded_vocab": 128})
    assert (model["num_layers"], model["embed_dim"], model["block_size"]) == (2, 32, 32)
    assert result["flops_per_token"] == expected == 201_984
    assert 0 < result["mfu"] < 1
    assert result["peak_memory_bytes"] > 0
    assert math.isfinite(result["loss"])

    written = [p.relative_to(workdir) for p in workdir.rglob("*")] if workdir.exists() else []
    assert not [p for p in written if "checkpoint" in str(p)], written

    # Data parallel over 8 devices: XLA reduces the gradients over `data`; the code asks
    # for no collective itself.
    assert result["collectives"]["lowered"] == {}
    assert result["collectives"]["optimised"]["all_reduce over data"]["count"] >= 1

    lines = [x for x in capsys.readouterr().out.splitlines() if x.startswith("bench: ")]
    assert len(lines) == 1
    assert json.loads(lines[0][len("bench: "):])["flops_per_token"] == expected


def test_xla_count_is_not_used_for_a_scanned_stack():
    """Cost analysis counts a loop's body once: a scanned BERT's FLOPs would be one layer's."""
    from lmjax.models import BertConfig
    from lmjax.train.bench import _flop_count

    timing = {"xla_flops": 1e9}
    per_item, how = _flop_count(timing, None, BertConfig(scan_layers=False), 1000)
    assert (per_item, how) == (1e6, "XLA cost analysis")
    per_item, how = _flop_count(timing, None, BertConfig(scan_layers=True), 1000)
    assert math.isnan(per_item) and "scanned" in how
