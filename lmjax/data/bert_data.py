"""BERT pretraining data: documents -> sentences -> NSP pairs -> MLM-masked batches.

Follows Devlin et al.'s `create_pretraining_data`: segment pairs are packed up to
`max_seq_len` (with probability `short_seq_prob` a shorter random target length, to
reduce the mismatch with short fine-tuning inputs); half the pairs continue the
document, half take segment B from another document. Masking picks 15% of the
non-special tokens (at least one, at most `max_predictions`) and replaces 80% of them
with [MASK], 10% with a random token and keeps 10%. Pairs are built once from a seed
(`dupe_factor` passes, each with new pairings); masks are drawn per batch from the
batch's index in the seeded stream (dynamic masking, as RoBERTa), so a resumed run and
every evaluation see exactly the same masks.

A batch is {"tokens", "segments" (batch, length); "masked_positions", "masked_labels",
"masked_weights" (batch, max_predictions); "nsp_labels", "nsp_weights" (batch,)}.
`nsp_labels` is 1 when B is a random segment. Rows built from single sentences (the
SST-2 phrases, extra MLM text) have `nsp_weight` 0.
"""

import dataclasses
import os
import re

import grain
import numpy as np

from lmjax.data import builders
from lmjax.data.tokenizers import SentencePieceTokenizer, load_tokenizer
from lmjax.parallel.distributed import batch_share

SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD, UNK, CLS, SEP, MASK = range(5)

# A sentence ends at . ! or ? before whitespace and an upper-case letter. Rule based and
# good enough for encyclopedia text and plays ("Mr. Smith" splits; WikiText's spaced-out
# decimals "3 @.@ 5" do not).
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def split_sentences(text: str) -> list[str]:
    """Sentences of a paragraph (rule based: see _SENTENCE_END)."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s.strip()]


def wikitext_documents(articles: list[str]) -> list[list[str]]:
    """Each article's paragraph sentences; section heading lines (` = = X = = `) dropped."""
    docs = []
    for body in articles:
        lines = [line for line in body.splitlines() if not line.startswith("=")]
        docs.append([s for line in lines for s in split_sentences(line)])
    return [d for d in docs if d]


def shakespeare_documents(text: str, speeches_per_document: int = 20) -> list[list[str]]:
    """Runs of consecutive speeches as documents (the file marks no scenes).

    A speech is a blank-line separated block `NAME:\\nline\\n...`; its lines are joined
    and split into sentences, the speaker's name kept as the first word.
    """
    speeches = [" ".join(block.split()) for block in text.split("\n\n") if block.strip()]
    docs = []
    for start in range(0, len(speeches), speeches_per_document):
        chunk = speeches[start : start + speeches_per_document]
        docs.append([s for speech in chunk for s in split_sentences(speech)])
    return [d for d in docs if d]


@dataclasses.dataclass
class Corpus:
    """Pretraining text: documents of sentences (NSP pairs) and loose sentences (MLM only)."""

    documents: list[list[str]]
    sentences: list[str]

    def texts(self):
        for doc in self.documents:
            yield from doc
        yield from self.sentences


def load_corpus(sources: tuple[str, ...], tfds_dir: str | None = None,
                limit: int | None = None) -> tuple[Corpus, Corpus]:
    """(train, held-out) corpora from prepared tfds datasets: every 10th document is held
    out, and a source of loose sentences holds out its validation split (SST-2 dev).

    `limit` keeps the first `limit` documents (and sentences) of each source, for tiny runs.
    """
    train, held = Corpus([], []), Corpus([], [])
    for name in sources:
        builders.prepare(name, tfds_dir)
        docs, sentences, held_sentences = _SOURCES[name](tfds_dir)
        docs = docs[:limit]
        train.documents += [d for i, d in enumerate(docs) if i % 10 != 9]
        held.documents += [d for i, d in enumerate(docs) if i % 10 == 9]
        train.sentences += sentences[:limit]
        held.sentences += held_sentences[:limit]
    return train, held


