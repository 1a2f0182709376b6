"""The translation task (`train.task = 'seq2seq'`): an `EncoderDecoder` trained with
label-smoothed cross-entropy on length-bucketed batches, evaluated by token-level loss
and accuracy, and by BLEU and chrF of greedy translations of the validation split.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from lmjax.data import translation
from lmjax.data.config import TranslationDataConfig
from lmjax.models import decoding
from lmjax.train import text_metrics
from lmjax.train.tasks import Task, _rngs


def token_losses(logits: jax.Array, targets: jax.Array, vocab_size: int,
                 smoothing: float) -> tuple[jax.Array, jax.Array]:
    """(label-smoothed cross-entropy, plain negative log-likelihood) per token.

    logits (batch, length, padded_vocab); smoothing spreads `smoothing` of the mass
    uniformly over the `vocab_size` real tokens (Szegedy et al. 2016), never over the
    padded vocabulary."""
    logits = logits[..., :vocab_size]
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(log_probs, targets[..., None], axis=-1)[..., 0]
    if smoothing == 0:
        return nll, nll
    # -sum(smooth_labels(one_hot) * log_probs) without the (tokens, vocab) one-hot:
    # (1 - smoothing) * nll + smoothing * mean(-log_probs).
    uniform = -jnp.mean(log_probs, axis=-1)
    return (1.0 - smoothing) * nll + smoothing * uniform, nll


class Seq2SeqTask(Task):
    """Batches `{"src", "tgt_in", "tgt_out"}` (lmjax/data/translation.py); `batch_size`
    is the token budget of a batch (rows times bucket length)."""

    def __init__(self, config, data: translation.TranslationData | None = None,
                 data_config: TranslationDataConfig | None = None):
        self.config, self.data = config, data
        self.data_config = data_config or TranslationDataConfig()
        self.model = config.module()

    def init_args(self):
        return jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 8), jnp.int32)

    def _losses(self, params, batch, rng, deterministic):
        c = self.config
        logits = self.model.apply({"params": params}, batch["src"], batch["tgt_in"],
                                  deterministic=deterministic, rngs=_rngs(rng))
        smoothed, nll = token_losses(logits, batch["tgt_out"], c.vocab_size, c.label_smoothing)
        weights = (batch["tgt_out"] != c.pad_id).astype(jnp.float32)
        correct = (jnp.argmax(logits, -1) == batch["tgt_out"]) * weights
        return smoothed * weights, nll * weights, correct, weights

    def loss(self, params, batch, carry, rng, deterministic):
        smoothed, nll, correct, weights = self._losses(params, batch, rng, deterministic)
        tokens = jnp.maximum(weights.sum(), 1.0)
        metrics = {"nll": nll.sum() / tokens, "accuracy": correct.sum() / tokens,
                   "target_tokens": weights.sum()}
        return smoothed.sum() / tokens, (metrics, carry)

    def eval_sums(self, params, batch, carry):
        _, nll, correct, weights = self._losses(params, batch, None, True)
        return {"nll": nll.sum(), "correct": correct.sum(), "tokens": weights.sum()}, carry

    def finish_eval(self, sums):
        tokens = max(float(sums["tokens"]), 1.0)
        loss = float(sums["nll"]) / tokens
        return {"loss": loss, "accuracy": float(sums["correct"]) / tokens,
                "perplexity": float(np.exp(min(loss, 50.0)))}

    def train_iterator(self, batch_size, seed):
        d = self.data_config
        return translation.train_iterator(self.data.train, batch_size, d.buckets, seed,
                                          d.row_multiple)

    def eval_batches(self, batch_size, num_batches, seed):
        del seed  # the whole validation split, in a fixed order
        d = self.data_config
        return translation.eval_batches(self.data.eval, batch_size, d.buckets, num_batches,
                                        d.row_multiple)

    def items_per_step(self, batch_size):
        return batch_size  # the token budget (padded tokens of one side)

    def extra_eval(self, params, step: int, final: bool) -> dict:
        """BLEU and chrF of greedy translations of the validation split, every
        `bleu_every` steps and at the end (never with `bleu_limit` 0)."""
        every = self.data_config.bleu_every
        if self.data_config.bleu_limit == 0 or not (final or (every and step % every == 0)):
            return {}
        return self.translation_scores(params, self.data.eval.src, self.data.eval_references)

    def translation_scores(self, params, sources, references, beam: int = 1,
                           alpha: float = 0.6) -> dict:
        d = self.data_config
        limit = len(sources) if d.bleu_limit is None else d.bleu_limit
        hyps = translate_ids(self.config, params, sources[:limit], self.data.tokenizer,
                             beam=beam, alpha=alpha, batch_size=d.bleu_batch)
        scores = text_metrics.translation_scores(hyps, references[:limit])
        return {k: v for k, v in scores.items() if not k.endswith("signature")}


def translate_ids(config, params, sources, tokenizer, *, beam: int = 1, alpha: float = 0.6,
                  batch_size: int = 64) -> list[str]:
    """Detokenised translations of token-id sources (each ending in EOS). Every process
    of a multi-process job decodes the whole list with the whole parameters."""
    if jax.process_count() > 1:
        params = multihost_utils.process_allgather(params, tiled=True)
    out = decoding.decode_ids(config, jax.device_get(params), list(sources), beam=beam,
                              alpha=alpha, batch_size=batch_size)
    return [tokenizer.decode(np.asarray(ids, np.int32)).strip() if ids else "" for ids in out]
