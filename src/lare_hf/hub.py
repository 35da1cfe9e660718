"""Pushing a LaRe checkpoint to the Hub: the files a push uploads and a generated model card."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import HfApi, ModelCard, ModelCardData

from .training.run import HISTORY_FILE, read_history

EVAL_REPORT_GLOB = "eval_*.json"


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
        if relative.startswith("checkpoint-") or path.name in ("optimizer.pt", "scheduler.pt", "training_args.bin"):
            continue
        if path.name.startswith("rng_state") or path.suffix == ".lock":
            continue
        selected.append(relative)
    return selected


def _evaluation_rows(root: Path) -> list[dict]:
    rows = []
    for report_path in sorted(root.glob(EVAL_REPORT_GLOB)):
        report = json.loads(report_path.read_text())
        if "benchmark" in report and "accuracy" in report:
            rows.append(report)
    return rows


def build_model_card(folder: str | Path, repo_id: str | None = None) -> ModelCard:
    """Model card from the checkpoint itself: config, stage history, data, losses, evaluation reports."""
    root = Path(folder)
    config = json.loads((root / "config.json").read_text())
    history = read_history(root)
    evaluations = _evaluation_rows(root)
    datasets = sorted({Path(record["train_file"]).name for record in history if record.get("train_file")})
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        license="apache-2.0",
        tags=["lare", "latent-reasoning", "multimodal", "custom_code"],
    )
    name = repo_id or root.name
    text = config.get("text_config", {})
    vision = config.get("vision_config", {})
    lines = [
        "---",
        card_data.to_yaml(),
        "---",
        "",
        f"# {name}",
        "",
        "A LaRe (Latent Refocusing, arXiv 2511.02360) model: a LLaVA-shaped vision-language model that reasons "
        "through K latent steps, each refocusing on a window of the image chosen from the language model's own "
        "attention and summarised by the Extractor into latent tokens.",
        "",
        "## Architecture",
        "",
        f"- Vision tower: {vision.get('model_type')} ({vision.get('image_size')} px, patch {vision.get('patch_size')})",
        f"- Language model: {text.get('model_type')} (hidden {text.get('hidden_size')}, "
        f"{text.get('num_hidden_layers')} layers)",
        f"- Latent steps K = {config.get('num_latent_steps')}, {config.get('latent_tokens_per_step')} latent tokens "
        f"per step, window {config.get('window_size')}x{config.get('window_size')}, Extractor "
        f"{config.get('extractor_num_layers')} layers / {config.get('extractor_num_heads')} heads",
        f"- Image reconstructor (U-Net) included: {config.get('use_reconstructor')}",
        "",
        "## Usage",
        "",
        "```python",
        "from transformers import AutoModelForImageTextToText, AutoProcessor",
        "",
        f'model = AutoModelForImageTextToText.from_pretrained("{name}", trust_remote_code=True)',
        f'processor = AutoProcessor.from_pretrained("{name}", trust_remote_code=True)',
        'messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "..."}]}]',
        "inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,",
        '                                       return_dict=True, return_tensors="pt")',
        f"out = model.generate(**inputs, max_new_tokens=64, num_latent_steps={config.get('num_latent_steps')})",
        "```",
        "",
        "## Training",
        "",
    ]
    if history:
        lines += [
            "| stage | trainer | data | examples | steps | LoRA | final loss | loss components |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for record in history:
            components = ", ".join(
                f"{key} {value:.4g}" for key, value in record.get("last_logged_losses", {}).items() if key != "loss"
            )
            lines.append(
                f"| {record['stage']} | {record['trainer']} | {Path(record.get('train_file') or '-').name} | "
                f"{record.get('num_examples')} | {record.get('global_steps')} | {record.get('lora')} | "
                f"{record.get('train_loss', float('nan')):.4g} | {components or '-'} |"
            )
        lines.append("")
        lines.append(f"Training data: {', '.join(datasets) or 'not recorded'}.")
    else:
        lines.append("No training history was recorded for this checkpoint (built, not trained).")
    lines += ["", "## Evaluation", ""]
    if evaluations:
        lines += ["| benchmark | K | accuracy | # tokens (correct) | samples |", "|---|---|---|---|---|"]
        for row in evaluations:
            tokens = row.get("avg_tokens_correct")
            tokens = "-" if tokens is None else f"{tokens:.1f}"
            lines.append(
                f"| {row['benchmark']} | {row.get('num_latent_steps')} | {row['accuracy']:.2f} | {tokens} | "
                f"{row.get('num_samples')} |"
            )
    else:
        lines.append("No evaluation report (`eval_*.json`) was found next to the checkpoint.")
    return ModelCard("\n".join(lines) + "\n")


def write_model_card(folder: str | Path, repo_id: str | None = None) -> Path:
    path = Path(folder) / "README.md"
    build_model_card(folder, repo_id).save(path)
    return path


def push_to_hub(folder: str | Path, repo_id: str, private: bool = False, token: str | None = None) -> str:
    """Write the model card, then upload model, processor, custom code and card (needs network and a token)."""
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
