"""Where LaRe writes: refuse to overwrite what a user wrote, find the last intact training checkpoint, write
folders so that an interrupted write (a crash, a full disk) never leaves a half-written copy where a good one was."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .modeling.validation import closest_name

# Files that mark a folder as holding a finished model (full checkpoint or LoRA adapters).
MODEL_MARKERS = ("config.json", "model.safetensors", "model.safetensors.index.json", "adapter_config.json")
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# Written last by Trainer._save_checkpoint: a checkpoint folder without it is incomplete.
CHECKPOINT_COMPLETE_MARKER = "trainer_state.json"
# Written by LaReTrainer once a checkpoint is complete (not in the paper): every file's size, checked on resume.
CHECKPOINT_MANIFEST = "lare_checkpoint_files.json"
# Hidden entries LaRe itself keeps in an output folder while writing it (the lock, the staging folder).
LOCK_NAME = ".lare.lock"
STAGING_NAME = ".lare-partial"
# errno values of a write that failed for lack of space: no space, file too large (RLIMIT_FSIZE), quota.
DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT}
# How the libraries that write weights report those errors: safetensors (Rust's "os error N") and torch.save's
# zip writer (a short write reported as a position mismatch or a failed write).
_DISK_FULL_TEXT = re.compile(
    r"os error (28|27|122)\b|No space left|File too large|Disk quota|unexpected pos \d+ vs \d+|"
    r"PytorchStreamWriter failed writing"
)


def is_non_empty_dir(path: str | Path) -> bool:
    """A folder with something in it besides LaRe's own lock and staging entries."""
    folder = Path(path)
    return folder.is_dir() and any(child.name not in (LOCK_NAME, STAGING_NAME) for child in folder.iterdir())


def refuse_non_empty(path: str | Path, what: str, overwrite: bool, flag: str = "--overwrite") -> Path:
    """Raise `FileExistsError` when `path` is a non-empty folder (or a file) and `overwrite` is False."""
    destination = Path(path)
    if destination.exists() and not destination.is_dir():
        raise FileExistsError(f"{what} {destination} is an existing file, not a folder; choose another path.")
    if is_non_empty_dir(destination) and not overwrite:
        raise FileExistsError(
            f"{what} {destination} is not empty; nothing was written. Choose an empty or new folder, or pass {flag} "
            "to write into it (files with the same names are replaced)."
        )
    return destination


def holds_finished_model(path: str | Path) -> bool:
    folder = Path(path)
    return folder.is_dir() and any((folder / name).is_file() for name in MODEL_MARKERS)


def complete_checkpoints(path: str | Path) -> list[Path]:
    """`checkpoint-N` folders of a training output_dir that were completely written, by step."""
    folder = Path(path)
    if not folder.is_dir():
        return []
    found = []
    for child in folder.iterdir():
        match = CHECKPOINT_PATTERN.match(child.name)
        if match and child.is_dir() and (child / CHECKPOINT_COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), child))
    return [child for _, child in sorted(found)]


def last_complete_checkpoint(path: str | Path) -> Path | None:
    checkpoints = complete_checkpoints(path)
    return checkpoints[-1] if checkpoints else None


