"""BERT pretraining data: masking statistics, specials, NSP balance, packing, determinism."""

import numpy as np
import pytest

from lmjax.data import bert_data
from lmjax.data.bert_data import CLS, MASK, PAD, SEP, MaskConfig, PairConfig

VOCAB = 300


def _synthetic_docs(seed=0, num_docs=200):
    """Documents of 5-30 sentences of 3-25 ordinary tokens (ids >= 5)."""
    rng = np.random.default_rng(seed)
    return [[rng.integers(5, VOCAB, rng.integers(3, 26)) for _ in range(rng.integers(5, 31))]
            for _ in range(num_docs)]


@pytest.fixture(scope="module")
def instances():
    return bert_data.make_instances(_synthetic_docs(), [], PairConfig(max_seq_len=64,
                                                                      dupe_factor=2), seed=0)


def _masked_sample(instances, batches=120, batch=64):
    mask = MaskConfig(vocab_size=VOCAB, max_predictions=bert_data.pad_predictions(64))
    return bert_data.pretrain_eval_batches(instances, batch, batches, 7, mask)


def test_masking_statistics_over_a_large_sample(instances):
    batches = _masked_sample(instances)
    chosen = replaced_by_mask = kept = randomised = candidates = 0
    for b in batches:
        original = b["tokens"].copy()
        rows = np.arange(len(original))[:, None]
        w = b["masked_weights"].astype(bool)
        # Undo the masking to recover the original row, then compare.
        original[np.broadcast_to(rows, w.shape)[w], b["masked_positions"][w]] = \
            b["masked_labels"][w]
        candidates += (original >= 5).sum()
        now = b["tokens"][np.broadcast_to(rows, w.shape), b["masked_positions"]][w]
        labels = b["masked_labels"][w]
        chosen += w.sum()
        replaced_by_mask += (now == MASK).sum()
        kept += (now == labels).sum()
        randomised += ((now != MASK) & (now != labels)).sum()
        unmasked = np.ones_like(original, bool)
        unmasked[np.broadcast_to(rows, w.shape)[w], b["masked_positions"][w]] = False
        np.testing.assert_array_equal(b["tokens"][unmasked], original[unmasked])
    assert chosen > 50_000
    assert abs(chosen / candidates - 0.15) < 0.003, chosen / candidates
    assert abs(replaced_by_mask / chosen - 0.8) < 0.006
    # A random replacement equals the original with probability 1/295.
    assert abs(kept / chosen - (0.1 + 0.1 / (VOCAB - 5))) < 0.005
    assert abs(randomised / chosen - 0.1 * (1 - 1 / (VOCAB - 5))) < 0.005


def test_specials_are_never_masked_and_random_tokens_are_ordinary(instances):
    for b in _masked_sample(instances, batches=20):
        w = b["masked_weights"].astype(bool)
        assert np.all(b["masked_labels"][w] >= 5)  # never [PAD] [UNK] [CLS] [SEP] [MASK]
        rows = np.arange(len(w))[:, None]
        now = b["tokens"][np.broadcast_to(rows, w.shape), b["masked_positions"]][w]
        assert np.all((now == MASK) | (now >= 5))
        assert np.all(b["tokens"][:, 0] == CLS)
        assert np.all((b["tokens"] == SEP).sum(1) == 2)


def test_masks_are_deterministic_for_a_seed(instances):
    a, b = _masked_sample(instances, batches=3), _masked_sample(instances, batches=3)
    for x, y in zip(a, b, strict=True):
        for key in x:
            np.testing.assert_array_equal(x[key], y[key])
    mask = MaskConfig(vocab_size=VOCAB, max_predictions=10)
    other = bert_data.pretrain_eval_batches(instances, 64, 1, 8, mask)[0]
    assert not np.array_equal(other["masked_positions"], a[0]["masked_positions"])


def test_nsp_labels_are_balanced_and_real_pairs_continue_the_document():
    docs = _synthetic_docs(seed=1, num_docs=400)
    inst = bert_data.make_instances(docs, [], PairConfig(max_seq_len=64, dupe_factor=3), 3)
    assert len(inst) > 4000
    assert abs(inst.nsp_labels.mean() - 0.5) < 0.02, inst.nsp_labels.mean()
    # Real pairs: A followed by B is a contiguous run of one document's tokens.
    streams = [np.concatenate(d) for d in docs]
    index = {}
    for k, s in enumerate(streams):
        for pos in range(len(s) - 3):
            index.setdefault(tuple(s[pos:pos + 4]), set()).add(k)
    same = {0: [], 1: []}
    for row, seg, label in zip(inst.tokens[:600], inst.segments[:600], inst.nsp_labels[:600],
                               strict=True):
        a = row[(seg == 0) & (row != PAD)][1:-1]
        b = row[(seg == 1) & (row != PAD)][:-1]
        if len(a) >= 4 and len(b) >= 4:
            da, db = index.get(tuple(a[-4:]), set()), index.get(tuple(b[:4]), set())
            same[int(label)].append(bool(da & db))
    assert len(same[0]) > 100 and all(same[0]), "a real next segment is from A's document"
    assert len(same[1]) > 100 and not any(same[1]), "a random segment is from another one"


