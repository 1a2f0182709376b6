"""Greedy and beam-search decoding of an `EncoderDecoder`, batched and jitted.

The source is encoded once and the cross-attention keys and values computed once
(`EncoderDecoder.init_cache`); each step feeds one token per row through the decoder,
whose self-attention keys and values are cached as in the GPT's KV cache
(`layers.KVCache`). Decoding stops when every row has ended (early stop at EOS) or at
`max_length` tokens. Padding and the start token are never generated.

Beam search follows fairseq's (and GNMT's) recipe: each step extends every live
hypothesis by every token, keeps the 2 * beam best candidates, retires those among
the first `beam` that end in EOS, and continues with the `beam` best that do not. A
row is done once it has `beam` finished hypotheses. Finished hypotheses are ranked by
log-probability / lp(length) with GNMT's length penalty lp(n) = ((5 + n) / 6)^alpha
(n counts the tokens including EOS; alpha 0 ranks by log-probability alone). With
beam 1 this is exactly greedy decoding.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from lmjax.models.seq2seq import Seq2SeqConfig

NEG = -1e9  # the score of an impossible token or an empty beam slot


def length_penalty(length, alpha: float):
    """GNMT's lp(n) = ((5 + n) / 6)^alpha."""
    return ((5.0 + length) / 6.0) ** alpha


def _log_probs(config: Seq2SeqConfig, logits: jax.Array) -> jax.Array:
    """(rows, padded_vocab) logits -> (rows, vocab_size) log-probabilities over the tokens
    decoding may produce (padding and the start token get NEG)."""
    logits = logits[:, : config.vocab_size].astype(jnp.float32)
    banned = jnp.zeros(config.vocab_size, bool).at[jnp.array([config.pad_id,
                                                              config.bos_id])].set(True)
    logits = jnp.where(banned, NEG, logits)
    return jax.nn.log_softmax(logits, axis=-1)


def _start(model, params, src: jax.Array, rows_per_source: int, max_length: int):
    """(source mask, decoder cache) with each source repeated `rows_per_source` times."""
    encoded = model.apply({"params": params}, src, method="encode")
    src = jnp.repeat(src, rows_per_source, axis=0)
    encoded = jnp.repeat(encoded, rows_per_source, axis=0)
    cache = model.apply({"params": params}, encoded, max_length, method="init_cache")
    return model.apply({"params": params}, src, method="source_mask"), cache


def _step(model, params, cache, src_mask, tokens: jax.Array, index):
    """One cached decoder step: tokens (rows,) at position `index` -> (log-probs, cache)."""
    positions = jnp.full((tokens.shape[0], 1), index, jnp.int32)
    logits, cache = model.apply({"params": params}, tokens[:, None], None, src_mask,
                                cache=cache, positions=positions, method="decode")
    return _log_probs(model.config, logits[:, 0]), cache


@functools.lru_cache(maxsize=64)
def _greedy_fn(config: Seq2SeqConfig, max_length: int):
    model = config.module()

    def run(params, src):
        batch = src.shape[0]
        src_mask, cache = _start(model, params, src, 1, max_length)
        tokens = jnp.full((batch, max_length + 1), config.pad_id, jnp.int32)
        tokens = tokens.at[:, 0].set(config.bos_id)
        state = (jnp.int32(0), tokens, cache, jnp.zeros(batch, bool))

        def cond(s):
            return (s[0] < max_length) & ~jnp.all(s[3])

        def body(s):
            i, tokens, cache, done = s
            log_probs, cache = _step(model, params, cache, src_mask, tokens[:, i], i)
            nxt = jnp.where(done, config.pad_id, jnp.argmax(log_probs, -1).astype(jnp.int32))
            tokens = tokens.at[:, i + 1].set(nxt)
            return i + 1, tokens, cache, done | (nxt == config.eos_id)

        return jax.lax.while_loop(cond, body, state)[1][:, 1:]

    return jax.jit(run)


def greedy(config: Seq2SeqConfig, params, src: jax.Array, max_length: int) -> jax.Array:
    """Greedy decoding: src (batch, S) -> tokens (batch, max_length), padding after EOS."""
    return _greedy_fn(config, max_length)(params, src)


def _gather(x: jax.Array, index: jax.Array) -> jax.Array:
    """x (batch, n, ...) picked along axis 1 by index (batch, m) -> (batch, m, ...)."""
    index = index.reshape(index.shape + (1,) * (x.ndim - 2))
    return jnp.take_along_axis(x, index, axis=1)


def _reorder_cache(cache, origin: jax.Array, beam: int):
    """Self-attention caches follow their hypotheses to their new slots; the source's
    cross-attention keys and values are the same for every beam of a row."""
    flat = (jnp.arange(origin.shape[0])[:, None] * beam + origin).reshape(-1)
    return [(jax.tree.map(lambda x: x[flat], own), cross) for own, cross in cache]


