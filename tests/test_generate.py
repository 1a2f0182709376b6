"""KV-cached decoding computes the same logits as recomputing the whole sequence."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from hypothesis import given, settings
from hypothesis import strategies as st

from lmjax.models import GPT, GPTConfig
from lmjax.models.transformer import stack_layers
from lmjax.serve.generate import (
    Decoder,
    SamplingParams,
    StopChecker,
    generate,
    sample_tokens,
)

CONFIG = GPTConfig(vocab_size=65, block_size=32, num_layers=2, num_heads=4, embed_dim=32)


@functools.cache
def _model(options=()):
    config = dataclasses.replace(CONFIG, **dict(options))
    model = GPT(config)
    init = jax.jit(lambda key: nn.unbox(model.init(key, jnp.zeros((1, 8), jnp.int32))))
    return model, init(jax.random.key(0))["params"]


@functools.cache
def _apply(model):
    return jax.jit(lambda params, tokens: model.apply({"params": params}, tokens))


def _full_logits(model, params, sequence):
    """Logits of the whole sequence recomputed without a cache (padded to the block:
    causal attention makes the padding invisible, and one shape compiles once)."""
    tokens = np.zeros((1, model.config.block_size), np.int32)
    tokens[0, : len(sequence)] = sequence
    return np.asarray(_apply(model)(params, tokens))[0, : len(sequence)]


@functools.cache
def _decoder(model):
    return Decoder(model)


ROPE_RMS_SWIGLU = (("position", "rope"), ("norm", "rmsnorm"), ("mlp", "swiglu"),
                   ("use_bias", False))


@pytest.mark.parametrize("options", [
    (), ROPE_RMS_SWIGLU, (("scan_layers", True),), (("scan_layers", True), *ROPE_RMS_SWIGLU),
])
def test_cached_decoding_equals_recomputation(options):
    """Batched prompts of lengths 3, 9 and 14, then 10 teacher-forced decode steps."""
    with jax.default_matmul_precision("highest"):  # GPUs default to TF32 matmuls
        _check_cached_decoding(*_model(options))


def _check_cached_decoding(model, params):
    decoder = _decoder(model)
    rng = np.random.default_rng(0)
    lengths = [3, 9, 14]
    sequences = [rng.integers(0, CONFIG.vocab_size, n + 10).tolist() for n in lengths]
    tokens = np.zeros((3, 16), np.int32)
    for i, n in enumerate(lengths):
        tokens[i, :n] = sequences[i][:n]
    cache = decoder.new_cache(3)
    logits, cache = decoder.prefill(params, cache, 0, tokens, np.zeros(3, np.int32),
                                    np.array(lengths, np.int32))
    got = [[np.asarray(logits[i])] for i in range(3)]
    pos = np.array(lengths, np.int32)
    for _ in range(10):
        step = np.array([sequences[i][pos[i]] for i in range(3)], np.int32)
        logits, cache = decoder.decode(params, cache, step, pos, np.ones(3, bool))
        for i in range(3):
            got[i].append(np.asarray(logits[i]))
        pos = pos + 1
    for i, n in enumerate(lengths):
        want = _full_logits(model, params, sequences[i][: n + 10])[n - 1 :, : CONFIG.vocab_size]
        np.testing.assert_allclose(np.stack(got[i])[:, : CONFIG.vocab_size], want,
                                   atol=1e-5, rtol=0)


def test_inactive_rows_are_untouched():
    """A decode step with active=False leaves that row's cache exactly as it was."""
    model, params = _model()
    decoder = _decoder(model)
    with jax.default_matmul_precision("highest"):  # as above: nothing new to compile
        cache = decoder.new_cache(3)
        tokens = np.arange(48, dtype=np.int32).reshape(3, 16) % 65
        _, cache = decoder.prefill(params, cache, 0, tokens, np.zeros(3, np.int32),
                                   np.array([5, 7, 2], np.int32))
        before = jax.tree.map(np.asarray, cache)
        _, cache = decoder.decode(params, cache, np.array([1, 2, 3], np.int32),
                                  np.array([5, 7, 2], np.int32), np.array([True, False, True]))
        after = jax.tree.map(np.asarray, cache)
    for b, a in zip(before, after, strict=True):
        np.testing.assert_array_equal(b.keys[1], a.keys[1])
        assert not np.array_equal(b.keys[0, :, 5], a.keys[0, :, 5])  # (batch, heads, pos, dim)


