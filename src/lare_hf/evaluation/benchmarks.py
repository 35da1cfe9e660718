"""Evaluation benchmarks: loaders for local copies of MMBench, MMStar, MMVP, ScienceQA (image subset), POPE and the
synthetic RefocusShapes and RefocusChains, their standard prompts, answer extraction and scoring, and the registry
(`get_benchmark`). The pieces live in their own modules and are re-exported here: `base` (`Benchmark`,
`BenchmarkSample`), `answers` (answer extraction, value coercion), `metrics`, and `lare_hf.data.files` (the file
and image reader training shares).

Everything is read from LOCAL files in the public Hub layouts used by lmms-eval / VLMEvalKit; nothing is downloaded.
A path may be a parquet / JSON / JSONL / CSV / TSV / arrow file, a glob pattern, a folder of such files (as a Hub
dataset snapshot has, e.g. ``MMBench/en/dev-*.parquet``; with several splits in the folder, the split is picked by
file or folder name), or a folder written by ``save_to_disk``. Images may be ``datasets.Image()`` columns,
``{"bytes": ..., "path": ...}`` dicts, paths (relative ones resolved against ``image_folder``, by default the folder
holding the data file), or base64 strings (VLMEvalKit TSVs).

Typical use (what the evaluation runner does)::

    bench = get_benchmark("mmbench")
    samples = bench.load("data/MMBench/en", split="dev")          # list[BenchmarkSample]
    texts = [generate(s.image, s.prompt) for s in samples]          # raw generated text, one per sample
    metrics = bench.score(samples, texts)                           # {"accuracy": 63.2, "per_category": ..., ...}
    rows = bench.judge(samples, texts)                              # per sample: extracted answer, correct or not

Metrics are percentages (0-100). `score` and `judge` take the raw generated text and run `extract` themselves;
extraction is idempotent, so already-extracted answers ("B", "yes") score the same.

Layouts (column names matched case-insensitively; alternatives in brackets):

* MMBench (lmms-lab/MMBench ``en/dev``; VLMEvalKit ``MMBench_DEV_EN.tsv``): ``index``, ``question``, ``hint``,
  ``A``-``D`` (+ ``E``; missing options None / NaN / "nan"), ``answer`` (letter), ``category``,
  ``L2-category`` [``l2-category``, ``l2_category``], ``image``, optionally ``source``, ``split``. Circular
  evaluation: rows whose ``index % 1_000_000`` agree are the circular shifts of one question, which counts as correct
  only when every shift is answered correctly (`MMBenchBenchmark.score` reports it as ``accuracy`` /
  ``circular_accuracy``, next to the per-row ``plain_accuracy``).
* MMStar (Lin-Chen/MMStar ``val``): ``index``, ``question`` (options inside: "Options: A: ..., B: ..."), ``answer``
  (letter), ``category``, ``l2_category``, ``image``, ``meta_info``.
* MMVP (MMVP/MMVP; lmms-lab-eval/MMVP; or the original ``Questions.csv`` + ``image_folder`` holding ``<Index>.jpg``):
  ``Index`` [``index``], ``Question``, ``Options`` ("(a) Open (b) Closed"), ``Correct Answer`` ("(a)"), ``image``.
  Consecutive indices (1-2, 3-4, ...) form a pair: ``pair_accuracy`` counts pairs with both answers correct.
* ScienceQA (derek-thomas/ScienceQA, lmms-lab/ScienceQA ``ScienceQA-IMG``; split ``test``): ``question``,
  ``choices`` (list), ``answer`` (int index), ``hint``, ``subject``, ``category``, ``image``, optionally ``grade``.
  Only rows with an image are kept (the IMG subset).
* POPE (lmms-lab/POPE ``test``): ``question_id``, ``question``, ``answer`` ("yes"/"no"), ``image_source``,
  ``image``, ``category`` (adversarial / popular / random). Metrics: accuracy, precision, recall, F1 (positive =
  "yes"), yes-ratio (share of "yes" predictions, as in the official POPE script), overall and per category.
* RefocusShapes (`lare_hf.data.refocus_shapes`; JSONL + images, or a saved DatasetDict, split ``test``):
  ``image``, ``question``, ``answer``, optionally ``choices`` (list), ``category``, ``pair_id``, ``id``.

Prompts: multiple choice as in LLaVA-1.5's evaluation ("{hint}\\n{question}\\nA. ...\\nB. ...\\nAnswer with the
option's letter from the given choices directly."; ScienceQA prefixes the hint with "Context: " as LLaVA /
lmms-eval do); POPE "{question}\\nAnswer the question using a single word or phrase." (LLaVA-1.5; pass
``post_prompt=POPE_ORIGINAL_POST_PROMPT`` for the original " Please answer this question with one word.");
RefocusShapes: the question as written in the record (the same text training sees).
"""

