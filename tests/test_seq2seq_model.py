"""The encoder-decoder against a NumPy transcription of its equations; padding, cached
decoding, greedy and beam search."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from lmjax.models import Seq2SeqConfig, decoding

TWO = Seq2SeqConfig(vocab_size=40, max_len=32, num_encoder_layers=2, num_decoder_layers=2,
                    num_heads=2, embed_dim=16, mlp_dim=32, dropout=0.1,
                    attention_dropout=0.1, attention="xla")
# One layer a side for the decoding tests: they compile several programs each.
TINY = Seq2SeqConfig(**{**TWO.__dict__, "num_encoder_layers": 1, "num_decoder_layers": 1})


def _forward(config):
    """jit(model.apply) on (params, src, tgt): eager op-by-op dispatch is slow on CPU."""
    model = config.module()
    return jax.jit(lambda p, src, tgt: model.apply({"params": p}, src, tgt))


def _params(config, seed=0, src_len=6, tgt_len=5):
    src = jnp.ones((1, src_len), jnp.int32)
    tgt = jnp.ones((1, tgt_len), jnp.int32)
    init = jax.jit(lambda key: config.module().init(key, src, tgt)["params"])
    return nn.unbox(init(jax.random.key(seed)))


# A plain NumPy transcription of the model's equations (float64).

def _ln(x, p, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def _softmax(s):
    s = s - s.max(-1, keepdims=True)
    e = np.exp(s)
    return e / e.sum(-1, keepdims=True)


def _attend(q, k, v, visible):
    """q (T, H, D), k, v (S, H, D), visible (T, S) -> (T, H, D)."""
    scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(q.shape[-1])
    scores = np.where(visible[None], scores, -1e30)
    return np.einsum("hts,shd->thd", _softmax(scores), v)


def _dense(x, p, in_axes=1):
    y = np.tensordot(x, p["kernel"], axes=in_axes)
    return y + p["bias"]


def _self_attn(x, p, visible):
    qkv = _dense(x, p["qkv"])  # (T, 3, H, D)
    return _dense(_attend(qkv[:, 0], qkv[:, 1], qkv[:, 2], visible), p["out"], 2)


def _cross_attn(x, ctx, p, visible):
    q, kv = _dense(x, p["q"]), _dense(ctx, p["kv"])
    return _dense(_attend(q, kv[:, 0], kv[:, 1], visible), p["out"], 2)


def _mlp(x, p):
    return _dense(np.maximum(_dense(x, p["up"]), 0.0), p["down"])


def _sublayer(c, x, norm, f):
    return x + f(_ln(x, norm)) if c.norm_position == "pre" else _ln(x + f(x), norm)


def _positions(c, p, n, table):
    if c.position == "learned":
        return p[table][:n]
    pos, i = np.arange(n)[:, None], np.arange(0, c.embed_dim, 2)[None]
    out = np.zeros((n, c.embed_dim))
    out[:, 0::2] = np.sin(pos / 10000 ** (i / c.embed_dim))
    out[:, 1::2] = np.cos(pos / 10000 ** (i / c.embed_dim))
    return out


def reference(c, params, src, tgt):
    """logits (T, vocab_size) of one source and decoder input, written out plainly."""
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    emb = p["embed"]["embedding"]
    real = src != c.pad_id
    x = emb[src] * np.sqrt(c.embed_dim) + _positions(c, p, len(src), "enc_wpe")
    for i in range(c.num_encoder_layers):
        b = p[f"encoder{i}"]
        x = _sublayer(c, x, b["norm1"], lambda h, b=b: _self_attn(
            h, b["attn"], np.broadcast_to(real, (len(src), len(src)))))
        x = _sublayer(c, x, b["norm2"], lambda h, b=b: _mlp(h, b["mlp"]))
    if c.norm_position == "pre":
        x = _ln(x, p["encoder_norm"])
    y = emb[tgt] * np.sqrt(c.embed_dim) + _positions(c, p, len(tgt), "dec_wpe")
    causal = np.tril(np.ones((len(tgt), len(tgt)), bool))
    for i in range(c.num_decoder_layers):
        b = p[f"decoder{i}"]
        y = _sublayer(c, y, b["norm1"], lambda h, b=b: _self_attn(h, b["attn"], causal))
        y = _sublayer(c, y, b["norm2"], lambda h, b=b: _cross_attn(
            h, x, b["cross"], np.broadcast_to(real, (len(tgt), len(src)))))
        y = _sublayer(c, y, b["norm3"], lambda h, b=b: _mlp(h, b["mlp"]))
    if c.norm_position == "pre":
        y = _ln(y, p["decoder_norm"])
    return y @ emb[: c.vocab_size].T


@pytest.mark.parametrize("norm_position,position", [("pre", "sinusoidal"), ("post", "learned")])
def test_model_equals_numpy_transcription(norm_position, position):
    config = Seq2SeqConfig(**{**TWO.__dict__, "norm_position": norm_position,
                              "position": position})
    params = _params(config, seed=1)
    src = np.array([[5, 9, 11, 7, 0, 0], [4, 6, 8, 10, 12, 14]], np.int32)
    tgt = np.array([[2, 13, 15, 17, 3], [2, 19, 21, 0, 0]], np.int32)
    got = _forward(config)(params, src, tgt)
    for row in range(2):
        want = reference(config, params, src[row], tgt[row])
        np.testing.assert_allclose(got[row, :, : config.vocab_size], want, rtol=1e-5, atol=1e-5)
    assert np.all(got[..., config.vocab_size:] < -1e30)  # padded vocabulary never scores


def test_padding_changes_nothing_it_should_not():
    forward, params = _forward(TINY), _params(TINY)
    src = jnp.array([[5, 9, 11, 7]])
    tgt = jnp.array([[2, 13, 15]])
    base = forward(params, src, tgt)
    padded = forward(params, jnp.pad(src, ((0, 0), (0, 5))), jnp.pad(tgt, ((0, 0), (0, 4))))
    np.testing.assert_allclose(padded[:, :3], base, rtol=1e-5, atol=1e-5)
    # A different source token does change the output: the mask hides padding only.
    other = forward(params, src.at[0, 3].set(8), tgt)
    assert np.abs(np.asarray(other - base)).max() > 1e-3


def test_cached_decoding_equals_full_decoder():
    model, params = TINY.module(), _params(TINY)
    src = jnp.array([[5, 9, 11, 7, 0], [4, 6, 8, 10, 12]])
    tgt = jnp.array([[2, 13, 15, 17, 19, 21], [2, 23, 25, 27, 29, 31]])
    full = _forward(TINY)(params, src, tgt)
    encoded = model.apply({"params": params}, src, method="encode")
    mask = model.apply({"params": params}, src, method="source_mask")
    cache = model.apply({"params": params}, encoded, 8, method="init_cache")
    step = jax.jit(lambda cache, tokens, positions: model.apply(
        {"params": params}, tokens, None, mask, cache=cache, positions=positions,
        method="decode"))
    steps = []
    for i in range(tgt.shape[1]):
        logits, cache = step(cache, tgt[:, i : i + 1], jnp.full((2, 1), i))
        steps.append(logits[:, 0])
    np.testing.assert_allclose(jnp.stack(steps, 1)[..., : TINY.vocab_size],
                               full[..., : TINY.vocab_size], rtol=1e-5, atol=1e-5)


def _src():
    return jnp.array([[5, 9, 11, 7, 0, 0], [4, 6, 8, 10, 12, 14], [30, 31, 0, 0, 0, 0]])


def test_beam_one_equals_greedy():
    params = _params(TINY, seed=3)
    greedy = decoding.greedy(TINY, params, _src(), 12)
    for alpha in (0.0, 0.6):
        beam, _ = decoding.beam_search(TINY, params, _src(), beam=1, alpha=alpha, max_length=12)
        np.testing.assert_array_equal(beam, greedy)


def _scores(config, params, src, hyps, alpha):
    """Length-penalised log-probabilities of `hyps` (all of length 3 or less) by the full
    (uncached) decoder, in one batch."""
    tgt = np.full((len(hyps), 3), config.pad_id, np.int32)
    for row, hyp in enumerate(hyps):
        tgt[row, : len(hyp)] = [config.bos_id, *hyp[:-1]]
    logits = _forward(config)(params, jnp.repeat(src[None], len(hyps), 0), tgt)
    log_probs = np.asarray(jax.vmap(lambda x: decoding._log_probs(config, x))(logits))
    return [sum(log_probs[row, i, t] for i, t in enumerate(hyp))
            / decoding.length_penalty(len(hyp), alpha) for row, hyp in enumerate(hyps)]


def test_beam_search_finds_the_exhaustive_best():
    """Vocabulary 6 (4 tokens can be generated), up to 3 tokens: 40 hypotheses."""
    config = Seq2SeqConfig(**{**TINY.__dict__, "vocab_size": 6})
    params = _params(config, seed=5)
    allowed = [t for t in range(6) if t not in (config.pad_id, config.bos_id, config.eos_id)]
    src = jnp.array([5, 4, 1, 0])
    hyps = [[config.eos_id]]
    for n in (1, 2, 3):
        hyps += [[*body, config.eos_id] if n < 3 else list(body)
                 for body in itertools.product(allowed, repeat=n)]
    for alpha in (0.0, 1.0):
        scores = _scores(config, params, src, hyps, alpha)
        best = int(np.argmax(scores))
        tokens, score = decoding.beam_search(config, params, src[None], beam=16, alpha=alpha,
                                             max_length=3)
        got = [t for t in np.asarray(tokens[0]).tolist() if t != config.pad_id]
        assert got == hyps[best], (got, hyps[best], alpha)
        np.testing.assert_allclose(float(score[0]), scores[best], rtol=1e-5)


def test_decode_ids_keeps_order_and_strips_eos():
    params = _params(TINY, seed=3)
    sources = [np.array([5, 9, 11, 7]), np.array([30, 31]), np.array([4, 6, 8, 10, 12, 14])]
    out = decoding.decode_ids(TINY, params, sources, beam=1, batch_size=4, length_multiple=4)
    direct = decoding.greedy(TINY, params, _src(), 12)
    for got, row in zip(out, np.asarray(direct)[[0, 2, 1]], strict=True):
        want = decoding.strip(row, TINY)
        n = min(len(got), len(want))  # the two ran to different maximum lengths
        assert got[:n] == want[:n] and n > 0
        assert TINY.eos_id not in got and TINY.pad_id not in got
