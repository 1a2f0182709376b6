"""Language-model input pipelines: token streams cut into windows, through grain.

A batch is `{"inputs": (batch, length), "targets": (batch, length)}` int32, targets
shifted by one. Training windows start at every offset of the training stream, in a
seeded shuffled order (nanoGPT samples offsets at random); the iterator is a grain
iterator whose state is saved in checkpoints, so a resumed run reads the same batches.
"""

import dataclasses
import os

import grain
import jax
import numpy as np

from lmjax.data import builders
from lmjax.data.tokenizers import (
    CharTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
)


class Windows:
    """Random-access source: item i is tokens[i : i + length + 1]."""

    def __init__(self, tokens: np.ndarray, length: int):
        if len(tokens) <= length:
            raise ValueError(f"a stream of {len(tokens)} tokens is too short for length {length}")
        self.tokens = tokens
        self.length = length

    def __len__(self) -> int:
        return len(self.tokens) - self.length

    def __getitem__(self, index: int) -> np.ndarray:
        return self.tokens[index : index + self.length + 1]


def _split_pair(window: np.ndarray) -> dict[str, np.ndarray]:
    return {"inputs": window[..., :-1], "targets": window[..., 1:]}


def _local_batch(global_batch: int) -> int:
    count = jax.process_count()
    if global_batch % count:
        raise ValueError(f"batch size {global_batch} does not divide over {count} processes")
    return global_batch // count


def window_batches(tokens: np.ndarray, length: int, global_batch: int, seed: int):
    """Endless grain MapDataset of this process's share of each global batch of windows."""
    ds = grain.MapDataset.source(Windows(tokens, length)).shuffle(seed=seed).repeat()
    ds = ds[jax.process_index() :: jax.process_count()]
    return ds.batch(_local_batch(global_batch), drop_remainder=True).map(_split_pair)


def train_iterator(tokens: np.ndarray, length: int, global_batch: int, seed: int):
    """Checkpointable iterator (`get_state`/`set_state`) over training batches.

    Read in the calling thread: a batch costs under a millisecond, and prefetch threads
    would compete with XLA for the few cores of a CPU run.
    """
    options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    return iter(window_batches(tokens, length, global_batch, seed).to_iter_dataset(options))


def eval_batches(
    tokens: np.ndarray, length: int, global_batch: int, num_batches: int, seed: int
) -> list[dict[str, np.ndarray]]:
    """A fixed list of batches: the same windows at every evaluation, so evals compare."""
    ds = window_batches(tokens, length, global_batch, seed)
    return [ds[i] for i in range(num_batches)]


@dataclasses.dataclass
class LMData:
    """Token streams of a prepared dataset and the tokenizer that made them."""

    tokenizer: Tokenizer
    train: np.ndarray
    eval: np.ndarray


def _make_tokenizer(kind: str, train: str, held_out: str, vocab_size: int | None) -> Tokenizer:
    if kind == "char":
        # nanoGPT's shakespeare_char builds its vocabulary from the whole text.
        return CharTokenizer.from_text(train + held_out)
    if kind == "sentencepiece":
        if not vocab_size:
            raise ValueError("a sentencepiece tokenizer needs dataset.vocab_size")
        return SentencePieceTokenizer.train([train], vocab_size=vocab_size)  # train split only
    raise ValueError(f"unknown tokenizer {kind!r}; use 'char' or 'sentencepiece'")


def load_lm_data(
    name: str,
    *,
    tokenizer: str = "char",
    vocab_size: int | None = None,
    tfds_dir: str | None = None,
    manual_dir: str | None = None,
    tokenizer_dir: str | None = None,
) -> LMData:
    """Token streams of a single-document tfds dataset (prepared on first use).

    Evaluation reads validation + test together (for tiny_shakespeare, nanoGPT's 10% val
    split). The tokenizer is saved to `tokenizer_dir` and reused from there when present,
    so a resumed run and `sample` encode exactly as training did.
    """
    builders.prepare(name, tfds_dir, manual_dir)
    train = builders.read_text(name, "train", tfds_dir)
    held_out = "".join(builders.read_text(name, s, tfds_dir) for s in ("validation", "test"))
    if tokenizer_dir and os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")):
        tok = load_tokenizer(tokenizer_dir)
    else:
        tok = _make_tokenizer(tokenizer, train, held_out, vocab_size)
        if tokenizer_dir:
            tok.save(tokenizer_dir)
    return LMData(tok, tok.encode(train), tok.encode(held_out))
