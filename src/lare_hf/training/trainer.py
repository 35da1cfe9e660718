"""Trainers for the four training stages (Appendix A-B; docs/design.md, the stage table)."""

from __future__ import annotations

import math
import os
import shutil
from collections import defaultdict

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import rotate_checkpoints

from ..data.collator import DATA_COLUMNS
from ..destinations import disk_full_error, is_disk_full, last_complete_checkpoint, write_manifest
from ..modeling.latent_losses import LOSS_TERM_NAMES, LaReLatentLossesMixin
from .window_selection import WindowTemperatureCallback, latent_refocus_module

# Loss components a LaRe forward returns (the model's LOSS_TERMS); each is logged as the mean over the logging window.
LOSS_COMPONENTS = LOSS_TERM_NAMES

# Parameter groups of a LaRe model, by module-name prefix (relative to LaReForConditionalGeneration).
MODULE_GROUPS = {
    "vision": ("model.vision_tower.",),
    "projector": ("model.multi_modal_projector.",),
    "latent": ("model.extractor.", "reconstructor.", "alignment_head."),
    "language_model": ("model.language_model.", "lm_head."),
}


def module_group(name: str) -> str | None:
    """The MODULE_GROUPS key a parameter name belongs to (PEFT prefixes and `modules_to_save` copies allowed)."""
    for prefix in ("base_model.model.",):
        name = name.removeprefix(prefix)
    name = name.replace(".modules_to_save.default.", ".").replace(".original_module.", ".")
    for group, prefixes in MODULE_GROUPS.items():
        if name.startswith(prefixes):
            return group
    return None


class ImageNoiseDrawCallback(TrainerCallback):
    """At the start of training (also a resumed one), sets the model's `image_loss_draws` to the number of training
    forwards before `state.global_step` (optimizer steps x gradient accumulation), so that a resumed run draws the
    L_img noise of the uninterrupted one (`reconstruction.noise_seeds`; not in the paper)."""

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        for module in model.modules() if model is not None else ():
            if isinstance(module, LaReLatentLossesMixin):
                module.image_loss_draws = state.global_step * args.gradient_accumulation_steps


