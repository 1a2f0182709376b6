"""Commands load only their own stack; a new model is one module file plus one gin file.

This file is also the module of a toy model: `ToyLMConfig` registers itself in
lmjax.models.MODELS when the file is imported, which a gin file does with
`import test_commands` (the CLI runs with tests/ on PYTHONPATH).
"""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import jax
from flax import linen as nn

from lmjax.models import layers
from lmjax.models.registry import MODELS

REPO = Path(__file__).resolve().parent.parent
SERVING_STACK = ("fastapi", "uvicorn", "starlette", "pydantic", "openai", "prometheus_client")


@MODELS.register("ToyLMConfig")
@dataclasses.dataclass(frozen=True)
class ToyLMConfig:
    """A one-layer MLP language model over the current token (a bigram model)."""

    vocab_size: int = 65
    block_size: int = 16
    embed_dim: int = 32

    def module(self) -> nn.Module:
        return ToyLM(self)


class ToyLM(nn.Module):
    """tokens (batch, length) -> logits (batch, length, vocab), as the `lm` task expects."""

    config: ToyLMConfig

    @nn.compact
    def __call__(self, tokens: jax.Array, deterministic: bool = True) -> jax.Array:
        c = self.config
        x = nn.Embed(c.vocab_size, c.embed_dim,
                     embedding_init=layers.init(0.02, ("vocab", "embed")))(tokens)
        x = nn.gelu(layers.Dense((c.embed_dim,), ("embed", "mlp"), name="hidden")(x))
        return layers.Dense((c.vocab_size,), ("mlp", "vocab"), name="out")(x)


def _cli(*args: str, env: dict | None = None, blocked: tuple[str, ...] = ()):
    """`python -m lmjax.main ARGS` in a subprocess where importing `blocked` fails."""
    code = (f"import sys; sys.modules.update(dict.fromkeys({blocked!r})); "
            f"from lmjax.main import main; sys.argv = ['lmjax', *{args!r}]; main()")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1", **(env or {})}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)


def test_train_and_sample_run_without_the_serving_stack(tmp_path):
    """fastapi, uvicorn, starlette, pydantic, openai and prometheus_client cannot be
    imported in these processes: training, eval and sampling must not need them."""
    workdir = tmp_path / "run"
    tiny = "--gin_file=configs/experiments/shakespeare_char_tiny.gin"
    trained = _cli("train", f"--workdir={workdir}", tiny, blocked=SERVING_STACK)
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert "done: step 20" in trained.stdout
    sampled = _cli("sample", f"--workdir={workdir}", "--prompt=ROMEO:", "--max_new_tokens=5",
                   blocked=SERVING_STACK)
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert sampled.stdout.startswith("ROMEO:")
    blocked = _cli("serve", f"--workdir={workdir}", blocked=SERVING_STACK)
    assert blocked.returncode == 1  # the guard really works, and says what to install
    assert "fastapi is missing" in blocked.stderr and "[serve]" in blocked.stderr


def test_a_model_in_one_file_and_one_gin_file_trains_through_the_cli(tmp_path):
    gin_file = tmp_path / "toy.gin"
    gin_file.write_text("\n".join([
        "import test_commands",
        "include 'configs/data/shakespeare_char.gin'",
        "include 'configs/runs/train.gin'",
        "train.model = @ToyLMConfig()",
        "ToyLMConfig.embed_dim = 24",
        "train.num_steps = 30",
        "train.batch_size = 8",
        "train.warmup_steps = 2",
        "train.log_every = 10",
        "train.eval_every = 30",
        "train.eval_batches = 2",
        "train.checkpoint_every = 30",
    ]))
    workdir = tmp_path / "run"
    env = {"PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    result = _cli("train", f"--workdir={workdir}", f"--gin_file={gin_file}", env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [10, 20, 30]
    assert train[-1]["loss"] < train[0]["loss"]
    assert "ToyLMConfig.embed_dim = 24" in (workdir / "config.gin").read_text()
    evaluated = _cli("eval", f"--workdir={workdir}", env=env)  # config.gin imports it again
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert "eval: step 30" in evaluated.stdout
