"""Metrics of the benchmarks, in percent: accuracy per group, pair accuracy (MMVP, RefocusShapes) and POPE's
yes/no metrics."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Hashable, Iterable, Sequence
from typing import Any


def percent(numerator: float, denominator: float) -> float:
    return 100.0 * numerator / denominator if denominator else 0.0


def accuracy_by(keys: Iterable[Any], correct: Iterable[bool]) -> dict[str, float]:
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for key, ok in zip(keys, correct):
        if key is None or key == "":
            continue
        totals[str(key)][0] += int(bool(ok))
        totals[str(key)][1] += 1
    return {key: percent(hit, n) for key, (hit, n) in sorted(totals.items())}


def pair_accuracy(pair_keys: Iterable[Hashable], correct: Iterable[bool]) -> tuple[float, int, int]:
    """Pairs (the items sharing a key) answered correctly on both sides: (pair accuracy in percent, complete pairs,
    keys that do not hold exactly two items)."""
    pairs: dict[Hashable, list[bool]] = defaultdict(list)
    for key, ok in zip(pair_keys, correct):
        pairs[key].append(bool(ok))
    complete = [all(v) for v in pairs.values() if len(v) == 2]
    return percent(sum(complete), len(complete)), len(complete), sum(1 for v in pairs.values() if len(v) != 2)


def yes_no_metrics(answers: Sequence[str], extracted: Sequence[str]) -> dict[str, float]:
    """Accuracy, precision, recall, F1 (positive class "yes") and yes-ratio (of predictions), in percent."""
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support

    if not answers:
        return {"accuracy": 0.0, "precision": 0.0, "recall": 0.0, "f1": 0.0, "yes_ratio": 0.0}
    truth = [a == "yes" for a in answers]
    predicted = [e == "yes" for e in extracted]
    precision, recall, f1, _ = precision_recall_fscore_support(
        truth, predicted, average="binary", pos_label=True, zero_division=0
    )
    return {
        "accuracy": 100.0 * accuracy_score(list(answers), list(extracted)),
        "precision": 100.0 * float(precision),
        "recall": 100.0 * float(recall),
        "f1": 100.0 * float(f1),
        "yes_ratio": percent(sum(predicted), len(predicted)),
    }


__all__ = ["accuracy_by", "pair_accuracy", "percent", "yes_no_metrics"]
