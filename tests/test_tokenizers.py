import json
import os
import random
import re

import numpy as np
import pytest

from lmjax.data.tokenizers import (
    CharTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
)

MIXED_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\tSpeak, speak! (yes); 'quoted' \"double\" -- 42% & $3.50?\n"
    "Caf\u00e9 na\u00efve \u00fcber \u2014 \u65e5\u672c\u8a9e \U0001f600 \u00a0end\n"
)

BERT_SPECIALS = {
    "pad_id": 0,
    "unk_id": 1,
    "bos_id": -1,
    "eos_id": -1,
    "pad_piece": "[PAD]",
    "unk_piece": "[UNK]",
    "user_defined_symbols": ("[CLS]", "[SEP]", "[MASK]"),
}


def make_corpus(num_lines: int = 3000, seed: int = 1234) -> list[str]:
    """Pseudo-sentences over a fixed syllable-built word list: no data files needed.

    The word list is the same for every seed; `seed` only picks the sentences.
    """
    word_rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ra", "ne", "tu", "shi", "po", "an", "el", "or", "ith"]
    syllables += ["ung", "qua", "ze", "be", "st", "gr", "ow", "ea", "ch", "th"]
    words = ["".join(word_rng.choices(syllables, k=word_rng.randint(1, 4))) for _ in range(600)]
    rng = random.Random(seed)
    lines = []
    for _ in range(num_lines):
        sentence = " ".join(rng.choices(words, k=rng.randint(3, 14)))
        lines.append(sentence.capitalize() + rng.choice(".!?;,"))
    return lines


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return make_corpus()


@pytest.fixture(scope="module")
def spm_tok(corpus: list[str]) -> SentencePieceTokenizer:
    return SentencePieceTokenizer.train(["\n".join(corpus)], vocab_size=300)


@pytest.fixture(scope="module")
def held_out() -> str:
    # Same generator, different seed: in-domain text the tokenizer was not trained on.
    return " ".join(make_corpus(num_lines=5, seed=99))


# ---------------------------------------------------------------- CharTokenizer


def test_char_vocab_matches_nanogpt_and_ids_match_reference() -> None:
    tok = CharTokenizer.from_text(MIXED_TEXT)
    chars = sorted(set(MIXED_TEXT))
    assert tok.chars == "".join(chars)
    assert tok.vocab_size == len(chars)
    stoi = {ch: i for i, ch in enumerate(chars)}
    sample = MIXED_TEXT[10:120] + MIXED_TEXT[-12:]
    np.testing.assert_array_equal(tok.encode(sample), [stoi[c] for c in sample])


def test_char_round_trip_unicode_newlines_punctuation() -> None:
    tok = CharTokenizer.from_text(MIXED_TEXT)
    ids = tok.encode(MIXED_TEXT)
    assert ids.dtype == np.int32 and ids.ndim == 1 and len(ids) == len(MIXED_TEXT)
    assert tok.decode(ids) == MIXED_TEXT
    assert tok.decode(ids.tolist()) == MIXED_TEXT
    assert tok.encode("").shape == (0,) and tok.decode([]) == ""


def test_char_handles_lone_surrogates_and_astral_chars() -> None:
    text = "a\ud800b\U0010ffff\U0001f600a"
    tok = CharTokenizer.from_text(text)
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size == 5


def test_char_matches_reference_on_large_ascii_text(corpus: list[str]) -> None:
    text = "\n".join(corpus)
    tok = CharTokenizer.from_text(text)
    stoi = {ch: i for i, ch in enumerate(sorted(set(text)))}
    np.testing.assert_array_equal(tok.encode(text), np.array([stoi[c] for c in text]))


def test_char_unknown_character_error_names_it() -> None:
    tok = CharTokenizer.from_text("hello world")
    with pytest.raises(ValueError, match="dataset") as info:
        tok.encode("hello \u00e9 world Z")
    assert "'\u00e9'" in str(info.value) and "'Z'" in str(info.value)


def test_char_bad_inputs() -> None:
    with pytest.raises(ValueError, match="duplicate"):
        CharTokenizer("abca")
    with pytest.raises(ValueError, match="non-empty"):
        CharTokenizer("")
    tok = CharTokenizer("abc")
    with pytest.raises(ValueError, match="out of range"):
        tok.decode([0, 3])
    with pytest.raises(ValueError, match="out of range"):
        tok.decode(np.array([-1]))
    with pytest.raises(ValueError, match="1-D"):
        tok.decode(np.zeros((2, 2), dtype=np.int32))


def test_char_save_load_round_trip(tmp_path) -> None:
    tok = CharTokenizer.from_text(MIXED_TEXT)
    directory = tmp_path / "nested" / "char"
    tok.save(str(directory))
    with open(directory / "tokenizer.json", encoding="utf-8") as f:
        assert json.load(f)["type"] == "char"
    loaded = load_tokenizer(str(directory))
    assert isinstance(loaded, CharTokenizer)
    assert loaded.chars == tok.chars
    np.testing.assert_array_equal(loaded.encode(MIXED_TEXT), tok.encode(MIXED_TEXT))