def _wikitext(tfds_dir):
    articles = []
    for split in ("validation", "test"):
        articles += [ex["text"].decode("utf-8")
                     for ex in builders.read_examples("wikitext2", split, tfds_dir)]
    return wikitext_documents(articles), [], []


def _shakespeare(tfds_dir):
    text = "".join(builders.read_text("tiny_shakespeare", s, tfds_dir)
                   for s in ("train", "validation", "test"))
    return shakespeare_documents(text), [], []


def _sst2(tfds_dir):
    """SST-2 sentences without labels, deduplicated, as MLM text: the training split to
    train on, the dev split held out (so an SST-2-only run has held-out text too)."""
    def sentences(split):
        rows = builders.read_examples("sst2", split, tfds_dir)
        return list(dict.fromkeys(ex["text"].decode("utf-8") for ex in rows))

    return [], sentences("train"), sentences("validation")


_SOURCES = {"wikitext2": _wikitext, "tiny_shakespeare": _shakespeare, "sst2": _sst2}


def bert_tokenizer(corpus: Corpus, vocab_size: int, directory: str | None = None):
    """A sentencepiece vocabulary with SPECIALS at ids 0-4, reused from `directory`."""
    if directory and os.path.exists(os.path.join(directory, "tokenizer.json")):
        tok = load_tokenizer(directory)
    else:
        tok = SentencePieceTokenizer.train_with_specials(corpus.texts(), vocab_size=vocab_size,
                                                         specials=SPECIALS)
        if directory:
            tok.save(directory)
    check_specials(tok)
    return tok


def check_specials(tok) -> None:
    pieces = [tok.id_to_piece(i) for i in range(len(SPECIALS))]
    if pieces != list(SPECIALS):
        raise ValueError(f"tokenizer's first ids are {pieces}, BERT needs {list(SPECIALS)}")


# --- NSP pairs ---------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PairConfig:
    max_seq_len: int = 128
    short_seq_prob: float = 0.1
    dupe_factor: int = 5
    # False: segment B always continues the document and no row has an NSP label
    # (RoBERTa drops next-sentence prediction; the MLM text is then all contiguous).
    nsp: bool = True


def _truncate_pair(a: list[int], b: list[int], max_tokens: int, rng) -> None:
    """BERT's truncate_seq_pair: drop from the front or back of the longer segment."""
    while len(a) + len(b) > max_tokens:
        longer = a if len(a) > len(b) else b
        del longer[0 if rng.random() < 0.5 else -1]


def _random_segment(docs, skip: int, target: int, rng) -> list[int]:
    other = int(rng.integers(len(docs) - 1))
    other += other >= skip  # any document but this one
    doc = docs[other]
    start = int(rng.integers(len(doc)))
    out: list[int] = []
    for sentence in doc[start:]:
        out += sentence
        if len(out) >= target:
            break
    return out


def _document_pairs(docs, index: int, config: PairConfig, rng) -> list[tuple]:
    """(segment A, segment B, is_random) pairs of one document (create_instances_from_document)."""
    doc, max_tokens = docs[index], config.max_seq_len - 3
    pairs, chunk, length, i = [], [], 0, 0
    target = max_tokens
    if rng.random() < config.short_seq_prob:
        target = int(rng.integers(2, max_tokens + 1))
    while i < len(doc):
        chunk.append(doc[i])
        length += len(doc[i])
        if i == len(doc) - 1 or length >= target:
            is_random = config.nsp and rng.random() < 0.5 and len(docs) > 1
            if len(chunk) == 1 and i + 1 < len(doc):
                i += 1  # a real next segment needs two sentences: take the next one too
                chunk.append(doc[i])
            if len(chunk) == 1:  # a lone last sentence has no next segment whatever the label
                break
            a_end = int(rng.integers(1, len(chunk))) if len(chunk) > 1 else 1
            a = [t for s in chunk[:a_end] for t in s]
            if is_random:
                # Unlike BERT's script the unused sentences are not put back: putting them
                # back makes random pairs more frequent than real ones (about 53:47 here).
                b = _random_segment(docs, index, target - len(a), rng)
            else:
                b = [t for s in chunk[a_end:] for t in s]
            _truncate_pair(a, b, max_tokens, rng)
            pairs.append((a, b, is_random))
            chunk, length = [], 0
            target = max_tokens
            if rng.random() < config.short_seq_prob:
                target = int(rng.integers(2, max_tokens + 1))
        i += 1
    return pairs


