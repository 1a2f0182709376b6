"""Data: tfds splits equal nanoGPT's, the vocabulary is nanoGPT's, iterators resume exactly."""

import os

import numpy as np
import pytest

from lmjax.data import builders
from lmjax.data.pipelines import Windows, eval_batches, load_lm_data, train_iterator


def _input_text() -> str:
    path = os.path.join(os.environ["LMJAX_DATA_DIR"], "tinyshakespeare", "input.txt")
    with open(path) as f:
        return f.read()


def test_splits_equal_nanogpt():
    """nanoGPT prepare.py: train = data[:int(n*0.9)], val = data[int(n*0.9):]."""
    text = _input_text()
    n = len(text)
    assert builders.read_text("tiny_shakespeare", "train") == text[: int(n * 0.9)]
    held_out = builders.read_text("tiny_shakespeare", "validation") + builders.read_text(
        "tiny_shakespeare", "test")
    assert held_out == text[int(n * 0.9):]


def test_char_vocabulary_and_streams():
    text = _input_text()
    data = load_lm_data("tiny_shakespeare")
    chars = sorted(set(text))
    assert data.tokenizer.vocab_size == len(chars) == 65
    stoi = {c: i for i, c in enumerate(chars)}
    n = int(len(text) * 0.9)
    np.testing.assert_array_equal(data.train[:1000], [stoi[c] for c in text[:1000]])
    assert len(data.train) == n and len(data.eval) == len(text) - n


def test_iterator_state_resumes_exactly():
    tokens = np.arange(1000, dtype=np.int32)
    it = train_iterator(tokens, 8, 4, seed=3)
    for _ in range(5):
        next(it)
    state = it.get_state()
    expected = [next(it) for _ in range(3)]
    resumed = train_iterator(tokens, 8, 4, seed=3)
    resumed.set_state(state)
    for want in expected:
        got = next(resumed)
        np.testing.assert_array_equal(got["inputs"], want["inputs"])
    batch = expected[0]
    assert batch["inputs"].shape == (4, 8)
    np.testing.assert_array_equal(batch["targets"][:, :-1], batch["inputs"][:, 1:])


def test_batches_are_seeded_and_eval_set_fixed():
    tokens = np.arange(1000, dtype=np.int32)
    a = next(train_iterator(tokens, 8, 4, seed=1))["inputs"]
    b = next(train_iterator(tokens, 8, 4, seed=2))["inputs"]
    assert not np.array_equal(a, b)
    first = eval_batches(tokens, 8, 4, 3, seed=5)
    second = eval_batches(tokens, 8, 4, 3, seed=5)
    for x, y in zip(first, second, strict=True):
        np.testing.assert_array_equal(x["inputs"], y["inputs"])


def test_too_short_stream_is_an_error():
    with pytest.raises(ValueError, match="too short"):
        Windows(np.arange(5), 8)


def test_sentencepiece_tokenizer_is_trained_on_train_split_and_saved(tmp_path):
    data = load_lm_data("tiny_shakespeare", tokenizer="sentencepiece", vocab_size=256,
                        tokenizer_dir=str(tmp_path / "tok"))
    assert data.tokenizer.vocab_size == 256
    assert (tmp_path / "tok" / "tokenizer.json").exists()
    again = load_lm_data("tiny_shakespeare", tokenizer="sentencepiece", vocab_size=256,
                         tokenizer_dir=str(tmp_path / "tok"))
    np.testing.assert_array_equal(again.eval[:500], data.eval[:500])
    assert len(data.train) < 0.7 * 1003854  # subword pieces, not characters
