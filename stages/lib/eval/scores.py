"""Generation metrics that suit Chinese as well as English: exact match, character-level ROUGE-L, BLEU and chrF."""

from __future__ import annotations


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when the texts are equal up to runs of whitespace."""
    return float(prediction.split() == reference.split())


def characters(text: str) -> str:
    return "".join(text.split())  # whitespace carries no meaning between Chinese characters


def lcs_length(a: str, b: str) -> int:
    row = [0] * (len(b) + 1)
    for ca in a:
        previous = 0  # row[j-1] of the line above
        for j, cb in enumerate(b, 1):
            previous, row[j] = row[j], previous + 1 if ca == cb else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction: str, reference: str) -> float:
    """F1 of the longest common character subsequence (ROUGE-L over characters, whitespace ignored)."""
    p, r = characters(prediction), characters(reference)
    lcs = lcs_length(p, r)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(r)
    return 2 * precision * recall / (precision + recall)


def sacrebleu_scores(predictions: list[str], references: list[str]) -> dict:
    """Corpus BLEU and chrF (0-100) by sacrebleu, one reference per prediction. BLEU uses sacrebleu's `zh`
    tokenizer: each Chinese character is a word, other text is split as by its default (13a) tokenizer."""
    import sacrebleu

    return {
        "bleu": sacrebleu.corpus_bleu(predictions, [references], tokenize="zh").score,
        "chrf": sacrebleu.corpus_chrf(predictions, [references]).score,
    }
