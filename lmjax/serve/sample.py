"""Loading the best checkpoint of a workdir for serving, and the `sample` command."""

import dataclasses

import jax

from lmjax.data.pipelines import LMData
from lmjax.data.tokenizers import Tokenizer
from lmjax.models import GPT
from lmjax.serve.generate import Decoder, SamplingParams, generate
from lmjax.train.trainer import TrainConfig, eval_set, gpt_task, restore_best


@dataclasses.dataclass
class Loaded:
    """A trained model ready to serve: float32 parameters on the host and its tokenizer."""

    model: GPT
    params: dict
    tokenizer: Tokenizer
    step: int
    eval_batches: list[dict]  # the fixed eval set training used


def load_best(*, workdir: str, model_config, data: LMData, config: TrainConfig, mesh, rules,
              on_ready=None) -> Loaded:
    """Runner for `entry.train`: the best checkpoint of workdir, read-only, gathered to host."""
    del on_ready
    setup, state, step = restore_best(workdir, model_config, config, mesh, rules)
    setup.checkpoints.close()
    params = jax.device_get(state.params)
    evals = eval_set(gpt_task(model_config, data), config)
    return Loaded(setup.model, params, data.tokenizer, step, evals)


def sample_best(*, prompt: str, max_new_tokens: int, temperature: float, top_k: int | None,
                seed: int, **runner_args) -> str:
    """Prints and returns `prompt` continued by the best checkpoint in workdir (KV-cached)."""
    loaded = load_best(**runner_args)
    ids = loaded.tokenizer.encode(prompt)
    if len(ids) == 0:
        raise ValueError("the prompt is empty; give at least one character")
    options = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature,
                             top_k=top_k or 0, seed=seed)
    out = generate(Decoder(loaded.model), loaded.params, [ids], options)[0]
    text = prompt + loaded.tokenizer.decode(out.tokens)
    print(text)
    return text
