"""Translation data: sentence pairs, a joint sentencepiece vocabulary, length-bucketed
batches of about a fixed number of tokens, through grain.

A batch is `{"src", "tgt_in", "tgt_out"}`, each (rows, bucket length) int32 padded with
`PAD`: the source ends in EOS, the decoder input starts with BOS and the decoder target
is the target followed by EOS. Pairs go to the smallest bucket that holds their longer
side; a bucket's batches have rows * length <= the token budget. Batch k of the
endless training stream is a pure function of (seed, k): each epoch shuffles the pairs
within buckets and the batches across buckets with its own seed, and the grain
iterator's state (the index k) is saved with checkpoints, so a resumed run reads the
same batches. Incomplete last batches are filled with all-padding rows (weight 0).
"""

import dataclasses
import functools
import os
import sys

import grain
import numpy as np

from lmjax.data import builders
from lmjax.data.tokenizers import SentencePieceTokenizer, Tokenizer, load_tokenizer
from lmjax.parallel.distributed import batch_share

PAD, UNK, BOS, EOS = 0, 1, 2, 3
TOO_LONG = ("truncate", "reject")
EPOCHS = 100_000  # the training stream's length in epochs: endless in practice


def language_pairs(languages: tuple[str, ...] = builders.MULTI30K_LANGUAGES) -> list[str]:
    return [f"{a}-{b}" for a in languages for b in languages if a != b]


def parse_pair(pair: str) -> tuple[str, str]:
    """'en-de' -> ('en', 'de'); an unknown pair raises ValueError naming the known ones."""
    if pair not in language_pairs():
        raise ValueError(f"unknown language pair {pair!r}; available: "
                         f"{', '.join(language_pairs())}")
    src, tgt = pair.split("-")
    return src, tgt


def train_tokenizer(texts: list[str], vocab_size: int) -> SentencePieceTokenizer:
    """A joint sentencepiece model of both sides' text: pad 0, unk 1, bos 2, eos 3."""
    return SentencePieceTokenizer.train(texts, vocab_size=vocab_size, pad_id=PAD, unk_id=UNK,
                                        bos_id=BOS, eos_id=EOS)


def fit_length(ids: np.ndarray, max_length: int, too_long: str, what: str) -> np.ndarray:
    """`ids` with EOS appended, cut to `max_length` (ending in EOS) or refused (ValueError
    naming `what`) when longer, as `too_long` says."""
    if too_long not in TOO_LONG:
        raise ValueError(f"too_long={too_long!r}; use one of {', '.join(TOO_LONG)}")
    if len(ids) + 1 > max_length:
        if too_long == "reject":
            raise ValueError(f"{what} has {len(ids) + 1} tokens with EOS, more than the "
                             f"maximum of {max_length}; shorten it or set too_long='truncate'")
        ids = ids[: max_length - 1]
    return np.append(np.asarray(ids, np.int32), EOS).astype(np.int32)


@dataclasses.dataclass
class Pairs:
    """Tokenised pairs: `src[i]` ends in EOS, `tgt[i]` is the target with EOS (no BOS)."""

    src: list[np.ndarray]
    tgt: list[np.ndarray]

    def __len__(self) -> int:
        return len(self.src)

    def lengths(self) -> np.ndarray:
        """The longer side of each pair (the decoder input is BOS + target minus EOS, as
        long as the target with EOS)."""
        return np.array([max(len(s), len(t)) for s, t in zip(self.src, self.tgt, strict=True)])


def encode_pairs(tokenizer: Tokenizer, src: list[str], tgt: list[str], max_length: int,
                 too_long: str, split: str) -> Pairs:
    """Encodes each side; sentences over `max_length` are cut (one warning with the count)
    or refused, naming the split and line."""
    out, cut = Pairs([], []), 0
    for line, (s, t) in enumerate(zip(src, tgt, strict=True), start=1):
        s_ids, t_ids = tokenizer.encode(s), tokenizer.encode(t)
        cut += (len(s_ids) + 1 > max_length) + (len(t_ids) + 1 > max_length)
        out.src.append(fit_length(s_ids, max_length, too_long, f"{split} line {line} (source)"))
        out.tgt.append(fit_length(t_ids, max_length, too_long, f"{split} line {line} (target)"))
    if cut:
        print(f"warning: {cut} sentences of the {split} split are longer than max_length="
              f"{max_length} tokens and were truncated", file=sys.stderr)
    return out


