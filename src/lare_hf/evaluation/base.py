"""The benchmark base: `BenchmarkSample` (one evaluation item, its image decoded on access) and `Benchmark` (load a
local file into samples, extract answers, judge and score). The benchmarks themselves are in
`lare_hf.evaluation.benchmarks`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from PIL import Image

from ..data.files import is_file, load_image, maybe_base64, read_table
from .answers import extract_choice
from .metrics import accuracy_by, percent

MC_POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."
SHORT_ANSWER_POST_PROMPT = "\nAnswer the question using a single word or phrase."
POPE_ORIGINAL_POST_PROMPT = " Please answer this question with one word."


@dataclass(eq=False)
class BenchmarkSample:
    """One evaluation item.

    ``image`` is decoded on access (a fresh RGB `PIL.Image` each time, so a large benchmark does not sit in memory as
    pixels); it may be set to a PIL image, bytes, a path, a ``{"bytes", "path"}`` dict or a zero-argument callable.
    ``answer`` is the gold answer in extracted form (an option letter, "yes"/"no", or the normalised free-form text);
    ``choices`` maps option letters to option texts for multiple-choice items; ``meta`` keeps benchmark fields
    (index, l2-category, pair ids, ...); ``image_root`` resolves a relative image path.
    """

    id: str
    image: Image.Image | None = field(repr=False)
    prompt: str
    answer: str
    choices: dict[str, str] | None = None
    category: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, repr=False)
    image_root: str | os.PathLike | None = field(default=None, repr=False)


def _get_image(self: BenchmarkSample) -> Image.Image | None:
    return load_image(self.__dict__.get("_image_source"), self.image_root)


def _set_image(self: BenchmarkSample, value: Any) -> None:
    self.__dict__["_image_source"] = value


BenchmarkSample.image = property(_get_image, _set_image, doc=BenchmarkSample.__doc__)  # type: ignore[assignment]


class _RowImage:
    """Lazy image of row `index` of a (memory-mapped) single-column dataset."""

    __slots__ = ("dataset", "column", "index")

    def __init__(self, dataset: datasets.Dataset, column: str, index: int):
        self.dataset, self.column, self.index = dataset, column, index

    def __call__(self) -> Any:
        return self.dataset[self.index][self.column]


# ----------------------------------------------------------------------------------------------------------------
# loading


def _check_paths(values: list[str | None], validity: list[bool], root: Path, source: str) -> None:
    """Image paths must exist (checked at load time, so a wrong image_folder fails before generation starts)."""
    missing = []
    for value, valid in zip(values, validity):
        if valid:
            path = Path(value).expanduser()
            if not is_file(path if path.is_absolute() else root / path) and not maybe_base64(value):
                missing.append(value[:200])
    if missing:
        raise FileNotFoundError(
            f"{source}: {len(missing)} image file(s) not found under {root}, e.g. {missing[:3]}; pass image_folder= "
            "(the folder relative image paths start from)."
        )


def _image_validity(ds: datasets.Dataset, column: str) -> list[bool]:
    """Whether each row has an image, read at the arrow level (no decoding, no copying of image bytes)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    flags: list[bool] = []
    for table in ds.select_columns([column]).with_format("arrow").iter(batch_size=1024):
        col = table.column(0)
        if pa.types.is_struct(col.type):
            names = [col.type.field(i).name for i in range(col.type.num_fields)]
            valid = pc.is_valid(col)
            has = None
            if "bytes" in names:
                has = pc.is_valid(pc.struct_field(col, "bytes"))
            if "path" in names:
                p = pc.struct_field(col, "path")
                has_path = pc.fill_null(pc.and_(pc.is_valid(p), pc.not_equal(p, "")), False)
                has = has_path if has is None else pc.or_(has, has_path)
            valid = pc.and_(valid, has) if has is not None else valid
        elif pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
            valid = pc.fill_null(pc.and_(pc.is_valid(col), pc.not_equal(pc.utf8_trim_whitespace(col), "")), False)
        else:
            valid = pc.is_valid(col)
        flags.extend(bool(v) for v in pc.fill_null(valid, False).to_pylist())
    return flags


# ----------------------------------------------------------------------------------------------------------------
# the base class


