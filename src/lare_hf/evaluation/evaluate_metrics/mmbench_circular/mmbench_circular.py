"""MMBench as an `evaluate` module: CircularEval accuracy (a question counts when every circular shift of its
options, the rows sharing `index % 1_000_000`, is answered correctly) and plain per-row accuracy, in percent.

Loads offline: `evaluate.load(lare_hf.evaluation.metric_path("mmbench_circular"))`.
"""

import datasets
import evaluate

from lare_hf.evaluation.benchmarks import MMBenchBenchmark

_DESCRIPTION = "MMBench (Liu et al., 2024) CircularEval accuracy from generated answers, as `lare eval` computes it."
_CITATION = """@inproceedings{liu2024mmbench,
  title     = {MMBench: Is Your Multi-modal Model an All-around Player?},
  author    = {Liu, Yuan and Duan, Haodong and Zhang, Yuanhan and Li, Bo and Zhang, Songyang and Zhao, Wangbo and
               Yuan, Yike and Wang, Jiaqi and He, Conghui and Liu, Ziwei and Chen, Kai and Lin, Dahua},
  booktitle = {ECCV},
  year      = {2024}
}"""
_KWARGS_DESCRIPTION = """
Args:
    predictions: generated answers ("B", "(B)", "B. cat", "The answer is B", or an option's text).
    references: the gold option letters.
    indices: MMBench's `index` of each row (circular copies of a question share `index % 1_000_000`).
    options: the option texts of each row, in letter order (A, B, C, ...).
Returns:
    circular_accuracy (= accuracy), plain_accuracy (percent), num_questions, num_circular_questions.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MmbenchCircular(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Value("string"),
                    "references": datasets.Value("string"),
                    "indices": datasets.Value("int64"),
                    "options": datasets.List(datasets.Value("string")),
                }
            ),
        )

    def _compute(self, predictions, references, indices, options):
        benchmark = MMBenchBenchmark()
        rows = [
            {"index": index, "question": "", "answer": reference, **dict(zip("ABCDE", choices))}
            for reference, index, choices in zip(references, indices, options)
        ]
        columns = {key: names[0] for key, names in benchmark.columns.items()}
        samples = [benchmark._make_sample(row, columns, i, "mmbench_circular") for i, row in enumerate(rows)]
        report = benchmark.score(samples, predictions)
        keys = ("accuracy", "circular_accuracy", "plain_accuracy", "num_questions", "num_circular_questions")
        return {key: report[key] for key in keys}
