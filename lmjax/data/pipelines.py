"""Language-model input pipelines: token streams cut into windows, through grain.

A batch is `{"inputs": (batch, length), "targets": (batch, length)}` int32, targets
shifted by one. Training windows start at every offset of the training stream, in a
seeded shuffled order (nanoGPT samples offsets at random); the iterator is a grain
iterator whose state is saved in checkpoints, so a resumed run reads the same batches.
"""

import dataclasses
import os
from collections.abc import Callable

import grain
import numpy as np

from lmjax.data import builders
from lmjax.data.tokenizers import (
    CharTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
)
from lmjax.parallel.distributed import batch_share


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


def process_batches(ds: grain.MapDataset, global_batch: int) -> grain.MapDataset:
    """Batches of this process's rows: its contiguous block of each global batch
    (lmjax.parallel.distributed.batch_share). The global batches, and so training, are the
    same for any number of processes; item k is always (a block of) global batch k."""
    index, count = batch_share(global_batch)
    return ds.batch(global_batch // count, drop_remainder=True)[index::count]


def window_examples(tokens: np.ndarray, length: int) -> grain.MapDataset:
    """Every window as {"inputs", "targets"} (length each), in stream order."""
    return grain.MapDataset.source(Windows(tokens, length)).map(_split_pair)


def window_batches(tokens: np.ndarray, length: int, global_batch: int, seed: int):
    """Endless grain MapDataset of this process's share of each global batch of windows."""
    ds = grain.MapDataset.source(Windows(tokens, length)).shuffle(seed=seed).repeat()
    return process_batches(ds, global_batch).map(_split_pair)


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


# Classification: padded token ids, a mask, a label and a weight per example.


@dataclasses.dataclass
class Examples:
    """Tokenised examples padded to one length. inputs, mask: (n, length); labels: (n,)."""

    inputs: np.ndarray
    mask: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        return {"inputs": self.inputs[index], "mask": self.mask[index],
                "label": self.labels[index], "weight": np.float32(1.0)}


@dataclasses.dataclass
class ClassificationData:
    tokenizer: Tokenizer
    train: Examples
    eval: Examples
    max_length: int
    num_classes: int = 2
    # The training split's texts as stored (before any lowercasing), and texts -> Examples
    # (labels 0) encoded like the splits, lowercasing included: what distillation's
    # transfer set needs (lmjax/train/distill.py), so a teacher and a student each apply
    # their own preprocessing. Absent for data built from token ids.
    train_texts: list[str] | None = None
    encode: Callable[[list[str]], Examples] | None = None


def pad_examples(ids: list[np.ndarray], labels: list[int], max_length: int,
                 pad_id: int = 0) -> Examples:
    """Truncates to `max_length` tokens and pads at the end with `pad_id` (mask False)."""
    inputs = np.full((len(ids), max_length), pad_id, np.int32)
    mask = np.zeros((len(ids), max_length), np.bool_)
    for row, seq in enumerate(ids):
        seq = seq[:max_length]
        inputs[row, : len(seq)] = seq
        mask[row, : len(seq)] = True
    if len(ids) and not mask[:, 0].all():
        empty = int(np.argmin(mask[:, 0]))
        raise ValueError(f"example {empty} has no tokens after tokenisation")
    return Examples(inputs, mask, np.asarray(labels, np.int32))


def classification_iterator(examples: Examples, global_batch: int, seed: int):
    """Checkpointable grain iterator over shuffled, repeated batches of this process's rows."""
    ds = grain.MapDataset.source(examples).shuffle(seed=seed).repeat()
    ds = process_batches(ds, global_batch)
    options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    return iter(ds.to_iter_dataset(options))


def classification_eval_batches(examples: Examples, global_batch: int,
                                max_batches: int) -> list[dict[str, np.ndarray]]:
    """All examples in their order (at most `max_batches` batches); the last batch is padded
    with weight-0 rows so each example counts exactly once."""
    share, count = batch_share(global_batch)
    local = global_batch // count
    batches = []
    for start in range(0, len(examples), global_batch):
        if len(batches) == max_batches:
            break
        index = np.arange(start, start + global_batch)
        rows = index[share * local : (share + 1) * local]
        real = rows < len(examples)
        take = np.where(real, rows, 0)
        batches.append({"inputs": examples.inputs[take], "mask": examples.mask[take],
                        "label": examples.labels[take], "weight": real.astype(np.float32)})
    return batches


def _classification_tokenizer(kind: str, train_texts: list[str], eval_texts: list[str],
                              vocab_size: int | None) -> Tokenizer:
    if kind == "char":
        # Vocabulary (not labels) from both splits, as nanoGPT's char vocab, so dev
        # characters unseen in training still encode.
        return CharTokenizer.from_text("".join(train_texts + eval_texts))
    if kind == "sentencepiece":
        if not vocab_size:
            raise ValueError("a sentencepiece tokenizer needs classify_dataset.vocab_size")
        # Trained on the train split only; id 0 is padding, 1 unknown.
        return SentencePieceTokenizer.train(train_texts, vocab_size=vocab_size, pad_id=0,
                                            unk_id=1, bos_id=-1, eos_id=-1, pad_piece="<pad>")
    raise ValueError(f"unknown tokenizer {kind!r}; use 'char' or 'sentencepiece'")


def load_classification_data(
    name: str,
    *,
    tokenizer: str = "sentencepiece",
    vocab_size: int | None = 8000,
    max_length: int = 64,
    tfds_dir: str | None = None,
    manual_dir: str | None = None,
    tokenizer_dir: str | None = None,
    lowercase: bool = False,
) -> ClassificationData:
    """Train and validation (dev) examples of a `text`/`label` tfds dataset, padded.

    The tokenizer is saved to `tokenizer_dir` and reused from there when present.
    """
    builders.prepare(name, tfds_dir, manual_dir)
    splits = {s: builders.read_examples(name, s, tfds_dir) for s in ("train", "validation")}
    texts = {s: [_text(e, lowercase) for e in rows] for s, rows in splits.items()}
    if tokenizer_dir and os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")):
        tok = load_tokenizer(tokenizer_dir)
    else:
        tok = _classification_tokenizer(tokenizer, texts["train"], texts["validation"],
                                        vocab_size)
        if tokenizer_dir:
            tok.save(tokenizer_dir)
    pad_id = getattr(tok, "pad_id", 0)
    pad_id = 0 if pad_id < 0 else pad_id

    def encode(lines: list[str], labels: list[int] | None = None) -> Examples:
        lines = [line.lower() for line in lines] if lowercase else lines
        labels = [0] * len(lines) if labels is None else labels
        return pad_examples([tok.encode(t) for t in lines], labels, max_length, pad_id)

    padded = {s: encode(texts[s], [int(e["label"]) for e in splits[s]]) for s in splits}
    return ClassificationData(tok, padded["train"], padded["validation"], max_length,
                              train_texts=[_text(e, False) for e in splits["train"]],
                              encode=encode)


def _text(example: dict, lowercase: bool) -> str:
    text = example["text"].decode("utf-8") if isinstance(example["text"], bytes) else \
        example["text"]
    return text.lower() if lowercase else text


# Streams for truncated BPTT: row r of every batch continues row r of the previous one.


class StreamChunks:
    """Random-access source: item k is chunk k of every row of the global batch.

    The token stream is cut into `rows` equal contiguous streams; chunk k of a row is
    its tokens [k * length, (k + 1) * length] (inputs and targets shifted by one).
    `resets` is True at the first token of each stream (and of each document, given
    `doc_starts`), where the model must forget its carry.
    """

    def __init__(self, tokens: np.ndarray, length: int, rows: int,
                 doc_starts: np.ndarray | None = None, row_slice: slice = slice(None)):
        per_row = len(tokens) // rows
        if per_row <= length:
            raise ValueError(f"{len(tokens)} tokens over {rows} rows leave {per_row} per row, "
                             f"too few for chunks of {length}; lower the batch size or length")
        self.rows = tokens[: rows * per_row].reshape(rows, per_row)[row_slice]
        starts = np.zeros(len(tokens), np.bool_)
        if doc_starts is not None:
            starts[np.asarray(doc_starts)] = True
        starts = starts[: rows * per_row].reshape(rows, per_row)[row_slice]
        starts[:, 0] = True
        self.starts, self.length = starts, length
        self.chunks = (per_row - 1) // length

    def __len__(self) -> int:
        return self.chunks

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        lo = index * self.length
        window = self.rows[:, lo : lo + self.length + 1]
        return {"inputs": window[:, :-1], "targets": window[:, 1:],
                "resets": self.starts[:, lo : lo + self.length]}


def _process_rows(global_batch: int) -> slice:
    index, count = batch_share(global_batch)
    local = global_batch // count
    return slice(index * local, (index + 1) * local)


def stream_iterator(tokens: np.ndarray, length: int, global_batch: int,
                    doc_starts: np.ndarray | None = None):
    """Checkpointable iterator over consecutive chunks, epoch after epoch."""
    source = StreamChunks(tokens, length, global_batch, doc_starts, _process_rows(global_batch))
    options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    return iter(grain.MapDataset.source(source).repeat().to_iter_dataset(options))


def stream_batches(tokens: np.ndarray, length: int, global_batch: int, max_batches: int,
                   doc_starts: np.ndarray | None = None) -> list[dict[str, np.ndarray]]:
    """The first `max_batches` consecutive chunks of a held-out stream (all by default)."""
    source = StreamChunks(tokens, length, global_batch, doc_starts, _process_rows(global_batch))
    return [source[k] for k in range(min(max_batches, len(source)))]