def bucket_rows(buckets: tuple[int, ...], budget: int, row_multiple: int) -> list[int]:
    """Rows of a batch per bucket: as many as fit `budget` tokens, a multiple of
    `row_multiple` (at least one multiple)."""
    return [max(row_multiple, budget // length // row_multiple * row_multiple)
            for length in buckets]


def assign_buckets(lengths: np.ndarray, buckets: tuple[int, ...]) -> np.ndarray:
    """The index of the smallest bucket that holds each length."""
    if len(lengths) and lengths.max() > buckets[-1]:
        raise ValueError(f"a pair of {lengths.max()} tokens is longer than the largest "
                         f"bucket {buckets[-1]}; add a bucket of max_length")
    return np.searchsorted(np.asarray(buckets), lengths, side="left")


def make_batch(pairs: Pairs, index: np.ndarray, rows: int, length: int) -> dict:
    """Pairs `index` padded to (rows, length); rows past len(index) are all padding."""
    batch = {k: np.full((rows, length), PAD, np.int32) for k in ("src", "tgt_in", "tgt_out")}
    for row, i in enumerate(index):
        src, tgt = pairs.src[i], pairs.tgt[i]
        batch["src"][row, : len(src)] = src
        batch["tgt_in"][row, : len(tgt)] = np.concatenate([[BOS], tgt[:-1]])
        batch["tgt_out"][row, : len(tgt)] = tgt
    return batch


class BucketedBatches:
    """Random-access source of batches: item k is batch k % n of epoch k // n, where the
    n batches of an epoch cover every pair once; each process reads its block of rows."""

    def __init__(self, pairs: Pairs, budget: int, buckets: tuple[int, ...], seed: int,
                 row_multiple: int = 8, shuffle: bool = True, epochs: int = EPOCHS):
        self.pairs, self.seed, self.shuffle, self.epochs = pairs, seed, shuffle, epochs
        self.buckets = tuple(buckets)
        self.rows = bucket_rows(self.buckets, budget, row_multiple)
        self.members = assign_buckets(pairs.lengths(), self.buckets)
        # This process's block of each bucket's rows, fixed now: the loading context
        # (parallel.distributed.loading_for) holds while the source is built, not when
        # the trainer reads batches.
        self.shares = [batch_share(rows) for rows in self.rows]
        counts = np.bincount(self.members, minlength=len(self.buckets))
        self.per_epoch = int(sum(-(-c // r) for c, r in zip(counts, self.rows, strict=True)))
        if self.per_epoch == 0:
            raise ValueError("no sentence pairs to batch")

    def __len__(self) -> int:
        return self.per_epoch * self.epochs

    @functools.lru_cache(maxsize=2)  # noqa: B019  (two epochs around a boundary)
    def plan(self, epoch: int) -> list[tuple[int, np.ndarray]]:
        """(bucket, pair indices) of each batch of `epoch`, in reading order."""
        rng = np.random.default_rng([self.seed, epoch])
        batches = []
        for b, rows in enumerate(self.rows):
            members = np.flatnonzero(self.members == b)
            if self.shuffle:
                members = rng.permutation(members)
            batches += [(b, members[i : i + rows]) for i in range(0, len(members), rows)]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        return batches

    def __getitem__(self, k: int) -> dict:
        bucket, index = self.plan(k // self.per_epoch)[k % self.per_epoch]
        rows = self.rows[bucket]
        batch = make_batch(self.pairs, index, rows, self.buckets[bucket])
        share, count = self.shares[bucket]
        local = rows // count
        return {key: v[share * local : (share + 1) * local] for key, v in batch.items()}


def train_iterator(pairs: Pairs, budget: int, buckets: tuple[int, ...], seed: int,
                   row_multiple: int = 8):
    """Checkpointable grain iterator (`get_state`/`set_state`) over training batches,
    read in the calling thread as the other pipelines are."""
    source = BucketedBatches(pairs, budget, buckets, seed, row_multiple)
    options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    return iter(grain.MapDataset.source(source).to_iter_dataset(options))


def eval_batches(pairs: Pairs, budget: int, buckets: tuple[int, ...], max_batches: int,
                 row_multiple: int = 8) -> list[dict]:
    """Every held-out pair once, bucketed in a fixed order (at most `max_batches`)."""
    source = BucketedBatches(pairs, budget, buckets, 0, row_multiple, shuffle=False, epochs=1)
    return [source[k] for k in range(min(len(source), max_batches))]


@dataclasses.dataclass
class TranslationData:
    """A language pair's tokenised train and validation splits, the validation text (for
    BLEU) and the joint tokenizer."""

    tokenizer: Tokenizer
    pair: tuple[str, str]
    train: Pairs
    eval: Pairs
    eval_sources: list[str]
    eval_references: list[str]


def read_split(name: str, split: str, pair: tuple[str, str],
               tfds_dir: str | None = None) -> tuple[list[str], list[str]]:
    """(source lines, target lines) of a prepared split, in the corpus's order (tfds
    stores examples shuffled)."""
    rows = sorted(builders.read_examples(name, split, tfds_dir), key=lambda r: int(r["idx"]))
    return [_text(r[pair[0]]) for r in rows], [_text(r[pair[1]]) for r in rows]


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def load_translation_data(*, name: str = "multi30k", pair: str = "en-de",
                          vocab_size: int = 8000, max_length: int = 128,
                          too_long: str = "truncate", limit: int | None = None,
                          tfds_dir: str | None = None, manual_dir: str | None = None,
                          tokenizer_dir: str | None = None) -> TranslationData:
    """Prepares the corpus if needed; trains the joint tokenizer on the training split's
    two sides (saved to `tokenizer_dir`, reused from there when present)."""
    languages = parse_pair(pair)
    builders.prepare(name, tfds_dir, manual_dir)
    train_src, train_tgt = read_split(name, "train", languages, tfds_dir)
    if limit is not None:
        train_src, train_tgt = train_src[:limit], train_tgt[:limit]
    eval_src, eval_tgt = read_split(name, "validation", languages, tfds_dir)
    if tokenizer_dir and os.path.exists(os.path.join(tokenizer_dir, "tokenizer.json")):
        tokenizer = load_tokenizer(tokenizer_dir)
    else:
        tokenizer = train_tokenizer(train_src + train_tgt, vocab_size)
        if tokenizer_dir:
            tokenizer.save(tokenizer_dir)
    train = encode_pairs(tokenizer, train_src, train_tgt, max_length, too_long, "train")
    held_out = encode_pairs(tokenizer, eval_src, eval_tgt, max_length, "truncate", "validation")
    return TranslationData(tokenizer, languages, train, held_out, eval_src, eval_tgt)
