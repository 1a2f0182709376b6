"""Tokenizers: a small common interface, a character-level and a SentencePiece implementation.

Every tokenizer can `save` itself into a directory that holds a `tokenizer.json` naming its type;
`load_tokenizer` reads that file and dispatches to the right class, so training scripts and
evaluation code only need to pass a directory around.
"""

from __future__ import annotations

import abc
import io
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, ClassVar

import numpy as np
import sentencepiece as spm

CONFIG_FILE = "tokenizer.json"
SPM_MODEL_FILE = "spm.model"

PathLike = str | os.PathLike[str]


def _write_config(directory: PathLike, config: dict[str, Any]) -> None:
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def _read_config(directory: PathLike) -> dict[str, Any]:
    path = os.path.join(directory, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no tokenizer config at {path!r}; was the tokenizer saved there?")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    if not isinstance(config, dict) or "type" not in config:
        raise ValueError(f"{path!r} has no 'type' field naming the tokenizer class")
    return config


def _as_id_array(ids: Sequence[int] | np.ndarray, vocab_size: int) -> np.ndarray:
    """Validates ids for decoding: 1-D, integer, within the vocabulary."""
    arr = np.asarray(ids)
    if arr.size == 0:
        return np.zeros(0, dtype=np.int64)  # np.asarray([]) is float64; treat as no ids
    if arr.ndim != 1:
        raise ValueError(f"decode expects a 1-D sequence of ids, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"decode expects integer ids, got dtype {arr.dtype}")
    bad = (arr < 0) | (arr >= vocab_size)
    if bad.any():
        raise ValueError(f"ids out of range [0, {vocab_size}): {arr[bad][:10].tolist()}")
    return arr


class Tokenizer(abc.ABC):
    """Maps text to 1-D int32 id arrays and back; saves to / loads from a directory."""

    name: ClassVar[str]  # key in TOKENIZER_REGISTRY and the "type" field of tokenizer.json

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int: ...

    @abc.abstractmethod
    def encode(self, text: str) -> np.ndarray: ...

    @abc.abstractmethod
    def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...

    @abc.abstractmethod
    def save(self, directory: PathLike) -> None: ...

    @classmethod
    @abc.abstractmethod
    def load(cls, directory: PathLike) -> Tokenizer: ...


def _codepoints(text: str) -> np.ndarray:
    # UTF-32 gives one fixed-width code unit per Python character, so the whole text becomes a
    # uint32 array without a Python-level loop. surrogatepass keeps lone surrogates (valid in
    # Python strings) instead of raising.
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")


class CharTokenizer(Tokenizer):
    """One id per character, ids are positions in `chars` (nanoGPT shakespeare_char style)."""

    name: ClassVar[str] = "char"

    def __init__(self, chars: str) -> None:
        if not chars:
            raise ValueError("CharTokenizer needs a non-empty character vocabulary")
        if len(set(chars)) != len(chars):
            raise ValueError("CharTokenizer vocabulary contains duplicate characters")
        self._chars = chars
        self._codes_by_id = _codepoints(chars)
        # Sorted code points + their ids let encode use one vectorised searchsorted for any
        # unicode text (no 0x110000-entry table, no per-character Python loop).
        order = np.argsort(self._codes_by_id, kind="stable")
        self._sorted_codes = self._codes_by_id[order]
        self._sorted_ids = order.astype(np.int32)

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        """Builds the vocabulary as nanoGPT does: sorted(list(set(text))), ids by position."""
        return cls("".join(sorted(set(text))))

    @property
    def chars(self) -> str:
        return self._chars

    @property
    def vocab_size(self) -> int:
        return len(self._chars)

    def encode(self, text: str) -> np.ndarray:
        codes = _codepoints(text)
        pos = np.searchsorted(self._sorted_codes, codes)
        pos = np.minimum(pos, len(self._sorted_codes) - 1)  # past-the-end -> compare fails below
        known = self._sorted_codes[pos] == codes
        if not known.all():
            self._raise_unknown(codes[~known])
        return self._sorted_ids[pos]

    def _raise_unknown(self, codes: np.ndarray) -> None:
        unknown = np.unique(codes)
        shown = ", ".join(repr(chr(c)) for c in unknown[:20].tolist())
        more = f" (and {len(unknown) - 20} more)" if len(unknown) > 20 else ""
        raise ValueError(
            f"characters not in the vocabulary: {shown}{more}. The character vocabulary was built "
            f"from the dataset's text, so only characters that occur there can be encoded."
        )

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        arr = _as_id_array(ids, self.vocab_size)
        return self._codes_by_id[arr].tobytes().decode("utf-32-le", "surrogatepass")

    def save(self, directory: PathLike) -> None:
        _write_config(directory, {"type": self.name, "chars": self._chars})

    @classmethod
    def load(cls, directory: PathLike) -> CharTokenizer:
        config = _read_config(directory)
        return cls(config["chars"])


# SentencePiece silently drops training sentences longer than max_sentence_length (bytes). We cut
# long lines into chunks of at most this many characters; 4 bytes per character bounds the UTF-8
# length, so no chunk is ever dropped.
_MAX_CHUNK_CHARS = 4096
_MAX_SENTENCE_BYTES = 4 * _MAX_CHUNK_CHARS


def _chunk_line(line: str, limit: int = _MAX_CHUNK_CHARS) -> Iterator[str]:
    start = 0
    while len(line) - start > limit:
        # Prefer cutting at a space so the cut rarely splits a word into spurious pieces.
        cut = line.rfind(" ", start + 1, start + limit)
        end = cut if cut > start else start + limit
        yield line[start:end]
        start = end
    yield line[start:]


def _training_sentences(texts: Iterable[str]) -> Iterator[str]:
    if isinstance(texts, str):  # iterating a str would feed single characters to the trainer
        texts = [texts]
    for text in texts:
        for line in text.splitlines():
            if line.strip():
                yield from _chunk_line(line)


class SentencePieceTokenizer(Tokenizer):
    """Wraps a trained SentencePiece model (unigram or BPE).

    Note that SentencePiece's default normalisation (nmt_nfkc, collapsing whitespace, newlines
    become spaces) makes decode(encode(text)) lossy for such text; pass
    normalization_rule_name="identity" etc. through `train(**trainer_options)` if that matters.
    """

    name: ClassVar[str] = "sentencepiece"

    def __init__(self, model: PathLike | bytes) -> None:
        if isinstance(model, bytes):
            proto = model
        else:
            with open(model, "rb") as f:  # FileNotFoundError names the path
                proto = f.read()
        self.model_proto = proto  # the serialised model, as saved
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=proto)
        except RuntimeError as e:
            raise ValueError(f"not a valid SentencePiece model: {e}") from e
        sp = self._sp  # the special pieces' ids; -1 where the model has none
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = (
            sp.pad_id(), sp.unk_id(), sp.bos_id(), sp.eos_id())

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        *,
        vocab_size: int,
        model_type: str = "unigram",
        user_defined_symbols: Sequence[str] = (),
        control_symbols: Sequence[str] = (),
        pad_id: int = -1,
        unk_id: int = 0,
        bos_id: int = 1,
        eos_id: int = 2,
        pad_piece: str = "<pad>",
        unk_piece: str = "<unk>",
        bos_piece: str = "<s>",
        eos_piece: str = "</s>",
        character_coverage: float = 1.0,
        seed_sentencepiece_size: int = 1_000_000,
        num_threads: int = 1,
        **trainer_options: str | float | bool,
    ) -> SentencePieceTokenizer:
        """Trains in memory on the non-empty lines of `texts`.

        Special ids default to SentencePiece's (unk=0, bos=1, eos=2, no pad); an id of -1
        disables that special. BERT-style vocabularies: pad_id=0, pad_piece="[PAD]", unk_id=1,
        unk_piece="[UNK]", bos_id=eos_id=-1, user_defined_symbols=("[CLS]", "[SEP]", "[MASK]")
        gives ids 0..4. User-defined symbols are matched in input text; control symbols get ids
        but are never produced by encode (insert them yourself).

        Training is deterministic: the same texts and options give a byte-identical model.
        num_threads is part of that (unigram EM sums per-thread statistics, so scores change
        with the thread count), hence a fixed default rather than os.cpu_count().
        """
        special_ids = {"pad_id": pad_id, "unk_id": unk_id, "bos_id": bos_id, "eos_id": eos_id}
        _check_special_ids(vocab_size, special_ids)
        options: dict[str, Any] = dict(
            vocab_size=vocab_size,
            model_type=model_type,
            user_defined_symbols=list(user_defined_symbols),
            control_symbols=list(control_symbols),
            **special_ids,
            pad_piece=pad_piece,
            unk_piece=unk_piece,
            bos_piece=bos_piece,
            eos_piece=eos_piece,
            character_coverage=character_coverage,
            seed_sentencepiece_size=seed_sentencepiece_size,
            num_threads=num_threads,
            max_sentence_length=_MAX_SENTENCE_BYTES,
            minloglevel=2,  # the trainer's INFO logs go to stderr and drown test output
        )
        options.update(trainer_options)
        # Only sentence sampling (input_sentence_size > 0) draws random numbers; pin the global
        # seed so even that is reproducible.
        spm.set_random_generator_seed(0)
        writer = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=_training_sentences(texts), model_writer=writer, **options
            )
        except (RuntimeError, ValueError) as e:
            raise _training_error(e, vocab_size) from e
        return cls(writer.getvalue())

    @classmethod
    def train_with_specials(
        cls,
        texts: Iterable[str],
        *,
        vocab_size: int,
        specials: Sequence[str] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"),
        **options: Any,
    ) -> SentencePieceTokenizer:
        """A vocabulary whose first ids are `specials`, in order (BERT's [PAD] [UNK] ...).

        specials[0] is the padding piece and specials[1] the unknown piece; the rest are
        control symbols: they get ids but encode never produces them, so text that
        happens to contain "[SEP]" cannot forge a separator.
        """
        if len(specials) < 2 or len(set(specials)) != len(specials):
            raise ValueError(f"specials must be distinct and start with pad and unk: {specials}")
        return cls.train(
            texts, vocab_size=vocab_size, pad_id=0, pad_piece=specials[0], unk_id=1,
            unk_piece=specials[1], bos_id=-1, eos_id=-1, control_symbols=tuple(specials[2:]),
            **options,
        )

    @property
    def special_ids(self) -> np.ndarray:
        """Sorted ids of pieces that are not text: control (incl. padding), unknown, unused."""
        sp = self._sp
        ids = [i for i in range(self.vocab_size)
               if sp.is_control(i) or sp.is_unknown(i) or sp.is_unused(i)]
        return np.asarray(ids, dtype=np.int32)

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    def piece_to_id(self, piece: str) -> int:
        """Id of `piece`; unknown pieces map to unk_id, as in SentencePiece."""
        return self._sp.piece_to_id(piece)

    def id_to_piece(self, id_: int) -> str:
        if not 0 <= id_ < self.vocab_size:
            raise ValueError(f"id {id_} out of range [0, {self.vocab_size})")
        return self._sp.id_to_piece(id_)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.encode(text, out_type=int), dtype=np.int32)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        arr = _as_id_array(ids, self.vocab_size)
        return self._sp.decode(arr.tolist())  # the SWIG binding wants Python ints

    def save(self, directory: PathLike) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, SPM_MODEL_FILE), "wb") as f:
            f.write(self.model_proto)
        _write_config(directory, {"type": self.name, "model_file": SPM_MODEL_FILE})

    @classmethod
    def load(cls, directory: PathLike) -> SentencePieceTokenizer:
        config = _read_config(directory)
        return cls(os.path.join(directory, config.get("model_file", SPM_MODEL_FILE)))


