"""MMVP as an `evaluate` module: per-question accuracy and the paired accuracy of MMVP (questions 1-2, 3-4, ... are
one pair, correct only when both are), in percent.

Loads offline: `evaluate.load(lare_hf.evaluation.metric_path("mmvp_pairs"))`.
"""

import datasets
import evaluate

from lare_hf.evaluation.benchmarks import MMVPBenchmark

_DESCRIPTION = (
    "MMVP (Tong et al., 2024) accuracy and pair accuracy from generated answers, as `lare eval` computes them."
)
_CITATION = """@inproceedings{tong2024eyes,
  title     = {Eyes Wide Shut? Exploring the Visual Shortcomings of Multimodal LLMs},
  author    = {Tong, Shengbang and Liu, Zhuang and Zhai, Yuexiang and Ma, Yi and LeCun, Yann and Xie, Saining},
  booktitle = {CVPR},
  year      = {2024}
}"""
_KWARGS_DESCRIPTION = """
Args:
    predictions: generated answers ("(b)", "b", "Closed", "The answer is B", ...).
    references: the gold answers as MMVP writes them ("(a)", "(b)").
    indices: MMVP's `Index` of each question (1-based; questions 2k-1 and 2k form a pair).
    options: MMVP's `Options` of each question ("(a) Open (b) Closed").
Returns:
    accuracy, pair_accuracy (percent), num_pairs, num_incomplete_pairs.
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MmvpPairs(evaluate.Metric):
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
                    "options": datasets.Value("string"),
                }
            ),
        )

    def _compute(self, predictions, references, indices, options):
        benchmark = MMVPBenchmark()
        rows = [
            {"Index": index, "Question": "", "Options": option, "Correct Answer": reference}
            for reference, index, option in zip(references, indices, options)
        ]
        columns = {key: names[0] for key, names in benchmark.columns.items()}
        samples = [benchmark._make_sample(row, columns, i, "mmvp_pairs") for i, row in enumerate(rows)]
        report = benchmark.score(samples, predictions)
        keys = ("accuracy", "pair_accuracy", "num_pairs", "num_incomplete_pairs")
        return {key: report[key] for key in keys}
