"""Batch normalised examples (see `lare_hf.data.formats`) into model inputs with `LaReProcessor`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

EXPLICIT_COT_TEMPLATE = "{rationale}\nAnswer: {answer}"

# The normalised example's columns the collator reads (Trainer must not remove them).
DATA_COLUMNS = ("messages", "answer", "rationale", "image", "id")


def _example_id(feature: dict[str, Any], position: int) -> str:
    return str(feature.get("id") if feature.get("id") is not None else f"batch position {position}")


@dataclass
class LaReDataCollator:
    """Collate examples `{"messages", "answer", "rationale", "image", "id"}` for `Trainer`.

    Calls `processor.build_training_inputs` and returns its tensors as a dict: input_ids, attention_mask, labels
    (-100 everywhere but the answer), pixel_values when the batch has images, rationale_input_ids /
    rationale_attention_mask when `with_rationale` is True.

    Args:
        processor: a `LaReProcessor`.
        num_latent_steps: K latent steps written into each sequence (None: the processor's default; 0: no latent
            slots, stage I / plain baseline).
        with_rationale: pass the rationales (for the latent losses); an example without one is an error.
        max_answer_length, max_rationale_length: truncation lengths in tokens (None: no truncation).
        rationale_in_answer: explicit chain-of-thought baseline: the target is "{rationale}\\nAnswer: {answer}" and
            no rationale tensors are produced (`with_rationale` is ignored).

    Batches are all-image or all-text: a batch mixing examples with and without an image raises (the model takes
    one image per prompt with an image placeholder); text-only batches are passed with images=None.
    """

    processor: Any
    num_latent_steps: int | None = None
    with_rationale: bool = True
    max_answer_length: int | None = None
    max_rationale_length: int | None = None
    rationale_in_answer: bool = False

    def _rationales(self, features: list[dict[str, Any]], why: str) -> list[str]:
        rationales = []
        for position, feature in enumerate(features):
            rationale = feature.get("rationale")
            if not isinstance(rationale, str) or not rationale.strip():
                raise ValueError(
                    f"Example {_example_id(feature, position)!r} has no rationale, but {why}. Fix the data (give "
                    "every record a 'rationale'), or pass with_rationale=False (and rationale_in_answer=False) for "
                    "a stage that does not use rationales."
                )
            rationales.append(rationale)
        return rationales

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("LaReDataCollator got an empty batch.")
        for position, feature in enumerate(features):
            missing = [key for key in ("messages", "answer") if key not in feature]
            if len(missing) == 2:
                raise ValueError(
                    f"Example {_example_id(feature, position)!r} reached LaReDataCollator without its data columns "
                    f"(it has only {sorted(feature)}): Trainer's remove_unused_columns=True (the default) dropped "
                    "every column the model's forward() does not name, e.g. 'messages' and 'answer'. Pass "
                    "TrainingArguments(remove_unused_columns=False), or use lare_hf.training.LaReTrainer, which "
                    "keeps the collator's columns."
                )
            if missing:
                raise ValueError(
                    f"Example {_example_id(feature, position)!r} lacks {missing}: the collator takes the normalised "
                    "examples of lare_hf.data.formats.load_records / records_from_dataset."
                )
        prompts = [feature["messages"] for feature in features]
        answers = [str(feature["answer"]) for feature in features]
        rationales = None
        if self.rationale_in_answer:
            explicit = self._rationales(features, "rationale_in_answer=True trains on 'rationale + answer'")
            answers = [
                EXPLICIT_COT_TEMPLATE.format(rationale=rationale.strip(), answer=answer)
                for rationale, answer in zip(explicit, answers)
            ]
        elif self.with_rationale:
            rationales = self._rationales(features, "with_rationale=True (this stage's latent losses need it)")

        with_image = [feature.get("image") is not None for feature in features]
        if all(with_image):
            images = [feature["image"] for feature in features]
        elif not any(with_image):
            images = None
        else:
            have = [_example_id(f, i) for i, f in enumerate(features) if f.get("image") is not None]
            lack = [_example_id(f, i) for i, f in enumerate(features) if f.get("image") is None]
            raise ValueError(
                f"Batch mixes examples with an image ({have[:5]}) and text-only examples ({lack[:5]}); the model "
                "takes one image per prompt with an image placeholder. Keep image and text-only data in separate "
                "datasets (or stages), or batch them separately."
            )

        batch = self.processor.build_training_inputs(
            prompts=prompts,
            answers=answers,
            images=images,
            rationales=rationales,
            num_latent_steps=self.num_latent_steps,
            max_answer_length=self.max_answer_length,
            max_rationale_length=self.max_rationale_length,
        )
        return dict(batch)


__all__ = ["DATA_COLUMNS", "EXPLICIT_COT_TEMPLATE", "LaReDataCollator"]