def _pack(a: list[int], b: list[int] | None, length: int) -> tuple[np.ndarray, np.ndarray]:
    """[CLS] A [SEP] (B [SEP]) padded to `length`; segment ids 0 for A, 1 for B."""
    tokens = [CLS, *a, SEP] + ([*b, SEP] if b is not None else [])
    segments = [0] * (len(a) + 2) + ([1] * (len(b) + 1) if b is not None else [])
    row, seg = np.zeros(length, np.int32), np.zeros(length, np.int32)
    row[: len(tokens)], seg[: len(segments)] = tokens, segments
    return row, seg


@dataclasses.dataclass
class Instances:
    """Packed, unmasked examples: tokens, segments (n, length); nsp labels, weights (n,)."""

    tokens: np.ndarray
    segments: np.ndarray
    nsp_labels: np.ndarray
    nsp_weights: np.ndarray

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict:
        return {"tokens": self.tokens[index], "segments": self.segments[index],
                "nsp_labels": self.nsp_labels[index], "nsp_weights": self.nsp_weights[index]}


def make_instances(docs: list[list[np.ndarray]], sentences: list[np.ndarray],
                   config: PairConfig, seed: int) -> Instances:
    """NSP pairs of tokenised documents plus MLM-only rows packed from loose sentences."""
    rng = np.random.default_rng(seed)
    docs = [[list(map(int, s)) for s in d if len(s)] for d in docs]
    docs = [d for d in docs if d]
    rows = []
    for _ in range(config.dupe_factor):
        for index in rng.permutation(len(docs)):
            for a, b, is_random in _document_pairs(docs, int(index), config, rng):
                rows.append((*_pack(a, b, config.max_seq_len), int(is_random),
                             float(config.nsp)))
    rows += [(*_pack(chunk, None, config.max_seq_len), 0, 0.0)
             for chunk in _chunks(sentences, config.max_seq_len - 2)]
    if not rows:
        raise ValueError("the pretraining corpus produced no examples; is it empty?")
    order = rng.permutation(len(rows))
    tokens, segments, labels, weights = zip(*(rows[i] for i in order), strict=True)
    return Instances(np.stack(tokens), np.stack(segments), np.asarray(labels, np.int32),
                     np.asarray(weights, np.float32))


def _chunks(sentences: list[np.ndarray], max_tokens: int):
    """Consecutive sentences concatenated up to `max_tokens` (longer ones truncated)."""
    chunk: list[int] = []
    for sentence in sentences:
        sentence = list(map(int, sentence[:max_tokens]))
        if chunk and len(chunk) + len(sentence) > max_tokens:
            yield chunk
            chunk = []
        chunk += sentence
    if chunk:
        yield chunk


# --- MLM masking -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MaskConfig:
    vocab_size: int
    special_ids: tuple[int, ...] = tuple(range(len(SPECIALS)))
    mask_prob: float = 0.15
    max_predictions: int = 20
    mask_id: int = MASK
    # Whole-word masking: ids whose piece starts a word (sentencepiece's "\u2581"); the
    # pieces of a word are masked together. None: pieces are drawn one by one.
    word_starts: tuple[bool, ...] | None = None