def test_prefill_of_one_row_in_either_cache_layout():
    """Prefilling row 1 of a filled cache (as generation does past the block) writes the
    same keys and values in the stacked cache of a scanned model as per layer, and
    leaves the other rows alone."""
    model, params = _model()
    scanned, _ = _model((("scan_layers", True),))
    stacked = stack_layers(params, CONFIG.num_layers)
    tokens = np.arange(48, dtype=np.int32).reshape(3, 16) % 65
    row = np.array([[7, 8, 9, 10, 11] + [0] * 11], np.int32)
    caches = []
    with jax.default_matmul_precision("highest"):
        for m, p in ((model, params), (scanned, stacked)):
            decoder = _decoder(m)
            _, cache = decoder.prefill(p, decoder.new_cache(3), 0, tokens,
                                       np.zeros(3, np.int32), np.array([5, 7, 2], np.int32))
            before = jax.tree.map(np.asarray, cache)
            logits, cache = decoder.prefill(p, cache, 1, row, np.zeros(1, np.int32),
                                            np.array([5], np.int32))
            cache = jax.tree.map(np.asarray, cache)
            caches.append((np.asarray(logits), cache))
            for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(cache), strict=True):
                rows = old.ndim - 4  # (..., batch, heads, max_length, head_dim)
                np.testing.assert_array_equal(np.delete(old, 1, rows), np.delete(new, 1, rows))
                assert not np.array_equal(np.take(old, 1, rows), np.take(new, 1, rows))
    (logits, per_layer), (scanned_logits, stacked_cache) = caches
    np.testing.assert_allclose(scanned_logits, logits, atol=1e-5, rtol=0)
    for i, layer in enumerate(per_layer):
        np.testing.assert_allclose(stacked_cache.keys[i], layer.keys, atol=1e-5, rtol=0)
        np.testing.assert_allclose(stacked_cache.values[i], layer.values, atol=1e-5, rtol=0)


def test_greedy_generation_equals_recomputed_argmax():
    model, params = _model()
    decoder = _decoder(model)
    prompts = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11]]
    out = generate(decoder, params, prompts, SamplingParams(max_new_tokens=12, temperature=0))
    for prompt, gen in zip(prompts, out, strict=True):
        seq = list(prompt)
        for _ in range(12):
            seq.append(int(np.argmax(_full_logits(model, params, seq)[-1, : CONFIG.vocab_size])))
        assert gen.tokens == seq[len(prompt):]
        assert gen.finish_reason == "length"


def test_generation_past_the_block_keeps_going():
    model, params = _model()
    out = generate(_decoder(model), params, [[1] * 30],
                   SamplingParams(max_new_tokens=40, temperature=0))
    assert len(out[0].tokens) == 40


def test_seed_fixes_the_sample_whatever_the_batch():
    """A request's tokens depend on its seed, not on the rows generated beside it."""
    model, params = _model()
    decoder = _decoder(model)
    opts = SamplingParams(max_new_tokens=8, temperature=1.0, seed=7)
    alone = generate(decoder, params, [[3, 4, 5]], opts)[0].tokens
    other = SamplingParams(max_new_tokens=8, temperature=1.0, seed=8)
    batched = generate(decoder, params, [[9, 9, 9, 9, 9], [3, 4, 5]], [other, opts])
    assert batched[1].tokens == alone
    assert generate(decoder, params, [[3, 4, 5]], other)[0].tokens != alone


def _draw(logits, n=400, **kw):
    batch = np.repeat(np.asarray(logits, np.float32)[None], n, axis=0)
    args = {"temperature": 1.0, "top_k": 0, "top_p": 1.0} | kw
    full = lambda v, dt: np.full(n, v, dt)  # noqa: E731
    out = sample_tokens(jnp.asarray(batch), full(args["temperature"], np.float32),
                        full(args["top_k"], np.int32), full(args["top_p"], np.float32),
                        np.arange(n, dtype=np.uint32), np.zeros(n, np.int32))
    return set(np.asarray(out).tolist())


def test_sampling_options():
    # probabilities 0.5, 0.25, 0.125, 0.0625, 0.0625
    logits = np.log([0.5, 0.25, 0.125, 0.0625, 0.0625])
    assert _draw(logits, temperature=0.0) == {0}
    assert _draw(logits) == {0, 1, 2, 3, 4}
    assert _draw(logits, top_k=2) == {0, 1}
    assert _draw(logits, top_p=0.7) == {0, 1}  # 0.5 < 0.7, 0.75 >= 0.7
    assert _draw(logits, top_p=0.8) == {0, 1, 2}
    assert _draw(logits, top_k=3, top_p=0.95) == {0, 1, 2}
    assert _draw(logits, temperature=0.05) == {0}  # sharpened to near greedy


