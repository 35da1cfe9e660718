"""Reading data files and images: the one reader behind training records (`lare_hf.data.formats`) and benchmark
files (`lare_hf.evaluation.benchmarks`).

Tables: parquet, JSON / JSONL (optionally compressed), CSV / TSV or arrow files, read through `datasets`, the format
told by the file name (`data_file_builder`); `read_table` also takes a glob pattern, a folder of such files (a Hub
dataset snapshot, with the split picked by file or folder name) or a `save_to_disk` folder.

Images: a PIL image, encoded bytes, a path (relative ones resolved against a root folder), a ``{"bytes", "path"}``
dict (as `datasets.Image(decode=False)` and parquet store them), a one-element list of these, or a base64 string
(VLMEvalKit TSVs). `image_reference` resolves a value without decoding it, `verify_image` checks a reference,
`open_image` decodes one as 8-bit RGB (`to_rgb`: 16-bit images scaled, transparency composited over white, as the
processor does), and `load_image` does all three for a value.
"""

from __future__ import annotations

import base64
import binascii
import glob
import io
import os
import re
from pathlib import Path
from typing import Any

import datasets
from PIL import Image

from ..processing.processing_lare import to_rgb

JSON_SUFFIXES = (".json", ".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")
COMPRESSION_SUFFIXES = ("", ".gz", ".bz2", ".xz", ".zst", ".zstd")
SAVE_TO_DISK_MARKERS = ("dataset_dict.json", "state.json")
_IMAGE_SIGNATURES = (b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"RIFF", b"II*\x00", b"MM\x00*")

ImageRef = tuple[str, Any]  # ("path", Path) | ("bytes", bytes) | ("pil", PIL.Image.Image)


# ----------------------------------------------------------------------------------------------------------------
# tables


def data_file_builder(path: Path) -> str | None:
    """The `datasets` builder of a data file by its name ("json", "parquet", "csv", "arrow"), None when unknown."""
    name = path.name.lower()
    for compression in COMPRESSION_SUFFIXES:
        if any(name.endswith(suffix + compression) for suffix in JSON_SUFFIXES):
            return "json"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith((".csv", ".tsv")):
        return "csv"
    if name.endswith(".arrow"):
        return "arrow"
    return None


def load_data_files(files: list[Path], source: str, split: str = "train") -> datasets.Dataset:
    """The rows of data files of one format as one `datasets.Dataset` (`split`: a datasets split expression such as
    "train[:100]"); a file that does not parse raises ValueError naming `source` and the format."""
    builders = {data_file_builder(file) for file in files}
    if len(builders) != 1 or None in builders:
        raise ValueError(f"{source}: cannot mix or recognise data file types {sorted(str(f) for f in files)[:5]}.")
    builder = builders.pop()
    try:
        if builder == "arrow":
            return datasets.concatenate_datasets([datasets.Dataset.from_file(str(file)) for file in files])
        kwargs = {"delimiter": "\t"} if all(file.name.lower().endswith(".tsv") for file in files) else {}
        return datasets.load_dataset(builder, data_files=[str(file) for file in files], split=split, **kwargs)
    except Exception as error:
        if "corresponds to no data" in str(error):  # datasets' message for a file without records
            raise ValueError(f"{source} has no records; add at least one record.") from error
        raise ValueError(f"Could not read {source} as {builder}: {type(error).__name__}: {error}") from error


def is_save_to_disk_folder(folder: Path) -> bool:
    return any((folder / marker).is_file() for marker in SAVE_TO_DISK_MARKERS)


def _split_matches(file: Path, split: str) -> bool:
    name = file.name.lower()
    split = split.lower()
    return (
        name.startswith(f"{split}-")
        or name.startswith(f"{split}.")
        or name.startswith(f"{split}_")
        or any(part.lower() == split for part in file.parent.parts[-2:])
    )


def _one_folder(files: list[Path], source: str) -> list[Path]:
    folders = sorted({str(f.parent) for f in files})
    if len(folders) > 1:
        raise ValueError(
            f"{source}: data files in several folders {folders[:6]} (e.g. several languages or configurations); "
            "pass the folder (or file) of the one to evaluate."
        )
    return files


def _read_folder(target: Path, source: str, split: str | None, default_split: str | None) -> datasets.Dataset:
    files = sorted(f for f in target.rglob("*") if f.is_file() and data_file_builder(f) is not None)
    files = [f for f in files if not any(p.startswith(".") for p in f.relative_to(target).parts)]
    if not files:
        raise FileNotFoundError(
            f"{source} is a folder without data files (.parquet, .json, .jsonl, .csv, .tsv, .arrow) and is not a "
            "save_to_disk folder."
        )
    for wanted in (split, default_split):
        if wanted:
            picked = [f for f in files if _split_matches(f, wanted)]
            if picked:
                return load_data_files(_one_folder(picked, source), source)
            if wanted == split:
                raise ValueError(
                    f"{source}: no data file for split {split!r} (looked for {split}-*, {split}.* or a {split}/ "
                    f"folder) among {[str(f.relative_to(target)) for f in files][:10]}."
                )
    return load_data_files(_one_folder(files, source), source)