from __future__ import annotations

import json
import re
from collections import defaultdict
from typing import Any

from ..data.files import load_image, read_table
from ..data.records import question_with_choices
from .answers import (
    OPTION_LETTERS,
    answer_segments,
    as_int,
    as_letter,
    as_text,
    clean_generation,
    colour_in,
    extract_choice,
    extract_free_form,
    extract_number,
    extract_yes_no,
    is_missing,
    normalize_text,
    options_prompt,
    parse_inline_options,
    parse_mmvp_options,
)
from .base import MC_POST_PROMPT, POPE_ORIGINAL_POST_PROMPT, SHORT_ANSWER_POST_PROMPT, Benchmark, BenchmarkSample
from .metrics import accuracy_by, pair_accuracy, percent, yes_no_metrics

CIRCULAR_MODULUS = 1_000_000


class MMBenchBenchmark(Benchmark):
    name = "mmbench"
    default_split = "dev"
    layout = "lmms-lab/MMBench (index, question, hint, A-D, answer, category, L2-category, image)"
    columns = {
        "index": ("index",),
        "question": ("question",),
        "hint": ("hint",),
        "answer": ("answer",),
        "category": ("category",),
        "l2_category": ("L2-category", "l2-category", "l2_category"),
        "source": ("source",),
        "split": ("split",),
        **{letter: (letter,) for letter in "ABCDE"},
    }
    required = ("index", "question", "A", "B", "answer")

    def _make_sample(self, row, cols, i, source):
        choices = {}
        for letter in "ABCDE":
            value = self._get(row, cols, letter)
            if is_missing(value):
                break
            choices[letter] = as_text(value)
        question, hint = as_text(self._get(row, cols, "question")), as_text(self._get(row, cols, "hint"))
        prompt = (f"{hint}\n" if hint else "") + f"{question}\n{options_prompt(choices)}{self.post_prompt}"
        index = as_int(self._get(row, cols, "index"))
        meta = {
            "index": index if index is not None else self._get(row, cols, "index"),
            "l2_category": as_text(self._get(row, cols, "l2_category")) or None,
            "hint": hint or None,
            "question": question,
            "source": as_text(self._get(row, cols, "source")) or None,
            "split": as_text(self._get(row, cols, "split")) or None,
        }
        return BenchmarkSample(
            id=as_text(self._get(row, cols, "index")) or str(i),
            image=None,
            prompt=prompt,
            answer=as_letter(self._get(row, cols, "answer")) if not is_missing(self._get(row, cols, "answer")) else "",
            choices=choices,
            category=as_text(self._get(row, cols, "category")) or None,
            meta=meta,
        )

    def _extra_metrics(self, samples, rows):
        """Circular evaluation: the rows sharing ``index % 1_000_000`` must all be correct."""
        groups: dict[Any, list[int]] = defaultdict(list)
        for k, sample in enumerate(samples):
            index = sample.meta.get("index")
            key = index % CIRCULAR_MODULUS if isinstance(index, int) else ("row", k)
            groups[key].append(k)
        hits, categories, l2 = [], [], []
        for key, members in groups.items():
            main = next((k for k in members if samples[k].meta.get("index") == key), members[0])
            hits.append(all(rows[k]["correct"] for k in members))
            categories.append(samples[main].category)
            l2.append(samples[main].meta.get("l2_category"))
        plain = [r["correct"] for r in rows]
        return {
            "accuracy": percent(sum(hits), len(hits)),
            "circular_accuracy": percent(sum(hits), len(hits)),
            "plain_accuracy": percent(sum(plain), len(plain)),
            "num_questions": len(groups),
            "num_circular_questions": sum(1 for members in groups.values() if len(members) > 1),
            "per_category": accuracy_by(categories, hits),
            "per_l2_category": accuracy_by(l2, hits),
            "per_category_plain": accuracy_by([s.category for s in samples], plain),
        }


