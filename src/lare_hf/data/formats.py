"""Training data formats: LLaVA-style conversations and reasoning records, loaded through `datasets`.

Two record formats are read:

* **conversation** (LLaVA-style)::

    {"id": "000001", "image": "coco/train2017/000001.jpg",
     "conversations": [{"from": "human", "value": "<image>\\nWhat is in the picture?"},
                       {"from": "gpt", "value": "A cat."}, ...]}

  Roles "human"/"user" and "gpt"/"assistant" ("role"/"content" keys are accepted as well as "from"/"value").
  Multi-turn is allowed; the LAST gpt turn is the training target, earlier turns are the prompt. Records without
  an image are text-only (the prompt then has no image part).

* **reasoning** (Vision-R1-cold-like; the synthetic RefocusShapes benchmark writes this format)::

    {"id": ..., "image": ..., "question": ..., "rationale": ..., "answer": ..., "choices": [...]}

  "image", "question" and "answer" are required; "id", "rationale" and "choices" are optional. A missing rationale
  is allowed at load time (`LaReRecords.without_rationale` lists such records and `require_rationales()` checks
  them up front for the stages that need one, II and IV); conversation records usually have none. Stage III mixes
  both kinds: the latent losses are taken over the samples that have a rationale / an image.

Files: JSON (a list of records), JSONL, parquet, or a folder written by `Dataset.save_to_disk` /
`DatasetDict.save_to_disk`, told apart by the extension (or by being a folder). Images may be paths relative to
`image_folder` (default: the folder that holds the data file or the save_to_disk folder), absolute paths, embedded
`{"bytes": ..., "path": ...}` dicts (as datasets / parquet store images), or a `datasets.Image()` column.

Every record is normalised to one example structure::

    {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ...}]},
                  {"role": "assistant", "content": "earlier answer"}, ...],
     "answer": str, "rationale": str | None, "image": PIL.Image.Image (RGB) | None, "id": str}

Records are validated when they are loaded -- fields, types, and every image is opened and verified -- so bad data
shows up before training starts, never in the middle of it. Images are then decoded lazily, in `__getitem__`
(so a large dataset does not sit in memory as decoded pixels); each call returns a fresh RGB `PIL.Image`.

This module loads and validates whole files (`load_records`, `LaReRecords`); the rules for one record are in
`lare_hf.data.records`, file and image reading in `lare_hf.data.files`.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Literal

import datasets
from torch.utils.data import Dataset

from .files import (
    ImageRef,
    data_file_builder,
    describe_image,
    is_save_to_disk_folder,
    load_data_files,
    open_image,
    verify_image,
)
from .records import (
    IMAGE_TOKEN,
    MalformedRecordError,
    RecordProblem,
    format_choices,
    normalise_record,
    question_with_choices,
)

logger = logging.getLogger(__name__)

CONVERSATION_COLUMNS = ("id", "image", "conversations", "rationale")
REASONING_COLUMNS = ("id", "image", "question", "rationale", "answer", "choices")
_VERIFY_WORKERS = 8
_MAX_REASONS_LOGGED = 5

Kind = Literal["auto", "conversation", "reasoning"]
OnError = Literal["raise", "skip"]


# ----------------------------------------------------------------------------------------------------------------
# the dataset


class LaReRecords(Dataset):
    """Validated training examples over a `datasets.Dataset` (only the valid rows are kept).

    `records[i]` is the normalised example (see the module docstring) with its image decoded lazily as RGB.
    Attributes: `dataset` (the underlying `datasets.Dataset` of valid raw rows), `kind` ("conversation" or
    "reasoning"), `source` (file name for messages), `source_indices` (row index in the source of each example),
    `skipped` (list of (source index, reason); for JSON Lines files also ("line N", reason) for lines that are not
    JSON), `num_skipped`, `without_rationale` (positions of examples that have
    no rationale), `without_image` (positions of text-only examples; they have no latent phase and may be batched with
    image examples, see `LaReDataCollator`).
    """

    def __init__(
        self,
        dataset: datasets.Dataset,
        kind: str,
        image_root: Path | None,
        source: str,
        source_indices: list[int],
        skipped: list[tuple[int, str]],
        without_rationale: list[int],
        without_image: list[int] | None = None,
        confine_to: Path | None = None,
    ):
        self.dataset = dataset
        self.confine_to = confine_to
        self.kind = kind
        self.image_root = image_root
        self.source = source
        self.source_indices = source_indices
        self.skipped = skipped
        self.without_rationale = without_rationale
        self.without_image = without_image or []

    @property
    def num_skipped(self) -> int:
        return len(self.skipped)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not isinstance(index, int):
            raise TypeError(f"LaReRecords indices are ints, got {type(index).__name__}.")
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} is out of range for {len(self)} examples")
        row = self.dataset[index]
        source_index = self.source_indices[index]
        try:
            example, ref = normalise_record(row, self.kind, self.image_root, self.confine_to)
            image = open_image(ref) if ref is not None else None
        except RecordProblem as problem:
            raise MalformedRecordError(self.source, source_index, problem.field, problem.reason, problem.fix) from None
        except Exception as error:  # noqa: BLE001  (an image that verified but does not decode, e.g. truncated)
            raise MalformedRecordError(
                self.source,
                source_index,
                "image",
                f"cannot decode {describe_image(ref)}: {error}",
                "replace the image",
            ) from error
        example["image"] = image
        example["id"] = _record_id(row, self.source, source_index)
        return example

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for index in range(len(self)):
            yield self[index]

    def require_rationales(self) -> None:
        """Raise (before training) when any example lacks the rationale that latent-loss stages need."""
        if self.without_rationale:
            first = [
                _record_id(self.dataset[i], self.source, self.source_indices[i]) for i in self.without_rationale[:5]
            ]
            raise ValueError(
                f"{self.source}: {len(self.without_rationale)} of {len(self)} records have no rationale "
                f"(first ids: {first}); this stage's latent losses need one. Fix the data, or train a stage "
                "that does not use rationales (with_rationale=False)."
            )

    def __repr__(self) -> str:
        return (
            f"LaReRecords(source={self.source!r}, kind={self.kind!r}, num_examples={len(self)}, "
            f"num_skipped={self.num_skipped})"
        )


def _record_id(row: dict, source: str, source_index: int) -> str:
    value = row.get("id")
    if value is None or (isinstance(value, str) and not value):
        return f"{Path(source).name}:{source_index}"
    return str(value)


def detect_kind(column_names: list[str]) -> str:
    """'conversation' when there is a "conversations" column, 'reasoning' when there is a "question" column."""
    columns = set(column_names)
    conversation, reasoning = "conversations" in columns, "question" in columns
    if conversation and not reasoning:
        return "conversation"
    if reasoning and not conversation:
        return "reasoning"
    what = "both 'conversations' and 'question'" if conversation else "neither 'conversations' nor 'question'"
    raise ValueError(
        f"Cannot detect the record format: the columns {sorted(columns)} have {what}. Conversation records have a "
        "'conversations' list; reasoning records have 'image', 'question', 'rationale', 'answer'. Pass "
        "kind='conversation' or kind='reasoning'."
    )


def _prepare_dataset(ds: datasets.Dataset) -> datasets.Dataset:
    feature = ds.features.get("image")
    if isinstance(feature, datasets.Image) and feature.decode:
        # raw {"bytes", "path"} rows: cheap to validate, decoded by us (as RGB) when an example is read
        ds = ds.cast_column("image", datasets.Image(decode=False))
    return ds


def _iter_batches(ds: datasets.Dataset, columns: tuple[str, ...], batch_size: int) -> Iterator[list[dict]]:
    present = [c for c in columns if c in ds.column_names]
    view = ds.select_columns(present)
    for batch in view.iter(batch_size=batch_size):
        keys = list(batch)
        yield [dict(zip(keys, values)) for values in zip(*(batch[k] for k in keys))]


def _image_fix(ref: ImageRef, image_root: Path | None) -> str:
    if ref[0] != "path":
        return "replace the embedded image"
    root = image_root if image_root is not None else Path.cwd()
    return (
        f"fix the image path (relative paths are resolved against image_folder={str(root)!r}; pass "
        "image_folder=... if the images live elsewhere)"
    )


def _check_batch(
    rows: list[dict],
    start: int,
    kind: str,
    image_root: Path | None,
    confine_to: Path | None,
    pool: ThreadPoolExecutor,
    path_verdicts: dict[Path, str | None],
) -> tuple[list[tuple[int, dict, ImageRef | None]], list[tuple[int, RecordProblem]]]:
    """Normalise a batch of raw rows (numbered from `start`) and verify their images, on `pool`, each image file once
    (`path_verdicts` remembers them across batches): ((index, example, image reference) of the good rows, (index,
    problem) of the others)."""
    problems: list[tuple[int, RecordProblem]] = []
    candidates: list[tuple[int, dict, ImageRef | None]] = []
    for offset, row in enumerate(rows):
        try:
            example, ref = normalise_record(row, kind, image_root, confine_to)
        except RecordProblem as problem:
            problems.append((start + offset, problem))
            continue
        candidates.append((start + offset, example, ref))
    new_paths = list({ref[1] for _, _, ref in candidates if ref is not None and ref[0] == "path"})
    new_paths = [path for path in new_paths if path not in path_verdicts]
    path_verdicts.update(zip(new_paths, pool.map(verify_image, [("path", p) for p in new_paths])))
    embedded = [(index, ref) for index, _, ref in candidates if ref is not None and ref[0] == "bytes"]
    embedded_verdicts = dict(zip((i for i, _ in embedded), pool.map(verify_image, (r for _, r in embedded))))
    good = []
    for index, example, ref in candidates:
        reason = None
        if ref is not None and ref[0] == "path":
            reason = path_verdicts[ref[1]]
        elif ref is not None and ref[0] == "bytes":
            reason = embedded_verdicts[index]
        if reason is not None:
            problems.append((index, RecordProblem("image", reason, _image_fix(ref, image_root))))
        else:
            good.append((index, example, ref))
    return good, problems


def _build_records(
    ds: datasets.Dataset,
    kind: Kind,
    image_root: Path | None,
    on_error: OnError,
    source: str,
    batch_size: int = 512,
    confine_to: Path | None = None,
    skipped_lines: list[tuple[str, str]] | None = None,
) -> LaReRecords:
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}.")
    if kind not in ("auto", "conversation", "reasoning"):
        raise ValueError(f"kind must be 'auto', 'conversation' or 'reasoning', got {kind!r}.")
    if len(ds) == 0:
        raise ValueError(f"{source} has no records.")
    ds = _prepare_dataset(ds)
    kind = detect_kind(ds.column_names) if kind == "auto" else kind
    columns = CONVERSATION_COLUMNS if kind == "conversation" else REASONING_COLUMNS

    skipped: list[tuple[int, str]] = []
    valid: list[int] = []
    rationale_missing: list[int] = []
    image_missing: list[int] = []
    path_verdicts: dict[Path, str | None] = {}  # each image file is verified once, however many records use it
    start = 0
    with ThreadPoolExecutor(max_workers=_VERIFY_WORKERS) as pool:  # image checks are mostly file I/O
        for rows in _iter_batches(ds, columns, batch_size):
            good, problems = _check_batch(rows, start, kind, image_root, confine_to, pool, path_verdicts)
            for index, example, ref in good:
                valid.append(index)
                if example["rationale"] is None:
                    rationale_missing.append(index)
                if ref is None:
                    image_missing.append(index)
            if problems:
                problems.sort(key=lambda item: item[0])
                if on_error == "raise":
                    index, problem = problems[0]
                    raise MalformedRecordError(source, index, problem.field, problem.reason, problem.fix)
                skipped.extend((index, str(problem)) for index, problem in problems)
            start += len(rows)
    valid.sort()

    skipped = list(skipped_lines or []) + skipped
    if skipped:
        shown = "; ".join(
            f"{i if isinstance(i, str) else f'record {i}'}: {reason}" for i, reason in skipped[:_MAX_REASONS_LOGGED]
        )
        more = f" (and {len(skipped) - _MAX_REASONS_LOGGED} more)" if len(skipped) > _MAX_REASONS_LOGGED else ""
        logger.warning(
            f"{source}: skipped {len(skipped)} malformed record(s) of {len(ds) + len(skipped_lines or [])} "
            f"(on_error='skip'): {shown}{more}"
        )
    if not valid:
        raise ValueError(
            f"{source}: all {len(ds)} records are malformed (see the warning above); nothing to train on."
        )
    kept = ds if len(valid) == len(ds) else ds.select(valid)
    position = {index: pos for pos, index in enumerate(valid)}
    return LaReRecords(
        dataset=kept,
        kind=kind,
        image_root=image_root,
        source=source,
        source_indices=valid,
        skipped=skipped,
        without_rationale=sorted(position[i] for i in rationale_missing),
        without_image=sorted(position[i] for i in image_missing),
        confine_to=confine_to,
    )


# ----------------------------------------------------------------------------------------------------------------
# public loaders


def _select_split(obj: datasets.Dataset | datasets.DatasetDict, split: str | None, source: str) -> datasets.Dataset:
    if isinstance(obj, datasets.DatasetDict):
        names = list(obj)
        if split is None:
            if "train" in obj:
                split = "train"
            elif len(names) == 1:
                split = names[0]
            else:
                raise ValueError(f"{source} has splits {names}; pass split=... to choose one.")
        if split not in obj:
            raise ValueError(f"{source} has no split {split!r}; it has {names}.")
        return obj[split]
    if not isinstance(obj, datasets.Dataset):
        raise TypeError(f"Expected a datasets.Dataset or DatasetDict, got {type(obj).__name__}.")
    return obj


def read_dataset(path: str, split: str | None = None) -> datasets.Dataset:
    """The raw `datasets.Dataset` of a JSON / JSONL / parquet file or a save_to_disk folder (no validation)."""
    file = Path(path).expanduser()
    if file.is_dir():
        if not (is_save_to_disk_folder(file) or (file / "dataset_info.json").is_file()):
            raise ValueError(
                f"{path} is a folder but not one written by save_to_disk (no state.json / dataset_dict.json). "
                "Pass a JSON, JSONL or parquet file, or a save_to_disk folder."
            )
        obj = datasets.load_from_disk(str(file))
        if isinstance(obj, datasets.Dataset) and split is not None:
            raise ValueError(f"{path} holds a single Dataset, not a DatasetDict; drop split={split!r}.")
        return _select_split(obj, split, path)
    if not file.is_file():
        raise FileNotFoundError(f"Training data {path} does not exist.")
    if file.stat().st_size == 0:
        raise ValueError(f"{path} is empty (0 bytes): it holds no records.")
    if data_file_builder(file) not in ("json", "parquet", "arrow"):
        raise ValueError(
            f"Cannot tell the format of {path} from its extension: use .json (a list of records), .jsonl, "
            ".parquet, or a save_to_disk folder."
        )
    return load_data_files([file], path, split=split or "train")


class MalformedLineError(ValueError):
    """A line of a JSON Lines file that is not a JSON object: names the file and the line number."""

    def __init__(self, source: str, line: int, reason: str):
        self.source, self.line, self.reason = source, line, reason
        super().__init__(
            f"{source}:{line}: line {line} is not a JSON record ({reason}). To fix: write one JSON object per line; "
            "or pass on_error='skip' (--on_error skip) to drop malformed lines (they are counted and logged)."
        )


def _is_json_lines(path: Path) -> bool:
    name = path.name.lower()
    return any(name.endswith(suffix) for suffix in (".jsonl", ".ndjson"))


def _read_json_lines(path: Path, on_error: OnError) -> tuple[datasets.Dataset, list]:
    """A JSON Lines file read line by line, so that a malformed line is reported with its line number (or skipped
    and counted with on_error='skip') instead of failing the whole file inside the JSON reader."""
    rows, bad = [], []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict):
                    raise ValueError(f"it holds a {type(row).__name__}, not an object")
            except ValueError as error:
                if on_error == "raise":
                    raise MalformedLineError(str(path), number, str(error)) from None
                bad.append((f"line {number}", f"not a JSON record ({error})"))
                continue
            rows.append(row)
    if not rows:
        if bad:
            raise ValueError(f"{path}: all {len(bad)} lines are malformed (first: {bad[0][1]}); nothing to train on.")
        raise ValueError(f"{path} is empty: it holds no records. Write one JSON record per line.")
    if not bad:
        return read_dataset(str(path)), bad
    # The valid lines go through the same JSON reader as a clean file (it reconciles records of mixed types, which
    # the per-record checks then report by index).
    with tempfile.TemporaryDirectory() as folder:
        clean = Path(folder) / path.name
        clean.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
        return read_dataset(str(clean)), bad


def load_records(
    path: str,
    kind: Kind = "auto",
    image_folder: str | None = None,
    on_error: OnError = "raise",
    split: str | None = None,
    allow_images_outside_root: bool = False,
) -> LaReRecords:
    """Load, validate and normalise conversation or reasoning records from a file or save_to_disk folder.

    Args:
        path: a .json (list of records), .jsonl, .parquet file (optionally compressed JSON), or a save_to_disk
            folder of a Dataset / DatasetDict.
        kind: "conversation", "reasoning", or "auto" (detected from the columns: "conversations" -> conversation,
            "question" -> reasoning).
        image_folder: root of relative image paths; default: the folder holding `path` (for a save_to_disk folder,
            the folder that contains it).
        on_error: "raise" -> the first malformed record raises `MalformedRecordError`; "skip" -> malformed records
            are dropped, listed in `.skipped`, counted in `.num_skipped`, and a warning is logged.
        split: for a DatasetDict folder, the split (default "train", or the only one); for files, a datasets split
            expression such as "train[:1000]" (default "train").
        allow_images_outside_root: image paths must resolve inside the image folder (`image_folder`, default the
            data file's folder); True lets a trusted dataset reference images anywhere.

    A JSON Lines file is read line by line: a line that is not a JSON object raises `MalformedLineError` naming the
    file and line number, or is skipped and counted (in `.skipped` / `.num_skipped`) with on_error='skip'.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}.")
    file = Path(path).expanduser()
    skipped_lines: list = []
    if file.is_file() and _is_json_lines(file) and split in (None, "train"):
        ds, skipped_lines = _read_json_lines(file, on_error)
    else:
        ds = read_dataset(path, split=split)
    root = Path(image_folder).expanduser().resolve() if image_folder is not None else file.resolve().parent
    confine_to = None if allow_images_outside_root else root
    return _build_records(
        ds, kind, root, on_error, source=str(path), confine_to=confine_to, skipped_lines=skipped_lines
    )