class Benchmark:
    """Base class: `load` local files, `extract` the answer from generated text, `judge` / `score` predictions.

    Subclasses set `name`, `default_split`, `columns` ({logical name: (accepted column names, ...)}), `required`
    (logical names that must exist), and implement `_make_sample`.
    """

    name: str = ""
    default_split: str | None = None
    columns: dict[str, tuple[str, ...]] = {}
    required: tuple[str, ...] = ()
    image_columns: tuple[str, ...] = ("image", "img", "image_path", "image_file")
    layout: str = ""
    max_new_tokens: int = 16  # what the reference toolkits generate for this benchmark (a suggestion)
    skip_rows_without_image: bool = False
    post_prompt: str = MC_POST_PROMPT  # appended to every prompt; override per instance with post_prompt=

    def __init__(self, post_prompt: str | None = None):
        if post_prompt is not None:
            self.post_prompt = post_prompt

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    # -- loading ---------------------------------------------------------------------------------------------

    def _resolve_columns(self, names: Sequence[str], source: str) -> dict[str, str]:
        lower = {n.lower(): n for n in names}
        resolved = {}
        for logical, accepted in self.columns.items():
            for candidate in accepted:
                if candidate.lower() in lower:
                    resolved[logical] = lower[candidate.lower()]
                    break
        for candidate in self.image_columns:
            if candidate.lower() in lower:
                resolved["image"] = lower[candidate.lower()]
                break
        missing = [" / ".join(map(repr, self.columns[name])) for name in self.required if name not in resolved]
        if missing:
            raise ValueError(
                f"{source}: the {self.name} loader needs column(s) {', '.join(missing)}, but the data has columns "
                f"{list(names)}. Expected the {self.layout} layout."
            )
        return resolved

    def load(
        self,
        path: str | os.PathLike,
        split: str | None = None,
        image_folder: str | os.PathLike | None = None,
        limit: int | None = None,
    ) -> list[BenchmarkSample]:
        """Read `path` (see the module docstring) into samples; images stay on disk / in arrow until accessed.

        `split`: the split of a saved DatasetDict or of a folder of split files (default `default_split` when
        present). `image_folder`: root for relative image paths (default: the folder holding the data).
        `limit`: keep the first `limit` samples.
        """
        source = os.fspath(path)
        ds, root = read_table(path, split, self.default_split)
        if image_folder is not None:
            root = Path(image_folder).expanduser()
        cols = self._resolve_columns(ds.column_names, source)
        image_col = cols.get("image")
        image_ds = None
        validity: list[bool] | None = None
        if image_col is not None:
            if isinstance(ds.features[image_col], datasets.Image):
                ds = ds.cast_column(image_col, datasets.Image(decode=False))
            image_ds = ds.select_columns([image_col])
            validity = _image_validity(ds, image_col)
            feature = ds.features[image_col]
            if isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string"):
                _check_paths(image_ds[image_col], validity, root, source)
            rows = ds.remove_columns([image_col])
        else:
            rows = ds
        samples: list[BenchmarkSample] = []
        for i, row in enumerate(rows):
            if limit is not None and len(samples) >= limit:
                break
            has_image = validity[i] if validity is not None else False
            if not has_image and self.skip_rows_without_image:
                continue
            sample = self._make_sample(row, cols, i, source)
            if sample is None:
                continue
            if has_image:
                sample.image = _RowImage(image_ds, image_col, i)
            else:
                fallback = self._fallback_image(row, cols, root)
                if fallback is None:
                    raise ValueError(
                        f"{source}: row {i} has no image (column {image_col!r})"
                        if image_col
                        else f"{source}: no image column (looked for {list(self.image_columns)}) and no image file "
                        f"found for row {i}; pass image_folder= for layouts that keep images in a folder."
                    )
                sample.image = fallback
            sample.image_root = root
            samples.append(sample)
        _dedupe_ids(samples)
        return samples

    def _fallback_image(self, row: dict, cols: dict[str, str], root: Path) -> Any:
        return None

    def _make_sample(self, row: dict, cols: dict[str, str], i: int, source: str) -> BenchmarkSample | None:
        raise NotImplementedError

    @staticmethod
    def _get(row: dict, cols: dict[str, str], logical: str, default: Any = None) -> Any:
        column = cols.get(logical)
        return row.get(column, default) if column is not None else default

    # -- judging ---------------------------------------------------------------------------------------------

    def extract(self, prediction: str, sample: BenchmarkSample) -> str:
        """The answer in `prediction` in the form of ``sample.answer``; "" when none can be extracted."""
        return extract_choice(prediction, sample.choices)

    def is_correct(self, prediction: str, sample: BenchmarkSample) -> bool:
        extracted = self.extract(prediction, sample)
        return bool(extracted) and extracted == sample.answer

    def judge(self, samples: Sequence[BenchmarkSample], predictions: Sequence[str]) -> list[dict[str, Any]]:
        """Per sample: ``{"id", "prediction", "extracted", "answer", "correct", "category"}``."""
        if isinstance(predictions, (dict, str)):
            raise TypeError("predictions must be a sequence of generated texts aligned with samples.")
        if len(samples) != len(predictions):
            raise ValueError(f"{len(samples)} samples but {len(predictions)} predictions; give one per sample.")
        unanswerable = [s.id for s in samples if not s.answer]
        if unanswerable:
            raise ValueError(
                f"{len(unanswerable)} samples have no ground-truth answer (e.g. {unanswerable[:3]}); the test splits of "
                "MMBench and similar benchmarks are scored by their servers, not locally."
            )
        rows = []
        for sample, prediction in zip(samples, predictions):
            extracted = self.extract(prediction, sample)
            rows.append(
                {
                    "id": sample.id,
                    "prediction": prediction,
                    "extracted": extracted,
                    "answer": sample.answer,
                    "correct": bool(extracted) and extracted == sample.answer,
                    "category": sample.category,
                }
            )
        return rows

    def score(self, samples: Sequence[BenchmarkSample], predictions: Sequence[str]) -> dict[str, Any]:
        """Metrics in percent: ``accuracy``, ``per_category`` and the benchmark's own (see the subclasses)."""
        rows = self.judge(samples, predictions)
        correct = [r["correct"] for r in rows]
        metrics = {
            "benchmark": self.name,
            "num_samples": len(rows),
            "num_correct": sum(correct),
            "num_unanswered": sum(1 for r in rows if not r["extracted"]),
            "accuracy": percent(sum(correct), len(rows)),
            "per_category": accuracy_by([s.category for s in samples], correct),
        }
        metrics.update(self._extra_metrics(samples, rows))
        return metrics

    def _extra_metrics(self, samples: Sequence[BenchmarkSample], rows: list[dict]) -> dict[str, Any]:
        return {}


def _dedupe_ids(samples: list[BenchmarkSample]) -> None:
    seen: dict[str, int] = {}
    for sample in samples:
        count = seen.get(sample.id, 0)
        seen[sample.id] = count + 1
        if count:
            sample.id = f"{sample.id}#{count}"


__all__ = [
    "MC_POST_PROMPT",
    "POPE_ORIGINAL_POST_PROMPT",
    "SHORT_ANSWER_POST_PROMPT",
    "Benchmark",
    "BenchmarkSample",
]