class MMStarBenchmark(Benchmark):
    name = "mmstar"
    default_split = "val"
    layout = "Lin-Chen/MMStar (index, question with 'Options: A: ..., B: ...', answer, category, l2_category, image)"
    columns = {
        "index": ("index",),
        "question": ("question",),
        "answer": ("answer",),
        "category": ("category",),
        "l2_category": ("l2_category", "l2-category", "L2-category"),
        "meta_info": ("meta_info",),
    }
    required = ("question", "answer")

    def _make_sample(self, row, cols, i, source):
        question = as_text(self._get(row, cols, "question"))
        choices = parse_inline_options(question)
        meta_info = self._get(row, cols, "meta_info")
        return BenchmarkSample(
            id=as_text(self._get(row, cols, "index")) or str(i),
            image=None,
            prompt=f"{question}{self.post_prompt}",
            answer=as_letter(self._get(row, cols, "answer")),
            choices=choices,
            category=as_text(self._get(row, cols, "category")) or None,
            meta={
                "index": as_int(self._get(row, cols, "index")),
                "l2_category": as_text(self._get(row, cols, "l2_category")) or None,
                "meta_info": meta_info if isinstance(meta_info, dict) else as_text(meta_info) or None,
            },
        )

    def _extra_metrics(self, samples, rows):
        return {
            "per_l2_category": accuracy_by([s.meta.get("l2_category") for s in samples], [r["correct"] for r in rows])
        }