def read_table(
    path: str | os.PathLike, split: str | None = None, default_split: str | None = None
) -> tuple[datasets.Dataset, Path]:
    """The raw `datasets.Dataset` behind `path` and the default folder for relative image paths.

    `split` picks a split of a saved DatasetDict or, in a folder of data files, the files named ``<split>-*`` /
    ``<split>.*`` or lying in a ``<split>/`` folder; `default_split` is tried when `split` is None.
    """
    source = os.fspath(path)
    target = Path(source).expanduser()
    if any(ch in source for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True) if Path(p).is_file())
        if not files:
            raise FileNotFoundError(f"No files match {source}.")
        return load_data_files(files, source), files[0].parent
    if target.is_dir():
        if is_save_to_disk_folder(target):
            obj = datasets.load_from_disk(str(target))
            if isinstance(obj, datasets.DatasetDict):
                names = list(obj)
                chosen = split or (default_split if default_split in obj else None)
                if chosen is None and len(names) == 1:
                    chosen = names[0]
                if chosen not in obj:
                    raise ValueError(f"{source} holds splits {names}; pass split= with one of them.")
                return obj[chosen], target.parent
            return obj, target.parent
        return _read_folder(target, source, split, default_split), target
    if not target.is_file():
        raise FileNotFoundError(f"Benchmark data {source} does not exist.")
    if data_file_builder(target) is None:
        raise ValueError(
            f"Cannot tell the format of {source}: use .parquet, .json, .jsonl, .csv, .tsv, .arrow, a folder of such "
            "files, or a save_to_disk folder."
        )
    return load_data_files([target], source), target.parent


# ----------------------------------------------------------------------------------------------------------------
# images


class ImageReferenceError(ValueError):
    """An image value that is not a usable reference: `reason` and `fix` (the record loader names the field)."""

    def __init__(self, reason: str, fix: str):
        self.reason, self.fix = reason, fix
        super().__init__(f"image {reason}; {fix}")


def image_reference(value: Any, root: str | os.PathLike | None) -> ImageRef | None:
    """Image value -> ("path", Path) | ("bytes", bytes) | ("pil", Image) | None (no image), without reading files.
    Relative paths start from `root` (the current directory when None)."""
    if value is None:
        return None
    if isinstance(value, Image.Image):
        return ("pil", value)
    if isinstance(value, (bytes, bytearray)):
        return ("bytes", bytes(value))
    if isinstance(value, (str, os.PathLike)):
        text = os.fspath(value)
        if not text.strip():
            return None
        path = Path(text).expanduser()
        if not path.is_absolute():
            path = Path(root if root is not None else Path.cwd()) / path
        return ("path", path)
    if isinstance(value, dict) and ("bytes" in value or "path" in value):
        if value.get("bytes") is not None:
            if not isinstance(value["bytes"], (bytes, bytearray)):
                raise ImageReferenceError(
                    f"'bytes' is a {type(value['bytes']).__name__}", "store the encoded file bytes"
                )
            return ("bytes", bytes(value["bytes"]))
        return image_reference(value.get("path"), root)
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            return image_reference(value[0], root)
        if len(value) == 0:
            return None
        raise ImageReferenceError(
            f"has {len(value)} images", "give one image per record (multi-image is not supported)"
        )
    raise ImageReferenceError(
        f"has type {type(value).__name__}",
        "use a path string, a {'bytes': ..., 'path': ...} dict or a datasets Image() column",
    )


def describe_image(ref: ImageRef) -> str:
    kind, value = ref
    return f"image file {value}" if kind == "path" else "embedded image bytes" if kind == "bytes" else "PIL image"


def verify_image(ref: ImageRef) -> str | None:
    """Open and verify an image; returns the reason it is unusable, or None when it is fine."""
    kind, value = ref
    if kind == "pil":
        return None
    if kind == "path" and not value.is_file():
        return f"image file {value} does not exist"
    try:
        with Image.open(value if kind == "path" else io.BytesIO(value)) as image:
            image.verify()
    except Exception as error:  # noqa: BLE001  (PIL raises many types for broken files)
        return f"cannot read {describe_image(ref)}: {type(error).__name__}: {error}"
    return None


def open_image(ref: ImageRef) -> Image.Image:
    """A fresh 8-bit RGB image (`to_rgb`) of a reference."""
    kind, value = ref
    if kind == "pil":
        return to_rgb(value)
    with Image.open(value if kind == "path" else io.BytesIO(value)) as image:
        image.load()
        return to_rgb(image)


def is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a base64 string far longer than any file name
        return False


def maybe_base64(text: str) -> bytes | None:
    """Decoded bytes when `text` is a base64-encoded image (as VLMEvalKit TSVs store them), else None."""
    if len(text) < 32 or not re.fullmatch(r"[A-Za-z0-9+/=\s]+", text[:256]):
        return None
    try:
        data = base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        return None
    return data if data.startswith(_IMAGE_SIGNATURES) else None


def load_image(value: Any, root: str | os.PathLike | None = None) -> Image.Image | None:
    """A fresh RGB image of any value `image_reference` takes, a base64 string, or a zero-argument callable returning
    one of these; None for a missing image. A path that is not a file raises FileNotFoundError."""
    if callable(value) and not isinstance(value, Image.Image):
        value = value()
    ref = image_reference(value, root)
    if ref is None:
        return None
    if ref[0] == "path" and not is_file(ref[1]):
        decoded = maybe_base64(os.fspath(value)) if isinstance(value, (str, os.PathLike)) else None
        if decoded is None:
            raise FileNotFoundError(f"Image {ref[1]} does not exist (pass image_folder= to resolve relative paths).")
        ref = ("bytes", decoded)
    return open_image(ref)


__all__ = [
    "ImageReferenceError",
    "data_file_builder",
    "describe_image",
    "image_reference",
    "load_data_files",
    "load_image",
    "open_image",
    "read_table",
    "verify_image",
]