def _whole_words(tokens, candidate, draws, word_starts, wanted):
    """(positions in masking order, whether each one's whole word fits in `wanted`).

    A word is a piece that starts one (sentencepiece's "\u2581") and the continuation
    pieces after it; all its pieces share the draw of its first piece, so they come out
    together, and a word is masked only if all of its pieces fit (as BERT's whole-word
    masking skips a word that would pass the prediction budget)."""
    rows, length = tokens.shape
    index = np.broadcast_to(np.arange(length), tokens.shape)
    starts = np.asarray(word_starts)[tokens] | ~candidate
    starts[:, 0] = True
    first = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    keys = np.where(candidate, np.take_along_axis(draws, first, 1), np.inf)
    order = np.lexsort((index, keys), axis=1)
    word = np.take_along_axis(first, order, 1)
    is_last = np.ones((rows, length), bool)
    is_last[:, :-1] = word[:, :-1] != word[:, 1:]
    last = np.minimum.accumulate(np.where(is_last, index, length)[:, ::-1], axis=1)[:, ::-1]
    return order, last < wanted[:, None]


def mask_batch(batch: dict, rng: np.random.Generator, config: MaskConfig) -> dict:
    """Adds MLM inputs and targets to a batch of packed rows (see the module docstring)."""
    tokens = batch["tokens"]
    rows, length = tokens.shape
    candidate = ~np.isin(tokens, config.special_ids)
    count = candidate.sum(1)
    wanted = np.minimum(config.max_predictions,
                        np.maximum(1, np.floor(count * config.mask_prob + 0.5))).astype(int)
    wanted = np.minimum(wanted, count)
    draws = rng.random((rows, length))
    if config.word_starts is None:
        order = np.argsort(np.where(candidate, draws, np.inf), axis=1, kind="stable")
        fits = np.ones(order.shape, bool)
    else:
        order, fits = _whole_words(tokens, candidate, draws, config.word_starts, wanted)
    positions = order[:, : config.max_predictions]
    weights = (np.arange(positions.shape[1])[None] < wanted[:, None]) & \
        fits[:, : config.max_predictions]
    positions = np.where(weights, positions, 0).astype(np.int32)
    labels = np.where(weights, np.take_along_axis(tokens, positions, 1), 0).astype(np.int32)
    action = rng.random(positions.shape)
    ordinary = np.setdiff1d(np.arange(config.vocab_size), config.special_ids)
    random_ids = rng.choice(ordinary, positions.shape)
    new = np.where(action < 0.8, config.mask_id, np.where(action < 0.9, random_ids, labels))
    inputs = tokens.copy()
    row_index = np.broadcast_to(np.arange(rows)[:, None], positions.shape)
    inputs[row_index[weights], positions[weights]] = new[weights]
    return {**batch, "tokens": inputs, "masked_positions": positions, "masked_labels": labels,
            "masked_weights": weights.astype(np.float32)}


def pad_predictions(max_seq_len: int, mask_prob: float = 0.15) -> int:
    """BERT's max_predictions_per_seq for a length (20 for 128)."""
    return int(np.ceil(max_seq_len * mask_prob))


# --- grain pipelines ---------------------------------------------------------------