class LaReTrainer(Trainer):
    """`Trainer` for LaRe: logs every loss component, per-module learning rates, stage-defined trainable modules.

    Subclasses (one per stage) set:
        stage: the stage number (1-4).
        trainable_groups: MODULE_GROUPS keys whose parameters train; every other parameter is frozen.
        latent_losses: whether the semantic-augmentation losses (Eq. 6-8) are on; each is taken over the samples
            that have what it needs (an image; a rationale for L_sym's text part and L_text).
        requires_rationales: whether every record must carry a rationale (checked before training).
    """

    stage: int = 0
    trainable_groups: tuple[str, ...] = ("projector", "latent", "language_model")
    latent_losses: bool = True
    requires_rationales: bool = True

    def __init__(self, *args, module_learning_rates: dict[str, float] | None = None, **kwargs):
        self.module_learning_rates = dict(module_learning_rates or {})
        super().__init__(*args, **kwargs)
        # a relaxed window selection (not in the paper): its temperature schedule and per-step diagnostics
        self.window_selection_callback: WindowTemperatureCallback | None = None
        refocus_module = latent_refocus_module(self.model)
        if refocus_module is not None and refocus_module.config.window_selection != "argmax":
            self.window_selection_callback = WindowTemperatureCallback(self.model)
            self.add_callback(self.window_selection_callback)
        self._component_sums: dict[str, float] = defaultdict(float)
        self._component_counts: dict[str, int] = defaultdict(int)
        self.add_callback(ImageNoiseDrawCallback())

    def _set_signature_columns_if_needed(self) -> None:
        """Keep the collator's data columns under Trainer's default `remove_unused_columns=True`: LaReDataCollator
        builds the model inputs from them, so they are not forward() arguments."""
        if self._signature_columns is None:
            super()._set_signature_columns_if_needed()
            self._signature_columns += [column for column in DATA_COLUMNS if column not in self._signature_columns]

    @classmethod
    def configure_model(cls, model: nn.Module, lora: bool = False) -> dict[str, int]:
        """Freeze everything but the stage's trainable groups; returns trainable parameter counts per group.

        With `lora`, the language model itself stays frozen and only its LoRA adapters train (the other groups,
        kept by PEFT as `modules_to_save` copies, train fully). The image tokenizer is always frozen.
        """
        counts: dict[str, int] = defaultdict(int)
        for name, param in model.named_parameters():
            group = module_group(name)
            if "lora_" in name:
                trainable, group = True, "lora_adapters"
            elif ".original_module." in name or ".image_tokenizer." in name:
                trainable = False
            elif lora and group == "language_model":
                trainable = False
            else:
                trainable = group in cls.trainable_groups
            param.requires_grad_(trainable)
            if trainable:
                counts[group] += param.numel()
        if not counts:
            raise ValueError(f"Stage {cls.stage} would train no parameter (groups {cls.trainable_groups}).")
        return dict(counts)

    def compute_loss(self, model, inputs, return_outputs: bool = False, num_items_in_batch=None):
        outputs = model(**inputs, compute_latent_losses=self.latent_losses)
        loss = outputs.loss
        if model.training:
            components = {}
            for name in LOSS_COMPONENTS:
                value = getattr(outputs, name, None)
                if value is not None:
                    components[name] = float(value.detach())
                    self._component_sums[name] += components[name]
                    self._component_counts[name] += 1
            if loss is not None and not math.isfinite(float(loss.detach())):
                self._stop_on_non_finite_loss(float(loss.detach()), components)
        return (loss, outputs) if return_outputs else loss

    def _stop_on_non_finite_loss(self, loss: float, components: dict[str, float]) -> None:
        """A NaN/inf loss would poison the weights (and every later checkpoint): stop, naming the step and term."""
        bad = [f"{name}={value}" for name, value in components.items() if not math.isfinite(value)]
        terms = ", ".join(bad) if bad else f"the weighted total loss={loss}"
        last = last_complete_checkpoint(self.args.output_dir)
        kept = (
            f"the last complete checkpoint {last} is intact" if last is not None else "no checkpoint was written yet"
        )
        raise FloatingPointError(
            f"Training stopped at step {self.state.global_step + 1}: the loss is not finite ({terms}); {kept}. "
            "Lower the learning rate (or the weight of that loss term), check the batch's data, then resume with "
            "--resume True."
        )

    def _save_checkpoint(self, model, trial) -> None:
        """Write each checkpoint into a hidden staging folder, record its files' sizes (`write_manifest`, flushed to
        disk) and rename it to `checkpoint-N` once complete, so a run killed mid-save never leaves a `checkpoint-N`
        that loads half-written (--resume picks the last intact one). A save that fails for lack of space removes
        its staging folder and raises `DiskFullError` naming the folder and the checkpoint kept."""
        run_dir = super()._get_output_dir(trial=trial)
        step = self.state.global_step
        staging = os.path.join(run_dir, f".partial-checkpoint-{step}")
        if self.args.should_save and os.path.isdir(staging):
            shutil.rmtree(staging)  # left by a run killed while saving this step
        self.accelerator.wait_for_everyone()
        self._staging_dir = staging
        try:
            super()._save_checkpoint(model, trial)
            written = os.path.join(staging, f"checkpoint-{step}")
            if self.args.should_save:
                write_manifest(written)  # every file's size, flushed to disk: resume checks the files are whole
        except Exception as error:
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            if not is_disk_full(error):
                raise
            last = last_complete_checkpoint(run_dir)
            kept = f"the last complete checkpoint {last} is intact" if last else "no earlier checkpoint was written"
            raise disk_full_error(
                error, f"checkpoint-{step}", run_dir, kept + "; resume with --resume True"
            ) from error
        finally:
            self._staging_dir = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            final = os.path.join(run_dir, f"checkpoint-{step}")
            if os.path.isdir(final):  # the same step saved again (a resumed run): the new one replaces it
                shutil.rmtree(final)
            os.replace(written, final)
            shutil.rmtree(staging)
            if self.state.best_global_step:
                best = os.path.join(run_dir, f"checkpoint-{self.state.best_global_step}")
                if os.path.isdir(best):
                    self.state.best_model_checkpoint = best
            rotate_checkpoints(
                output_dir=run_dir,
                save_total_limit=self.args.save_total_limit,
                best_model_checkpoint=self.state.best_model_checkpoint,
                use_mtime=False,
            )
        self.accelerator.wait_for_everyone()

    def _get_output_dir(self, trial) -> str:
        staging = getattr(self, "_staging_dir", None)
        return staging if staging is not None else super()._get_output_dir(trial=trial)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._component_counts:
            for name, total in self._component_sums.items():
                logs[name] = round(total / self._component_counts[name], 6)
            self._component_sums.clear()
            self._component_counts.clear()
        super().log(logs, start_time)

    def create_optimizer(self, model=None) -> torch.optim.Optimizer:
        """AdamW with one learning rate per module group (projector / latent modules / language model)."""
        if self.optimizer is not None:
            return self.optimizer
        opt_model = self.model if model is None else model
        decay = set(self.get_decay_parameter_names(opt_model))
        groups: dict[tuple[float, float], list[nn.Parameter]] = defaultdict(list)
        for name, param in opt_model.named_parameters():
            if not param.requires_grad:
                continue
            group = module_group(name) or "adapter"
            lr = self.module_learning_rates.get(group, self.args.learning_rate)
            weight_decay = self.args.weight_decay if name in decay else 0.0
            groups[(lr, weight_decay)].append(param)
        param_groups = [
            {"params": params, "lr": lr, "weight_decay": weight_decay} for (lr, weight_decay), params in groups.items()
        ]
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs.pop("lr", None)
        self.optimizer = optimizer_cls(param_groups, lr=self.args.learning_rate, **optimizer_kwargs)
        return self.optimizer