@functools.lru_cache(maxsize=64)
def _beam_fn(config: Seq2SeqConfig, beam: int, alpha: float, max_length: int):
    model = config.module()
    k, vocab = beam, config.vocab_size

    def run(params, src):
        batch = src.shape[0]
        src_mask, cache = _start(model, params, src, k, max_length)
        seqs = jnp.full((batch, k, max_length + 1), config.pad_id, jnp.int32)
        seqs = seqs.at[:, :, 0].set(config.bos_id)
        live = jnp.full((batch, k), NEG).at[:, 0].set(0.0)  # one real hypothesis at first
        state = (jnp.int32(0), seqs, live, seqs, jnp.full((batch, k), NEG), cache)

        def cond(s):
            i, finished = s[0], s[4] > NEG / 2
            return (i < max_length) & ~jnp.all(jnp.sum(finished, axis=1) >= k)

        def body(s):
            i, seqs, live, fin_seqs, fin_scores, cache = s
            log_probs, cache = _step(model, params, cache, src_mask,
                                     seqs[:, :, i].reshape(-1), i)
            scores = (live[..., None] + log_probs.reshape(batch, k, vocab)).reshape(batch, -1)
            top, index = jax.lax.top_k(scores, 2 * k)  # (batch, 2k) candidates
            origin, token = index // vocab, (index % vocab).astype(jnp.int32)
            cand = _gather(seqs, origin).at[:, :, i + 1].set(token)
            ends = (token == config.eos_id) | (i + 1 == max_length)
            # Candidates among the first k that end are finished (fairseq); the others
            # that end are dropped, so beam 1 follows exactly the greedy path.
            retire = ends & (jnp.arange(2 * k) < k) & (top > NEG / 2)
            done = jnp.where(retire, top / length_penalty(i + 1.0, alpha), NEG)
            all_scores = jnp.concatenate([fin_scores, done], axis=1)
            fin_scores, pick = jax.lax.top_k(all_scores, k)
            fin_seqs = _gather(jnp.concatenate([fin_seqs, cand], axis=1), pick)
            live, pick = jax.lax.top_k(jnp.where(ends, NEG, top), k)
            cache = _reorder_cache(cache, _gather(origin, pick), k)
            return i + 1, _gather(cand, pick), live, fin_seqs, fin_scores, cache

        _, _, _, fin_seqs, fin_scores, _ = jax.lax.while_loop(cond, body, state)
        return fin_seqs[:, 0, 1:], fin_scores[:, 0]

    return jax.jit(run)


def beam_search(config: Seq2SeqConfig, params, src: jax.Array, *, beam: int = 4,
                alpha: float = 0.6, max_length: int) -> tuple[jax.Array, jax.Array]:
    """src (batch, S) -> (best tokens (batch, max_length), padding after EOS; their
    length-penalised scores (batch,))."""
    if beam < 1:
        raise ValueError(f"beam={beam}: give a beam of at least 1")
    if 2 * beam > beam * config.vocab_size:
        raise ValueError(f"beam={beam} needs a vocabulary of at least 2 tokens")
    return _beam_fn(config, beam, float(alpha), max_length)(params, src)


def strip(tokens: np.ndarray, config: Seq2SeqConfig) -> list[int]:
    """Decoded ids up to (without) the first EOS, padding removed."""
    out = []
    for t in np.asarray(tokens).tolist():
        if t == config.eos_id:
            break
        if t != config.pad_id:
            out.append(t)
    return out


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def decode_ids(config: Seq2SeqConfig, params, sources: list[np.ndarray], *, beam: int = 1,
               alpha: float = 0.6, batch_size: int = 64, length_multiple: int = 16,
               max_extra: int = 16) -> list[list[int]]:
    """Decodes token-id sources (each already within `config.max_len`) in batches of
    similar length: greedy for beam 1, else beam search. Returns ids per source, in order.

    Sources are padded to a multiple of `length_multiple` and batches to `batch_size`
    rows, so few shapes compile; the output may be up to 2 * that length + `max_extra`
    tokens (at most `config.max_len`).
    """
    order = sorted(range(len(sources)), key=lambda i: len(sources[i]))
    results: list[list[int]] = [[] for _ in sources]
    for start in range(0, len(order), batch_size):
        chosen = order[start : start + batch_size]
        width = min(_round_up(max(len(sources[i]) for i in chosen) or 1, length_multiple),
                    config.max_len)
        src = np.full((batch_size, width), config.pad_id, np.int32)
        for row, i in enumerate(chosen):
            src[row, : len(sources[i])] = sources[i]
        max_length = min(2 * width + max_extra, config.max_len)
        if beam == 1:
            out = greedy(config, params, jnp.asarray(src), max_length)
        else:
            out, _ = beam_search(config, params, jnp.asarray(src), beam=beam, alpha=alpha,
                                 max_length=max_length)
        out = np.asarray(out)
        for row, i in enumerate(chosen):
            results[i] = strip(out[row], config)
    return results