def _masked(instances: Instances, global_batch: int, seed: int, mask: MaskConfig):
    """This process's rows of each masked global batch. Every process masks the whole
    global batch (the masking draws depend on the batch, not the process count) and
    keeps its block."""
    index, count = batch_share(global_batch)
    ds = grain.MapDataset.source(instances).shuffle(seed=seed).repeat()
    ds = ds.batch(global_batch, drop_remainder=True)
    ds = ds.random_map(lambda batch, rng: mask_batch(batch, rng, mask), seed=seed + 1)
    if count == 1:
        return ds
    rows = slice(index * global_batch // count, (index + 1) * global_batch // count)
    return ds.map(lambda batch: {k: v[rows] for k, v in batch.items()})


def pretrain_iterator(instances: Instances, global_batch: int, seed: int, mask: MaskConfig):
    """Checkpointable iterator over masked training batches (read in the calling thread)."""
    options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    return iter(_masked(instances, global_batch, seed, mask).to_iter_dataset(options))


def pretrain_eval_batches(instances: Instances, global_batch: int, num_batches: int,
                          seed: int, mask: MaskConfig) -> list[dict]:
    """A fixed list of masked batches, the same at every evaluation."""
    ds = _masked(instances, global_batch, seed, mask)
    return [ds[i] for i in range(num_batches)]


class PhasedIterator:
    """`first` for the first `steps` batches, then `then` (the short-sequences-first
    schedule); checkpointable like grain's iterators, so a resumed run picks up in the
    right phase at the right batch."""

    def __init__(self, first, then, steps: int):
        self.first, self.then, self.steps, self.count = first, then, steps, 0

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        source = self.first if self.count < self.steps else self.then
        self.count += 1
        return next(source)

    def get_state(self) -> dict:
        return {"count": self.count, "first": self.first.get_state(),
                "then": self.then.get_state()}

    def set_state(self, state: dict) -> None:
        self.count = state["count"]
        self.first.set_state(state["first"])
        self.then.set_state(state["then"])


@dataclasses.dataclass
class ShortPhase:
    """Training rows packed to a shorter length, read for the first `steps` batches (BERT
    spent 90% of its steps on 128 tokens before going to 512)."""

    train: Instances
    mask: MaskConfig
    steps: int


@dataclasses.dataclass
class PretrainData:
    tokenizer: SentencePieceTokenizer
    train: Instances
    eval: Instances
    mask: MaskConfig
    short: ShortPhase | None = None

    def train_iterator(self, global_batch: int, seed: int):
        full = pretrain_iterator(self.train, global_batch, seed, self.mask)
        if self.short is None:
            return full
        short = pretrain_iterator(self.short.train, global_batch, seed, self.short.mask)
        return PhasedIterator(short, full, self.short.steps)


def load_pretrain_data(
    *,
    sources: tuple[str, ...] = ("wikitext2", "tiny_shakespeare", "sst2"),
    vocab_size: int = 8000,
    pairs: PairConfig = PairConfig(),
    whole_word_mask: bool = False,
    short_seq_len: int | None = None,
    short_steps: int = 0,
    seed: int = 12345,
    limit: int | None = None,
    tfds_dir: str | None = None,
    tokenizer_dir: str | None = None,
) -> PretrainData:
    """Corpus -> vocabulary (saved to `tokenizer_dir`) -> packed NSP pairs, train and held out;
    with `short_seq_len`, the training rows packed to that length too, for the first
    `short_steps` batches."""
    train, held = load_corpus(sources, tfds_dir, limit)
    tok = bert_tokenizer(train, vocab_size, tokenizer_dir)

    def encode_docs(docs):
        return [[tok.encode(s) for s in d] for d in docs]

    docs, sentences = encode_docs(train.documents), [tok.encode(s) for s in train.sentences]
    train_rows = make_instances(docs, sentences, pairs, seed)
    # Held-out text is the held-out documents; a corpus of loose sentences only (SST-2
    # alone, for continued pretraining) is scored on its held-out sentences instead. The
    # general corpus's figures stay those of held-out documents.
    held_sentences = [] if held.documents else held.sentences
    eval_rows = make_instances(encode_docs(held.documents),
                               [tok.encode(s) for s in held_sentences],
                               dataclasses.replace(pairs, dupe_factor=1), seed + 1)
    starts = None
    if whole_word_mask:
        starts = tuple(tok.id_to_piece(i).startswith("\u2581") for i in range(tok.vocab_size))
    mask = MaskConfig(vocab_size=tok.vocab_size, special_ids=tuple(tok.special_ids.tolist()),
                      max_predictions=pad_predictions(pairs.max_seq_len), word_starts=starts)
    short = None
    if short_seq_len is not None:
        short_pairs = dataclasses.replace(pairs, max_seq_len=short_seq_len)
        short_rows = make_instances(docs, sentences, short_pairs, seed)
        short_mask = dataclasses.replace(mask, max_predictions=pad_predictions(short_seq_len))
        short = ShortPhase(short_rows, short_mask, short_steps)
    return PretrainData(tok, train_rows, eval_rows, mask, short)