def _check_special_ids(vocab_size: int, ids: dict[str, int]) -> None:
    # SentencePiece reports these mistakes only as a failed internal CHECK with no message.
    enabled = {name: i for name, i in ids.items() if i != -1}
    for name, i in enabled.items():
        if not 0 <= i < vocab_size:
            raise ValueError(f"{name}={i} must be -1 (disabled) or in [0, vocab_size={vocab_size})")
    if len(set(enabled.values())) != len(enabled):
        raise ValueError(f"special ids must be distinct (use -1 to disable one): {enabled}")


def _training_error(error: Exception, vocab_size: int) -> ValueError:
    message = str(error)
    if "Vocabulary size too high" in message:
        hint = f"vocab_size={vocab_size} is too large for this training text; lower vocab_size"
    elif "Vocabulary size is smaller" in message:
        hint = f"vocab_size={vocab_size} cannot hold all characters; raise vocab_size"
    elif "sentences_.empty()" in message:
        hint = "the training texts contain no non-empty lines"
    else:
        hint = "sentencepiece training failed"
    return ValueError(f"{hint} (sentencepiece: {message})")


TOKENIZER_REGISTRY: dict[str, type[Tokenizer]] = {
    cls.name: cls for cls in (CharTokenizer, SentencePieceTokenizer)
}


def load_tokenizer(directory: PathLike) -> Tokenizer:
    """Loads whichever tokenizer was saved into `directory` (see Tokenizer.save)."""
    kind = _read_config(directory)["type"]
    if kind not in TOKENIZER_REGISTRY:
        known = ", ".join(sorted(TOKENIZER_REGISTRY))
        raise ValueError(f"unknown tokenizer type {kind!r} in {directory!r}; known: {known}")
    return TOKENIZER_REGISTRY[kind].load(directory)