def test_packing_respects_max_len_and_short_sequence_probability():
    docs = _synthetic_docs(seed=2, num_docs=300)
    long = bert_data.make_instances(docs, [], PairConfig(max_seq_len=64, short_seq_prob=0.0), 0)
    short = bert_data.make_instances(docs, [], PairConfig(max_seq_len=64, short_seq_prob=0.5), 0)
    lengths = lambda inst: (inst.tokens != PAD).sum(1)  # noqa: E731
    assert lengths(long).max() <= 64 and lengths(short).max() <= 64
    # Shorter targets make more, shorter pairs.
    assert lengths(short).mean() < lengths(long).mean() - 5
    assert np.mean(lengths(long) >= 48) > 0.8


def test_loose_sentences_become_mlm_only_rows():
    sentences = [np.arange(5, 5 + n) for n in (10, 20, 30, 40)]
    inst = bert_data.make_instances([], sentences, PairConfig(max_seq_len=64), 0)
    assert np.all(inst.nsp_weights == 0) and np.all(inst.segments == 0)
    assert sorted((inst.tokens != PAD).sum(1).tolist()) == [42, 62]  # [CLS] ... [SEP]


def test_sentence_splitting():
    text = 'He left . The rest stayed ; " Who ? " she asked . Done in 3 @.@ 5 km .'
    assert bert_data.split_sentences(text) == [
        "He left .", 'The rest stayed ; " Who ? " she asked .', "Done in 3 @.@ 5 km .",
    ]
    speech = "ROMEO: But soft! What light through yonder window breaks? It is the east."
    assert len(bert_data.split_sentences(speech)) == 3


def _word_starts(seed=3):
    """A vocabulary where about a third of the ordinary ids continue a word."""
    starts = np.random.default_rng(seed).random(VOCAB) > 0.35
    starts[:5] = True
    return tuple(bool(s) for s in starts)


def test_whole_word_masking_takes_every_piece_of_a_word(instances):
    starts = _word_starts()
    mask = MaskConfig(vocab_size=VOCAB, max_predictions=bert_data.pad_predictions(64),
                      word_starts=starts)
    chosen = candidates = 0
    for b in bert_data.pretrain_eval_batches(instances, 64, 20, 7, mask):
        w = b["masked_weights"].astype(bool)
        for row in range(len(w)):
            original = b["tokens"][row].copy()
            picked = b["masked_positions"][row][w[row]]
            original[picked] = b["masked_labels"][row][w[row]]
            ordinary = original >= 5
            word = np.cumsum(np.asarray(starts)[original] | ~ordinary)
            masked = np.zeros(len(original), bool)
            masked[picked] = True
            for index in np.unique(word[ordinary]):
                pieces = ordinary & (word == index)
                assert masked[pieces].all() or not masked[pieces].any()
            assert masked.sum() <= mask.max_predictions
            chosen += masked.sum()
            candidates += ordinary.sum()
    # Words that would pass the budget are skipped, so a little under 15% is masked.
    assert 0.11 < chosen / candidates <= 0.15


def test_without_nsp_segment_b_always_continues_and_nothing_is_scored():
    docs = _synthetic_docs(seed=2, num_docs=100)
    inst = bert_data.make_instances(docs, [], PairConfig(max_seq_len=64, nsp=False), 0)
    assert len(inst) > 100
    assert not inst.nsp_labels.any() and not inst.nsp_weights.any()


def test_short_sequences_first_then_full_length_and_resumes_across_the_switch():
    """The phased iterator reads `steps` batches of short rows, then full-length ones (the
    same batches a run without the schedule reads), and a restored state continues
    exactly, across the switch too."""
    docs = _synthetic_docs(seed=4, num_docs=60)
    mask = MaskConfig(vocab_size=VOCAB, max_predictions=bert_data.pad_predictions(64))
    full = bert_data.make_instances(docs, [], PairConfig(max_seq_len=64), 0)
    short = bert_data.make_instances(docs, [], PairConfig(max_seq_len=16), 0)
    phase = bert_data.ShortPhase(short, MaskConfig(vocab_size=VOCAB, max_predictions=3), 3)
    data = bert_data.PretrainData(None, full, full, mask, phase)
    batches = list(zip(range(6), data.train_iterator(8, seed=5), strict=False))
    assert [b["tokens"].shape for _, b in batches] == [(8, 16)] * 3 + [(8, 64)] * 3
    assert [b["masked_positions"].shape[1] for _, b in batches] == [3] * 3 + [10] * 3
    plain = bert_data.PretrainData(None, full, full, mask).train_iterator(8, seed=5)
    for (_, got), want in zip(batches[3:], plain, strict=False):
        np.testing.assert_array_equal(got["tokens"], want["tokens"])
    for stop in (2, 4):  # before and after the switch
        first = data.train_iterator(8, seed=5)
        for _ in range(stop):
            next(first)
        resumed = data.train_iterator(8, seed=5)
        resumed.set_state(first.get_state())
        for index in range(stop, 6):
            got = next(resumed)
            for key in ("tokens", "masked_positions", "masked_labels"):
                np.testing.assert_array_equal(got[key], batches[index][1][key])
