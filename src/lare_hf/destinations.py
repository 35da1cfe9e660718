"""Where LaRe writes: refuse to overwrite what a user wrote, find the last complete training checkpoint."""

from __future__ import annotations

import json
import re
from pathlib import Path

from .modeling.validation import closest_name

# Files that mark a folder as holding a finished model (full checkpoint or LoRA adapters).
MODEL_MARKERS = ("config.json", "model.safetensors", "model.safetensors.index.json", "adapter_config.json")
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
# Written last by Trainer._save_checkpoint: a checkpoint folder without it is incomplete.
CHECKPOINT_COMPLETE_MARKER = "trainer_state.json"


def is_non_empty_dir(path: str | Path) -> bool:
    folder = Path(path)
    return folder.is_dir() and any(folder.iterdir())


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
    "check_lare_checkpoint",
    "complete_checkpoints",
    "holds_finished_model",
    "is_non_empty_dir",
    "last_complete_checkpoint",
    "refuse_non_empty",
]