class MMVPBenchmark(Benchmark):
    name = "mmvp"
    default_split = "train"  # the Hub copy stores its 300 questions as the "train" split
    layout = "MMVP/MMVP (Index, Question, Options '(a) ... (b) ...', Correct Answer '(a)', image)"
    columns = {
        "index": ("Index", "idx", "question_id"),
        "question": ("Question",),
        "options": ("Options",),
        "answer": ("Correct Answer", "correct_answer", "answer"),
        "category": ("category", "pattern"),
    }
    required = ("question", "options", "answer")

    def _make_sample(self, row, cols, i, source):
        choices = parse_mmvp_options(self._get(row, cols, "options"))
        if not choices:
            raise ValueError(f"{source}: row {i}: cannot read options from {self._get(row, cols, 'options')!r}.")
        question = as_text(self._get(row, cols, "question"))
        index = as_int(self._get(row, cols, "index"))
        return BenchmarkSample(
            id=str(index) if index is not None else str(i),
            image=None,
            prompt=f"{question}\n{options_prompt(choices)}{self.post_prompt}",
            answer=as_letter(self._get(row, cols, "answer")),
            choices=choices,
            category=as_text(self._get(row, cols, "category")) or None,
            meta={"index": index if index is not None else i, "row": i},
        )

    def _fallback_image(self, row, cols, root):
        index = self._get(row, cols, "index")
        for name in (f"{as_text(index)}.jpg", f"{as_text(index)}.png", f"{as_text(index)}.jpeg"):
            for folder in (root, root / "MMVP Images"):
                if (folder / name).is_file():
                    return str(folder / name)
        return None

    def _extra_metrics(self, samples, rows):
        """Pair accuracy: questions 1-2, 3-4, ... (``Index``, 1-based; 0-based indices are detected)."""
        indices = [s.meta.get("index") for s in samples]
        base = 0 if min(indices, default=1) == 0 else 1
        accuracy, complete, incomplete = pair_accuracy(
            [(i - base) // 2 for i in indices], [r["correct"] for r in rows]
        )
        return {"pair_accuracy": accuracy, "num_pairs": complete, "num_incomplete_pairs": incomplete}


class ScienceQABenchmark(Benchmark):
    name = "scienceqa"
    default_split = "test"
    layout = "derek-thomas/ScienceQA / lmms-lab/ScienceQA (question, choices, answer index, hint, subject, image)"
    columns = {
        "id": ("id", "pid", "question_id"),
        "question": ("question",),
        "choices": ("choices",),
        "answer": ("answer",),
        "hint": ("hint",),
        "subject": ("subject",),
        "category": ("category",),
        "grade": ("grade",),
        "topic": ("topic",),
    }
    required = ("question", "choices", "answer")
    skip_rows_without_image = True

    def _make_sample(self, row, cols, i, source):
        raw = self._get(row, cols, "choices")
        if isinstance(raw, str):
            try:
                raw = json.loads(raw)
            except ValueError:
                raw = None
        if not isinstance(raw, (list, tuple)) or not raw:
            raise ValueError(f"{source}: row {i}: 'choices' must be a non-empty list of strings, got {raw!r}.")
        choices = {OPTION_LETTERS[k]: as_text(c) for k, c in enumerate(raw)}
        answer = as_int(self._get(row, cols, "answer"))
        if answer is None or not 0 <= answer < len(choices):
            raise ValueError(f"{source}: row {i}: 'answer' must index 'choices' (0..{len(choices) - 1}).")
        hint, question = as_text(self._get(row, cols, "hint")), as_text(self._get(row, cols, "question"))
        context = f"Context: {hint}\n" if hint else ""
        return BenchmarkSample(
            id=as_text(self._get(row, cols, "id")) or str(i),
            image=None,
            prompt=f"{context}{question}\n{options_prompt(choices)}{self.post_prompt}",
            answer=OPTION_LETTERS[answer],
            choices=choices,
            category=as_text(self._get(row, cols, "category")) or None,
            meta={
                "row": i,
                "subject": as_text(self._get(row, cols, "subject")) or None,
                "grade": as_text(self._get(row, cols, "grade")) or None,
                "topic": as_text(self._get(row, cols, "topic")) or None,
            },
        )

    def _extra_metrics(self, samples, rows):
        correct = [r["correct"] for r in rows]
        return {
            "per_subject": accuracy_by([s.meta.get("subject") for s in samples], correct),
            "per_grade": accuracy_by([s.meta.get("grade") for s in samples], correct),
        }


class POPEBenchmark(Benchmark):
    name = "pope"
    default_split = "test"
    layout = "lmms-lab/POPE (question_id, question, answer yes/no, image_source, image, category)"
    columns = {
        "id": ("id",),
        "question_id": ("question_id",),
        "question": ("question", "text"),
        "answer": ("answer", "label"),
        "image_source": ("image_source",),
        "category": ("category",),
    }
    required = ("question", "answer")
    post_prompt = SHORT_ANSWER_POST_PROMPT
    max_new_tokens = 128

    def _make_sample(self, row, cols, i, source):
        answer = as_text(self._get(row, cols, "answer")).lower()
        if answer not in ("yes", "no"):
            raise ValueError(f"{source}: row {i}: POPE answers are 'yes' or 'no', got {answer!r}.")
        qid = as_text(self._get(row, cols, "question_id"))
        category = as_text(self._get(row, cols, "category")) or None
        sid = as_text(self._get(row, cols, "id")) or (f"{category}/{qid}" if category and qid else qid) or str(i)
        return BenchmarkSample(
            id=sid,
            image=None,
            prompt=f"{as_text(self._get(row, cols, 'question'))}{self.post_prompt}",
            answer=answer,
            choices=None,
            category=category,
            meta={"question_id": qid or None, "image_source": as_text(self._get(row, cols, "image_source")) or None},
        )

    def _fallback_image(self, row, cols, root):
        name = as_text(self._get(row, cols, "image_source"))
        if name:
            for candidate in (name, f"{name}.jpg", f"{name}.png"):
                if (root / candidate).is_file():
                    return str(root / candidate)
        return None

    def extract(self, prediction, sample):
        return extract_yes_no(prediction)

    def _extra_metrics(self, samples, rows):
        answers = [r["answer"] for r in rows]
        extracted = [r["extracted"] for r in rows]
        overall = yes_no_metrics(answers, extracted)
        by_category: dict[str, list[int]] = defaultdict(list)
        for k, sample in enumerate(samples):
            if sample.category:
                by_category[sample.category].append(k)
        per = {
            cat: yes_no_metrics([answers[k] for k in ks], [extracted[k] for k in ks])
            for cat, ks in sorted(by_category.items())
        }
        mean = {m: sum(v[m] for v in per.values()) / len(per) for m in overall} if per else {}
        return {**overall, "per_category_metrics": per, "mean_over_categories": mean}


class RefocusShapesBenchmark(Benchmark):
    """The synthetic RefocusShapes benchmark (`lare_hf.data.refocus_shapes`), read from its JSONL / saved copy."""

    name = "refocus_shapes"
    default_split = "test"
    layout = "RefocusShapes reasoning records (image, question, answer, choices, category, pair_id)"
    columns = {
        "id": ("id",),
        "question": ("question",),
        "answer": ("answer",),
        "choices": ("choices",),
        "category": ("category",),
        "pair_id": ("pair_id",),
        "rationale": ("rationale",),
    }
    required = ("question", "answer")
    post_prompt = ""
    max_new_tokens = 128

    def _make_sample(self, row, cols, i, source):
        question = as_text(self._get(row, cols, "question"))
        raw = self._get(row, cols, "choices")
        if isinstance(raw, dict):
            choices = {str(k).upper(): as_text(v) for k, v in raw.items() if not is_missing(v)} or None
        elif isinstance(raw, (list, tuple)) and len(raw) > 0:
            choices = {OPTION_LETTERS[k]: as_text(c) for k, c in enumerate(raw)}
        else:
            choices = None
        if choices:
            question = question_with_choices(question, raw)  # the text training asks (lare_hf.data.formats)
        answer = as_text(self._get(row, cols, "answer"))
        if choices:
            answer = as_letter(answer)
        elif answer.lower() in ("yes", "no"):
            answer = answer.lower()
        elif not re.fullmatch(r"-?\d+(?:\.\d+)?", answer):
            answer = normalize_text(answer)
        pair_id = as_int(self._get(row, cols, "pair_id"))
        return BenchmarkSample(
            id=as_text(self._get(row, cols, "id")) or str(i),
            image=None,
            prompt=f"{question}{self.post_prompt}",
            answer=answer,
            choices=choices,
            category=as_text(self._get(row, cols, "category")) or None,
            meta={"pair_id": pair_id if pair_id is not None else -1},
        )

    def extract(self, prediction, sample):
        if sample.choices:
            return extract_choice(prediction, sample.choices)
        if sample.answer in ("yes", "no"):
            return extract_yes_no(prediction, strict=True)
        if re.fullmatch(r"-?\d+(?:\.\d+)?", sample.answer):
            return extract_number(prediction)
        return extract_free_form(prediction)

    def _extra_metrics(self, samples, rows):
        paired = [(s.meta["pair_id"], r["correct"]) for s, r in zip(samples, rows) if s.meta.get("pair_id", -1) >= 0]
        accuracy, complete, _ = pair_accuracy([key for key, _ in paired], [ok for _, ok in paired])
        return {"pair_accuracy": accuracy, "num_pairs": complete}


class RefocusChainsBenchmark(Benchmark):
    """The synthetic RefocusChains benchmark (`lare_hf.data.refocus_chains`): "From the red cell, follow 3 marks."
    -> "the blue cell". The gold answer is the colour; a prediction is judged by the colour its final answer names
    (after the last "Answer:" when there is one), which must be exactly one of the board's colours. ``category`` is
    the chain length; ``meta["visited_cells"]`` holds the cell each reasoning step reads (for window-hit rates)."""

    name = "refocus_chains"
    default_split = "test"
    layout = "RefocusChains reasoning records (image, question, answer, category, visited_cells)"
    columns = {
        "id": ("id",),
        "question": ("question",),
        "answer": ("answer",),
        "category": ("category",),
        "rationale": ("rationale",),
        "visited_cells": ("visited_cells",),
    }
    required = ("question", "answer")
    post_prompt = ""
    max_new_tokens = 32

    def _make_sample(self, row, cols, i, source):
        from ..data.refocus_chains import COLOUR_NAMES

        answer = colour_in(as_text(self._get(row, cols, "answer")), COLOUR_NAMES)
        visited = self._get(row, cols, "visited_cells")
        return BenchmarkSample(
            id=as_text(self._get(row, cols, "id")) or str(i),
            image=None,
            prompt=f"{as_text(self._get(row, cols, 'question'))}{self.post_prompt}",
            answer=answer,
            category=as_text(self._get(row, cols, "category")) or None,
            meta={"visited_cells": [list(map(int, cell)) for cell in visited] if visited is not None else []},
        )

    def extract(self, prediction, sample):
        from ..data.refocus_chains import COLOUR_NAMES

        text = clean_generation(prediction)
        segments = answer_segments(text)
        return colour_in(segments[0] if segments else text, COLOUR_NAMES)


BENCHMARKS: dict[str, type[Benchmark]] = {
    "mmbench": MMBenchBenchmark,
    "mmstar": MMStarBenchmark,
    "mmvp": MMVPBenchmark,
    "scienceqa": ScienceQABenchmark,
    "pope": POPEBenchmark,
    "refocus_shapes": RefocusShapesBenchmark,
    "refocus_chains": RefocusChainsBenchmark,
}


def get_benchmark(name: str, **kwargs: Any) -> Benchmark:
    """An instance of the benchmark called `name` (case-insensitive; "-" and "_" alike); kwargs go to its
    constructor (``post_prompt=...``). Unknown names raise ValueError listing the valid ones."""
    key = str(name).strip().lower().replace("-", "_")
    if key not in BENCHMARKS:
        raise ValueError(f"Unknown benchmark {name!r}; valid names: {', '.join(sorted(BENCHMARKS))}.")
    return BENCHMARKS[key](**kwargs)


__all__ = [
    "BENCHMARKS",
    "Benchmark",
    "BenchmarkSample",
    "MC_POST_PROMPT",
    "MMBenchBenchmark",
    "MMStarBenchmark",
    "MMVPBenchmark",
    "POPEBenchmark",
    "POPE_ORIGINAL_POST_PROMPT",
    "RefocusChainsBenchmark",
    "RefocusShapesBenchmark",
    "SHORT_ANSWER_POST_PROMPT",
    "ScienceQABenchmark",
    "extract_choice",
    "extract_free_form",
    "extract_number",
    "extract_yes_no",
    "get_benchmark",
    "load_image",
    "normalize_text",
    "parse_inline_options",
    "parse_mmvp_options",
    "read_table",
    "yes_no_metrics",
]
