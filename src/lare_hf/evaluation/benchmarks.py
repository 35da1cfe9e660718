"""Evaluation benchmarks: loaders for local copies of MMBench, MMStar, MMVP, ScienceQA (image subset), POPE and the
synthetic RefocusShapes, their standard prompts, answer extraction and scoring.

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
import math
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import datasets
from PIL import Image

from ..data.files import is_file, load_image, maybe_base64, read_table
from ..data.formats import question_with_choices

MC_POST_PROMPT = "\nAnswer with the option's letter from the given choices directly."
SHORT_ANSWER_POST_PROMPT = "\nAnswer the question using a single word or phrase."
POPE_ORIGINAL_POST_PROMPT = " Please answer this question with one word."
CIRCULAR_MODULUS = 1_000_000
OPTION_LETTERS = "ABCDEFGH"

_NUMBER_WORDS = {
    w: str(i)
    for i, w in enumerate(
        "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
        "seventeen eighteen nineteen twenty".split()
    )
}


# ----------------------------------------------------------------------------------------------------------------
# samples and images


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
# reading files


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
# answer extraction


def _clean(text: Any) -> str:
    """Generated text without reasoning tags, special tokens and markdown emphasis; spaces collapsed."""
    if text is None:
        return ""
    text = str(text)
    lowered = text.lower()
    if "</think>" in lowered:
        text = text[lowered.rfind("</think>") + len("</think>") :]
    text = re.sub(r"<\|[^|>]*\|>|</?s>|<[^>\s]*answer>", " ", text)
    text = text.replace("**", " ").replace("__", " ").replace("`", " ")
    return re.sub(r"[ \t\r\f\v]+", " ", text).strip()


def normalize_text(text: Any) -> str:
    """Lower case, punctuation to spaces, articles dropped, whitespace collapsed (for free-form matching)."""
    words = re.sub(r"[^\w\s]", " ", str(text).lower()).split()
    return " ".join(w for w in words if w not in ("a", "an", "the"))


def _norm_option(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", str(text).lower()).split())


_ANSWER_RE = re.compile(r"\banswer\b\s*(?:\bis\b|:|=)\s*:?\s*(?:(?:option|choice)\s+)?", re.IGNORECASE)
_NOT_ARTICLE_NEXT = {"or", "and", "nor", "vs", "versus", "is", "seems", "would", "should", "might"}


def _answer_segments(text: str) -> list[str]:
    """Texts following "answer is" / "answer:" phrases, last first (a final answer after a rationale wins)."""
    segments = []
    for match in reversed(list(_ANSWER_RE.finditer(text))):
        segment = text[match.end() :].split("\n")[0].strip()
        if segment:
            segments.append(segment)
    return segments


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?;])\s", text, maxsplit=1)[0]


def _choice_in(segment: str, letters: set[str], choices: dict[str, str]) -> str | None:
    """Letter found in `segment`; "" when ambiguous or an invalid letter; None when nothing was found."""
    s = segment.strip().strip("*_\"'` ")
    if not s:
        return None
    whole = re.fullmatch(r"[(\[]?([A-Za-z])[)\]]?[.:,;!]?", s)
    if whole:
        letter = whole.group(1).upper()
        return letter if letter in letters else ""
    lead = re.match(r"[(\[]([A-Za-z])[)\]]|([A-Za-z])[.:)](?=\s|$)", s)
    if lead:
        letter = (lead.group(1) or lead.group(2)).upper()
        if letter in letters:
            return letter
    tokens = s.split()
    found: set[str] = set()
    for k, token in enumerate(tokens):
        core = token.strip(".,:;!?\"'*")
        m = re.fullmatch(r"[(\[]([A-Za-z])[)\]]|([A-Z])", core)
        if not m:
            continue
        letter = (m.group(1) or m.group(2)).upper()
        if letter not in letters:
            continue
        if m.group(2) == "A" and core == token and k + 1 < len(tokens):
            nxt = tokens[k + 1]
            if nxt[:1].islower() and nxt.strip(".,:;!?").lower() not in _NOT_ARTICLE_NEXT:
                continue  # "A dog ..." -- an article, not option A
        found.add(letter)
    if len(found) == 1:
        return found.pop()
    if len(found) > 1:
        return ""
    if choices:
        norm = _norm_option(s)
        hits = []
        for letter, option in choices.items():
            option_norm = _norm_option(option)
            if option_norm and re.search(rf"(?<!\w){re.escape(option_norm)}(?!\w)", norm):
                hits.append(letter)
        if len(hits) == 1:
            return hits[0]
        if len(hits) > 1:
            exact = [h for h in hits if _norm_option(choices[h]) == norm]
            if len(exact) == 1:
                return exact[0]
            longest = max(hits, key=lambda h: len(_norm_option(choices[h])))
            if all(_norm_option(choices[h]) in _norm_option(choices[longest]) for h in hits):
                return longest
            return ""
    return None


def extract_choice(text: Any, choices: dict[str, str] | Sequence[str] | str | None = None) -> str:
    """The option letter a generated text picks, or "" when none can be told (nothing found, or ambiguous).

    `choices`: {letter: option text}, a list of option texts (lettered A, B, ...), or just the valid letters
    ("ABCD", the default). Handles "B", "(B)", "b.", "B. cat", "b) Closed", "The answer is B.", "Answer: (c)",
    a rationale followed by "so the answer is C", and an option's text without its letter ("Closed").
    "A or B" and texts naming several options are ambiguous -> "".
    """
    if isinstance(choices, str):
        options: dict[str, str] = {}
        letters = {c.upper() for c in choices}
    else:
        if choices is not None and not isinstance(choices, dict):
            choices = {OPTION_LETTERS[i]: str(c) for i, c in enumerate(choices)}
        options = {str(k).upper(): str(v) for k, v in (choices or {}).items() if v is not None}
        letters = set(options) or set("ABCD")
    text = _clean(text)
    if not text:
        return ""
    for segment in _answer_segments(text):
        for part in (_first_sentence(segment), segment):
            found = _choice_in(part, letters, options)
            if found is not None:
                return found
    found = _choice_in(text, letters, options)
    return found or ""


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z]+(?:'[a-z]+)?", text.lower())


def extract_yes_no(text: Any, strict: bool = False) -> str:
    """ "yes" / "no" from a generated text.

    A leading yes/no word (or one right after "the answer is") decides. Otherwise, as in the official POPE script,
    the first sentence is read: "no", "not" or a "n't" word -> "no", anything else -> "yes". With ``strict=True``
    (RefocusShapes) a text must contain exactly one of the words yes / no, else "" (unanswered). Empty text -> "".
    """
    text = _clean(text)
    if not text:
        return ""
    for segment in _answer_segments(text):
        words = _words(segment)
        if words and words[0] in ("yes", "no"):
            return words[0]
    words = _words(text)
    if words and words[0] in ("yes", "no"):
        return words[0]
    if strict:
        kinds = {w for w in words if w in ("yes", "no")}
        return kinds.pop() if len(kinds) == 1 else ""
    first = _words(text.split(".")[0])
    if any(w in ("no", "not") or w.endswith("n't") for w in first):
        return "no"
    return "yes"


def _numbers(text: str) -> list[str]:
    out = []
    for token in re.findall(r"-?\d+(?:\.\d+)?|[A-Za-z]+", text):
        if token[0].isdigit() or token[0] == "-":
            plain_integer = "." not in token and not token.startswith("-")
            out.append((token.lstrip("0") or "0") if plain_integer else token)
        elif token.lower() in _NUMBER_WORDS:
            out.append(_NUMBER_WORDS[token.lower()])
    return out


def extract_number(text: Any) -> str:
    """The number a text answers with: the first number after "the answer is", else the only number in the text
    (digits or the words zero..twenty); "" when there is none or several different ones."""
    text = _clean(text)
    if not text:
        return ""
    for segment in _answer_segments(text):
        numbers = _numbers(_first_sentence(segment))
        if numbers:
            return numbers[0]
    numbers = set(_numbers(text))
    return numbers.pop() if len(numbers) == 1 else ""


def extract_free_form(text: Any) -> str:
    """Normalised answer text: what follows the last "the answer is" (first sentence), else the whole text."""
    text = _clean(text)
    segments = _answer_segments(text)
    return normalize_text(_first_sentence(segments[0]) if segments else text)


# ----------------------------------------------------------------------------------------------------------------
# helpers for rows


def _missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none")


def _text(value: Any) -> str:
    if _missing(value):
        return ""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(value).strip()


def _int(value: Any) -> int | None:
    try:
        return int(float(value))
    except (TypeError, ValueError):
        return None


def _letter(value: Any) -> str:
    """Gold option letter from "B", "(b)", "b", "(a) Open"."""
    text = _text(value)
    m = re.match(r"\s*\(?([A-Za-z])\)?(?:[\s.:]|$)", text)
    return m.group(1).upper() if m else text.upper()


def options_prompt(choices: dict[str, str]) -> str:
    return "\n".join(f"{letter}. {text}" for letter, text in choices.items())


def parse_inline_options(question: str) -> dict[str, str] | None:
    """Options spelled inside a question, MMStar style: "...\\nOptions: A: x, B: y, C: z" -> {"A": "x", ...}."""
    markers = list(re.finditer(r"options?\s*:\s*", question, re.IGNORECASE))
    marker = markers[-1] if markers else None
    tail = question[marker.end() :] if marker else question
    first = re.match(r"\s*\(?A\s*[:.)]\s*", tail)
    if not first:
        return None
    starts = [(first.start(), first.end())]
    for letter in OPTION_LETTERS[1:]:
        m = re.compile(rf"[,;\s]\s*\(?{letter}\s*[:.)]\s+").search(tail, starts[-1][1])
        if not m:
            break
        starts.append((m.start(), m.end()))
    if len(starts) < 2:
        return None
    options = {}
    for k, (_, end) in enumerate(starts):
        stop = starts[k + 1][0] if k + 1 < len(starts) else len(tail)
        options[OPTION_LETTERS[k]] = tail[end:stop].strip().rstrip(",;").strip()
    return options


def _pct(numerator: float, denominator: float) -> float:
    return 100.0 * numerator / denominator if denominator else 0.0


def _accuracy_by(keys: Iterable[Any], correct: Iterable[bool]) -> dict[str, float]:
    totals: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for key, ok in zip(keys, correct):
        if key is None or key == "":
            continue
        totals[str(key)][0] += int(bool(ok))
        totals[str(key)][1] += 1
    return {key: _pct(hit, n) for key, (hit, n) in sorted(totals.items())}


# ----------------------------------------------------------------------------------------------------------------
# benchmarks


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
            "accuracy": _pct(sum(correct), len(rows)),
            "per_category": _accuracy_by([s.category for s in samples], correct),
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
            if _missing(value):
                break
            choices[letter] = _text(value)
        question, hint = _text(self._get(row, cols, "question")), _text(self._get(row, cols, "hint"))
        prompt = (f"{hint}\n" if hint else "") + f"{question}\n{options_prompt(choices)}{self.post_prompt}"
        index = _int(self._get(row, cols, "index"))
        meta = {
            "index": index if index is not None else self._get(row, cols, "index"),
            "l2_category": _text(self._get(row, cols, "l2_category")) or None,
            "hint": hint or None,
            "question": question,
            "source": _text(self._get(row, cols, "source")) or None,
            "split": _text(self._get(row, cols, "split")) or None,
        }
        return BenchmarkSample(
            id=_text(self._get(row, cols, "index")) or str(i),
            image=None,
            prompt=prompt,
            answer=_letter(self._get(row, cols, "answer")) if not _missing(self._get(row, cols, "answer")) else "",
            choices=choices,
            category=_text(self._get(row, cols, "category")) or None,
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
            "accuracy": _pct(sum(hits), len(hits)),
            "circular_accuracy": _pct(sum(hits), len(hits)),
            "plain_accuracy": _pct(sum(plain), len(plain)),
            "num_questions": len(groups),
            "num_circular_questions": sum(1 for members in groups.values() if len(members) > 1),
            "per_category": _accuracy_by(categories, hits),
            "per_l2_category": _accuracy_by(l2, hits),
            "per_category_plain": _accuracy_by([s.category for s in samples], plain),
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
        question = _text(self._get(row, cols, "question"))
        choices = parse_inline_options(question)
        meta_info = self._get(row, cols, "meta_info")
        return BenchmarkSample(
            id=_text(self._get(row, cols, "index")) or str(i),
            image=None,
            prompt=f"{question}{self.post_prompt}",
            answer=_letter(self._get(row, cols, "answer")),
            choices=choices,
            category=_text(self._get(row, cols, "category")) or None,
            meta={
                "index": _int(self._get(row, cols, "index")),
                "l2_category": _text(self._get(row, cols, "l2_category")) or None,
                "meta_info": meta_info if isinstance(meta_info, dict) else _text(meta_info) or None,
            },
        )

    def _extra_metrics(self, samples, rows):
        return {
            "per_l2_category": _accuracy_by([s.meta.get("l2_category") for s in samples], [r["correct"] for r in rows])
        }


def parse_mmvp_options(options: Any) -> dict[str, str]:
    """ "(a) Open (b) Closed" (or a list) -> {"A": "Open", "B": "Closed"}."""
    if isinstance(options, (list, tuple)):
        return {OPTION_LETTERS[i]: _text(o) for i, o in enumerate(options)}
    text = _text(options)
    found = re.findall(r"\(([a-zA-Z])\)\s*(.*?)(?=\s*\([a-zA-Z]\)|$)", text, re.DOTALL)
    return {letter.upper(): value.strip() for letter, value in found}


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
        question = _text(self._get(row, cols, "question"))
        index = _int(self._get(row, cols, "index"))
        return BenchmarkSample(
            id=str(index) if index is not None else str(i),
            image=None,
            prompt=f"{question}\n{options_prompt(choices)}{self.post_prompt}",
            answer=_letter(self._get(row, cols, "answer")),
            choices=choices,
            category=_text(self._get(row, cols, "category")) or None,
            meta={"index": index if index is not None else i, "row": i},
        )

    def _fallback_image(self, row, cols, root):
        index = self._get(row, cols, "index")
        for name in (f"{_text(index)}.jpg", f"{_text(index)}.png", f"{_text(index)}.jpeg"):
            for folder in (root, root / "MMVP Images"):
                if (folder / name).is_file():
                    return str(folder / name)
        return None

    def _extra_metrics(self, samples, rows):
        """Pair accuracy: questions 1-2, 3-4, ... (``Index``, 1-based; 0-based indices are detected)."""
        indices = [s.meta.get("index") for s in samples]
        base = 0 if min(indices, default=1) == 0 else 1
        pairs: dict[int, list[bool]] = defaultdict(list)
        for index, row in zip(indices, rows):
            pairs[(index - base) // 2].append(row["correct"])
        complete = [all(v) for v in pairs.values() if len(v) == 2]
        return {
            "pair_accuracy": _pct(sum(complete), len(complete)),
            "num_pairs": len(complete),
            "num_incomplete_pairs": sum(1 for v in pairs.values() if len(v) != 2),
        }


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
        choices = {OPTION_LETTERS[k]: _text(c) for k, c in enumerate(raw)}
        answer = _int(self._get(row, cols, "answer"))
        if answer is None or not 0 <= answer < len(choices):
            raise ValueError(f"{source}: row {i}: 'answer' must index 'choices' (0..{len(choices) - 1}).")
        hint, question = _text(self._get(row, cols, "hint")), _text(self._get(row, cols, "question"))
        context = f"Context: {hint}\n" if hint else ""
        return BenchmarkSample(
            id=_text(self._get(row, cols, "id")) or str(i),
            image=None,
            prompt=f"{context}{question}\n{options_prompt(choices)}{self.post_prompt}",
            answer=OPTION_LETTERS[answer],
            choices=choices,
            category=_text(self._get(row, cols, "category")) or None,
            meta={
                "row": i,
                "subject": _text(self._get(row, cols, "subject")) or None,
                "grade": _text(self._get(row, cols, "grade")) or None,
                "topic": _text(self._get(row, cols, "topic")) or None,
            },
        )

    def _extra_metrics(self, samples, rows):
        correct = [r["correct"] for r in rows]
        return {
            "per_subject": _accuracy_by([s.meta.get("subject") for s in samples], correct),
            "per_grade": _accuracy_by([s.meta.get("grade") for s in samples], correct),
        }


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
        "yes_ratio": _pct(sum(predicted), len(predicted)),
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
        answer = _text(self._get(row, cols, "answer")).lower()
        if answer not in ("yes", "no"):
            raise ValueError(f"{source}: row {i}: POPE answers are 'yes' or 'no', got {answer!r}.")
        qid = _text(self._get(row, cols, "question_id"))
        category = _text(self._get(row, cols, "category")) or None
        sid = _text(self._get(row, cols, "id")) or (f"{category}/{qid}" if category and qid else qid) or str(i)
        return BenchmarkSample(
            id=sid,
            image=None,
            prompt=f"{_text(self._get(row, cols, 'question'))}{self.post_prompt}",
            answer=answer,
            choices=None,
            category=category,
            meta={"question_id": qid or None, "image_source": _text(self._get(row, cols, "image_source")) or None},
        )

    def _fallback_image(self, row, cols, root):
        name = _text(self._get(row, cols, "image_source"))
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
        question = _text(self._get(row, cols, "question"))
        raw = self._get(row, cols, "choices")
        if isinstance(raw, dict):
            choices = {str(k).upper(): _text(v) for k, v in raw.items() if not _missing(v)} or None
        elif isinstance(raw, (list, tuple)) and len(raw) > 0:
            choices = {OPTION_LETTERS[k]: _text(c) for k, c in enumerate(raw)}
        else:
            choices = None
        if choices:
            question = question_with_choices(question, raw)  # the text training asks (lare_hf.data.formats)
        answer = _text(self._get(row, cols, "answer"))
        if choices:
            answer = _letter(answer)
        elif answer.lower() in ("yes", "no"):
            answer = answer.lower()
        elif not re.fullmatch(r"-?\d+(?:\.\d+)?", answer):
            answer = normalize_text(answer)
        pair_id = _int(self._get(row, cols, "pair_id"))
        return BenchmarkSample(
            id=_text(self._get(row, cols, "id")) or str(i),
            image=None,
            prompt=f"{question}{self.post_prompt}",
            answer=answer,
            choices=choices,
            category=_text(self._get(row, cols, "category")) or None,
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
        pairs: dict[int, list[bool]] = defaultdict(list)
        for sample, row in zip(samples, rows):
            if sample.meta.get("pair_id", -1) >= 0:
                pairs[sample.meta["pair_id"]].append(row["correct"])
        complete = [all(v) for v in pairs.values() if len(v) == 2]
        return {"pair_accuracy": _pct(sum(complete), len(complete)), "num_pairs": len(complete)}


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

        answer = _colour_in(_text(self._get(row, cols, "answer")), COLOUR_NAMES)
        visited = self._get(row, cols, "visited_cells")
        return BenchmarkSample(
            id=_text(self._get(row, cols, "id")) or str(i),
            image=None,
            prompt=f"{_text(self._get(row, cols, 'question'))}{self.post_prompt}",
            answer=answer,
            category=_text(self._get(row, cols, "category")) or None,
            meta={"visited_cells": [list(map(int, cell)) for cell in visited] if visited is not None else []},
        )

    def extract(self, prediction, sample):
        from ..data.refocus_chains import COLOUR_NAMES

        text = _clean(prediction)
        segments = _answer_segments(text)
        return _colour_in(segments[0] if segments else text, COLOUR_NAMES)


def _colour_in(text: str, colours: Sequence[str]) -> str:
    """The one colour word `text` names ("" when it names none or several different ones)."""
    found = {word for word in re.findall(r"[a-z]+", text.lower()) if word in colours}
    return found.pop() if len(found) == 1 else ""


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
