"""The four training stages on Trainer (Appendix A-B)."""

from .arguments import LaReDataArguments, LaReModelArguments, LaReTrainingArguments, parse_train_arguments
from .run import merge_lora, run_all, run_stage
from .trainer import (
    STAGE_TRAINERS,
    LaReTrainer,
    StageIAlignmentTrainer,
    StageIIIInstructionTrainer,
    StageIILatentAlignmentTrainer,
    StageIVReasoningTrainer,
)

__all__ = [
    "STAGE_TRAINERS",
    "LaReDataArguments",
    "LaReModelArguments",
    "LaReTrainer",
    "LaReTrainingArguments",
    "StageIAlignmentTrainer",
    "StageIIIInstructionTrainer",
    "StageIILatentAlignmentTrainer",
    "StageIVReasoningTrainer",
    "merge_lora",
    "parse_train_arguments",
    "run_all",
    "run_stage",
]