def test_stop_strings_cut_the_text():
    model, params = _model()
    decoder = _decoder(model)
    detok = lambda ids: "".join(chr(97 + i % 26) for i in ids)  # noqa: E731
    free = generate(decoder, params, [[1, 2, 3]], SamplingParams(max_new_tokens=12, temperature=0),
                    detokenize=detok)[0]
    stop = free.text[4:6]
    cut = generate(decoder, params, [[1, 2, 3]],
                   SamplingParams(max_new_tokens=12, temperature=0, stop=(stop,)),
                   detokenize=detok)[0]
    assert cut.finish_reason == "stop"
    assert cut.text == free.text[: free.text.find(stop)]


def test_bad_sampling_options_name_the_field():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


@pytest.mark.parametrize("field, value", [
    ("top_k", 3_000_000_000),  # overflowed the sampler's int32 (`lmjax sample --top_k`)
    ("top_k", 2**31),
    ("top_k", -1),
    ("seed", -1),  # overflowed the sampler's uint32
    ("seed", 2**32),
    ("max_new_tokens", 10**9),
    ("max_new_tokens", 0),
    ("temperature", float("nan")),
    ("temperature", float("inf")),
    ("temperature", 2.5),
    ("top_p", float("nan")),
    ("stop", tuple("abcdefghijklmnopq")),  # 17 strings
    ("stop", ("x" * 257,)),
    ("stop", ["a list"]),
])
def test_sampling_options_out_of_range_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_sampling_options_at_their_bounds_are_accepted_and_sample():
    from lmjax.serve.generate import (
        MAX_STOP_CHARS,
        MAX_STOP_STRINGS,
        MAX_TEMPERATURE,
        MAX_TOP_K,
        SEED_LIMIT,
    )

    opts = SamplingParams(max_new_tokens=3, temperature=MAX_TEMPERATURE, top_k=MAX_TOP_K,
                          seed=SEED_LIMIT - 1, stop=("z" * MAX_STOP_CHARS,) * MAX_STOP_STRINGS)
    model, params = _model()
    detok = lambda ids: "".join(chr(97 + i % 26) for i in ids)  # noqa: E731
    out = generate(_decoder(model), params, [[1, 2, 3]], opts, detokenize=detok)[0]
    assert len(out.tokens) == 3 and out.finish_reason == "length"


def _first_stop(text, stops):
    """The reference: check the text as it grows one character at a time; the first
    length at which stop strings occur, the earliest of them."""
    for n in range(1, len(text) + 1):
        hits = [i for i in (text[:n].find(s) for s in stops if s) if i >= 0]
        if hits:
            return min(hits)
    return None


def _held(text, stops):
    """The reference: the longest end of text that is a proper prefix of a stop string."""
    return max((k for s in stops for k in range(1, len(s))
                if len(text) >= k and text.endswith(s[:k])), default=0)


@settings(max_examples=200, deadline=None)
@given(text=st.text("abc", max_size=40), stops=st.lists(st.text("abc", max_size=6), max_size=4),
       cuts=st.lists(st.integers(0, 40), max_size=8))
def test_stop_checker_agrees_with_searching_the_whole_text(text, stops, cuts):
    """Fed the text in arbitrary pieces (an automaton per stop string, reading each new
    character once), the checker finds what searching the whole text each time finds."""
    checker = StopChecker(stops)
    for n in sorted(set(cuts)) + [len(text)]:
        at = checker.find(text[:n])
        if at is not None:
            break
        assert checker.held() == _held(text[:n], stops)
    assert at == _first_stop(text, stops)


def test_stop_checker_reads_each_new_character_once():
    """The per-token cost stays flat as the text grows: 2,000 one-character steps read
    2,000 characters, with the most and longest stop strings allowed."""
    from lmjax.serve.generate import MAX_STOP_CHARS, MAX_STOP_STRINGS

    reads = []

    class Text(str):
        def __getitem__(self, index):
            if isinstance(index, int):
                reads.append(index)
            return str.__getitem__(self, index)

    stops = [("ab" * MAX_STOP_CHARS)[:MAX_STOP_CHARS - 1] + "z"] * MAX_STOP_STRINGS
    checker = StopChecker(stops)
    text = "ab" * 1000
    for n in range(1, len(text) + 1):
        assert checker.find(Text(text[:n])) is None
    assert sorted(reads) == list(range(len(text)))
    assert checker.held() == MAX_STOP_CHARS - 2  # "abab...ab" could begin each stop string


def test_stop_checker_rereads_a_rewritten_end():
    """A tokenizer may rewrite the end of the text (U+FFFD becomes the character once its
    last byte arrives); the checker reads the rewritten part again."""
    checker = StopChecker(["\u00e9t\u00e9"])
    assert checker.find("un \ufffd") is None
    assert checker.find("un \u00e9t\u00e9") == 3
