"""Run one training stage (`lare train --stage N`) or chain all four (`lare train --all`)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from transformers import AutoModelForImageTextToText, AutoProcessor, set_seed
from transformers.utils import logging

from ..data.collator import LaReDataCollator
from ..data.formats import load_records
from ..destinations import (
    CHECKPOINT_PATTERN,
    check_lare_checkpoint,
    holds_finished_model,
    last_complete_checkpoint,
    refuse_non_empty,
)
from ..modeling.image_tokenizer_check import warn_if_random_image_tokenizer
from ..modeling.model_card import HISTORY_FILE, read_history, write_model_card
from .arguments import LaReDataArguments, LaReModelArguments, LaReTrainingArguments, parse_train_arguments
from .trainer import LOSS_COMPONENTS, STAGE_TRAINERS

logger = logging.get_logger(__name__)

# LaReConfig fields a recipe may change on an existing checkpoint (they do not change the architecture).
RUNTIME_CONFIG_FIELDS = {
    "sym_loss_weight",
    "image_loss_weight",
    "text_loss_weight",
    "alignment_temperature",
    "text_prefix_length",
    "num_latent_steps",
}

# Modules LoRA training keeps fully trainable (and saves next to the adapters).
LORA_FULLY_TRAINED = ["multi_modal_projector", "extractor", "reconstructor", "alignment_head"]


def _apply_overrides(model, overrides: str | None) -> None:
    if not overrides:
        return
    try:
        values = json.loads(overrides)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"model_overrides must be a JSON object such as '{{\"sym_loss_weight\": 0.5}}', got {overrides!r} ({error})."
        ) from None
    if not isinstance(values, dict):
        raise ValueError(f"model_overrides must be a JSON object of LaReConfig fields, got {overrides!r}.")
    config = model.config
    config.check_field_names(values, "model_overrides key")
    bad = sorted(set(values) - RUNTIME_CONFIG_FIELDS)
    if bad:
        raise ValueError(
            f"model_overrides {bad} cannot change on a built checkpoint; allowed: {sorted(RUNTIME_CONFIG_FIELDS)}. "
            "Architecture changes (ablations) are made with `lare build --set`."
        )
    previous = {key: getattr(config, key) for key in values}
    for key, value in values.items():
        setattr(config, key, value)
    try:
        config.validate_lare()
    except ValueError as error:
        for key, value in previous.items():
            setattr(config, key, value)
        raise ValueError(f"model_overrides: {error}") from None


def _check_output_dir(training_args: LaReTrainingArguments) -> str | None:
    """Never overwrite what is already in output_dir: resuming (--resume) and overwriting (--overwrite) are explicit.

    Returns the last completely written checkpoint to resume from (None: start from the beginning)."""
    output = Path(training_args.output_dir)
    resume, overwrite = training_args.resume, training_args.overwrite
    written = (
        sorted(p.name for p in output.glob("checkpoint-*") if CHECKPOINT_PATTERN.match(p.name))
        if output.is_dir()
        else []
    )
    last = last_complete_checkpoint(output)
    if resume:
        if last is None and holds_finished_model(output) and not overwrite:
            raise FileExistsError(
                f"output_dir {output} holds a finished model and no complete checkpoint to resume from; nothing was "
                "overwritten. Choose another output_dir, or pass --overwrite True to train again into it."
            )
        return str(last) if last is not None else None
    if written and not overwrite:
        raise FileExistsError(
            f"output_dir {output} already holds checkpoint(s) {written}. Pass --resume True to continue that run, or "
            "choose another output_dir; existing checkpoints are never overwritten."
        )
    if holds_finished_model(output) and not overwrite:
        raise FileExistsError(
            f"output_dir {output} already holds a finished model; nothing was overwritten. Choose another "
            "output_dir, or pass --overwrite True to replace it."
        )
    return None


def _wrap_lora(model, model_args: LaReModelArguments):
    from peft import LoraConfig, get_peft_model

    present = [name for name in LORA_FULLY_TRAINED if any(n.split(".")[-1] == name for n, _ in model.named_modules())]
    config = LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules,
        modules_to_save=present,
    )
    return get_peft_model(model, config)


def run_stage(
    model_args: LaReModelArguments, data_args: LaReDataArguments, training_args: LaReTrainingArguments
) -> dict[str, Any]:
    """Train one stage; the final model (or LoRA adapters), processor and stage history go to output_dir."""
    if model_args.stage not in STAGE_TRAINERS:
        raise ValueError(f"stage must be 1, 2, 3 or 4, got {model_args.stage}.")
    trainer_cls = STAGE_TRAINERS[model_args.stage]
    resume_from = _check_output_dir(training_args)
    check_lare_checkpoint(model_args.model_name_or_path, "model_name_or_path")
    if not Path(data_args.train_file).expanduser().exists():
        raise FileNotFoundError(
            f"train_file {data_args.train_file} does not exist; pass a JSON, JSONL or parquet file or a "
            "save_to_disk folder."
        )
    set_seed(training_args.seed)

    # The data is checked before the model is loaded: a broken record fails in seconds, not after loading weights.
    records = load_records(
        data_args.train_file,
        kind=data_args.data_kind,
        image_folder=data_args.image_folder,
        on_error=data_args.on_error,
        allow_images_outside_root=data_args.allow_images_outside_root,
    )
    if trainer_cls.requires_rationales:
        records.require_rationales()  # fail before training, not at a random step
    elif trainer_cls.latent_losses and len(records.without_rationale) == len(records):
        logger.warning(
            f"{data_args.train_file}: no record has a rationale, so the latent losses that need one (L_sym's text "
            "part, L_text) stay 0 in this stage; L_img and L_sym's visual part train on the image records."
        )

    model = AutoModelForImageTextToText.from_pretrained(model_args.model_name_or_path)
    processor = AutoProcessor.from_pretrained(model_args.model_name_or_path)
    _apply_overrides(model, model_args.model_overrides)
    if trainer_cls.latent_losses:  # stages II-IV take L_img
        warn_if_random_image_tokenizer(model.config, f"lare train --stage {model_args.stage}")
    num_latent_steps = 0 if model_args.stage == 1 else data_args.num_latent_steps
    if trainer_cls.latent_losses and num_latent_steps == 0:
        raise ValueError(f"Stage {model_args.stage} trains the latent modules; it needs num_latent_steps > 0.")
    if model_args.lora:
        model = _wrap_lora(model, model_args)
    counts = trainer_cls.configure_model(model, lora=model_args.lora)

    train_dataset = records
    if data_args.max_train_samples is not None:
        from torch.utils.data import Subset

        train_dataset = Subset(records, range(min(data_args.max_train_samples, len(records))))
    collator = LaReDataCollator(
        processor=processor,
        num_latent_steps=num_latent_steps,
        with_rationale=trainer_cls.latent_losses,
        max_answer_length=data_args.max_answer_length,
        max_rationale_length=data_args.max_rationale_length,
        response_format=data_args.response_format,
    )
    training_args.remove_unused_columns = False
    # Pushing is done once at the end with the generated model card (lare_hf.hub), not by Trainer mid-run.
    push_repo = training_args.hub_model_id if training_args.push_to_hub else None
    if training_args.push_to_hub and not push_repo:
        raise ValueError("--push_to_hub needs --hub_model_id ORG/NAME.")
    training_args.push_to_hub = False
    trainer = trainer_cls(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        data_collator=collator,
        processing_class=processor,
        module_learning_rates=training_args.module_learning_rates(),
    )
    result = trainer.train(resume_from_checkpoint=resume_from)
    trainer.save_model(training_args.output_dir)
    processor.save_pretrained(training_args.output_dir)

    final_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    record = {
        "stage": model_args.stage,
        "trainer": trainer_cls.__name__,
        "started_from": model_args.model_name_or_path,
        "train_file": data_args.train_file,
        "num_examples": len(train_dataset),
        "skipped_records": records.num_skipped,
        "num_latent_steps": num_latent_steps,
        "lora": model_args.lora,
        "trainable_parameters": counts,
        "global_steps": trainer.state.global_step,
        "train_loss": result.training_loss,
        "last_logged_losses": {
            k: final_logs[-1][k] for k in ("loss", *LOSS_COMPONENTS) if final_logs and k in final_logs[-1]
        },
    }
    if not trainer.is_world_process_zero():  # only the main process saved the model: it writes history and card
        return record
    history = read_history(model_args.model_name_or_path) + [record]
    Path(training_args.output_dir, HISTORY_FILE).write_text(json.dumps(history, indent=2))
    if not model_args.lora:  # the card describes a full checkpoint (a LoRA folder gets one when merged)
        write_model_card(training_args.output_dir)
    if push_repo:
        from ..hub import push_to_hub

        record["pushed"] = push_to_hub(training_args.output_dir, push_repo, token=training_args.hub_token)
    return record


def merge_lora(adapter_dir: str, output_dir: str, overwrite: bool = False) -> Path:
    """Merge LoRA adapters into their base checkpoint and write a full LaRe checkpoint with its processor
    (a non-empty `output_dir` is refused unless `overwrite`)."""
    from peft import PeftConfig, PeftModel

    refuse_non_empty(output_dir, "merge output", overwrite)
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise FileNotFoundError(
            f"adapter {adapter_dir} has no adapter_config.json; pass the output_dir of a `lare train ... --lora True` "
            "run."
        )
    peft_config = PeftConfig.from_pretrained(adapter_dir)
    base = AutoModelForImageTextToText.from_pretrained(peft_config.base_model_name_or_path)
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    output = Path(output_dir)
    merged.save_pretrained(output)
    AutoProcessor.from_pretrained(adapter_dir).save_pretrained(output)
    history = Path(adapter_dir) / HISTORY_FILE
    if history.is_file():
        shutil.copy(history, output / HISTORY_FILE)
    write_model_card(output)
    return output


def run_all(
    config_files: list[str],
    model_name_or_path: str | None = None,
    overrides: list[str] | None = None,
    output_root: str | None = None,
) -> list[dict[str, Any]]:
    """Chain the four stages: each starts from the previous stage's output_dir (`output_root/stageN` if given)."""
    records = []
    previous = model_name_or_path
    for stage_index, config_file in enumerate(config_files, start=1):
        extra = list(overrides or [])
        if previous is not None:
            extra += ["--model_name_or_path", previous]
        if output_root is not None:
            extra += ["--output_dir", str(Path(output_root) / f"stage{stage_index}")]
        model_args, data_args, training_args = parse_train_arguments(config_file, extra)
        records.append(run_stage(model_args, data_args, training_args))
        previous = training_args.output_dir
    return records


__all__ = ["HISTORY_FILE", "merge_lora", "read_history", "run_all", "run_stage"]
