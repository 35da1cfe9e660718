"""Arguments of `lare train`: parsed with `HfArgumentParser` from a YAML recipe plus command-line overrides."""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from transformers import HfArgumentParser, TrainingArguments

from ..configs import packaged_configs_dir, resolve_recipe
from ..modeling.validation import check_known_keys


@dataclass
class LaReModelArguments:
    model_name_or_path: str = field(metadata={"help": "checkpoint to start from (the previous stage's output)"})
    stage: int = field(default=1, metadata={"help": "training stage 1-4 (Appendix A)"})
    lora: bool = field(default=False, metadata={"help": "train LoRA adapters on the language model (PEFT)"})
    lora_r: int = field(default=16)
    lora_alpha: int = field(default=32)
    lora_dropout: float = field(default=0.05)
    lora_target_modules: str = field(
        default=r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
        metadata={"help": "regex of the language-model linear layers that get adapters"},
    )
    model_overrides: str | None = field(
        default=None, metadata={"help": "JSON dict of LaReConfig fields to change (e.g. loss weights, ablations)"}
    )


@dataclass
class LaReDataArguments:
    train_file: str = field(metadata={"help": "JSON / JSONL / parquet file or save_to_disk folder"})
    image_folder: str | None = field(default=None, metadata={"help": "root of relative image paths"})
    data_kind: str = field(default="auto", metadata={"help": "auto, conversation or reasoning"})
    on_error: str = field(default="raise", metadata={"help": "malformed records: raise or skip (counted)"})
    allow_images_outside_root: bool = field(
        default=False,
        metadata={"help": "let image paths of the data resolve outside image_folder (default: refused)"},
    )
    num_latent_steps: int | None = field(default=None, metadata={"help": "K for the latent slots (stage I: 0)"})
    max_answer_length: int | None = field(default=None)
    # Not in the paper, which takes T (Eq. 6) from the whole rationale: a cap on the extra LM pass over long
    # rationales; 512 keeps rationales of a few hundred tokens whole (benchmarks/bench_rationale_length.py).
    max_rationale_length: int | None = field(
        default=512,
        metadata={
            "help": "rationale tokens whose LM hidden states T enter L_Z<->T (Eq. 6) and whose prefix L_text (Eq. 8) "
            "reconstructs; longer rationales are cut (not in the paper, which uses the whole rationale; None: no cut)"
        },
    )
    max_train_samples: int | None = field(default=None)
    response_format: str = field(
        default="reasoning",
        metadata={
            "help": "what the model learns to generate: 'reasoning' (the paper: rationale, then 'Answer: ...'; the "
            "bare answer for records without a rationale) or 'answer' (the bare answer; not in the paper)"
        },
    )


@dataclass
class LaReTrainingArguments(TrainingArguments):
    projector_lr: float | None = field(default=None, metadata={"help": "learning rate of the projector"})
    latent_lr: float | None = field(default=None, metadata={"help": "learning rate of Extractor, U-Net and heads"})
    language_model_lr: float | None = field(default=None, metadata={"help": "learning rate of the LLM"})
    resume: bool = field(default=False, metadata={"help": "continue from the last complete checkpoint in output_dir"})
    overwrite: bool = field(
        default=False, metadata={"help": "write into an output_dir that already holds a model or checkpoints"}
    )

    def module_learning_rates(self) -> dict[str, float]:
        rates = {"projector": self.projector_lr, "latent": self.latent_lr, "language_model": self.language_model_lr}
        return {group: rate for group, rate in rates.items() if rate is not None}


ARGUMENT_CLASSES = (LaReModelArguments, LaReDataArguments, LaReTrainingArguments)


def yaml_to_argv(recipe: dict[str, Any]) -> list[str]:
    """Turn a recipe mapping into `--key value` arguments (lists become repeated values)."""
    argv: list[str] = []
    for key, value in recipe.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            argv += [f"--{key}", *map(str, value)]
        elif isinstance(value, dict):
            import json

            argv += [f"--{key}", json.dumps(value)]
        else:
            argv += [f"--{key}", str(value)]
    return argv


