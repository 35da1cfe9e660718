"""Pushing a LaRe checkpoint to the Hub: the files a push uploads and a generated model card."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi

from .modeling.model_card import HISTORY_FILE, build_model_card, write_model_card


def files_to_upload(folder: str | Path) -> list[str]:
    """Relative paths a push of `folder` uploads (model, processor, custom code, card, history, eval reports).

    Training state stays local: intermediate Trainer checkpoints, optimizer/scheduler/RNG states, training args.
    """
    root = Path(folder)
    selected = []
    for path in sorted(root.rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(root).as_posix()
        if relative.startswith(("checkpoint-", ".partial-checkpoint-", ".lare-partial")) or path.name in (
            "optimizer.pt",
            "scheduler.pt",
            "training_args.bin",
        ):
            continue
        if path.name.startswith("rng_state") or path.suffix == ".lock":
            continue
        selected.append(relative)
    return selected


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Write the model card (unless the folder's README.md is the user's own), then upload model, processor, custom
    code and card (needs network and a token)."""
    if not (Path(folder) / "config.json").is_file():
        raise ValueError(f"{folder} is not a saved checkpoint (no config.json).")
    write_model_card(folder, repo_id)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    commit = api.upload_folder(
        folder_path=str(folder),
        repo_id=repo_id,
        allow_patterns=files_to_upload(folder),
        commit_message="Upload LaRe checkpoint",
    )
    return str(commit)


__all__ = ["HISTORY_FILE", "build_model_card", "files_to_upload", "push_to_hub", "write_model_card"]