def records_from_dataset(
    ds: datasets.Dataset | datasets.DatasetDict,
    kind: Kind = "auto",
    image_folder: str | None = None,
    on_error: OnError = "raise",
    split: str | None = None,
    allow_images_outside_root: bool = False,
) -> LaReRecords:
    """`load_records` for an in-memory `datasets.Dataset` (a DatasetDict needs `split`, default "train").

    Relative image paths are resolved against `image_folder`, or the current directory when it is None. With an
    `image_folder`, image paths must stay inside it (unless `allow_images_outside_root=True`); without one, the
    dataset was built in Python by the caller and its paths are taken as they are.
    """
    ds = _select_split(ds, split, "dataset")
    # resolved now: a later change of the working directory does not move the images
    root = Path(image_folder).expanduser().resolve() if image_folder is not None else Path.cwd()
    confine_to = root if image_folder is not None and not allow_images_outside_root else None
    name = ds.info.dataset_name if ds.info is not None and ds.info.dataset_name else "dataset"
    return _build_records(ds, kind, root, on_error, source=name, confine_to=confine_to)


__all__ = [
    "IMAGE_TOKEN",
    "LaReRecords",
    "MalformedLineError",
    "MalformedRecordError",
    "detect_kind",
    "format_choices",
    "question_with_choices",
    "load_records",
    "read_dataset",
    "records_from_dataset",
]
