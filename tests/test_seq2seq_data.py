"""Translation data (buckets, determinism, resume, bad input), the seq2seq loss and the
generation metrics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmjax.data import builders, translation
from lmjax.train import text_metrics
from lmjax.train.seq2seq_task import token_losses


def _pairs(n=300, seed=0, vocab=100):
    """Random pairs; source i starts with token 4 + i, so it names its pair."""
    rng = np.random.default_rng(seed)
    src = [np.concatenate([[4 + i], rng.integers(4, vocab, rng.integers(0, 29)),
                           [translation.EOS]]) for i in range(n)]
    tgt = [np.append(rng.integers(4, vocab, rng.integers(1, 30)), translation.EOS)
           for _ in range(n)]
    return translation.Pairs([s.astype(np.int32) for s in src], [t.astype(np.int32) for t in tgt])


BUCKETS = (8, 16, 32)


def test_an_epoch_covers_every_pair_once_within_the_budget():
    pairs = _pairs()
    source = translation.BucketedBatches(pairs, 256, BUCKETS, seed=3)
    seen = []
    for k in range(source.per_epoch):
        batch = source[k]
        rows, length = batch["src"].shape
        assert length in BUCKETS and rows % 8 == 0
        assert rows * length <= 256 or rows == 8
        for row in range(rows):
            real = batch["tgt_out"][row] != translation.PAD
            if not real.any():
                continue  # a filler row of an incomplete batch
            src = batch["src"][row][batch["src"][row] != translation.PAD]
            index = int(src[0]) - 4
            np.testing.assert_array_equal(src, pairs.src[index])
            np.testing.assert_array_equal(batch["tgt_out"][row][real], pairs.tgt[index])
            np.testing.assert_array_equal(batch["tgt_in"][row][real],
                                          np.concatenate([[translation.BOS],
                                                          pairs.tgt[index][:-1]]))
            seen.append(index)
    assert sorted(seen) == list(range(len(pairs)))


def test_batches_are_a_function_of_seed_and_step_and_the_iterator_resumes():
    pairs = _pairs()
    first = translation.train_iterator(pairs, 256, BUCKETS, seed=5)
    for _ in range(7):
        next(first)
    state = first.get_state()
    want = [next(first) for _ in range(40)]  # crosses an epoch boundary
    resumed = translation.train_iterator(pairs, 256, BUCKETS, seed=5)
    resumed.set_state(state)
    for a, b in zip(want, [next(resumed) for _ in range(40)], strict=True):
        assert all(np.array_equal(a[k], b[k]) for k in a)
    other = translation.train_iterator(pairs, 256, BUCKETS, seed=6)
    assert any(not np.array_equal(next(other)["src"], w["src"]) for w in want[:3])


def test_unknown_language_pair_names_the_available_ones():
    with pytest.raises(ValueError, match="unknown language pair 'en-xx'; available: en-de, "
                                         "en-fr, de-en, de-fr, fr-en, fr-de"):
        translation.parse_pair("en-xx")


def test_missing_corpus_file_names_where_it_goes(tmp_path):
    folder = tmp_path / "multi30k"
    folder.mkdir()
    with pytest.raises(builders.MissingDataError, match=str(folder / "train.en")):
        builders.prepare("multi30k", str(tmp_path / "tfds"), str(folder))
    (folder / "train.en").write_text("a\n")
    with pytest.raises(builders.MissingDataError, match=str(folder / "train.de")):
        builders.read_parallel(folder, "train", ("en", "de"))


def test_mismatched_line_counts_name_both_files_and_counts(tmp_path):
    (tmp_path / "val.en").write_text("one\ntwo\nthree\n")
    (tmp_path / "val.de").write_text("eins\nzwei\n")
    with pytest.raises(builders.BadDataError) as err:
        builders.read_parallel(tmp_path, "val", ("en", "de"))
    assert f"{tmp_path / 'val.en'} has 3 lines" in str(err.value)
    assert f"{tmp_path / 'val.de'} has 2 lines" in str(err.value)


def test_too_long_sentences_are_truncated_or_rejected():
    ids = np.arange(4, 14)
    cut = translation.fit_length(ids, 5, "truncate", "x")
    np.testing.assert_array_equal(cut, [4, 5, 6, 7, translation.EOS])
    with pytest.raises(ValueError, match="input.txt:7 has 11 tokens with EOS, more than the "
                                         "maximum of 5"):
        translation.fit_length(ids, 5, "reject", "input.txt:7")
    np.testing.assert_array_equal(translation.fit_length(ids[:2], 5, "reject", "x"),
                                  [4, 5, translation.EOS])


def test_label_smoothed_loss_matches_its_formula():
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(size=(2, 3, 8)), jnp.float32)
    logits = logits.at[..., 6:].set(jnp.finfo(jnp.float32).min)  # padded vocabulary
    targets = jnp.array([[1, 2, 3], [4, 5, 0]])
    smoothed, nll = token_losses(logits, targets, vocab_size=6, smoothing=0.1)
    log_probs = np.asarray(jax.nn.log_softmax(logits[..., :6]))
    onehot = np.eye(6)[np.asarray(targets)]
    want = -np.sum((0.9 * onehot + 0.1 / 6) * log_probs, axis=-1)
    np.testing.assert_allclose(smoothed, want, rtol=1e-6)
    np.testing.assert_allclose(nll, -np.sum(onehot * log_probs, -1), rtol=1e-6)


HYPS = ["The cat sat on the mat.", "A man is playing a guitar on stage."]
REFS = ["The cat is sitting on the mat.", "A man plays the guitar on a stage."]


def test_bleu_and_chrf_are_sacrebleus():
    import sacrebleu

    scores = text_metrics.translation_scores(HYPS, REFS)
    assert scores["bleu"] == pytest.approx(sacrebleu.corpus_bleu(HYPS, [REFS]).score)
    assert scores["chrf"] == pytest.approx(sacrebleu.corpus_chrf(HYPS, [REFS]).score)
    upper = text_metrics.translation_scores([h.upper() for h in HYPS], REFS)
    assert upper["bleu"] < scores["bleu"] and upper["bleu_lc"] == pytest.approx(scores["bleu_lc"])
    assert scores["bleu_signature"].startswith("nrefs:1|case:mixed|eff:no|tok:13a")
    assert "case:lc" in scores["bleu_lc_signature"]


def test_rouge_matches_rouge_score_on_a_fixed_example():
    from rouge_score import rouge_scorer

    got = text_metrics.rouge(HYPS, REFS)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for name in ("rouge1", "rouge2", "rougeL"):
        want = np.mean([scorer.score(r, h)[name].fmeasure for h, r in zip(HYPS, REFS,
                                                                           strict=True)])
        assert got[name] == pytest.approx(100 * want)
    # The library's numbers for this example (rouge-score 0.1.2), fixed here.
    want = {"rouge1": 82.21153846153845, "rouge2": 41.55844155844156, "rougeL": 75.96153846153845}
    assert got == pytest.approx(want, abs=1e-9)
    with pytest.raises(ValueError, match="2 hypotheses for 1 references"):
        text_metrics.rouge(HYPS, REFS[:1])
