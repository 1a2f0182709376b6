"""Shared by the serving benchmarks: load a trained workdir; make the workload."""

import dataclasses
import os
import sys

import numpy as np

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..")))

DEFAULT_WORKDIR = "runs/serve"  # trained by configs/experiments/shakespeare_char_serve.gin


def _config(workdir: str):
    """The run's TrainConfig, from its config.gin."""
    from lmjax import configs
    from lmjax.train.config import TrainConfig

    configs.parse([os.path.join(workdir, "config.gin")], [])
    return configs.bound(TrainConfig)


def load(workdir: str):
    """The best checkpoint of workdir as `lmjax.serve.sample.Loaded` (as `lmjax serve`
    loads it: config.gin, the tokenizer and the parameters)."""
    from lmjax.serve.sample import load_best

    return load_best(workdir, _config(workdir))


def eval_batches(workdir: str) -> list[dict]:
    """The fixed eval batches the training run evaluated on (reads the corpus)."""
    from lmjax.commands import build_task
    from lmjax.train.trainer import eval_set

    config = _config(workdir)
    return eval_set(build_task(config, workdir), config)


def eval_text(workdir: str, tokenizer) -> str:
    """The text of the run's eval batches, one row after another."""
    return "".join(tokenizer.decode(row) for b in eval_batches(workdir) for row in b["inputs"])


@dataclasses.dataclass(frozen=True)
class Workload:
    """Poisson arrivals with heavy-tailed (Pareto) prompt and output lengths."""

    arrivals: np.ndarray  # seconds from the start
    prompt_lengths: np.ndarray
    output_lengths: np.ndarray


def make_workload(num: int, rate: float, seed: int, *, prompt_min: int = 8,
                  prompt_max: int = 256, output_min: int = 4, output_max: int = 256,
                  alpha: float = 1.1) -> Workload:
    """Pareto(alpha) lengths (alpha near 1: a few requests are far longer than most),
    clipped to [min, max]; exponential inter-arrival gaps at `rate` requests/s."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1.0 / rate, num)

    def pareto(low, high):
        return np.clip((low * (1 + rng.pareto(alpha, num))).astype(int), low, high)

    return Workload(np.cumsum(gaps) - gaps[0], pareto(prompt_min, prompt_max),
                    pareto(output_min, output_max))


def prompts_from_text(text: str, lengths: np.ndarray, seed: int) -> list[str]:
    """Prompts cut from the corpus at random offsets, of the given lengths (characters)."""
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(text) - int(lengths.max()) - 1, len(lengths))
    return [text[s : s + n] for s, n in zip(starts, lengths, strict=True)]


def percentile(values, q: float) -> float:
    return float(np.percentile(np.asarray(values, float), q)) if len(values) else float("nan")
