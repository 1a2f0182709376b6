"""Generation metrics: BLEU and chrF through sacreBLEU, ROUGE through rouge-score.

BLEU is sacreBLEU's corpus BLEU on detokenised text with its defaults (cased, 13a
tokenisation, exponential smoothing), the number papers can compare when they give its
signature; `bleu_lc` lowercases both sides, closer to papers that report lowercased
BLEU (those on Multi30k usually also tokenise the references with Moses first, which
sacreBLEU does not, so it remains an approximation). Scores are on a 0-100 scale.
"""

from collections.abc import Sequence


def _check(hypotheses: Sequence[str], references: Sequence[str]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references; "
                         "give one hypothesis per reference line")


def translation_scores(hypotheses: Sequence[str], references: Sequence[str]) -> dict:
    """{'bleu', 'bleu_lc', 'chrf'} of a corpus and the sacreBLEU signatures that name
    how each was computed ({'bleu_signature', 'bleu_lc_signature', 'chrf_signature'})."""
    from sacrebleu.metrics import BLEU, CHRF

    _check(hypotheses, references)
    hyps, refs = list(hypotheses), [list(references)]
    cased, lowercased, chrf = BLEU(), BLEU(lowercase=True), CHRF()
    return {
        "bleu": cased.corpus_score(hyps, refs).score,
        "bleu_lc": lowercased.corpus_score(hyps, refs).score,
        "chrf": chrf.corpus_score(hyps, refs).score,
        "bleu_signature": str(cased.get_signature()),
        "bleu_lc_signature": str(lowercased.get_signature()),
        "chrf_signature": str(chrf.get_signature()),
    }


def rouge(hypotheses: Sequence[str], references: Sequence[str],
          types: Sequence[str] = ("rouge1", "rouge2", "rougeL"), stemmer: bool = True) -> dict:
    """Mean ROUGE F-measure (0-100) of each type over the pairs, as rouge-score computes
    it for one reference per hypothesis: {'rouge1': ..., 'rouge2': ..., 'rougeL': ...}."""
    from rouge_score import rouge_scorer

    _check(hypotheses, references)
    scorer = rouge_scorer.RougeScorer(list(types), use_stemmer=stemmer)
    totals = dict.fromkeys(types, 0.0)
    for hyp, ref in zip(hypotheses, references, strict=True):
        scores = scorer.score(ref, hyp)  # rouge-score takes (target, prediction)
        for name in types:
            totals[name] += scores[name].fmeasure
    count = max(len(hypotheses), 1)
    return {name: 100.0 * total / count for name, total in totals.items()}
