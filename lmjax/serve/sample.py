"""Sampling text from a trained GPT (full recomputation over the last block of tokens)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from lmjax.data.pipelines import LMData
from lmjax.train.trainer import TrainConfig, restore_best


def _next_token(model, params, window, length, rng, temperature: float, top_k: int | None):
    """window: (1, block) tokens of which the first `length` are real."""
    logits = model.apply({"params": params}, window)[0, length - 1]  # (vocab,)
    if temperature == 0:
        return jnp.argmax(logits)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, min(top_k, model.config.vocab_size))[0][-1]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    return jax.random.categorical(rng, logits)


def generate(model: nn.Module, params, prompt: np.ndarray, max_new_tokens: int, *,
             temperature: float = 1.0, top_k: int | None = None, seed: int = 0) -> np.ndarray:
    """nanoGPT's `generate`: crop the context to the block size and sample one token at a time.

    The window has a fixed shape (1, block_size), padded at the end, so one compiled
    function serves every step; causal attention makes the padding invisible.
    """
    block = model.config.block_size
    step = jax.jit(functools.partial(_next_token, model, temperature=temperature, top_k=top_k))
    tokens = list(int(t) for t in prompt)
    if not tokens:
        raise ValueError("the prompt is empty; give at least one character")
    key = jax.random.key(seed)
    for i in range(max_new_tokens):
        context = tokens[-block:]
        window = np.zeros((1, block), np.int32)
        window[0, : len(context)] = context
        token = step(params, window, len(context), jax.random.fold_in(key, i))
        tokens.append(int(token))
    return np.asarray(tokens[len(prompt):], np.int32)


def sample_best(*, workdir: str, model_config, data: LMData, config: TrainConfig, mesh, rules,
                prompt: str, max_new_tokens: int, temperature: float, top_k: int | None,
                seed: int, on_ready=None) -> str:
    """Prints and returns `prompt` continued by the best checkpoint in workdir."""
    del on_ready
    setup, state, _ = restore_best(workdir, model_config, config, mesh, rules)
    setup.checkpoints.close()
    ids = data.tokenizer.encode(prompt)
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        out = generate(setup.model, state.params, ids, max_new_tokens,
                       temperature=temperature, top_k=top_k, seed=seed)
    text = prompt + data.tokenizer.decode(out)
    print(text)
    return text
