"""Data configurations; gin binds them as `dataset`, `classify_dataset`, `pretrain_data`,
`finetune` and `distill` (for example `dataset.name = 'tiny_shakespeare'`)."""

import dataclasses


@dataclasses.dataclass(frozen=True)
class LMDataConfig:
    """Token streams of a single-document tfds dataset (lmjax.data.pipelines.load_lm_data)."""

    name: str = "tiny_shakespeare"
    tokenizer: str = "char"  # or "sentencepiece"
    vocab_size: int | None = None  # sentencepiece only
    tfds_dir: str | None = None  # default: $LMJAX_TFDS_DIR, else ~/tensorflow_datasets
    manual_dir: str | None = None  # default: $LMJAX_DATA_DIR/<corpus folder>


@dataclasses.dataclass(frozen=True)
class ClassifyDataConfig:
    """Padded examples of a text classification dataset (train and dev splits)."""

    name: str = "sst2"
    tokenizer: str = "sentencepiece"
    vocab_size: int | None = 8000
    max_length: int = 64
    lowercase: bool = False
    tfds_dir: str | None = None
    manual_dir: str | None = None


@dataclasses.dataclass(frozen=True)
class PretrainDataConfig:
    """BERT pretraining examples (NSP pairs, MLM masks) of offline tfds corpora."""

    sources: tuple[str, ...] = ("wikitext2", "tiny_shakespeare", "sst2")
    vocab_size: int = 8000
    max_seq_len: int = 128
    short_seq_prob: float = 0.1
    dupe_factor: int = 5
    nsp: bool = True  # next-sentence prediction; False: contiguous segments, MLM only
    whole_word_mask: bool = False  # mask all pieces of a word together
    # Short sequences first (BERT): the first `short_steps` batches are packed to
    # `short_seq_len` tokens, the rest to `max_seq_len` (evaluation always uses max_seq_len).
    short_seq_len: int | None = None
    short_steps: int = 0
    # Continued pretraining: start from this bert_pretrain run's best checkpoint (all
    # params) with its vocabulary, e.g. in-domain on `sources = ['sst2']`.
    init_workdir: str | None = None
    seed: int = 12345
    limit: int | None = None  # first documents of each source only (tests)
    tfds_dir: str | None = None

    def __post_init__(self):
        if self.short_seq_len is None and self.short_steps:
            raise ValueError("pretrain_data.short_steps is set but pretrain_data.short_seq_len "
                             "is not: bind both for a short-sequences-first schedule")
        if self.short_seq_len is not None:
            if not 5 <= self.short_seq_len < self.max_seq_len:
                raise ValueError(
                    f"pretrain_data.short_seq_len={self.short_seq_len} must be at least 5 (a "
                    f"pair of tokens and [CLS] [SEP] [SEP]) and below max_seq_len="
                    f"{self.max_seq_len}")
            if self.short_steps <= 0:
                raise ValueError("pretrain_data.short_seq_len needs pretrain_data.short_steps "
                                 f"> 0 (batches of short rows), got {self.short_steps}")


@dataclasses.dataclass(frozen=True)
class FinetuneConfig:
    """SST-2 for a BERT with the vocabulary of the pretraining run in `init_workdir`.

    With `init_params` the encoder starts from that run's best checkpoint; without, from
    a random initialisation (the same model trained from scratch, for comparison).
    """

    init_workdir: str | None = None
    init_params: bool = True
    max_length: int = 64
    limit: int | None = None  # first training sentences only (tests)
    tfds_dir: str | None = None


@dataclasses.dataclass(frozen=True)
class DistillConfig:
    """A teacher for `train.task = 'distill'` (lmjax/train/distill.py); the student's data
    are the `classify_dataset` bindings."""

    teacher_workdir: str | None = None  # a trained `classify` or `bert_finetune` run
    temperature: float = 2.0  # T: both sides' logits are divided by it in the soft term
    alpha: float = 0.5  # weight of the soft (teacher) term; 1 - alpha on the labels
    # The transfer set of Tang et al. (2019): up to `augment` new sentences per training
    # example (each word deleted with probability augment_drop, then with probability
    # augment_ngram only a random 1-5-word n-gram kept), taught by the teacher alone.
    augment: int = 0
    augment_drop: float = 0.1
    augment_ngram: float = 0.25
    augment_seed: int = 0

    def __post_init__(self):
        if self.augment < 0:
            raise ValueError(f"distill.augment must be >= 0 (copies per example), got "
                             f"{self.augment}")
        for name in ("augment_drop", "augment_ngram"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"distill.{name} is a probability in [0, 1), got "
                                 f"{getattr(self, name)}")


@dataclasses.dataclass(frozen=True)
class TranslationDataConfig:
    """Sentence pairs of a parallel corpus (lmjax.data.translation), bound as `translation`.

    Batches hold about `train.batch_size` tokens: pairs are grouped into length buckets
    (the longer side, EOS included, up to each bound in `buckets`) and each bucket's
    batches have as many rows as fit the budget (a multiple of `row_multiple`).
    """

    name: str = "multi30k"
    pair: str = "en-de"  # source-target languages
    vocab_size: int = 8000  # joint sentencepiece vocabulary of both sides' training text
    max_length: int = 128  # tokens per side, EOS included
    too_long: str = "truncate"  # or "reject": a longer sentence is cut (with a warning) or refused
    buckets: tuple[int, ...] = (12, 16, 20, 24, 32, 48, 64, 128)
    row_multiple: int = 8  # rows of every batch divide by this (the data-parallel degree)
    bleu_every: int = 0  # BLEU on the validation split every N steps (a multiple of
    #                     train.eval_every) and at the end; 0: at the end only
    bleu_limit: int | None = None  # first validation sentences only (None: all; 0: no BLEU)
    bleu_batch: int = 128  # rows of a decoding batch
    limit: int | None = None  # first training pairs only (tests)
    tfds_dir: str | None = None
    manual_dir: str | None = None
