"""RefocusShapes (lare_hf's synthetic benchmark) as an `evaluate` module: accuracy and minimal-pair accuracy, in
percent, with the benchmark's own answer matching (option letters, yes/no, numbers, free-form text).

Loads offline: `evaluate.load(lare_hf.evaluation.metric_path("refocus_shapes"))`.
"""

import datasets
import evaluate

from lare_hf.evaluation.benchmarks import RefocusShapesBenchmark

_DESCRIPTION = "RefocusShapes accuracy and minimal-pair accuracy from generated answers, as `lare eval` computes them."
_CITATION = """@article{ma2025lare,
  title   = {Multimodal Reasoning via Latent Refocusing},
  author  = {Ma, Jizheng and Zhou, Xiaofei and Zhang, Geyuan and Song, Yanlong and Yan, Han},
  journal = {arXiv preprint arXiv:2511.02360},
  year    = {2025}
}"""
_KWARGS_DESCRIPTION = """
Args:
    predictions: generated answers.
    references: the records' `answer` fields.
    choices: the records' `choices` (an empty list for open questions).
    pair_ids: the records' `pair_id` (-1 when a record has no minimal-pair partner).
Returns:
    accuracy, pair_accuracy (percent), num_pairs.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class RefocusShapes(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Value("string"),
                    "choices": datasets.List(datasets.Value("string")),
                    "pair_ids": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, choices, pair_ids):
        benchmark = RefocusShapesBenchmark()
        rows = [
            {"id": str(i), "question": "", "answer": reference, "choices": options or None, "pair_id": pair_id}
            for i, (reference, options, pair_id) in enumerate(zip(references, choices, pair_ids))
        ]
        columns = {key: names[0] for key, names in benchmark.columns.items()}
        samples = [benchmark._make_sample(row, columns, i, "refocus_shapes") for i, row in enumerate(rows)]
        report = benchmark.score(samples, predictions)
        return {key: report[key] for key in ("accuracy", "pair_accuracy", "num_pairs")}