def parse_train_arguments(
    config_file: str | None, overrides: list[str] | None = None
) -> tuple[LaReModelArguments, LaReDataArguments, LaReTrainingArguments]:
    """Recipe YAML first, command-line `--key value` overrides after it (later wins)."""
    recipe: dict[str, Any] = {}
    if config_file is not None:
        path = resolve_recipe(config_file)
        recipe = yaml.safe_load(path.read_text()) or {}
        if not isinstance(recipe, dict):
            raise ValueError(f"Recipe {config_file} must be a mapping of argument names to values.")
    parser = HfArgumentParser(ARGUMENT_CLASSES)
    known = {action.dest for action in parser._actions} - {"help"}
    check_known_keys(recipe, known, f"key in recipe {config_file}:", "Fix the key or remove it from the recipe.")
    flags = [item[2:].split("=", 1)[0] for item in overrides or [] if item.startswith("--")]
    check_known_keys(flags, known, "lare train argument", "Fix the --key (recipe keys and TrainingArguments fields).")
    argv = resolve_deepspeed_config(yaml_to_argv(recipe) + list(overrides or []))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    return model_args, data_args, with_lare_fsdp_policy(training_args, model_args.model_name_or_path)


# DeepSpeed configs shipped with the package (Trainer-style, "auto" values filled from TrainingArguments): `lare
# train --deepspeed zero3`. Not in the paper, which does not say how its 8-GPU training is sharded.
PACKAGED_DEEPSPEED_CONFIGS = ("zero2", "zero3")


def resolve_deepspeed_config(argv: list[str]) -> list[str]:
    """`--deepspeed zero2|zero3` -> the packaged config file (a path the user gave is kept); refuses DeepSpeed
    options when DeepSpeed is not installed, naming the fix."""
    argv = list(argv)
    for index, item in enumerate(argv):
        if item.split("=", 1)[0] != "--deepspeed":
            continue
        value_index = index if "=" in item else index + 1
        value = item.split("=", 1)[1] if "=" in item else (argv[index + 1] if index + 1 < len(argv) else None)
        if value is None:
            raise ValueError("--deepspeed needs a value: zero2, zero3 or the path of a DeepSpeed JSON config.")
        if value in PACKAGED_DEEPSPEED_CONFIGS and not Path(value).exists():
            value = str(packaged_configs_dir() / "deepspeed" / f"{value}.json")
            argv[value_index] = f"--deepspeed={value}" if "=" in item else value
        if importlib.util.find_spec("deepspeed") is None:
            raise ImportError(
                f"--deepspeed {value} needs DeepSpeed, which is not installed: `pip install deepspeed` (it builds "
                "its ops on first use; see docs/training.md, 'Sharded training'), or train with --fsdp."
            )
    return argv


def with_lare_fsdp_policy(training_args: LaReTrainingArguments, model_name_or_path: str) -> LaReTrainingArguments:
    """With `--fsdp` (Trainer's FSDP through accelerate's `FullyShardedDataParallelPlugin`): FSDP2 with the wrap
    policy of `training.fsdp.apply_fsdp2` (`transformer_layer_cls_to_wrap` = `fsdp_layer_class_names` of the
    checkpoint), full resharding after forward and a full state dict on save, unless `--fsdp_config` sets them.
    Not in the paper. accelerate falls back to DDP on CPU (`use_cpu`): FSDP needs GPUs."""
    if not training_args.fsdp:
        return training_args
    fsdp_config = dict(training_args.fsdp_config or {})
    if not fsdp_config.get("transformer_layer_cls_to_wrap"):
        from .fsdp import fsdp_layer_class_names

        fsdp_config["transformer_layer_cls_to_wrap"] = fsdp_layer_class_names(model_name_or_path)
    fsdp_config.setdefault("version", 2)
    fsdp_config.setdefault("reshard_after_forward", True)
    fsdp_config.setdefault("state_dict_type", "FULL_STATE_DICT")
    return dataclasses.replace(training_args, fsdp=True, fsdp_config=fsdp_config)


__all__ = [
    "PACKAGED_DEEPSPEED_CONFIGS",
    "LaReDataArguments",
    "LaReModelArguments",
    "LaReTrainingArguments",
    "parse_train_arguments",
    "resolve_deepspeed_config",
    "with_lare_fsdp_policy",
    "yaml_to_argv",
]