def checkpoint_damage(path: str | Path) -> str | None:
    """What is wrong with a written checkpoint folder, or None when every file is whole.

    Checks the size of every file against the manifest LaReTrainer writes (a missing or truncated file), and,
    with or without a manifest, that each safetensors file holds as many bytes as its header describes, that
    each torch.save file (a zip) still has its central directory, and that each JSON file parses."""
    folder = Path(path)
    manifest = folder / CHECKPOINT_MANIFEST
    if manifest.is_file():
        try:
            sizes = json.loads(manifest.read_text())["files"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            return f"its {CHECKPOINT_MANIFEST} is unreadable"
        for name, size in sizes.items():
            file = folder / name
            if not file.is_file():
                return f"{name} is missing"
            if file.stat().st_size != size:
                return f"{name} has {file.stat().st_size} bytes, {size} were written"
    for file in sorted(folder.rglob("*")):
        if file.is_file():
            damage = _file_damage(file)
            if damage:
                return f"{file.relative_to(folder)} {damage}"
    return None


def _file_damage(file: Path) -> str | None:
    size = file.stat().st_size
    if file.suffix == ".safetensors":
        with open(file, "rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return f"is truncated ({size} bytes, no header)"
            (header_length,) = struct.unpack("<Q", head)
            if 8 + header_length > size:
                return f"is truncated ({size} bytes; its header alone needs {8 + header_length})"
            try:
                header = json.loads(handle.read(header_length))
            except (ValueError, UnicodeDecodeError):
                return "has an unreadable header"
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
        if 8 + header_length + end != size:
            return f"is truncated ({size} bytes; its header describes {8 + header_length + end})"
    elif file.suffix in (".pt", ".pth", ".bin"):
        if not zipfile.is_zipfile(file):
            return f"is truncated or not a torch.save file ({size} bytes, no zip directory)"
    elif file.suffix == ".json":
        try:
            json.loads(file.read_text())
        except (ValueError, UnicodeDecodeError):
            return "is not valid JSON (truncated?)"
    return None


def last_intact_checkpoint(path: str | Path) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint whose files are whole, and the newer ones skipped as damaged (with why)."""
    damaged = []
    for checkpoint in reversed(complete_checkpoints(path)):
        damage = checkpoint_damage(checkpoint)
        if damage is None:
            return checkpoint, damaged
        damaged.append((checkpoint, damage))
    return None, damaged


def write_manifest(folder: str | Path) -> None:
    """Record every file's size in `CHECKPOINT_MANIFEST` (after the files were flushed to disk)."""
    root = Path(folder)
    sizes = {
        file.relative_to(root).as_posix(): file.stat().st_size
        for file in sorted(root.rglob("*"))
        if file.is_file() and file.name != CHECKPOINT_MANIFEST
    }
    manifest = root / CHECKPOINT_MANIFEST
    manifest.write_text(json.dumps({"files": sizes}, indent=1))
    fsync_tree(root)


def fsync_tree(folder: str | Path) -> None:
    """Flush every file and folder under `folder` to disk, so a rename that follows publishes whole files."""
    root = Path(folder)
    for path in [*sorted(root.rglob("*")), root]:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` (from open/write, safetensors or torch.save) is a write that failed for lack of space."""
    while error is not None:
        if getattr(error, "errno", None) in DISK_FULL_ERRNOS or _DISK_FULL_TEXT.search(str(error)):
            return True
        error = error.__cause__ or error.__context__
    return False


class DiskFullError(OSError):
    """A write failed because the disk (or a quota or file size limit) is full; nothing complete was replaced."""


def disk_full_error(error: BaseException, what: str, where: str | Path, kept: str) -> DiskFullError:
    return DiskFullError(
        errno.ENOSPC,
        f"The disk is full: writing {what} to {where} failed ({' '.join(str(error).split())}). The partial write was "
        f"removed; {kept}. Free space on {where} (or raise the quota / file size limit) and run again.",
    )


def publish_folder(staging: Path, destination: Path) -> None:
    """Move every entry of `staging` into `destination` with atomic renames (an existing file of the same name is
    replaced at once, never left half-written), then remove `staging`."""
    destination.mkdir(parents=True, exist_ok=True)
    for entry in sorted(staging.iterdir()):
        target = destination / entry.name
        if entry.is_dir() and target.is_dir():
            publish_folder(entry, target)
        else:
            if target.is_dir():
                shutil.rmtree(target)
            os.replace(entry, target)
    staging.rmdir()


@contextmanager
def staged_write(destination: str | Path, what: str, publish: bool = True) -> Iterator[Path]:
    """Yield a hidden staging folder inside `destination` to write into; on success its files are flushed and moved
    into `destination` (`publish_folder`), on failure it is removed, so `destination` keeps its previous files.
    A failure for lack of space is raised as `DiskFullError` naming `destination`."""
    destination = Path(destination)
    destination.mkdir(parents=True, exist_ok=True)
    staging = destination / STAGING_NAME
    if staging.exists():
        shutil.rmtree(staging)  # left by a run that died while writing
    staging.mkdir()
    try:
        yield staging
        if publish:
            fsync_tree(staging)
            publish_folder(staging, destination)
    except BaseException as error:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, Exception) and is_disk_full(error):
            raise disk_full_error(error, what, destination, "the folder's previous files are unchanged") from error
        raise


def check_lare_checkpoint(path: str | Path, what: str = "model") -> None:
    """Before loading a local checkpoint: it exists, has a readable config.json, and that config is a LaRe one.

    A Hub id (`org/name` that is not a local path) is left to `from_pretrained`."""
    folder = Path(path).expanduser()
    if not folder.exists():
        if str(path).count("/") == 1 and not str(path).startswith((".", "/", "~")):
            return  # a Hub repository id
        raise FileNotFoundError(
            f"{what} {path} does not exist; pass a folder written by `lare build` or `lare train`."
        )
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(
            f"{what} {path} has no config.json, so it is not a saved checkpoint; pass a folder written by "
            "`lare build` or `lare train`."
        )
    try:
        config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{config_file} is not valid JSON ({error}); fix or re-save the checkpoint.") from None
    model_type = config.get("model_type") if isinstance(config, dict) else None
    if model_type != "lare":
        if isinstance(model_type, str) and closest_name(model_type, ["lare"]):
            fix = f"did you mean 'lare'? Fix \"model_type\" in {config_file}"
        else:
            fix = (
                "load it with its own class, or assemble a LaRe checkpoint from it with "
                "`lare build --vision DIR --text DIR --output DIR`"
            )
        raise ValueError(
            f"{what} {path} is a {model_type!r} checkpoint (config.json), not a LaRe one ('lare'); {fix}."
        )


__all__ = [
    "DiskFullError",
    "check_lare_checkpoint",
    "checkpoint_damage",
    "complete_checkpoints",
    "is_disk_full",
    "last_intact_checkpoint",
    "staged_write",
    "holds_finished_model",
    "is_non_empty_dir",
    "last_complete_checkpoint",
    "refuse_non_empty",
]
