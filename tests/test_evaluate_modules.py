"""The benchmark scorers as local Hugging Face `evaluate` modules, loaded offline with `evaluate.load(path)`."""

from __future__ import annotations

import pytest

evaluate = pytest.importorskip("evaluate")

from lare_hf.evaluation import metric_path  # noqa: E402


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")


def test_pope():
    pope = evaluate.load(metric_path("pope"))
    scores = pope.compute(predictions=["Yes, there is a dog.", "No.", "yes", "There is no cat."],
                          references=["yes", "no", "no", "yes"])  # fmt: skip
    # TP 1 (row 0), FP 1 (row 2), FN 1 (row 3): precision = recall = F1 = 50
    assert scores == {"accuracy": 50.0, "precision": 50.0, "recall": 50.0, "f1": 50.0, "yes_ratio": 50.0}
    with pytest.raises(ValueError, match="must be 'yes' or 'no'"):
        pope.compute(predictions=["yes"], references=["maybe"])


def test_mmbench_circular():
    mmbench = evaluate.load(metric_path("mmbench_circular"))
    scores = mmbench.compute(
        predictions=["A", "The answer is B.", "C", "(B)"],
        references=["A", "B", "A", "B"],
        indices=[1, 1_000_001, 2, 1_000_002],  # question 1 and its shifted copy; question 2 and its copy
        options=[["cat", "dog"], ["dog", "cat"], ["red", "blue"], ["blue", "red"]],
    )
    assert scores["circular_accuracy"] == scores["accuracy"] == 50.0  # question 2 fails its first copy
    assert scores["plain_accuracy"] == 75.0
    assert scores["num_questions"] == 2 and scores["num_circular_questions"] == 2


def test_mmvp_pairs():
    mmvp = evaluate.load(metric_path("mmvp_pairs"))
    scores = mmvp.compute(predictions=["(a)", "b", "Open", "(a)"], references=["(a)", "(b)", "(a)", "(b)"],
                          indices=[1, 2, 3, 4], options=["(a) Open (b) Closed"] * 4)  # fmt: skip
    assert scores == {"accuracy": 75.0, "pair_accuracy": 50.0, "num_pairs": 2, "num_incomplete_pairs": 0}


def test_refocus_shapes():
    shapes = evaluate.load(metric_path("refocus_shapes"))
    scores = shapes.compute(predictions=["3", "yes", "The answer is B"], references=["3", "no", "B"],
                            choices=[[], [], ["red", "blue"]], pair_ids=[0, 0, -1])  # fmt: skip
    assert scores["accuracy"] == pytest.approx(200 / 3) and scores["pair_accuracy"] == 0.0 and scores["num_pairs"] == 1


def test_unknown_module_names_the_available_ones():
    with pytest.raises(ValueError, match="available: mmbench_circular, mmvp_pairs, pope, refocus_shapes"):
        metric_path("mmstar")