# ------------------------------------------------------- SentencePieceTokenizer


def test_spm_vocab_size_and_round_trip(spm_tok: SentencePieceTokenizer, held_out: str) -> None:
    assert isinstance(spm_tok, Tokenizer)
    assert spm_tok.vocab_size == 300
    ids = spm_tok.encode(held_out)
    assert ids.dtype == np.int32 and ids.ndim == 1
    assert ids.min() >= 0 and ids.max() < 300
    assert len(ids) < len(held_out) / 2  # subword units, not characters
    assert spm_tok.decode(ids) == held_out
    assert spm_tok.decode(ids.tolist()) == held_out


def test_spm_default_specials(spm_tok: SentencePieceTokenizer) -> None:
    assert (spm_tok.unk_id, spm_tok.bos_id, spm_tok.eos_id, spm_tok.pad_id) == (0, 1, 2, -1)
    assert spm_tok.id_to_piece(0) == "<unk>"
    assert spm_tok.piece_to_id("</s>") == 2
    assert spm_tok.piece_to_id("no-such-piece") == spm_tok.unk_id
    with pytest.raises(ValueError, match="out of range"):
        spm_tok.id_to_piece(300)


def test_spm_training_is_deterministic(corpus: list[str], held_out: str) -> None:
    a = SentencePieceTokenizer.train(corpus, vocab_size=250)
    b = SentencePieceTokenizer.train(iter(corpus), vocab_size=250)
    assert a.model_proto == b.model_proto
    np.testing.assert_array_equal(a.encode(held_out), b.encode(held_out))


def test_spm_bert_specials_get_requested_ids(corpus: list[str]) -> None:
    tok = SentencePieceTokenizer.train(corpus, vocab_size=200, **BERT_SPECIALS)
    assert tok.vocab_size == 200
    pieces = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert [tok.id_to_piece(i) for i in range(5)] == pieces
    assert [tok.piece_to_id(p) for p in pieces] == [0, 1, 2, 3, 4]
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, -1, -1)
    # User-defined symbols are matched as whole units inside text.
    assert 4 in tok.encode("Kalo [MASK] mira.").tolist()


def test_spm_bpe_and_long_lines(corpus: list[str]) -> None:
    # One 100k-character line with no newline: must be chunked, not silently dropped.
    long_line = " ".join(corpus)[:100_000]
    tok = SentencePieceTokenizer.train(long_line, vocab_size=200, model_type="bpe")
    assert tok.vocab_size == 200
    assert tok.decode(tok.encode(corpus[0])) == corpus[0]


def test_spm_save_load_round_trip(tmp_path, spm_tok: SentencePieceTokenizer, held_out: str) -> None:
    directory = tmp_path / "spm"
    spm_tok.save(str(directory))
    assert sorted(os.listdir(directory)) == ["spm.model", "tokenizer.json"]
    loaded = load_tokenizer(directory)
    assert isinstance(loaded, SentencePieceTokenizer)
    assert loaded.model_proto == spm_tok.model_proto
    np.testing.assert_array_equal(loaded.encode(held_out), spm_tok.encode(held_out))
    from_path = SentencePieceTokenizer(str(directory / "spm.model"))
    np.testing.assert_array_equal(from_path.encode(held_out), spm_tok.encode(held_out))


def test_spm_vocab_size_too_large_is_clear(corpus: list[str]) -> None:
    with pytest.raises(ValueError, match="lower vocab_size"):
        SentencePieceTokenizer.train(corpus[:50], vocab_size=50_000)


def test_spm_bad_training_inputs(corpus: list[str]) -> None:
    with pytest.raises(ValueError, match="raise vocab_size"):
        SentencePieceTokenizer.train(corpus, vocab_size=10)
    with pytest.raises(ValueError, match="no non-empty lines"):
        SentencePieceTokenizer.train(["", "\n\n  \n"], vocab_size=100)
    with pytest.raises(ValueError, match="distinct"):
        SentencePieceTokenizer.train(corpus, vocab_size=100, pad_id=0)
    with pytest.raises(ValueError, match="pad_id"):
        SentencePieceTokenizer.train(corpus, vocab_size=100, pad_id=100)
    with pytest.raises(ValueError, match="valid SentencePiece model"):
        SentencePieceTokenizer(b"not a model")


# ------------------------------------------------------------------- registry


def test_load_without_config_names_path(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        load_tokenizer(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path))):
        load_tokenizer(str(tmp_path))


def test_load_unknown_type(tmp_path) -> None:
    (tmp_path / "tokenizer.json").write_text(json.dumps({"type": "wordpiece"}))
    with pytest.raises(ValueError, match="unknown tokenizer type 'wordpiece'"):
        load_tokenizer(str(tmp_path))
