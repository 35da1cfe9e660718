"""POPE as an `evaluate` module: accuracy, precision, recall, F1 (positive class "yes") and yes-ratio, in percent.

Loads offline: `evaluate.load(lare_hf.evaluation.metric_path("pope"))`. Answers are read from generated texts as the
official POPE script does (`lare_hf.evaluation.benchmarks.extract_yes_no`).
"""

import datasets
import evaluate

from lare_hf.evaluation.benchmarks import extract_yes_no, yes_no_metrics

_DESCRIPTION = (
    "POPE (Li et al., 2023) object-hallucination scores from generated answers, as `lare eval` computes them."
)
_CITATION = """@inproceedings{li2023pope,
  title     = {Evaluating Object Hallucination in Large Vision-Language Models},
  author    = {Li, Yifan and Du, Yifan and Zhou, Kun and Wang, Jinpeng and Zhao, Wayne Xin and Wen, Ji-Rong},
  booktitle = {EMNLP},
  year      = {2023}
}"""
_KWARGS_DESCRIPTION = """
Args:
    predictions: generated answers (free text; "Yes, there is a dog." counts as "yes").
    references: the gold answers, "yes" or "no".
Returns:
    accuracy, precision, recall, f1, yes_ratio (percent).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Pope(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("string"), "references": datasets.Value("string")}
            ),
        )

    def _compute(self, predictions, references):
        answers = [str(reference).strip().lower() for reference in references]
        wrong = sorted({answer for answer in answers if answer not in ("yes", "no")})
        if wrong:
            raise ValueError(f"POPE references must be 'yes' or 'no', got {wrong[:5]}.")
        return yes_no_metrics(answers, [extract_yes_no(prediction) for prediction in predictions])