class StageIAlignmentTrainer(LaReTrainer):
    """Stage I, vision-language alignment: the projector only, next-token loss, no latent steps."""

    stage = 1
    trainable_groups = ("projector",)
    latent_losses = False
    requires_rationales = False


class StageIILatentAlignmentTrainer(LaReTrainer):
    """Stage II, latent alignment: Extractor + U-Net + heads, vision tower and LLM frozen, all losses."""

    stage = 2
    trainable_groups = ("latent",)
    latent_losses = True


class StageIIIInstructionTrainer(LaReTrainer):
    """Stage III, instruction tuning: everything but the vision tower, all losses. The data is LLaVA-665K-like: image
    and text-only conversations (single- and multi-turn) mixed with reasoning records, so a record may lack a
    rationale or an image; each latent loss is averaged over the samples that have what it needs, and a batch
    with none of them trains on L_ntp alone."""

    stage = 3
    trainable_groups = ("projector", "latent", "language_model")
    latent_losses = True
    requires_rationales = False


class StageIVReasoningTrainer(LaReTrainer):
    """Stage IV, reasoning fine-tuning: everything but the vision tower, all losses, reasoning data."""

    stage = 4
    trainable_groups = ("projector", "latent", "language_model")
    latent_losses = True


STAGE_TRAINERS: dict[int, type[LaReTrainer]] = {
    1: StageIAlignmentTrainer,
    2: StageIILatentAlignmentTrainer,
    3: StageIIIInstructionTrainer,
    4: StageIVReasoningTrainer,
}

__all__ = [
    "LOSS_COMPONENTS",
    "MODULE_GROUPS",
    "LaReTrainer",
    "STAGE_TRAINERS",
    "StageIAlignmentTrainer",
    "StageIILatentAlignmentTrainer",
    "StageIIIInstructionTrainer",
    "StageIVReasoningTrainer",
    "module_group",
]
